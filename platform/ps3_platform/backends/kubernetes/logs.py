"""Pod log streams -> lines, and several followed pods merged into one iterator.

`kubectl logs -f` over a selector follows every pod concurrently; here each followed pod
gets a reader thread that puts whole lines on one queue, so a quiet rank never blocks a
chatty one and lines are never cut in half (chunks from the API server split anywhere).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

_DONE = object()


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Reassemble lines from arbitrary byte chunks (a final unterminated line is kept)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace") + "\n"
    if pending:
        yield pending.decode(errors="replace") + "\n"


def prefixed(lines: Iterable[str], prefix: str) -> Iterator[str]:
    for line in lines:
        yield f"{prefix}{line}" if prefix else line


def follow_streams(streams: list[tuple[str, object]]) -> Iterator[str]:
    """Follow several open log responses at once; `streams` are (line prefix, response).

    Ends when every stream has ended (their containers exited). Closing the generator
    (Ctrl-C in the CLI) closes the responses so the reader threads finish.
    """
    lines: queue.Queue = queue.Queue()

    def read(prefix: str, response) -> None:
        try:
            for line in split_lines(response.stream(4096)):
                lines.put(f"{prefix}{line}")
        except Exception as exc:  # noqa: BLE001 - reported in-band, the other streams go on
            lines.put(f"{prefix}error: log stream broke: {exc}\n")
        finally:
            lines.put(_DONE)

    threads = [threading.Thread(target=read, args=item, daemon=True) for item in streams]
    for thread in threads:
        thread.start()
    open_streams = len(threads)
    try:
        while open_streams:
            item = lines.get()
            if item is _DONE:
                open_streams -= 1
            else:
                yield item
    finally:
        for _, response in streams:
            response.release_conn()
            response.close()
