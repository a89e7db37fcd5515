"""The state store: what the server remembers across restarts, in one SQLite file (stdlib ``sqlite3``, WAL).

``<state_dir>/state.db`` (mode 0640) holds the peers the registry knows, the silences, and every state
change (the history, issue 13). An operator may query it with ``sqlite3 -readonly``; ``hbd history``
reads it the same way while the daemon writes (WAL: readers never wait for the writer, nor it for them).

The event loop never waits on the disk for more than a few milliseconds:

- ``put_peer``/``forget_peer``/``put_silence``/``drop_silence``/``add_change`` only queue (O(1), no I/O).
  Peers and silences are coalesced by name (the newest record of a name is the only one written), so
  their queues hold at most one entry per name; changes are capped (``max_changes``): when full, the
  oldest is dropped and counted (``dropped_changes``).
- ``start_run(now)`` and ``alive(now)`` (every few seconds) record when the daemon ran, one row per
  run in ``runs``: ``hbd history`` shows the time outside every run as unknown. Also O(1).
- ``flush(max_rows)``, called from a loop timer a few times per second, writes at most ``max_rows`` rows
  in one transaction and says whether more remain (then call it again soon, say on the next loop turn).
  MAX_ROWS is sized so that one call stays well under 20 ms on the reference machine (see
  docs/performance.md, bench/store_flush.py).
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

The schema's version is the file's ``PRAGMA user_version``; ``_upgrade`` brings an older file up to
SCHEMA_VERSION step by step (each step in the same transaction as its version bump).
This module imports nothing from hbd but the errors (``StoreError`` lives in hbd.errors, importable here too).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from hbd.errors import StoreError

DB_NAME = "state.db"
SCHEMA_VERSION = 2
FILE_MODE = 0o640
DIR_MODE = 0o750
# Rows written per flush() call: at 500, the longest call of a 19,000-peer mass disconnect took
# 5-6 ms on the quiet 2-core reference machine, up to 17 ms loaded, more with its cores oversubscribed
# (bench/store_flush.py; docs/performance.md).
MAX_ROWS = 500
# How long a write may wait for another connection's lock (a reader's checkpoint, an `sqlite3` shell
# holding a write transaction): short, the loop is waiting. Past it, flush() tries again next time.
BUSY_TIMEOUT_MS = 5
OPEN_TIMEOUT = 2.0  # open() runs before the loop: it may wait this long for a reader to let go
# Checkpoint the WAL into the database once it holds this many pages (4 KiB each), in a flush() step of
# its own; the WAL file is truncated back to JOURNAL_LIMIT after a checkpoint.
CHECKPOINT_PAGES = 256
JOURNAL_LIMIT = 4 * 1024 * 1024
# Queue bounds. Peers and silences are coalesced by name, so these only matter if the registry's own
# bound (max_peers, plus the expected peers) failed; changes come at the rate peers change state.
MAX_QUEUED_NAMES = 200_000
CLOSE_SECONDS = 5.0  # close() gives up writing the queues after this long (a lock held by someone else)
MAX_CHANGES = 100_000

# SQLite's primary result codes (the low byte of an extended code) that mean the file is not sound.
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED


__all__ = ["ChangeRecord", "PeerRecord", "SilenceRecord", "Snapshot", "StateStore", "StoreError"]


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One peer the registry remembers. Times are wall clock (epoch seconds)."""

    name: str
    address: str
    state: str  # view.PEER_STATES
    since: float
    last_ping: float | None
    reason: str
    expected: bool
    timeout: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SilenceRecord:
    name: str
    until: float  # wall clock
    reason: str
    created: float  # wall clock


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One state change, for the history (issue 13)."""

    time: float  # wall clock
    peer: str
    old: str
    new: str
    reason: str
    side: str = "server"  # or "client": a client's server links


_R = TypeVar("_R", PeerRecord, SilenceRecord)


@dataclass(frozen=True, slots=True)
class Snapshot:
    peers: list[PeerRecord]
    silences: list[SilenceRecord]


# Each step takes the file from version i to i + 1 (index i). Add steps; never edit a released one.
# `changes` has no index but its id: appends and pruning touch only the two ends of its b-tree (an index
# on peer would cost a random page per row written or pruned; a history query scans, in its own process).
_STEPS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE peers (
            name TEXT PRIMARY KEY, address TEXT, state TEXT, since REAL, last_ping REAL NULL,
            reason TEXT, expected INTEGER, timeout REAL, labels TEXT)""",
        "CREATE TABLE silences (name TEXT PRIMARY KEY, until REAL, reason TEXT, created REAL)",
        """CREATE TABLE changes (
            id INTEGER PRIMARY KEY, time REAL, peer TEXT, old TEXT, new TEXT, reason TEXT, side TEXT)""",
    ),
    # 2 (issue 13): the daemon's runs (start_run/alive), so that `hbd history` tells the time nobody
    # watched from the time a peer was up. A file from before has no runs: its server is taken as
    # running from its first recorded change to its last sign of life (the newest change or ping).
    (
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, started REAL, alive REAL)",
        """INSERT INTO runs (started, alive) SELECT started, alive FROM (
            SELECT min(time) AS started, max(max(time), coalesce((SELECT max(last_ping) FROM peers), 0)) AS alive
            FROM changes) WHERE started IS NOT NULL""",
    ),
)
assert len(_STEPS) == SCHEMA_VERSION

_PUT_PEER = (
    "INSERT OR REPLACE INTO peers (name, address, state, since, last_ping, reason, expected, timeout, labels)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PUT_SILENCE = "INSERT OR REPLACE INTO silences (name, until, reason, created) VALUES (?, ?, ?, ?)"
_ADD_CHANGE = "INSERT INTO changes (time, peer, old, new, reason, side) VALUES (?, ?, ?, ?, ?, ?)"
# Bounded work per call: only the oldest rows by id are looked at (a row whose time went backwards with
# the wall clock waits until the front reaches it).
_PRUNE = "DELETE FROM changes WHERE id IN (SELECT id FROM changes ORDER BY id LIMIT ?) AND time < ?"
_PRUNE_RUNS = "DELETE FROM runs WHERE alive < ? AND id IS NOT ?"  # a few rows: one per daemon start


def _upgrade(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file's schema to SCHEMA_VERSION, one step per transaction (a new file starts at 0)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: written by a newer hbd (schema version {version}; this one knows up to {SCHEMA_VERSION});"
            " upgrade hbd, or move the file away to start a new store"
        )
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in _STEPS[version]:
                conn.execute(sql)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")  # no parameters for PRAGMA: an int we made
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF


def _timestamp(wall: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall))


def _labels_json(labels: tuple[tuple[str, str], ...]) -> str:
    return json.dumps(dict(labels), separators=(",", ":"), ensure_ascii=False)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


def _labels(text: str | None) -> tuple[tuple[str, str], ...]:
    """Labels from their JSON column; a hand-edited value that is not an object of strings is dropped."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return ()
    if not isinstance(value, dict):
        return ()
    return tuple((str(k), str(v)) for k, v in value.items() if isinstance(v, str))


def _check_dir(state_dir: str) -> None:
    """Make sure state_dir is a directory this process may write, creating its last component if missing."""
    try:
        os.mkdir(state_dir, DIR_MODE)
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"state_dir {state_dir}: cannot create it: {e.strerror}") from None
    if not os.path.isdir(state_dir):
        raise StoreError(f"state_dir {state_dir}: not a directory")
    # access() honours a read-only mount (EROFS) too; root passes the mode bits, as it does for real writes.
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StoreError(f"state_dir {state_dir}: not writable by uid {os.geteuid()} (check its owner and mode)")


def _create_file(path: str) -> None:
    """Create the database file with FILE_MODE (whatever the umask), so that -wal and -shm inherit it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    except OSError as e:
        raise StoreError(f"{path}: cannot create it: {e.strerror}") from None
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _connect(path: str) -> sqlite3.Connection:
    """Open, check and set up the database; sqlite3 errors pass through (the caller sorts out corruption)."""
    if not os.access(path, os.R_OK | os.W_OK):
        # sqlite would fall back to read-only without a word, and fail at the first write
        mode = stat.filemode(os.stat(path).st_mode)
        raise StoreError(f"{path}: not readable and writable by uid {os.geteuid()} ({mode})")
    # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT), one per flush
    conn = sqlite3.connect(path, timeout=OPEN_TIMEOUT, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]  # persistent; close() undoes it
        if mode != "wal":
            raise StoreError(f"{path}: SQLite cannot use WAL mode here (journal_mode {mode}); use a local filesystem")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # flush() checkpoints, in a step of its own
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_LIMIT}")
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            problems = "; ".join(str(row[0]) for row in check[:3])
            raise sqlite3.DatabaseError(f"quick_check: {problems}")
        _upgrade(conn, path)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except BaseException:
        conn.close()
        raise
    return conn


def _is_corrupt(e: sqlite3.Error) -> bool:
    return _code(e) in _CORRUPT_CODES or str(e).startswith("quick_check:")


def _move_aside(path: str, wall: float) -> str:
    """Rename the database (and its WAL, which belongs to it) to <path>.corrupt-<timestamp>; drop its -shm."""
    aside = f"{path}.corrupt-{_timestamp(wall)}"
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.corrupt-{_timestamp(wall)}.{n}"
    try:
        os.rename(path, aside)
        for suffix in ("-wal", "-journal"):
            if os.path.lexists(path + suffix):
                os.rename(path + suffix, aside + suffix)
        if os.path.lexists(path + "-shm"):
            os.unlink(path + "-shm")
    except OSError as e:
        raise StoreError(f"{path} is corrupt and cannot be moved aside: {e.strerror}") from None
    return aside


class StateStore:
    """Queues records from the loop and writes them in bounded batches; see the module docstring."""

    def __init__(self, conn: sqlite3.Connection, path: str, notice: str | None, max_changes: int) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.notice = notice  # set when a corrupt file was moved aside at open
        self.failed: str | None = None
        self.dropped_changes = 0  # oldest changes dropped because the queue was full
        self.dropped_names = 0  # peer/silence updates dropped because their queue was full
        self.rows_written = 0
        self.busy = 0  # flushes put off because another connection held the write lock
        self.checkpoints = 0
        self._messages: list[str] = [notice] if notice else []
        # name -> record, or None to delete the row; dict order = first queued, first written
        self._peers: dict[str, PeerRecord | None] = {}
        self._silences: dict[str, SilenceRecord | None] = {}
        self._changes: collections.deque[ChangeRecord] = collections.deque(maxlen=max_changes)
        self._prune_before: float | None = None
        self._wal_pages = 0
        # This daemon's run (start_run/alive): its row's id once written, and a sign of life to write.
        self._run_started: float | None = None
        self._run_id: int | None = None
        self._alive: float | None = None

    @classmethod
    def open(
        cls, state_dir: str, *, max_changes: int = MAX_CHANGES, wall: Callable[[], float] = time.time
    ) -> StateStore:
        """Open (or create) ``<state_dir>/state.db``. Blocking: call it before the loop runs.

        Raises StoreError with the reason when the store cannot be used. A corrupt file is moved aside
        and a new store started: then ``notice`` (and the first ``take_messages()``) says so.
        """
        _check_dir(state_dir)
        path = os.path.join(state_dir, DB_NAME)
        _create_file(path)
        notice = None
        try:
            conn = _connect(path)
        except sqlite3.Error as e:
            if not _is_corrupt(e):
                raise StoreError(f"{path}: {e}") from None
            aside = _move_aside(path, wall())
            notice = f"{path} was corrupt ({e}): moved it aside to {aside} and started a new store"
            _create_file(path)
            try:
                conn = _connect(path)
            except sqlite3.Error as e2:
                raise StoreError(f"{path}: {e2}") from None
        return cls(conn, path, notice, max_changes)

    # -- reading (at start-up, before the loop runs) --

    def load(self) -> Snapshot:
        """Everything remembered: the peers and the silences (empty if the store has failed)."""
        if self._conn is None:
            return Snapshot([], [])
        peers: list[PeerRecord] = []
        silences: list[SilenceRecord] = []
        bad = 0
        try:
            for r in self._conn.execute(
                "SELECT name, address, state, since, last_ping, reason, expected, timeout, labels FROM peers"
            ):
                try:
                    rec = PeerRecord(
                        name=_text(r[0]),
                        address=_text(r[1]),
                        state=_text(r[2]),
                        since=float(r[3]),
                        last_ping=None if r[4] is None else float(r[4]),
                        reason=_text(r[5] or ""),
                        expected=bool(r[6]),
                        timeout=float(r[7]),
                        labels=_labels(r[8]),
                    )
                except (TypeError, ValueError):
                    bad += 1
                    continue
                peers.append(rec)
            for r in self._conn.execute("SELECT name, until, reason, created FROM silences"):
                try:
                    silences.append(SilenceRecord(_text(r[0]), float(r[1]), _text(r[2] or ""), float(r[3])))
                except (TypeError, ValueError):
                    bad += 1
        except sqlite3.Error as e:
            self._fail(f"cannot read {self.path}: {e}")
            return Snapshot([], [])
        if bad:  # a hand-edited row: what it said cannot be trusted, the rest can
            self._messages.append(f"{self.path}: skipped {bad} rows with values of the wrong type")
        return Snapshot(peers, silences)

    # -- queueing: O(1), no I/O --

    def put_peer(self, rec: PeerRecord) -> None:
        self._queue(self._peers, rec.name, rec)

    def forget_peer(self, name: str) -> None:
        self._queue(self._peers, name, None)

    def put_silence(self, rec: SilenceRecord) -> None:
        self._queue(self._silences, rec.name, rec)

    def drop_silence(self, name: str) -> None:
        self._queue(self._silences, name, None)

    def add_change(self, rec: ChangeRecord) -> None:
        if self._conn is None:
            return
        if len(self._changes) == self._changes.maxlen:
            if not self.dropped_changes:
                self._messages.append(
                    f"state store: {self._changes.maxlen} changes wait to be written; dropping the oldest"
                    " (counted in dropped_changes)"
                )
            self.dropped_changes += 1  # the deque drops the oldest
        self._changes.append(rec)

    def prune_changes(self, before: float) -> None:
        """Delete the changes older than ``before`` (wall clock), a batch per flush() (history retention)."""
        if self._conn is not None:
            self._prune_before = before

    def start_run(self, now: float) -> None:
        """This daemon's run begins at ``now`` (wall clock): a new row in ``runs``, written by the next
        flush(). ``hbd history`` counts the time outside every run as unknown."""
        if self._conn is not None:
            self._run_started, self._run_id, self._alive = now, None, now

    def alive(self, now: float) -> None:
        """The daemon is alive at ``now`` (wall clock). Call it every few seconds, and once more just
        before close(). O(1): the next flush() writes the newest value to the run's row (one row however
        often it is called). Without start_run(), the run starts here."""
        if self._conn is None:
            return
        if self._run_started is None:
            self._run_started = now
        self._alive = now

    def pending(self) -> int:
        """Rows waiting to be written (not counting a pending prune)."""
        return len(self._peers) + len(self._silences) + len(self._changes) + (self._alive is not None)

    def take_messages(self) -> list[str]:
        """What the daemon should log, each message once: the corrupt-file notice, the first drop from a
        full queue, the failure."""
        out, self._messages = self._messages, []
        return out

    def _queue(self, queue: dict[str, _R | None], name: str, rec: _R | None) -> None:
        if self._conn is None:
            return
        if name not in queue and len(queue) >= MAX_QUEUED_NAMES:
            if not self.dropped_names:
                self._messages.append(
                    f"state store: {MAX_QUEUED_NAMES} names wait to be written; dropping updates of new ones"
                    " (counted in dropped_names)"
                )
            self.dropped_names += 1
            return
        queue[name] = rec

    # -- writing --

    def flush(self, max_rows: int = MAX_ROWS) -> bool:
        """Write up to ``max_rows`` queued rows in one transaction; True if more remain (call again soon).

        One call is one bounded step: a batch of rows, or a WAL checkpoint, or a batch of pruning. A write
        error sets ``failed`` (see the module docstring); this never raises.
        """
        conn = self._conn
        if conn is None:
            return False
        try:
            if self._wal_pages >= CHECKPOINT_PAGES:
                return self._checkpoint(conn)
            if not self.pending():
                return self._prune(conn, max_rows) if self._prune_before is not None else False
            try:
                conn.execute("BEGIN IMMEDIATE")  # takes the write lock before anything leaves the queues
            except sqlite3.OperationalError as e:
                if _code(e) in _BUSY_CODES:
                    self.busy += 1
                    return True
                raise
            try:
                rows = self._write_batch(conn, max_rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the write's own error says more
                raise
            self.rows_written += rows
            self._wal_pages += rows // 16 + 1  # an estimate (~20 rows a page): the checkpoint reads the real size
            return bool(self.pending()) or self._prune_before is not None or self._wal_pages >= CHECKPOINT_PAGES
        except Exception as e:  # nothing raises into the loop: a store that cannot write stops, and says why
            self._fail(f"cannot write {self.path}: {e}" if isinstance(e, sqlite3.Error) else f"{self.path}: {e!r}")
            return False

    def _write_batch(self, conn: sqlite3.Connection, max_rows: int) -> int:
        # Silences first (few, and an operator is waiting for them); then peers and changes share what
        # is left, neither starving the other during a mass disconnect.
        budget = max(1, max_rows)
        run = self._write_run(conn)  # one row, beside the budget
        silences = _take(self._silences, budget)
        budget -= len(silences)
        half = budget // 2 if self._peers and self._changes else budget
        changes_first = _take_changes(self._changes, half)
        peers = _take(self._peers, budget - len(changes_first))
        changes = changes_first + _take_changes(self._changes, budget - len(changes_first) - len(peers))
        put_s = [(n, r.until, r.reason, r.created) for n, r in silences if r is not None]
        drop_s = [(n,) for n, r in silences if r is None]
        put_p = [
            (n, r.address, r.state, r.since, r.last_ping, r.reason, int(r.expected), r.timeout, _labels_json(r.labels))
            for n, r in peers
            if r is not None
        ]
        drop_p = [(n,) for n, r in peers if r is None]
        if put_s:
            conn.executemany(_PUT_SILENCE, put_s)
        if drop_s:
            conn.executemany("DELETE FROM silences WHERE name = ?", drop_s)
        if put_p:
            conn.executemany(_PUT_PEER, put_p)
        if drop_p:
            conn.executemany("DELETE FROM peers WHERE name = ?", drop_p)
        if changes:
            conn.executemany(_ADD_CHANGE, [(c.time, c.peer, c.old, c.new, c.reason, c.side) for c in changes])
        return run + len(silences) + len(peers) + len(changes)

    def _write_run(self, conn: sqlite3.Connection) -> int:
        if self._alive is None or self._run_started is None:
            return 0
        if self._run_id is None:
            cursor = conn.execute("INSERT INTO runs (started, alive) VALUES (?, ?)", (self._run_started, self._alive))
            self._run_id = cursor.lastrowid
        else:
            conn.execute("UPDATE runs SET alive = ? WHERE id = ?", (self._alive, self._run_id))
        self._alive = None
        return 1

    def _checkpoint(self, conn: sqlite3.Connection) -> bool:
        # PASSIVE: copies what no reader still needs, never waits for readers; TRUNCATE-style shrinking
        # is left to journal_size_limit.
        # A reader's snapshot may keep part of the WAL from being copied: that part waits for the next
        # checkpoint, after another CHECKPOINT_PAGES of writes (rows are never held up by checkpoints).
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        self._wal_pages = 0
        return bool(self.pending()) or self._prune_before is not None

    def _prune(self, conn: sqlite3.Connection, max_rows: int) -> bool:
        assert self._prune_before is not None
        try:
            deleted = conn.execute(_PRUNE, (max(1, max_rows), self._prune_before)).rowcount
        except sqlite3.OperationalError as e:
            if _code(e) in _BUSY_CODES:
                self.busy += 1
                return True
            raise
        self._wal_pages += deleted // 16 + 1
        if deleted < max_rows:
            conn.execute(_PRUNE_RUNS, (self._prune_before, self._run_id))  # the runs that ended before it too
            self._prune_before = None
        return self._prune_before is not None

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        self._messages.append(f"state store stopped: {reason}; nothing more is written until restart")
        self._peers.clear()
        self._silences.clear()
        self._changes.clear()
        self._prune_before = None
        self._alive = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Write everything still queued, then close (blocking: at shutdown, after the loop)."""
        deadline = time.monotonic() + CLOSE_SECONDS
        while self._conn is not None and self.pending() and time.monotonic() < deadline:
            busy = self.busy
            self.flush(MAX_ROWS * 10)
            if self.busy > busy:
                time.sleep(0.01)  # someone else holds the write lock
        if self.pending():
            self._messages.append(f"state store closed with {self.pending()} rows unwritten (the file stayed locked)")
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            # Back to a rollback journal while no daemon writes: a reader who may read state.db but not
            # create files in state_dir (group _hbd: `hbd history`, `sqlite3 -readonly`) cannot open a
            # WAL database without its -shm. If a reader is in right now this fails, and the WAL stays.
            conn.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error:
            pass
        try:
            conn.close()  # the last connection checkpoints and removes the WAL
        except sqlite3.Error as e:
            self._fail(f"cannot close {self.path}: {e}")


def _take(queue: dict[str, _R | None], n: int) -> list[tuple[str, _R | None]]:
    """The ``n`` oldest entries of a coalescing queue, removed from it."""
    if n <= 0 or not queue:
        return []
    batch = list(itertools.islice(queue.items(), n))
    for name, _ in batch:
        del queue[name]
    return batch


def _take_changes(queue: collections.deque[ChangeRecord], n: int) -> list[ChangeRecord]:
    return [queue.popleft() for _ in range(min(n, len(queue)))]
