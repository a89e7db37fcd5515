"""The state store's SQLite file: ``<state_dir>/state.db`` (WAL), one connection, written a bounded step
at a time (see hbd.state_store for the whole story: durability, what a reader sees, the figures).

``StoreFile.open`` (blocking, before the loop runs) checks the directory, creates the file with
FILE_MODE, checks the whole file (``PRAGMA quick_check``), brings its schema up to date (``_upgrade``, a
step per transaction, the steps handed down by the caller), and moves a corrupt file aside to
``state.db.corrupt-<UTC timestamp>`` and starts a new one, returning a notice that says so. It raises
StoreError with a reason an operator can act on.

After open, ``read``, ``step`` and ``close`` raise what SQLite (or the disk) raises: the StateStore above
turns that into ``failed`` and ``abandon``s the file. ``step`` is one bounded step of a flush: a WAL
checkpoint, or a batch of rows taken from the queues handed to it, or a batch of pruning. This module
imports nothing from hbd but the errors, the records and the queues' types.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from hbd.errors import StoreError
from hbd.store_queues import Batch, StoreQueues
from hbd.store_records import PeerRecord, SilenceRecord, Snapshot

DB_NAME = "state.db"  # the server's
CLIENT_DB_NAME = "client.db"  # the client's (its server links' history): both daemons may share state_dir
SCHEMA_VERSION = 2
FILE_MODE = 0o640
DIR_MODE = 0o750
# How long a write may wait for another connection's lock (a reader's checkpoint, an `sqlite3` shell
# holding a write transaction): short, the loop is waiting. Past it, flush() tries again next time.
BUSY_TIMEOUT_MS = 5
OPEN_TIMEOUT = 2.0  # open() runs before the loop: it may wait this long for a reader to let go
# Checkpoint the WAL into the database once it holds this many pages (4 KiB each), in a flush() step of
# its own; the WAL file is truncated back to JOURNAL_LIMIT after a checkpoint.
CHECKPOINT_PAGES = 256
JOURNAL_LIMIT = 4 * 1024 * 1024

# SQLite's primary result codes (the low byte of an extended code) that mean the file is not sound.
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED

# Each step takes the file from version i to i + 1 (index i): the file's version is len(steps). Add steps;
# never edit a released one. The StateStore hands these down at open.
# `changes` has no index but its id: appends and pruning touch only the two ends of its b-tree (an index
# on peer would cost a random page per row written or pruned; a history query scans, in its own process).
STEPS: tuple[tuple[str, ...], ...] = (
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
assert len(STEPS) == SCHEMA_VERSION

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
_UNGUARDED: AbstractContextManager[object] = nullcontext()  # one thread queues and writes (tests, tools)


def _upgrade(conn: sqlite3.Connection, path: str, steps: tuple[tuple[str, ...], ...]) -> None:
    """Bring the file's schema to version len(steps), one step per transaction (a new file starts at 0)."""
    latest = len(steps)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > latest:
        raise StoreError(
            f"{path}: written by a newer hbd (schema version {version}; this one knows up to {latest});"
            " upgrade hbd, or move the file away to start a new store"
        )
    while version < latest:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in steps[version]:
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


def _connect(path: str, steps: tuple[tuple[str, ...], ...]) -> sqlite3.Connection:
    """Open, check and set up the database; sqlite3 errors pass through (the caller sorts out corruption)."""
    if not os.access(path, os.R_OK | os.W_OK):
        # sqlite would fall back to read-only without a word, and fail at the first write
        mode = stat.filemode(os.stat(path).st_mode)
        raise StoreError(f"{path}: not readable and writable by uid {os.geteuid()} ({mode})")
    # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT), one per flush.
    # check_same_thread=False: opened here, written by the store's writer thread (hbd.store_thread),
    # closed by whichever of them is last; never two threads at a time.
    conn = sqlite3.connect(path, timeout=OPEN_TIMEOUT, isolation_level=None, check_same_thread=False)
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
        _upgrade(conn, path, steps)
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


class StoreFile:
    """The open database: reads it at start-up, writes it a bounded step per call; see the module docstring."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn: sqlite3.Connection | None = conn  # None once closed or abandoned
        self.path = path
        self.prune_before: float | None = None  # delete the changes older than this, a batch per step
        self.rows_written = 0
        self.busy = 0  # steps put off because another connection held the write lock
        self.checkpoints = 0
        self._wal_pages = 0
        # This daemon's run (start_run/alive): its row's id once written, and a sign of life to write.
        self._run_started: float | None = None
        self._run_id: int | None = None
        self._alive: float | None = None

    @classmethod
    def open(
        cls, state_dir: str, wall: Callable[[], float], steps: tuple[tuple[str, ...], ...], file: str = DB_NAME
    ) -> tuple[StoreFile, str | None]:
        """Open (or create) ``<state_dir>/<file>`` at schema version len(steps); the notice says if a
        corrupt file was moved aside. Blocking; raises StoreError."""
        _check_dir(state_dir)
        path = os.path.join(state_dir, file)
        _create_file(path)
        notice = None
        try:
            conn = _connect(path, steps)
        except sqlite3.Error as e:
            if not _is_corrupt(e):
                raise StoreError(f"{path}: {e}") from None
            aside = _move_aside(path, wall())
            notice = f"{path} was corrupt ({e}): moved it aside to {aside} and started a new store"
            _create_file(path)
            try:
                conn = _connect(path, steps)
            except sqlite3.Error as e2:
                raise StoreError(f"{path}: {e2}") from None
        return cls(conn, path), notice

    def read(self) -> tuple[Snapshot, int]:
        """The peers and silences in the file, and how many rows were skipped (values of the wrong type)."""
        peers: list[PeerRecord] = []
        silences: list[SilenceRecord] = []
        bad = 0
        if self.conn is None:
            return Snapshot(peers, silences), bad
        for r in self.conn.execute(
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
        for r in self.conn.execute("SELECT name, until, reason, created FROM silences"):
            try:
                silences.append(SilenceRecord(_text(r[0]), float(r[1]), _text(r[2] or ""), float(r[3])))
            except (TypeError, ValueError):
                bad += 1
        return Snapshot(peers, silences), bad

    def step(self, queues: StoreQueues, max_rows: int, guard: AbstractContextManager[object] = _UNGUARDED) -> bool:
        """One bounded step: a WAL checkpoint, or up to ``max_rows`` rows from ``queues`` in one transaction,
        or a batch of pruning. True if more remain (call again soon).

        ``guard`` (a lock) is held while this reads or takes what the queueing side writes (the queues,
        the run's sign of life, the pruning asked for), and never while SQLite works: the store's
        writer thread (hbd.store_thread) writes while the loop queues."""
        conn = self.conn
        if conn is None:
            return False
        if self._wal_pages >= CHECKPOINT_PAGES:
            return self._checkpoint(conn, queues, guard)
        with guard:
            pending, prune_before = self.pending(queues), self.prune_before
        if not pending:
            return self._prune(conn, max_rows, prune_before, guard) if prune_before is not None else False
        try:
            conn.execute("BEGIN IMMEDIATE")  # takes the write lock before anything leaves the queues
        except sqlite3.OperationalError as e:
            if _code(e) in _BUSY_CODES:
                self.busy += 1
                return True
            raise
        try:
            with guard:
                run = self._take_run()
                batch = queues.take_batch(max_rows)
            rows = self._write_run(conn, run)  # one row, beside the budget
            _write(conn, batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the write's own error says more
            raise
        rows += len(batch)
        self.rows_written += rows
        self._wal_pages += rows // 16 + 1  # an estimate (~20 rows a page): the checkpoint reads the real size
        return self._more(queues, guard) or self._wal_pages >= CHECKPOINT_PAGES

    def _more(self, queues: StoreQueues, guard: AbstractContextManager[object]) -> bool:
        with guard:
            return bool(self.pending(queues)) or self.prune_before is not None

    def _checkpoint(self, conn: sqlite3.Connection, queues: StoreQueues, guard: AbstractContextManager[object]) -> bool:
        # PASSIVE: copies what no reader still needs, never waits for readers; TRUNCATE-style shrinking
        # is left to journal_size_limit.
        # A reader's snapshot may keep part of the WAL from being copied: that part waits for the next
        # checkpoint, after another CHECKPOINT_PAGES of writes (rows are never held up by checkpoints).
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        self._wal_pages = 0
        return self._more(queues, guard)

    def _prune(
        self, conn: sqlite3.Connection, max_rows: int, before: float, guard: AbstractContextManager[object]
    ) -> bool:
        try:
            deleted = conn.execute(_PRUNE, (max(1, max_rows), before)).rowcount
        except sqlite3.OperationalError as e:
            if _code(e) in _BUSY_CODES:
                self.busy += 1
                return True
            raise
        self._wal_pages += deleted // 16 + 1
        if deleted < max_rows:
            conn.execute(_PRUNE_RUNS, (before, self._run_id))  # the runs that ended before it too
            with guard:
                if self.prune_before == before:  # not asked again meanwhile
                    self.prune_before = None
        with guard:
            return self.prune_before is not None

    def start_run(self, now: float) -> None:
        """This daemon's run begins at ``now`` (wall clock): a new row in ``runs``, written by the next step."""
        self._run_started, self._run_id, self._alive = now, None, now

    def alive(self, now: float) -> None:
        """The daemon is alive at ``now``: the next step writes the newest value to the run's row (one row
        however often this is called). Without start_run(), the run starts here."""
        if self._run_started is None:
            self._run_started = now
        self._alive = now

    def pending(self, queues: StoreQueues) -> int:
        """Rows waiting to be written: the queues', and this run's sign of life."""
        return queues.pending() + (self._alive is not None)

    def _take_run(self) -> tuple[float, float] | None:
        """The run's start and newest sign of life, to write (None: nothing new); taken, under the guard."""
        if self._alive is None or self._run_started is None:
            return None
        run, self._alive = (self._run_started, self._alive), None
        return run

    def _write_run(self, conn: sqlite3.Connection, run: tuple[float, float] | None) -> int:
        if run is None:
            return 0
        if self._run_id is None:
            cursor = conn.execute("INSERT INTO runs (started, alive) VALUES (?, ?)", run)
            self._run_id = cursor.lastrowid
        else:
            conn.execute("UPDATE runs SET alive = ? WHERE id = ?", (run[1], self._run_id))
        return 1

    def abandon(self) -> None:
        """Close without a word after a failure: nothing more is written."""
        self.prune_before = None
        self._alive = None
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Close the file (blocking, at shutdown); raises sqlite3.Error if the last close fails."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            # Back to a rollback journal while no daemon writes: a reader who may read state.db but not
            # create files in state_dir (group _hbd: `hbd history`, `sqlite3 -readonly`) cannot open a
            # WAL database without its -shm. If a reader is in right now this fails, and the WAL stays.
            conn.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error:
            pass
        conn.close()  # the last connection checkpoints and removes the WAL


def _write(conn: sqlite3.Connection, batch: Batch) -> None:
    put_s = [(n, r.until, r.reason, r.created) for n, r in batch.silences if r is not None]
    drop_s = [(n,) for n, r in batch.silences if r is None]
    put_p = [
        (n, r.address, r.state, r.since, r.last_ping, r.reason, int(r.expected), r.timeout, _labels_json(r.labels))
        for n, r in batch.peers
        if r is not None
    ]
    drop_p = [(n,) for n, r in batch.peers if r is None]
    if put_s:
        conn.executemany(_PUT_SILENCE, put_s)
    if drop_s:
        conn.executemany("DELETE FROM silences WHERE name = ?", drop_s)
    if put_p:
        conn.executemany(_PUT_PEER, put_p)
    if drop_p:
        conn.executemany("DELETE FROM peers WHERE name = ?", drop_p)
    if batch.changes:
        rows = [(c.time, c.peer, c.old, c.new, c.reason, c.side) for c in batch.changes]
        conn.executemany(_ADD_CHANGE, rows)
