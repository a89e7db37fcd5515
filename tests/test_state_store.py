"""The state store on real SQLite files: what it keeps, how it queues and batches, what a second reader
sees, what survives `kill -9`, and how it behaves when the file or the disk goes bad (a corrupt file is
moved aside; a read-only directory is refused at open; a full disk stops it without raising)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hbd import state_store
from hbd.state_store import ChangeRecord, PeerRecord, SilenceRecord, StateStore, StoreError

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_790_000_000.0  # a wall-clock time (2026)


def peer(name: str, state: str = "UP", **kw: object) -> PeerRecord:
    fields: dict = dict(
        name=name,
        address="192.0.2.7:40000",
        state=state,
        since=NOW,
        last_ping=NOW + 1.5,
        reason="",
        expected=False,
        timeout=10.0,
        labels=(),
    )
    fields.update(kw)
    return PeerRecord(**fields)


def change(i: int, peer: str = "web1") -> ChangeRecord:
    return ChangeRecord(time=NOW + i, peer=peer, old="UP", new="DOWN", reason=f"change {i}")


def reader(state_dir: Path) -> sqlite3.Connection:
    """A second connection, read-only, as `hbd history` or an operator's `sqlite3 -readonly` opens it."""
    return sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, isolation_level=None)


def count(state_dir: Path, table: str) -> int:
    conn = reader(state_dir)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def drain(store: StateStore, max_rows: int = 500) -> int:
    calls = 1
    while store.flush(max_rows):
        calls += 1
        assert calls < 10_000
    return calls


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore.open(str(tmp_path))
    yield s
    s.close()


def test_round_trip_of_peers_silences_and_changes(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path))
    web1 = peer("web1", "DOWN", reason="no ping for 10 s", expected=True, labels=(("rack", "r1"), ("role", "wéb")))
    db1 = peer("db1", "NEW", last_ping=None, timeout=2.5)
    s.put_peer(web1)
    s.put_peer(db1)
    silence = SilenceRecord(name="web1", until=NOW + 3600, reason="kernel update", created=NOW)
    s.put_silence(silence)
    for i in range(3):
        s.add_change(change(i))
    s.add_change(ChangeRecord(NOW, "hbd.example.net:54321", "UP", "DOWN", "reset", side="client"))
    assert s.pending() == 7
    assert not s.flush()
    assert s.pending() == 0 and s.rows_written == 7
    s.close()

    again = StateStore.open(str(tmp_path))
    try:
        snap = again.load()
        assert sorted(snap.peers, key=lambda p: p.name) == [db1, web1]
        assert snap.silences == [silence]
        assert again.notice is None and again.take_messages() == []
    finally:
        again.close()
    conn = reader(tmp_path)
    rows = conn.execute("SELECT time, peer, old, new, reason, side FROM changes ORDER BY id").fetchall()
    assert rows[:3] == [(NOW + i, "web1", "UP", "DOWN", f"change {i}", "server") for i in range(3)]
    assert rows[3][-1] == "client"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == state_store.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # closed: WAL while open
    assert json.loads(conn.execute("SELECT labels FROM peers WHERE name = 'web1'").fetchone()[0]) == {
        "rack": "r1",
        "role": "wéb",
    }


def test_forget_and_drop_delete_rows(store: StateStore, tmp_path: Path) -> None:
    store.put_peer(peer("web1"))
    store.put_peer(peer("web2"))
    store.put_silence(SilenceRecord("web1", NOW + 60, "", NOW))
    drain(store)
    store.forget_peer("web1")
    store.drop_silence("web1")
    store.forget_peer("never-stored")  # nothing to delete: not an error
    drain(store)
    assert [p.name for p in store.load().peers] == ["web2"]
    assert store.load().silences == []
    assert store.failed is None


def test_rows_an_operator_broke_by_hand_are_skipped_and_said_once(store: StateStore, tmp_path: Path) -> None:
    store.put_peer(peer("web1", labels=(("rack", "r1"),)))
    store.put_peer(peer("web2"))
    store.put_silence(SilenceRecord("web1", NOW, "", NOW))
    store.flush()
    conn = sqlite3.connect(str(tmp_path / "state.db"))
    conn.execute("UPDATE peers SET since = 'yesterday' WHERE name = 'web2'")
    conn.execute("UPDATE peers SET labels = '[1, 2]' WHERE name = 'web1'")  # not an object: no labels
    conn.execute("INSERT INTO silences VALUES (NULL, 1.0, 'x', 1.0)")
    conn.commit()
    conn.close()
    snap = store.load()
    assert [(p.name, p.labels) for p in snap.peers] == [("web1", ())]
    assert [x.name for x in snap.silences] == ["web1"]
    assert store.take_messages() == [f"{tmp_path}/state.db: skipped 2 rows with values of the wrong type"]
    assert store.failed is None


def test_a_thousand_puts_of_one_name_write_one_row(store: StateStore) -> None:
    for i in range(1000):
        store.put_peer(peer("web1", last_ping=NOW + i))
        store.put_silence(SilenceRecord("web1", NOW + i, "", NOW))
    assert store.pending() == 2
    assert not store.flush()
    assert store.rows_written == 2
    (p,) = store.load().peers
    assert p.last_ping == NOW + 999  # the newest record wins
    assert store.load().silences[0].until == NOW + 999
    # a forget after a put coalesces too: one delete, no insert
    store.put_peer(peer("web2"))
    store.forget_peer("web2")
    assert store.pending() == 1
    store.flush()
    assert [p.name for p in store.load().peers] == ["web1"]


def test_a_flood_of_changes_is_capped_oldest_dropped_and_counted(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path), max_changes=100)
    try:
        for i in range(250):
            s.add_change(change(i))
        assert s.pending() == 100 and s.dropped_changes == 150
        (msg,) = s.take_messages()  # said once, not 150 times
        assert "100 changes wait to be written; dropping the oldest" in msg
        drain(s)
        conn = reader(tmp_path)
        reasons = [r for (r,) in conn.execute("SELECT reason FROM changes ORDER BY id")]
        conn.close()
        assert reasons == [f"change {i}" for i in range(150, 250)]  # the newest 100, in order
    finally:
        s.close()


def test_distinct_names_beyond_the_bound_are_dropped_and_counted(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_store, "MAX_QUEUED_NAMES", 10)
    for i in range(15):
        store.put_peer(peer(f"web{i}"))
    assert store.pending() == 10 and store.dropped_names == 5
    assert len(store.take_messages()) == 1
    store.put_peer(peer("web3", "DOWN"))  # a name already queued is still updated
    assert store.pending() == 10 and store.dropped_names == 5
    drain(store)
    assert {p.name: p.state for p in store.load().peers}["web3"] == "DOWN"


def test_flush_writes_max_rows_per_call_in_one_transaction(store: StateStore, tmp_path: Path) -> None:
    for i in range(600):
        store.put_peer(peer(f"web{i}"))
        store.add_change(change(i))
    assert store.flush(500) is True
    assert store.pending() == 700
    assert count(tmp_path, "peers") + count(tmp_path, "changes") == 500  # committed, visible to a reader
    assert count(tmp_path, "changes") == 250  # peers and changes share a batch: neither starves
    assert store.flush(500) is True
    assert store.flush(500) is False
    assert store.pending() == 0
    assert count(tmp_path, "peers") == 600 and count(tmp_path, "changes") == 600
    assert store.flush(500) is False  # nothing to do


def test_a_mass_disconnect_is_written_in_bounded_steps(store: StateStore, tmp_path: Path) -> None:
    # 19,000 peers go DOWN at once: queueing is cheap, and every flush() is one bounded step (the figures
    # for this machine are bench/store_flush.py's; the bound here is generous, the machine is shared).
    t = time.perf_counter()
    for i in range(19_000):
        store.put_peer(peer(f"host{i:05d}", "DOWN", reason="no ping for 10 s"))
        store.add_change(change(i, f"host{i:05d}"))
    assert time.perf_counter() - t < 2.0
    steps, longest, more = 0, 0.0, True
    while more:
        before = store.rows_written
        t = time.perf_counter()
        more = store.flush(500)
        longest = max(longest, time.perf_counter() - t)
        assert store.rows_written - before <= 500
        steps += 1
    assert store.rows_written == 38_000 and steps == 76 + store.checkpoints
    assert 5 <= store.checkpoints <= 20  # the WAL is checkpointed as it grows, a step at a time
    assert longest < 0.25, f"longest flush() {longest * 1000:.0f} ms"
    assert count(tmp_path, "peers") == 19_000 and count(tmp_path, "changes") == 19_000


def test_silences_go_first(store: StateStore, tmp_path: Path) -> None:
    for i in range(50):
        store.add_change(change(i))
    store.put_silence(SilenceRecord("web1", NOW + 60, "maintenance", NOW))
    store.flush(10)
    assert count(tmp_path, "silences") == 1 and count(tmp_path, "changes") == 9


def test_a_reader_sees_committed_data_while_the_writer_is_open(store: StateStore, tmp_path: Path) -> None:
    store.put_peer(peer("web1"))
    store.flush()
    store.put_peer(peer("web2"))  # queued, not flushed: not in the file yet
    conn = reader(tmp_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [n for (n,) in conn.execute("SELECT name FROM peers")] == ["web1"]
        # a reader in the middle of a long read does not hold the writer up (WAL), and keeps its snapshot
        conn.execute("BEGIN")
        assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 1
        t = time.monotonic()
        assert store.flush() is False
        assert time.monotonic() - t < 2.0 and store.failed is None and store.busy == 0
        assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 1
        conn.execute("COMMIT")
        assert conn.execute("SELECT count(*) FROM peers").fetchone()[0] == 2
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM peers")
    finally:
        conn.close()


def test_a_writer_holding_the_lock_puts_the_flush_off_without_losing_rows(store: StateStore, tmp_path: Path) -> None:
    other = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # say, an operator's sqlite3 shell in a write transaction
        store.put_peer(peer("web1"))
        t = time.monotonic()
        assert store.flush() is True  # try again later
        assert time.monotonic() - t < 2.0
        assert store.busy == 1 and store.pending() == 1 and store.failed is None
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert store.flush() is False
    assert [p.name for p in store.load().peers] == ["web1"]


def test_prune_deletes_old_changes_a_batch_per_flush(store: StateStore, tmp_path: Path) -> None:
    for i in range(1000):
        store.add_change(change(i))
    drain(store)
    store.prune_changes(NOW + 700)
    assert store.flush(300) is True
    assert count(tmp_path, "changes") == 700
    drain(store, 300)
    conn = reader(tmp_path)
    assert conn.execute("SELECT min(time), count(*) FROM changes").fetchone() == (NOW + 700, 300)
    conn.close()


def test_close_writes_what_is_left(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path))
    for i in range(6000):
        s.put_peer(peer(f"web{i}"))
    s.close()
    s.close()  # twice is fine
    assert not (tmp_path / "state.db-wal").exists()  # checkpointed and removed by the last connection
    assert count(tmp_path, "peers") == 6000
    s.put_peer(peer("late"))  # after close: a no-op
    assert s.flush() is False and s.pending() == 0


def test_file_mode_is_0640_whatever_the_umask(tmp_path: Path) -> None:
    for umask in (0o000, 0o077):
        d = tmp_path / f"u{umask:o}"
        d.mkdir()
        old = os.umask(umask)
        try:
            s = StateStore.open(str(d))
        finally:
            os.umask(old)
        try:
            s.put_peer(peer("web1"))
            s.flush()
            for name in ("state.db", "state.db-wal", "state.db-shm"):
                assert (d / name).stat().st_mode & 0o777 == 0o640, name
        finally:
            s.close()


def test_a_missing_state_dir_is_created_0750_but_not_its_parents(tmp_path: Path) -> None:
    StateStore.open(str(tmp_path / "hbd")).close()
    assert (tmp_path / "hbd").stat().st_mode & 0o777 == 0o750
    with pytest.raises(StoreError, match=r"state_dir .*/nope/hbd: cannot create it: No such file or directory"):
        StateStore.open(str(tmp_path / "nope" / "hbd"))
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        StateStore.open(str(tmp_path / "file"))


# -- a file from another version --


def test_a_file_from_a_newer_hbd_is_refused_and_left_alone(tmp_path: Path) -> None:
    StateStore.open(str(tmp_path)).close()
    conn = sqlite3.connect(str(tmp_path / "state.db"))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match=r"newer hbd.*schema version 99"):
        StateStore.open(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.db"]


def test_an_older_file_is_upgraded_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = StateStore.open(str(tmp_path))
    s.put_peer(peer("web1"))
    s.close()
    # the next release's schema: one more step
    version = state_store.SCHEMA_VERSION + 1
    monkeypatch.setattr(state_store, "SCHEMA_VERSION", version)
    monkeypatch.setattr(state_store, "_STEPS", (*state_store._STEPS, ("ALTER TABLE peers ADD COLUMN note TEXT",)))
    s = StateStore.open(str(tmp_path))
    try:
        assert [p.name for p in s.load().peers] == ["web1"]
    finally:
        s.close()
    conn = reader(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    assert "note" in [r[1] for r in conn.execute("PRAGMA table_info(peers)")]
    conn.close()


def test_a_failed_upgrade_step_leaves_the_file_at_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    StateStore.open(str(tmp_path)).close()
    version = state_store.SCHEMA_VERSION
    monkeypatch.setattr(state_store, "SCHEMA_VERSION", version + 1)
    bad = ("ALTER TABLE peers ADD COLUMN note TEXT", "ALTER TABLE nosuch ADD COLUMN x")
    monkeypatch.setattr(state_store, "_STEPS", (*state_store._STEPS, bad))
    with pytest.raises(StoreError, match="no such table: nosuch"):
        StateStore.open(str(tmp_path))
    conn = reader(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == version
    assert "note" not in [r[1] for r in conn.execute("PRAGMA table_info(peers)")]  # rolled back
    conn.close()


# -- corruption --


def test_a_garbage_file_is_moved_aside_and_a_new_store_started(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path))
    s.put_peer(peer("web1"))
    s.close()
    garbage = b"this is not an SQLite file\n" * 300
    (tmp_path / "state.db").write_bytes(garbage)
    wall = time.mktime((2026, 11, 26, 12, 0, 0, 0, 0, 0)) - time.timezone
    s = StateStore.open(str(tmp_path), wall=lambda: wall)
    try:
        aside = tmp_path / "state.db.corrupt-20261126T120000Z"
        assert aside.read_bytes() == garbage
        assert s.notice is not None
        assert "state.db was corrupt (file is not a database)" in s.notice and str(aside) in s.notice
        assert "started a new store" in s.notice
        assert s.take_messages() == [s.notice]
        assert s.take_messages() == []  # once
        assert s.load().peers == []
        s.put_peer(peer("web2"))
        assert s.flush() is False and s.failed is None
    finally:
        s.close()
    assert [p.name for p in StateStore.open(str(tmp_path)).load().peers] == ["web2"]


def test_a_damaged_page_is_found_at_open(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path))
    for i in range(2000):
        s.put_peer(peer(f"web{i}", reason="x" * 50))
    s.close()
    path = tmp_path / "state.db"
    size = path.stat().st_size
    assert size > 8 * 4096
    with open(path, "r+b") as f:  # a valid header, a page of garbage in the middle
        f.seek(4 * 4096)
        f.write(os.urandom(4096))
    s = StateStore.open(str(tmp_path))
    try:
        assert s.notice is not None and "corrupt" in s.notice
        assert len(list(tmp_path.glob("state.db.corrupt-*"))) == 1
        assert s.load().peers == []
    finally:
        s.close()


def test_the_corrupt_files_wal_goes_aside_with_it(tmp_path: Path) -> None:
    # A WAL left by a killed writer belongs to its database; replayed into a new one it would bring
    # pages of the old file back.
    s = StateStore.open(str(tmp_path))
    for i in range(2000):
        s.put_peer(peer(f"web{i}"))
    s.close()  # all in state.db, no WAL
    s = StateStore.open(str(tmp_path))
    s.put_peer(peer("web7", "DOWN"))
    s.flush()
    wal = (tmp_path / "state.db-wal").read_bytes()  # what a kill -9 now would leave
    s.close()
    (tmp_path / "state.db").write_bytes(b"\0garbage" * 10000)
    (tmp_path / "state.db-wal").write_bytes(wal)
    s = StateStore.open(str(tmp_path), wall=lambda: NOW)
    try:
        (aside,) = tmp_path.glob("state.db.corrupt-*[0-9]Z")
        assert Path(f"{aside}-wal").read_bytes() == wal
        assert s.load().peers == [] and s.notice is not None
    finally:
        s.close()


# -- the directory or the file cannot be written --


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        user=65534,
        group=65534,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_a_state_dir_without_write_permission_is_refused_at_open() -> None:
    top = tempfile.mkdtemp()  # pytest's tmp_path is private to root
    try:
        os.chmod(top, 0o755)
        os.mkdir(f"{top}/hbd", 0o755)  # root's, and not writable by others
        out = _as_nobody(f"""
            from hbd.state_store import StateStore, StoreError
            try:
                StateStore.open({top + "/hbd"!r})
            except StoreError as e:
                print(e)
            """)
        assert out.stdout.strip() == f"state_dir {top}/hbd: not writable by uid 65534 (check its owner and mode)", out
        # the directory is writable, but a state.db of another user is not
        os.chmod(f"{top}/hbd", 0o777)
        StateStore.open(f"{top}/hbd").close()
        out = _as_nobody(f"""
            from hbd.state_store import StateStore, StoreError
            try:
                StateStore.open({top + "/hbd"!r})
            except StoreError as e:
                print(e)
            """)
        assert "state.db: not readable and writable by uid 65534 (-rw-r-----)" in out.stdout, out
    finally:
        subprocess.run(["rm", "-rf", top], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_a_member_of_the_group_reads_the_store_while_the_daemon_runs_and_after_it_stopped() -> None:
    # As under the unit: state_dir 0750 and state.db 0640, the reader in the group only (nogroup here).
    top = tempfile.mkdtemp()
    read = f"""
        import sqlite3
        conn = sqlite3.connect("file:{top}/hbd/state.db?mode=ro", uri=True)
        print(conn.execute("SELECT count(*) FROM peers").fetchone()[0])
        """
    try:
        os.chmod(top, 0o755)
        os.mkdir(f"{top}/hbd", 0o750)
        os.chown(f"{top}/hbd", 0, 65534)
        s = StateStore.open(f"{top}/hbd")
        s.put_peer(peer("web1"))
        s.flush()
        for name in os.listdir(f"{top}/hbd"):  # the daemon's files: -wal and -shm too
            os.chown(f"{top}/hbd/{name}", 0, 65534)
        running = _as_nobody(read)
        s.close()
        stopped = _as_nobody(read)
        assert (running.stdout, stopped.stdout) == ("1\n", "1\n"), (running.stderr, stopped.stderr)
        assert sorted(os.listdir(f"{top}/hbd")) == ["state.db"]
        s = StateStore.open(f"{top}/hbd")  # and it is a WAL store again
        try:
            assert s._conn is not None and s._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            s.close()
    finally:
        subprocess.run(["rm", "-rf", top], check=True)


def _mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def test_a_read_only_state_dir_is_refused_at_open(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    _mount_tmpfs(mnt, "ro,size=64k")
    try:
        with pytest.raises(StoreError, match=r"state_dir .*/ro: not writable by uid 0"):
            StateStore.open(str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_stops_the_store_once_and_nothing_raises(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=256k")  # the -shm alone takes 32k
    try:
        s = StateStore.open(str(mnt))
        s.put_peer(peer("first"))
        assert s.flush() is False and s.failed is None
        assert s.take_messages() == []
        for i in range(5000):
            s.put_peer(peer(f"web{i}", reason="x" * 100))
        calls = 0
        while s.flush(100):
            calls += 1
            assert calls < 1000
        assert s.failed is not None and "full" in s.failed and str(mnt) in s.failed
        (msg,) = s.take_messages()
        assert msg.startswith("state store stopped: cannot write") and s.failed in msg
        # from now on: no-ops, bounded, silent
        s.put_peer(peer("later"))
        s.add_change(change(1))
        s.put_silence(SilenceRecord("web1", NOW, "", NOW))
        assert s.pending() == 0 and s.flush() is False
        assert s.load().peers == []
        s.close()
        assert s.take_messages() == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_file_size_limit_stops_the_store_in_a_real_process(tmp_path: Path) -> None:
    # Disk full as a process sees it without root: RLIMIT_FSIZE, with SIGXFSZ ignored so that the
    # write fails (EFBIG) instead of killing the process.
    code = f"""
        import json, os, resource, signal
        from hbd.state_store import PeerRecord, StateStore
        s = StateStore.open({str(tmp_path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # the WAL holds the schema's pages until a checkpoint: the limit leaves room above both files
        size = max(os.path.getsize({str(tmp_path / "state.db")!r}), os.path.getsize({str(tmp_path / "state.db-wal")!r}))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 64 * 1024, resource.RLIM_INFINITY))
        for i in range(20000):
            s.put_peer(PeerRecord(f"web{{i}}", "192.0.2.1:1", "UP", 0.0, None, "x" * 100, False, 10.0, ()))
        calls = 0
        while s.flush(200):
            calls += 1
        failed, messages = s.failed, s.take_messages()
        s.put_peer(PeerRecord("late", "", "UP", 0.0, None, "", False, 10.0, ()))
        more = s.flush()
        s.close()
        print(json.dumps({{"failed": failed, "messages": messages, "calls": calls, "more": more,
                          "pending": s.pending(), "again": s.take_messages()}}))
        """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["failed"] and r["failed"].startswith(f"cannot write {tmp_path}/state.db:"), r
    assert len(r["messages"]) == 1 and r["failed"] in r["messages"][0]
    assert r["calls"] >= 1 and r["more"] is False and r["pending"] == 0 and r["again"] == []


# -- kill -9 --

WRITER = """
import sys, time
from hbd.state_store import ChangeRecord, PeerRecord, SilenceRecord, StateStore
s = StateStore.open(sys.argv[1])
mode = sys.argv[2]
def rec(i):
    return PeerRecord(f"web{i}", "192.0.2.1:1", "DOWN", float(i), None, "no ping", True, 10.0, (("n", str(i)),))
i = 0
if mode == "batches":  # flushed batches, then some only queued, then wait to be killed
    for batch in range(5):
        for _ in range(300):
            s.put_peer(rec(i))
            s.add_change(ChangeRecord(float(i), f"web{i}", "UP", "DOWN", "no ping"))
            i += 1
        s.put_silence(SilenceRecord(f"web{batch}", 1e10, "maintenance", 0.0))
        while s.flush(500):
            pass
        print("flushed", i, flush=True)
    for _ in range(300):
        s.put_peer(rec(i))
        i += 1
    print("queued", i, flush=True)
    time.sleep(60)
else:  # write as fast as it can, reporting what was committed, until killed mid-write
    while True:
        for _ in range(50):
            s.put_peer(rec(i))
            s.add_change(ChangeRecord(float(i), f"web{i}", "UP", "DOWN", "no ping"))
            i += 1
        while s.flush(100):
            pass
        print("flushed", i, flush=True)
"""


def _writer(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "state"), mode],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_what_was_flushed_survives_kill_9(tmp_path: Path) -> None:
    proc = _writer(tmp_path, "batches")
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("queued"):
                break
        assert lines[-2] == ["flushed", "1500"] and lines[-1] == ["queued", "1800"]
        assert (tmp_path / "state" / "state.db-wal").exists()  # the data is in the WAL, not checkpointed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    s = StateStore.open(str(tmp_path / "state"))
    try:
        assert s.notice is None  # not corrupt: reused
        snap = s.load()
        names = {p.name for p in snap.peers}
        assert names == {f"web{i}" for i in range(1500)}  # every flushed record; the queued ones are lost
        assert next(p for p in snap.peers if p.name == "web7").labels == (("n", "7"),)
        assert sorted(x.name for x in snap.silences) == [f"web{b}" for b in range(5)]
    finally:
        s.close()
    assert count(tmp_path / "state", "changes") == 1500


def test_kill_9_in_the_middle_of_writing_leaves_a_sound_file(tmp_path: Path) -> None:
    proc = _writer(tmp_path, "continuous")
    committed = 0
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            committed = int(line.split()[1])
            if committed >= 3000 or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert committed >= 50
    s = StateStore.open(str(tmp_path / "state"))  # quick_check passes: not moved aside
    try:
        assert s.notice is None
        n = len(s.load().peers)
    finally:
        s.close()
    # at least what was reported committed; whole batches only (a batch is one transaction)
    assert n >= committed and n % 50 == 0
    assert count(tmp_path / "state", "changes") == n


# -- runs (issue 13: when the server was watching) --


def runs(state_dir: Path) -> list[tuple[float, float]]:
    conn = reader(state_dir)
    try:
        return [(a, b) for a, b in conn.execute("SELECT started, alive FROM runs ORDER BY id")]
    finally:
        conn.close()


def test_a_run_is_one_row_whatever_the_number_of_signs_of_life(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path))
    assert s.pending() == 0
    s.start_run(NOW)
    assert s.pending() == 1
    drain(s)
    assert runs(tmp_path) == [(NOW, NOW)]
    for i in range(1000):
        s.alive(NOW + i)
    assert s.pending() == 1
    s.add_change(change(1))
    assert drain(s) == 1 and s.pending() == 0
    assert runs(tmp_path) == [(NOW, NOW + 999)]
    s.alive(NOW + 1005)
    s.close()  # writes the last sign of life
    assert runs(tmp_path) == [(NOW, NOW + 1005)]
    s = StateStore.open(str(tmp_path))  # a restart: a run of its own; the first keeps its end
    s.alive(NOW + 2000)  # without start_run, the run starts here
    s.close()
    assert runs(tmp_path) == [(NOW, NOW + 1005), (NOW + 2000, NOW + 2000)]


def test_a_store_that_failed_records_no_run(tmp_path: Path) -> None:
    s = StateStore.open(str(tmp_path))
    s._fail("disk full (a test)")
    s.start_run(NOW)
    s.alive(NOW + 1)
    assert s.pending() == 0 and s.flush() is False
    s.close()
    assert runs(tmp_path) == []


def test_pruning_drops_the_runs_that_ended_before_but_never_this_one(tmp_path: Path) -> None:
    for started, alive in ((NOW, NOW + 10), (NOW + 100, NOW + 110)):
        s = StateStore.open(str(tmp_path))
        s.start_run(started)
        s.alive(alive)
        s.close()
    s = StateStore.open(str(tmp_path))
    s.start_run(NOW + 200)
    s.alive(NOW + 201)
    drain(s)
    s.prune_changes(NOW + 500)  # everything before NOW + 500, but this run is still going on
    drain(s)
    assert runs(tmp_path) == [(NOW + 200, NOW + 201)]
    s.close()


def test_a_version_1_file_gets_runs_from_its_first_change_to_its_last_sign_of_life(tmp_path: Path) -> None:
    """The upgrade to version 2 (the runs table) takes a version 1 file's server as running from its
    first recorded change to the newest change or ping it holds; an empty file gets no run."""
    for name, rows, expected in (
        ("with", [(NOW, "web1"), (NOW + 50, "db1")], [(NOW, NOW + 70)]),
        ("empty", [], []),
    ):
        state_dir = tmp_path / name
        state_dir.mkdir()
        conn = sqlite3.connect(state_dir / "state.db", isolation_level=None)
        for sql in state_store._STEPS[0]:
            conn.execute(sql)
        conn.execute("PRAGMA user_version = 1")
        sql = "INSERT INTO changes (time, peer, old, new, reason, side) VALUES (?, ?, 'UP', 'DOWN', '', 'server')"
        conn.executemany(sql, rows)
        conn.execute("INSERT INTO peers (name, last_ping) VALUES ('web1', ?), ('db1', NULL)", (NOW + 70,))
        conn.close()
        StateStore.open(str(state_dir)).close()
        assert runs(state_dir) == expected, name
        assert reader(state_dir).execute("PRAGMA user_version").fetchone()[0] == 2


def test_after_kill_9_the_run_ends_within_a_flush_of_the_kill(tmp_path: Path) -> None:
    """A daemon marking itself alive and flushing every 50 ms, killed: its run's end is at most a
    moment before the kill (generous bound: a loaded machine)."""
    code = f"""
        import sys, time
        from hbd.state_store import StateStore
        s = StateStore.open({str(tmp_path)!r})
        s.start_run(time.time())
        while True:
            s.alive(time.time())
            s.flush()
            print("alive", flush=True)
            time.sleep(0.05)
        """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        for _ in range(10):
            child.stdout.readline()
        child.kill()
        killed = time.time()
        child.wait(timeout=30)
    [(started, alive)] = runs(tmp_path)
    assert started < alive <= killed and killed - alive < 2.0, (started, alive, killed)
