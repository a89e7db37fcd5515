"""The state store: what a daemon remembers across restarts, in one SQLite file (stdlib ``sqlite3``, WAL).

The server's ``<state_dir>/state.db`` (mode 0640) holds the peers the registry knows, the silences,
and every state change (the history, issue 13); the client's ``<state_dir>/client.db``
(CLIENT_DB_NAME) the state changes of its server links. An operator may query them with ``sqlite3
-readonly``; ``hbd history`` reads them the same way while the daemon writes (WAL: readers never wait
for the writer, nor it for them).

The daemons write it from a thread of their own (hbd.store_thread.StoreThread, a StateStore whose
``flush`` wakes that thread): the event loop only queues, and never waits on the disk. The queues and
the run's row are shared under a lock that the writer holds only while it takes a batch (never while
SQLite works). Used from one thread (tests, tools), a StateStore writes on that thread:

- ``put_peer``/``forget_peer``/``put_silence``/``drop_silence``/``add_change`` only queue (O(1), no I/O).
  Peers and silences are coalesced by name (the newest record of a name is the only one written), so
  their queues hold at most one entry per name; changes are capped (``max_changes``): when full, the
  oldest is dropped and counted (``dropped_changes``).
- ``start_run(now)`` and ``alive(now)`` (every few seconds) record when the daemon ran, one row per
  run in ``runs``: ``hbd history`` shows the time outside every run as unknown. Also O(1).
- ``flush(max_rows)`` writes at most ``max_rows`` rows in one transaction and says whether more remain
  (then call it again). MAX_ROWS keeps one transaction short (a few ms; see docs/performance.md,
  bench/store_flush.py), so that the writer takes the queues' lock often and briefly.
- The WAL is checkpointed by ``flush`` itself, as a step of its own (``wal_autocheckpoint`` would do it
  inside whichever commit crossed the threshold, stretching that one call).

Durability: ``synchronous=NORMAL`` in WAL mode: a committed flush survives the process being killed
(``kill -9``, a crash, the watchdog); a power cut may lose the last commits, never the file's
consistency. What was only queued is lost with the process: at most the last flush interval.

Failures: ``open`` raises ``StoreError`` with a reason an operator can act on (a missing or read-only
directory, a file written by a newer hbd). A corrupt file is moved aside to
``state.db.corrupt-<UTC timestamp>`` and a new store started; ``notice`` says so. After ``open`` nothing
raises: a write error (disk full, I/O error, the file made read-only) sets ``failed`` to the reason,
closes the database and drops the queues; every later call is a no-op. ``take_messages()`` hands each
notice and failure to the daemon exactly once, to log.

``open`` (blocking, before the loop runs) checks the whole file (``PRAGMA quick_check``: 0.2-0.5 s for a
million history rows). ``close`` turns the file back to a rollback journal, so that a reader who may
read state.db but not create its -shm (group _hbd, ``hbd history``) can open a stopped daemon's store
with ``?mode=ro``; the next ``open`` makes it WAL again.

The schema's version is the file's ``PRAGMA user_version``; an older file is brought up to
SCHEMA_VERSION step by step (each step in the same transaction as its version bump), the steps
(``_STEPS``) handed down to the file at ``open``.

Three rooms, each handed what it needs: hbd.store_records (the records), hbd.store_queues (the bounded
queues, pure), hbd.store_file (the SQLite file). ``StateStore`` wires them, says what to log, and turns
any write error into ``failed``. The records and StoreError (from hbd.errors) are importable from here.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Self

from hbd.errors import StoreError
from hbd.store_file import CLIENT_DB_NAME as CLIENT_DB_NAME
from hbd.store_file import DB_NAME as DB_NAME
from hbd.store_file import SCHEMA_VERSION as SCHEMA_VERSION
from hbd.store_file import STEPS as _STEPS
from hbd.store_file import StoreFile
from hbd.store_queues import StoreQueues
from hbd.store_records import ChangeRecord, PeerRecord, SilenceRecord, Snapshot

# Rows written per flush() call (a transaction): at 500, the longest call of a 19,000-peer mass
# disconnect took 5-6 ms on the quiet 2-core reference machine, up to 17 ms loaded, more with its
# cores oversubscribed (bench/store_flush.py; docs/performance.md). The writer thread runs them.
MAX_ROWS = 500
# Queue bounds. Peers and silences are coalesced by name, so these only matter if the registry's own
# bound (max_peers, plus the expected peers) failed; changes come at the rate peers change state.
MAX_QUEUED_NAMES = 200_000  # read at each put
CLOSE_SECONDS = 5.0  # close() gives up writing the queues after this long (a lock held by someone else)
MAX_CHANGES = 100_000


__all__ = ["ChangeRecord", "PeerRecord", "SilenceRecord", "Snapshot", "StateStore", "StoreError"]


class _TimedLock:
    """A lock that keeps how long its longest contended wait took (the loop's share of the writer thread)."""

    __slots__ = ("lock", "longest_wait")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.longest_wait = 0.0  # perf counter seconds

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):  # the writer thread is taking a batch: a short wait
            started = time.perf_counter()
            self.lock.acquire()
            self.longest_wait = max(self.longest_wait, time.perf_counter() - started)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class StateStore:
    """Queues records from the loop and writes them in bounded batches; see the module docstring."""

    def __init__(self, file: StoreFile, notice: str | None, max_changes: int) -> None:
        self._file = file
        self._queues = StoreQueues(max_changes)
        self.path = file.path
        self.notice = notice  # set when a corrupt file was moved aside at open
        self.failed: str | None = None
        self._messages: list[str] = [notice] if notice else []
        # Held by whoever touches the queues, the run's row or the messages: the loop queueing, the
        # writer thread taking a batch (hbd.store_thread). Never held while SQLite works.
        self._guard = _TimedLock()
        self._lock = self._guard.lock  # the writer's side: not timed

    @classmethod
    def open(
        cls,
        state_dir: str,
        *,
        file: str = DB_NAME,
        max_changes: int = MAX_CHANGES,
        wall: Callable[[], float] = time.time,
    ) -> Self:
        """Open (or create) ``<state_dir>/<file>`` (the server's state.db, the client's CLIENT_DB_NAME).
        Blocking: call it before the loop runs.

        Raises StoreError with the reason when the store cannot be used. A corrupt file is moved aside
        and a new store started: then ``notice`` (and the first ``take_messages()``) says so.
        """
        store_file, notice = StoreFile.open(state_dir, wall, _STEPS, file)
        return cls(store_file, notice, max_changes)

    # -- counters --

    @property
    def longest_wait(self) -> float:
        """The longest the queueing side (the loop) waited for the writer to let go of the queues (seconds)."""
        return self._guard.longest_wait

    @property
    def dropped_changes(self) -> int:
        """Oldest changes dropped because the queue was full."""
        return self._queues.dropped_changes

    @property
    def dropped_names(self) -> int:
        """Peer/silence updates dropped because their queue was full."""
        return self._queues.dropped_names

    @property
    def rows_written(self) -> int:
        return self._file.rows_written

    @property
    def busy(self) -> int:
        """Flushes put off because another connection held the write lock."""
        return self._file.busy

    @property
    def checkpoints(self) -> int:
        return self._file.checkpoints

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The open connection (None once closed or failed), for tests that look at the file's mode."""
        return self._file.conn

    # -- reading (at start-up, before the loop runs) --

    def load(self) -> Snapshot:
        """Everything remembered: the peers and the silences (empty if the store has failed)."""
        try:
            snapshot, bad = self._file.read()
        except sqlite3.Error as e:
            self._fail(f"cannot read {self.path}: {e}")
            return Snapshot([], [])
        if bad:  # a hand-edited row: what it said cannot be trusted, the rest can
            self._messages.append(f"{self.path}: skipped {bad} rows with values of the wrong type")
        return snapshot

    # -- queueing: O(1), no I/O --

    def put_peer(self, rec: PeerRecord) -> None:
        if self._file.conn is not None:
            with self._guard:
                self._said_dropped_name(self._queues.put_peer(rec.name, rec, MAX_QUEUED_NAMES))

    def forget_peer(self, name: str) -> None:
        if self._file.conn is not None:
            with self._guard:
                self._said_dropped_name(self._queues.put_peer(name, None, MAX_QUEUED_NAMES))

    def put_silence(self, rec: SilenceRecord) -> None:
        if self._file.conn is not None:
            with self._guard:
                self._said_dropped_name(self._queues.put_silence(rec.name, rec, MAX_QUEUED_NAMES))

    def drop_silence(self, name: str) -> None:
        if self._file.conn is not None:
            with self._guard:
                self._said_dropped_name(self._queues.put_silence(name, None, MAX_QUEUED_NAMES))

    def add_change(self, rec: ChangeRecord) -> None:
        if self._file.conn is None:
            return
        with self._guard:
            if not self._queues.add_change(rec) and self._queues.dropped_changes == 1:
                self._messages.append(
                    f"state store: {self._queues.max_changes} changes wait to be written; dropping the oldest"
                    " (counted in dropped_changes)"
                )

    def prune_changes(self, before: float) -> None:
        """Delete the changes older than ``before`` (wall clock), a batch per flush() (history retention)."""
        if self._file.conn is not None:
            with self._guard:
                self._file.prune_before = before

    def start_run(self, now: float) -> None:
        """This daemon's run begins at ``now`` (wall clock): a new row in ``runs``, written by the next
        flush(). ``hbd history`` counts the time outside every run as unknown."""
        if self._file.conn is not None:
            with self._guard:
                self._file.start_run(now)

    def alive(self, now: float) -> None:
        """The daemon is alive at ``now`` (wall clock). Call it every few seconds, and once more just
        before close(). O(1): the next flush() writes the newest value to the run's row (one row however
        often it is called). Without start_run(), the run starts here."""
        if self._file.conn is not None:
            with self._guard:
                self._file.alive(now)

    def pending(self) -> int:
        """Rows waiting to be written (not counting a pending prune)."""
        with self._guard:
            return self._file.pending(self._queues)

    def take_messages(self) -> list[str]:
        """What the daemon should log, each message once: the corrupt-file notice, the first drop from a
        full queue, the failure."""
        with self._guard:
            out, self._messages = self._messages, []
        return out

    def _said_dropped_name(self, queued: bool) -> None:
        if not queued and self._queues.dropped_names == 1:
            self._messages.append(
                f"state store: {MAX_QUEUED_NAMES} names wait to be written; dropping updates of new ones"
                " (counted in dropped_names)"
            )

    # -- writing --

    def flush(self, max_rows: int = MAX_ROWS) -> bool:
        """Write up to ``max_rows`` queued rows in one transaction; True if more remain (call again soon).

        One call is one bounded step: a batch of rows, or a WAL checkpoint, or a batch of pruning. A write
        error sets ``failed`` (see the module docstring); this never raises.
        """
        return self._step(max_rows)

    def _step(self, max_rows: int) -> bool:
        """flush() itself, on whichever thread writes (hbd.store_thread overrides flush, not this)."""
        if self._file.conn is None:
            return False
        try:
            return self._file.step(self._queues, max_rows, self._lock)
        except Exception as e:  # nothing raises into the loop: a store that cannot write stops, and says why
            self._fail(f"cannot write {self.path}: {e}" if isinstance(e, sqlite3.Error) else f"{self.path}: {e!r}")
            return False

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        with self._lock:
            self._messages.append(f"state store stopped: {reason}; nothing more is written until restart")
            self._queues.clear()
        self._file.abandon()

    def close(self) -> None:
        """Write everything still queued, then close (blocking: at shutdown, after the loop)."""
        deadline = time.monotonic() + CLOSE_SECONDS
        while self._file.conn is not None and self.pending() and time.monotonic() < deadline:
            busy = self.busy
            self._step(MAX_ROWS * 10)
            if self.busy > busy:
                time.sleep(0.01)  # someone else holds the write lock
        if unwritten := self.pending():
            with self._lock:
                self._messages.append(f"state store closed with {unwritten} rows unwritten (the file stayed locked)")
        try:
            self._file.close()
        except sqlite3.Error as e:
            self._fail(f"cannot close {self.path}: {e}")
