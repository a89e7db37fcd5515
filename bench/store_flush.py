"""How long the state store holds the loop: ``python3 -m bench.store_flush [-n 19000] [--max-rows 500] [--thread]``.

A server that knew N peers (all UP, already in the store) loses them all at once: each peer's record
becomes DOWN and one change (UP -> DOWN) is queued for the history.

Without ``--thread``: one thread queues and then calls flush() until nothing is left, each call one
bounded SQLite step (a transaction of max_rows, a WAL checkpoint). Prints the longest, median and
99th-percentile call in ms, and what a checkpoint step cost: what each step costs the thread that runs
it (the daemons' writer thread, hbd.store_thread, since the loop no longer runs them).

With ``--thread``: the daemons' way. The store's writer thread writes while this thread, standing in
for the loop, hands the rows over as the loop does (a turn: 500 peer records and 500 changes queued,
then flush(), which only wakes the writer). Prints the longest and median hand-over of a turn in ms,
the longest wait for the writer's lock, and how long the writer took to write it all.

The store lives in a temporary directory on the disk (``--dir`` for another); figures are for this
machine at this moment: run it a few times.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from hbd.state_store import DB_NAME, MAX_ROWS, ChangeRecord, PeerRecord, StateStore
from hbd.store_thread import StoreThread


def peer(i: int, state: str, now: float) -> PeerRecord:
    return PeerRecord(
        name=f"host{i:05d}.example.net",
        address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:40000",
        state=state,
        since=now,
        last_ping=now - 3.0,
        reason="" if state == "UP" else "no ping for 10 s",
        expected=True,
        timeout=10.0,
        labels=(("rack", f"r{i % 40}"), ("role", "web")),
    )


def prefill(directory: str, history: int) -> None:
    """A store that already holds ``history`` changes (about a month of a busy fleet at 1,000,000)."""
    StateStore.open(directory).close()
    start = time.time() - 30 * 86400
    step = 30 * 86400 / max(1, history)
    with sqlite3.connect(f"{directory}/{DB_NAME}") as conn:
        conn.executemany(
            "INSERT INTO changes (time, peer, old, new, reason, side) VALUES (?, ?, ?, ?, ?, 'server')",
            (
                (start + i * step, f"host{i % 19000:05d}.example.net", "UP", "DOWN", "no ping for 10 s")
                for i in range(history)
            ),
        )
    conn.close()


def run(n: int, max_rows: int, directory: str, history: int = 0) -> dict[str, float]:
    if history:
        prefill(directory, history)
    opened = time.perf_counter()
    store = StateStore.open(directory)
    opened = time.perf_counter() - opened
    now = time.time()
    for i in range(n):
        store.put_peer(peer(i, "UP", now))
    while store.flush(5000):  # the store as the restart found it; not measured
        pass
    now = time.time()
    queued = time.perf_counter()
    for i in range(n):  # the mass disconnect, as the registry reports it
        store.put_peer(peer(i, "DOWN", now))
        store.add_change(ChangeRecord(now, f"host{i:05d}.example.net", "UP", "DOWN", "no ping for 10 s"))
    queued = time.perf_counter() - queued
    times: list[float] = []
    checkpoints: list[float] = []
    rows = store.rows_written
    more = True
    while more:
        c = store.checkpoints
        t = time.perf_counter()
        more = store.flush(max_rows)
        t = time.perf_counter() - t
        (checkpoints if store.checkpoints > c else times).append(t)
    rows = store.rows_written - rows
    store.close()
    assert store.failed is None, store.failed
    ms = sorted(t * 1000 for t in times + checkpoints)
    return {
        "calls": len(ms),
        "rows": rows,
        "checkpoints": len(checkpoints),
        "checkpoint_max_ms": max(checkpoints, default=0.0) * 1000,
        "max_ms": ms[-1],
        "median_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "total_ms": sum(ms),
        "queue_ms": queued * 1000,
        "open_ms": opened * 1000,
    }


def run_thread(n: int, directory: str, history: int = 0, turn: int = 500) -> dict[str, float]:
    """The mass disconnect handed to the writer thread ``turn`` peers (and their changes) at a time."""
    if history:
        prefill(directory, history)
    store = StoreThread.open(directory)
    now = time.time()
    for i in range(n):
        store.put_peer(peer(i, "UP", now))
    while store._step(5000):  # the store as the restart found it; not measured
        pass
    store.start_run(now)
    store.flush()  # the first, before the loop runs: starts the writer
    now = time.time()
    started = time.perf_counter()
    turns: list[float] = []
    for first in range(0, n, turn):
        t = time.perf_counter()
        for i in range(first, min(n, first + turn)):
            store.put_peer(peer(i, "DOWN", now))
            store.add_change(ChangeRecord(now, f"host{i:05d}.example.net", "UP", "DOWN", "no ping for 10 s"))
        store.flush()
        turns.append(time.perf_counter() - t)
        time.sleep(0.001)  # the loop's other work between turns
    while store.pending():
        time.sleep(0.005)
    written = time.perf_counter() - started
    store.close()
    assert store.failed is None, store.failed
    ms = sorted(t * 1000 for t in turns)
    return {
        "turns": len(ms),
        "max_ms": ms[-1],
        "median_ms": statistics.median(ms),
        "wait_ms": store.longest_wait * 1000,
        "written_s": written,
        "checkpoints": store.checkpoints,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=19000, help="peers that go down at once (default 19000)")
    ap.add_argument("--max-rows", type=int, default=MAX_ROWS, help=f"rows per flush() (default {MAX_ROWS})")
    ap.add_argument("--runs", type=int, default=3, help="repeat, each in a new store (default 3)")
    ap.add_argument("--history", type=int, default=0, help="changes already in the store (default 0)")
    ap.add_argument("--dir", default=None, help="where to put the stores (default: a temporary directory)")
    ap.add_argument("--thread", action="store_true", help="hand the rows to the writer thread, as the daemons do")
    args = ap.parse_args()
    if args.thread:
        print(f"{args.n} peers down at once, handed to the writer thread 500 a turn; one new store per run")
        print(f"{'run':>3} {'turns':>6} {'max ms':>7} {'median ms':>9} {'lock wait ms':>12} {'written s':>9}")
        for k in range(args.runs):
            with tempfile.TemporaryDirectory(dir=args.dir) as d:
                r = run_thread(args.n, d, args.history)
            print(
                f"{k + 1:>3} {r['turns']:>6} {r['max_ms']:>7.2f} {r['median_ms']:>9.2f} {r['wait_ms']:>12.3f}"
                f" {r['written_s']:>9.2f}"
            )
        return
    print(f"{args.n} peers down at once, flush(max_rows={args.max_rows}); one new store per run")
    print(
        f"{'run':>3} {'calls':>6} {'rows':>7} {'max ms':>7} {'p99 ms':>7} {'median ms':>9} {'total ms':>8}"
        f" {'checkpoints':>11} {'their max ms':>12} {'open ms':>7}"
    )
    for k in range(args.runs):
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            r = run(args.n, args.max_rows, d, args.history)
        print(
            f"{k + 1:>3} {r['calls']:>6} {r['rows']:>7} {r['max_ms']:>7.1f} {r['p99_ms']:>7.1f}"
            f" {r['median_ms']:>9.1f} {r['total_ms']:>8.0f} {r['checkpoints']:>11}"
            f" {r['checkpoint_max_ms']:>12.1f} {r['open_ms']:>7.0f}"
        )


if __name__ == "__main__":
    main()
