"""The state store's writer thread on real SQLite files: the loop's calls return at once while SQLite
is stalled mid-transaction or locked by someone else, nothing queued is lost, close writes the rest,
a write error stops the store once, and the writer takes no signals."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

from hbd.state_store import CLOSE_SECONDS, ChangeRecord, PeerRecord
from hbd.store_thread import JOIN_SLACK, StoreThread

NOW = 1_790_000_000.0
# The loop's calls must not wait on the disk: each returns in well under a loop turn's budget (the
# bound is generous for a loaded 2-core machine: a call is microseconds, a GIL hand-off up to 5 ms).
LOOP_CALL_LIMIT = 0.25


def change(i: int, peer: str = "web1") -> ChangeRecord:
    return ChangeRecord(NOW + i, peer, "UP", "DOWN", f"change {i}")


def peer(name: str) -> PeerRecord:
    return PeerRecord(name, "192.0.2.7:40000", "DOWN", NOW, NOW - 1, "disconnected", False, 10.0)


def count(state_dir: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def wait_until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def started(tmp_path: Path) -> tuple[StoreThread, StoreThread]:
    """The store, twice: its queueing side (the loop's) and its writer (the same object)."""
    store = StoreThread.open(str(tmp_path))
    store.start_run(NOW)
    store.flush()  # the first: on this thread (the run's row), then the writer starts
    return store, store


def test_the_loop_never_waits_while_sqlite_is_stalled_in_a_transaction(tmp_path: Path) -> None:
    """The writer is held inside SQLite (a transaction that does not end, as a stuck fsync would hold
    it) until the loop's side has made a mass disconnect's worth of calls: had any of them waited for
    the writer, they could not have finished (the writer lets go only after them)."""
    store, writer = started(tmp_path)
    stalled, release, returned = threading.Event(), threading.Event(), threading.Event()

    def stall() -> int:  # SQLite calls this inside the writer's transaction
        stalled.set()
        release.wait(60)
        returned.set()
        return 0

    conn = store._conn
    assert conn is not None
    conn.create_function("stall", 0, stall)
    conn.execute(
        "CREATE TEMP TRIGGER stall AFTER INSERT ON main.changes WHEN NEW.peer = 'slow' BEGIN SELECT stall(); END"
    )
    writer.add_change(change(0, "slow"))
    writer.flush()
    assert stalled.wait(10)
    try:
        for i in range(1, 20_001):
            writer.add_change(change(i))
            writer.put_peer(peer(f"web{i}"))
            if i % 500 == 0:
                assert writer.flush() is False  # wakes the writer: never more for the loop to do
        assert not returned.is_set()  # all done while the writer was still inside SQLite
        assert store.pending() == 40_000 and count(tmp_path, "changes") == 0  # all waiting, nothing lost
    finally:
        release.set()
    wait_until(lambda: store.pending() == 0)
    writer.close()
    assert count(tmp_path, "changes") == 20_001 and count(tmp_path, "peers") == 20_000
    # The loop waits for the queues' lock only while the writer takes a batch (microseconds; the bound
    # is generous for a loaded 2-core machine).
    assert store.longest_wait < LOOP_CALL_LIMIT and writer.take_messages() == []


def test_a_write_lock_held_elsewhere_holds_up_the_writer_not_the_loop(tmp_path: Path) -> None:
    store, writer = started(tmp_path)
    other = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # an operator's `sqlite3` shell in a write transaction
    try:
        for i in range(1000):
            writer.add_change(change(i))
        t = time.perf_counter()
        assert writer.flush() is False
        assert time.perf_counter() - t < LOOP_CALL_LIMIT
        wait_until(lambda: store.busy >= 2)  # the writer keeps trying
        assert store.pending() == 1000 and store.failed is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    writer.flush()
    wait_until(lambda: store.pending() == 0)
    writer.close()
    assert count(tmp_path, "changes") == 1000


def test_close_writes_everything_still_queued(tmp_path: Path) -> None:
    _, writer = started(tmp_path)
    for i in range(30_000):
        writer.add_change(change(i))
    writer.alive(NOW + 5)
    t = time.monotonic()
    writer.close()  # not flushed once: close writes it all, and the writer ends
    assert time.monotonic() - t < CLOSE_SECONDS + JOIN_SLACK
    assert writer._thread is not None and not writer._thread.is_alive()
    assert count(tmp_path, "changes") == 30_000
    conn = sqlite3.connect(str(tmp_path / "state.db"))
    assert conn.execute("SELECT started, alive FROM runs").fetchall() == [(NOW, NOW + 5)]
    conn.close()
    assert writer.take_messages() == []


def test_a_full_disk_stops_the_store_once_and_the_loop_runs_on(tmp_path: Path) -> None:
    store, writer = started(tmp_path)
    conn = store._conn
    assert conn is not None
    conn.execute("PRAGMA max_page_count = 20")  # SQLITE_FULL after a few batches: "database or disk is full"
    for i in range(20_000):
        writer.add_change(change(i, "x" * 100))
    writer.flush()
    wait_until(lambda: writer.failed is not None)
    messages = writer.take_messages()
    assert len(messages) == 1 and "state store stopped" in messages[0] and "full" in messages[0], messages
    assert store.pending() == 0  # the queues are dropped: nothing more is written
    writer.add_change(change(1))  # a no-op now, as every later call
    assert writer.flush() is False and store.pending() == 0
    writer.close()
    assert writer.take_messages() == []  # said once


def test_the_writer_thread_takes_no_signals(tmp_path: Path) -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    _, writer = started(tmp_path)
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the caller's mask is as it was
        assert writer._thread is not None and writer._thread.native_id is not None
        status = Path(f"/proc/self/task/{writer._thread.native_id}/status").read_text()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCHLD):
            assert blocked & (1 << (signum - 1)), f"{signum!r} not blocked in the writer"
    finally:
        writer.close()
