"""Which other ranks are still alive, for a rank that waits on them outside any collective.

A checkpoint commits only when every rank has uploaded its files, and that wait happens in
a background thread with no collective to fail when a rank dies: without this, rank 0 waits
for a killed rank's upload until its retry budget runs out, holding up the group's restart.
Each rank publishes `host pid beat` in the job's rendezvous store and bumps `beat` every
second. A peer on the same host is dead when its process is (seen at once); a peer on
another host when its beat has not moved for `stale_s`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)


class Peers:
    """Publishes this rank's liveness and answers which of the given ranks are gone."""

    def __init__(self, store, rank: int, *, period_s: float = 1.0, stale_s: float = 10.0):
        self._store, self.rank = store, rank
        self.period_s, self.stale_s = period_s, stale_s
        self._host, self._pid, self._beat = socket.gethostname(), os.getpid(), 0
        self._lock = threading.Lock()  # one store client, two threads (beat and checks)
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (last value, when it last changed)

    @classmethod
    def from_env(cls, restart_count: int, **kwargs) -> Peers | None:
        """A client of the rendezvous store torchrun (or the operator) set up; None without one."""
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=10))
        except (KeyError, ValueError, RuntimeError) as exc:
            log.warning("peer liveness off (no rendezvous store: %s); waits on other ranks use their deadlines", exc)
            return None
        rank = int(os.environ.get("RANK", 0))
        return cls(dist.PrefixStore(f"ps3/attempt-{restart_count}/peers", store), rank, **kwargs).start()

    def start(self) -> Peers:
        self._publish()
        threading.Thread(target=self._beat_forever, name="ps3-peer-beat", daemon=True).start()
        return self

    def gone(self, ranks) -> list[int]:
        """Those of `ranks` known to be dead; a rank that cannot be told stays presumed alive."""
        return [r for r in ranks if r != self.rank and self._is_gone(r)]

    def _publish(self) -> None:
        self._beat += 1
        with self._lock:
            self._store.set(str(self.rank), f"{self._host} {self._pid} {self._beat}")

    def _beat_forever(self) -> None:
        while True:
            time.sleep(self.period_s)
            try:
                self._publish()
            except Exception as exc:  # noqa: BLE001 - the store went away: nothing left to tell
                log.debug("peer beat stopped: %s", exc)
                return

    def _is_gone(self, rank: int) -> bool:
        key = str(rank)
        try:
            with self._lock:
                if not self._store.check([key]):
                    return False  # not started yet
                value = self._store.get(key).decode()
        except Exception:  # noqa: BLE001 - cannot tell
            return False
        host, pid, _ = value.split()
        if host == self._host:
            return not _process_alive(int(pid))
        now = time.monotonic()
        last, since = self._seen.get(rank, (None, now))
        if value != last:
            self._seen[rank] = (value, now)
            return False
        return now - since > self.stale_s


def _process_alive(pid: int) -> bool:
    """True for a running process; False for one that is gone or a zombie (killed, not yet reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
