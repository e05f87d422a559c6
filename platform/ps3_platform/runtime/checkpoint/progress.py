"""The progress record rank 0 keeps beside the checkpoints (what `platformctl status` reads on a
cluster), written by one background thread so a hanging store never holds up a step.
"""

from __future__ import annotations

import json
import logging
import threading

from ..restart import PROGRESS

log = logging.getLogger(__name__)


class ProgressRecords:
    """Checkpointer's progress record and small JSON reads (state set up by `Checkpointer.__init__`)."""

    # ---- progress (what a restart lost) -------------------------------------------------
    def write_progress(self, record: dict) -> None:
        """Leave this attempt's progress beside the checkpoints (rank 0, at log intervals).

        In the background and best effort: a store that hangs must not hold up training
        steps (or a stop). One writer thread writes the newest record, so records that
        arrive while a write is in flight replace each other and the last one always lands
        (`flush_progress`); a failed write is logged and costs only how fresh `status` and
        the next restart's lost-steps figure are."""
        with self._progress_lock:
            self._progress_pending = json.dumps(record).encode()
            if self._progress_thread is None:
                self._progress_thread = threading.Thread(target=self._write_progress, name="ps3-progress",
                                                         daemon=True)
                self._progress_thread.start()

    def flush_progress(self, timeout_s: float = 5.0) -> None:
        """Wait (a little) for the last progress record to land: at the end of a stage."""
        thread = self._progress_thread
        if thread is not None:
            thread.join(timeout_s)

    def _write_progress(self) -> None:
        while True:
            with self._progress_lock:
                data, self._progress_pending = self._progress_pending, None
                if data is None:
                    self._progress_thread = None
                    return
            try:
                if self.location.is_local:
                    self.location.fs.makedirs(self.location.root, exist_ok=True)
                self.location.fs.pipe_file(self.location.path(PROGRESS), data)
            except Exception as exc:  # noqa: BLE001 - any storage error; training goes on
                log.warning("could not write %s: %s", self.location.url_of(PROGRESS), exc)

    def read_progress(self) -> dict | None:
        """The previous attempt's last progress record, if it left one."""
        record = self._read_json(self.location.path(PROGRESS))
        return record if isinstance(record, dict) else None

    def _read_json(self, path: str) -> dict | None:
        """A small JSON object, or None if it is absent, unreadable or the store is down (polling)."""
        try:
            return json.loads(self.location.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a poll: the caller's deadline bounds it
            log.debug("reading %s failed: %s", path, exc)
            self._record_trouble(f"poll of {path.rsplit('/', 1)[-1]}", exc)
            return None
