"""The state store's writer thread: the loop hands rows over, one thread of its own writes them.

A ``StoreThread`` is a ``StateStore`` (hbd.state_store) whose ``flush`` and ``close`` hand the
writing to a thread of its own. Queueing
(``put_peer``, ``add_change``, ``alive`` ...) is the store's own: O(1) under its lock, on the loop's
thread. ``flush()`` only wakes the writer and returns at once; the writer takes a bounded batch from
the queues (under the lock: the loop waits for it at most that long, ``longest_wait``), then runs the
transaction, the WAL checkpoints and the pruning without it. Python's sqlite3 lets go of the GIL while
SQLite works, so no loop turn waits on the disk: a checkpoint's fsync, a reader holding the lock, a
slow disk only make the queues longer, and the queues are bounded (the oldest change dropped and
counted, as always).

What stays as it was: a batch is one transaction (``MAX_ROWS``); the loop wakes the writer every
``FLUSH_INTERVAL`` (hbd.store_writer), so after ``kill -9`` at most about that much is missing; a write
error stops the store for good and the loop logs why, once (``take_messages``); ``close`` writes what
is still queued within ``CLOSE_SECONDS`` and closes the file, waiting for the writer a moment more.

The first ``flush()`` (before the loop runs: the run's row must be on file before the server
listens) writes on the caller's thread, then starts the writer. The writer blocks every signal: they
are the loop's, and an interrupted fsync is nobody's business.
"""

from __future__ import annotations

import threading
import time

from hbd.early import start_quiet
from hbd.state_store import CLOSE_SECONDS, MAX_ROWS, StateStore
from hbd.store_file import StoreFile

IDLE_WAKE = 1.0  # the writer looks at the queues at least this often, woken or not
BUSY_PAUSE = 0.01  # after a step put off by another connection's lock
JOIN_SLACK = 1.0  # close() waits this much longer than CLOSE_SECONDS for the writer to finish


class StoreThread(StateStore):
    """A StateStore written by a thread of its own (``StoreThread.open(...)``); see the module docstring."""

    def __init__(self, file: StoreFile, notice: str | None, max_changes: int) -> None:
        super().__init__(file, notice, max_changes)
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._closing: list[str] = []  # what close() has to say itself

    # -- the loop's side: queueing is the StateStore's, O(1) under its lock --

    def take_messages(self) -> list[str]:
        out, self._closing = self._closing, []
        return super().take_messages() + out

    def flush(self, max_rows: int = MAX_ROWS) -> bool:
        """Wake the writer; never more for the loop to do here (False). The first call writes a step
        on the caller's thread and starts the writer."""
        if self._thread is None:
            self._step(max_rows)
            self._start()
        else:
            self._wake.set()
        return False

    def close(self) -> None:
        """Write what is still queued and close (blocking: at shutdown, after the loop; at most about
        CLOSE_SECONDS + JOIN_SLACK)."""
        thread = self._thread
        if thread is None:
            super().close()
            return
        self._stopping = True
        self._wake.set()
        thread.join(CLOSE_SECONDS + JOIN_SLACK)
        if thread.is_alive():  # stuck in the disk: it is a daemon thread, the process may end without it
            self._closing.append(
                f"state store: the writer did not finish within {CLOSE_SECONDS + JOIN_SLACK:g} s"
                f" (the disk does not answer); {self.pending()} rows may be lost"
            )

    # -- the writer --

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="hbd state store", daemon=True)
        start_quiet(thread)  # signals are the loop's
        self._thread = thread

    def _run(self) -> None:
        while not self._stopping and self.failed is None:
            self._wake.wait(IDLE_WAKE)
            self._wake.clear()
            self._drain()
        super().close()  # what is still queued, within CLOSE_SECONDS; then the file is closed

    def _drain(self) -> None:
        """Write until the queues are empty (a batch per transaction), the store fails, or close() is
        called (then the store's close writes the rest)."""
        while not self._stopping:
            busy = self.busy
            if not self._step(MAX_ROWS) or self.failed is not None:
                return
            if self.busy > busy:
                time.sleep(BUSY_PAUSE)  # another connection holds the write lock: let it finish
