"""Reading the state store for ``hbd history``: read-only, in the command's own process, never the daemon's.

The file is opened with SQLite's ``mode=ro``: this process never writes it, never creates it, and
reads a consistent snapshot while the daemon writes (WAL: readers and the writer do not wait for
each other). A stopped daemon leaves no WAL behind; a reader that may not write the directory then
cannot set up SQLite's shared-memory file, so with no ``-wal`` file present (nobody is writing) the
file is opened ``immutable`` instead.

Every way this can fail (no file, no permission, not a database, a newer schema) is a
``HistoryError`` with one line that says what is wrong.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import urllib.parse
from dataclasses import dataclass

from hbd.errors import HbdError
from hbd.history import Run

DB_NAME = "state.db"  # hbd.state_store.DB_NAME
KNOWN_SCHEMA = 2  # the newest store layout this reader understands
# The daemon marks its run alive every few seconds: a run whose last sign of life is this recent is
# taken to be running still (its next mark is on the way).
RUNNING_SLACK = 30.0


class HistoryError(HbdError):
    """The history cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One recorded state change (the columns ``hbd history`` reads)."""

    time: float
    peer: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, slots=True)
class StoredHistory:
    path: str
    changes: list[ChangeRow]  # in time order: all from ``since`` on, and each peer's last one before it
    runs: list[Run] | None  # None: the store records no runs of the server
    last_ping: dict[str, float | None]  # the peers table: every peer the registry remembers
    first_seen: dict[str, float]  # each peer's first recorded change (however far back)


def store_path(state_dir: str) -> str:
    return os.path.join(state_dir, DB_NAME)


def read(path: str, since: float, now: float, peer: str | None = None) -> StoredHistory:
    """The server side's changes from ``since`` on (of one peer, or all), the runs and the peers."""
    conn = _open(path)
    try:
        return _read(conn, path, since, now, peer)
    except sqlite3.Error as e:
        raise HistoryError(_explain(path, e)) from None
    finally:
        conn.close()


def _open(path: str) -> sqlite3.Connection:
    try:
        st = os.stat(path)
    except PermissionError:
        raise HistoryError(
            f"{path}: permission denied: a directory on its path is not searchable by uid {os.geteuid()}"
        ) from None
    except FileNotFoundError:
        raise HistoryError(
            f"{path}: no such file: the server has not kept a state store there yet "
            "(is state_dir right? it is written once the server runs)"
        ) from None
    except OSError as e:
        raise HistoryError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HistoryError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise HistoryError(
            f"{path}: permission denied ({stat.filemode(st.st_mode)}): run as root or as a member of the "
            "daemon's group (e.g. _hbd)"
        )
    uri = "file:" + urllib.parse.quote(os.path.abspath(path))
    try:
        conn = sqlite3.connect(uri + "?mode=ro", uri=True)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.Error as e:
        if os.path.exists(path + "-wal") or (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF not in (8, 14):
            raise HistoryError(_explain(path, e)) from None
    # SQLITE_READONLY / CANTOPEN with no WAL: nobody writes; read the file as it is.
    try:
        conn = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.Error as e:
        raise HistoryError(_explain(path, e)) from None


def _explain(path: str, e: sqlite3.Error) -> str:
    code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return f"{path}: not a readable hbd state store ({e}); the server moves a corrupt file aside when it starts"
    return f"{path}: cannot read it: {e}"


def _read(conn: sqlite3.Connection, path: str, since: float, now: float, peer: str | None) -> StoredHistory:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version > KNOWN_SCHEMA:
        raise HistoryError(
            f"{path}: written by a newer hbd (schema version {version}; this one reads up to {KNOWN_SCHEMA})"
        )
    if not {"changes", "peers"} <= tables:
        raise HistoryError(f"{path}: not an hbd state store (no changes or peers table)")
    which, args = ("AND peer = ?", (peer,)) if peer is not None else ("", ())
    columns = "time, peer, old, new, reason"
    # Each peer's last change before ``since`` gives its state then (SQLite takes the bare columns
    # from the row holding the max); then everything from ``since`` on.
    before = conn.execute(
        f"SELECT {columns}, max(time) FROM changes WHERE side = 'server' AND time < ? {which} GROUP BY peer",
        (since, *args),
    ).fetchall()
    after = conn.execute(
        f"SELECT {columns} FROM changes WHERE side = 'server' AND time >= ? {which} ORDER BY time, id",
        (since, *args),
    ).fetchall()
    changes = [_row(r) for r in sorted(before, key=lambda r: r[0])] + [_row(r) for r in after]
    runs: list[Run] | None = None
    if "runs" in tables:
        sql = "SELECT started, alive FROM runs WHERE alive >= ? ORDER BY started, id"
        found = [(float(a), float(b)) for a, b in conn.execute(sql, (since,))]
        if found:
            runs = found
            started, alive = runs[-1]
            if now - alive <= RUNNING_SLACK:
                runs[-1] = (started, max(alive, now))
    peers_sql = "SELECT name, last_ping FROM peers" + (" WHERE name = ?" if peer is not None else "")
    last_ping = {str(name): (None if ping is None else float(ping)) for name, ping in conn.execute(peers_sql, args)}
    first_sql = f"SELECT peer, min(time) FROM changes WHERE side = 'server' {which} GROUP BY peer"
    first_seen = {str(name): float(t) for name, t in conn.execute(first_sql, args)}
    return StoredHistory(path, changes, runs, last_ping, first_seen)


def _row(r: tuple) -> ChangeRow:
    return ChangeRow(float(r[0]), str(r[1]), str(r[2] or ""), str(r[3] or ""), str(r[4] or ""))
