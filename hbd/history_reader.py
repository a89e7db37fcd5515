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
from collections.abc import Iterator

from hbd.errors import HbdError
from hbd.history import Run
from hbd.state_store import CLIENT_DB_NAME, DB_NAME, SCHEMA_VERSION, ChangeRecord

KNOWN_SCHEMA = SCHEMA_VERSION  # the newest store layout this reader understands: the store's own
# The daemon marks its run alive every few seconds: a run whose last sign of life is this recent is
# taken to be running still (its next mark is on the way).
RUNNING_SLACK = 30.0


class HistoryError(HbdError):
    """The history cannot be read; the message says why."""


SIDES = ("server", "client")  # whose store: the server's peers, or the client's server links


def store_path(state_dir: str, side: str = "server") -> str:
    return os.path.join(state_dir, CLIENT_DB_NAME if side == "client" else DB_NAME)


# Rows a hand-edited file may hold that the daemon never writes are skipped, not fatal: a time that
# is not a number or not a plausible epoch (|t| < 1e11: before the year 5000), a missing peer name.
_TIME_OK = "typeof({0}) IN ('integer', 'real') AND abs({0}) < 1e11"


class HistoryStore:
    """A state store opened read-only; use as a context manager. Every method raises HistoryError.
    ``side``: whose changes to read, the server's (its peers) or the client's (its server links)."""

    def __init__(self, path: str, side: str = "server") -> None:
        if side not in SIDES:
            raise ValueError(f"side: {side!r}")
        self.path = path
        self.side = side  # one of SIDES: safe to write into the SQL
        self._conn = _open(path)
        try:
            self._has_runs = self._check()
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.close()

    def _check(self) -> bool:
        """The schema is one this reader knows; whether it has the runs table."""
        version = next(self._rows("PRAGMA user_version", ()))[0]
        tables = {r[0] for r in self._rows("SELECT name FROM sqlite_master WHERE type = 'table'", ())}
        if version > KNOWN_SCHEMA:
            raise HistoryError(
                f"{self.path}: written by a newer hbd (schema version {version}; this one reads up to {KNOWN_SCHEMA})"
            )
        if not {"changes", "peers"} <= tables:
            raise HistoryError(f"{self.path}: not an hbd state store (no changes or peers table)")
        return "runs" in tables

    def _rows(self, sql: str, args: tuple[object, ...]) -> Iterator[tuple]:
        try:
            yield from self._conn.execute(sql, args)
        except sqlite3.Error as e:
            raise HistoryError(_explain(self.path, e)) from None

    def runs(self, since: float, now: float) -> list[Run] | None:
        """The server's runs that reach past ``since``; None when the store records no runs at all.
        A run alive within RUNNING_SLACK of ``now`` is taken as running up to now."""
        if not self._has_runs or not list(self._rows("SELECT 1 FROM runs LIMIT 1", ())):
            return None
        sql = (
            f"SELECT started, alive FROM runs WHERE {_TIME_OK.format('started')} AND {_TIME_OK.format('alive')}"
            " AND alive >= ? ORDER BY started, id"
        )
        runs = [(float(a), float(b)) for a, b in self._rows(sql, (since,))]
        if runs and now - runs[-1][1] <= RUNNING_SLACK:
            runs[-1] = (runs[-1][0], max(runs[-1][1], now))
        return runs

    def last_pings(self, peer: str | None = None) -> dict[str, float | None]:
        """Every peer the registry remembers (or just ``peer``) and its last ping."""
        where, args = (" WHERE name = ?", (peer,)) if peer is not None else ("", ())
        rows = self._rows(f"SELECT name, last_ping FROM peers{where}", args)
        return {str(n): float(t) if isinstance(t, int | float) and abs(t) < 1e11 else None for n, t in rows if n}

    def first_seen(self, peer: str | None = None) -> dict[str, float]:
        """Each peer's first recorded change, however far back."""
        where, args = ("AND peer = ?", (peer,)) if peer is not None else ("", ())
        sql = (
            f"SELECT peer, min(time) FROM changes WHERE side = '{self.side}' AND peer IS NOT NULL"
            f" AND {_TIME_OK.format('time')} {where} GROUP BY peer"
        )
        return {str(n): float(t) for n, t in self._rows(sql, args)}

    def histories(self, since: float, peer: str | None = None) -> Iterator[tuple[str, list[ChangeRecord]]]:
        """Per peer, in name order: its changes (of this side) from ``since`` on, led by its last change
        before ``since`` (its state then). The rows are fetched at once, as plain tuples: a reader's
        lock on a stopped daemon's store (rollback journal) then lasts only as long as the query, not
        as long as the arithmetic (a daemon that starts meanwhile waits for it)."""
        where, args = ("AND peer = ?", (peer,)) if peer is not None else ("", ())
        valid = f"side = '{self.side}' AND peer IS NOT NULL AND {_TIME_OK.format('time')} {where}"
        # SQLite takes a bare column (id) from the row that holds its group's max(time).
        sql = (
            f"SELECT time, peer, old, new, reason FROM changes WHERE {valid} AND (time >= ? OR id IN"
            f" (SELECT id FROM (SELECT id, max(time) FROM changes WHERE {valid} AND time < ? GROUP BY peer)))"
            " ORDER BY peer, time, id"
        )
        name: str | None = None
        rows: list[ChangeRecord] = []
        for r in list(self._rows(sql, (*args, since, *args, since))):
            row = ChangeRecord(float(r[0]), str(r[1]), str(r[2] or ""), str(r[3] or ""), str(r[4] or ""))
            if row.peer != name:
                if name is not None:
                    yield name, rows
                name, rows = row.peer, []
            rows.append(row)
        if name is not None:
            yield name, rows


def _open(path: str) -> sqlite3.Connection:
    try:
        st = os.stat(path)
    except PermissionError:
        raise HistoryError(
            f"{path}: permission denied: a directory on its path is not searchable by uid {os.geteuid()}"
        ) from None
    except FileNotFoundError:
        raise HistoryError(
            f"{path}: no such file: the daemon has not kept a state store there yet "
            "(is state_dir right? it is written once the daemon runs)"
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
        return _connect(uri + "?mode=ro")
    except sqlite3.Error as e:
        if os.path.exists(path + "-wal") or (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF not in (8, 14):
            raise HistoryError(_explain(path, e)) from None
    # SQLITE_READONLY / CANTOPEN with no WAL: nobody writes; read the file as it is.
    try:
        return _connect(uri + "?mode=ro&immutable=1")
    except sqlite3.Error as e:
        raise HistoryError(_explain(path, e)) from None


def _connect(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # the first read: errors show here
    except BaseException:
        conn.close()
        raise
    return conn


def _explain(path: str, e: sqlite3.Error) -> str:
    code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return f"{path}: not a readable hbd state store ({e}); the server moves a corrupt file aside when it starts"
    return f"{path}: cannot read it: {e}"
