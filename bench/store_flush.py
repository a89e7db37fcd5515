"""How long one state-store flush() holds the loop: ``python3 -m bench.store_flush [-n 19000] [--max-rows 500]``.

A server that knew N peers (all UP, already in the store) loses them all at once: each peer's record
becomes DOWN and one change (UP -> DOWN) is queued for the history. The loop then calls flush() until
nothing is left, as its timer would. Prints the longest, median and 99th-percentile call in ms, and
what a checkpoint step cost. The store lives in a temporary directory on the disk (``--dir`` for
another); figures are for this machine at this moment: run it a few times.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=19000, help="peers that go down at once (default 19000)")
    ap.add_argument("--max-rows", type=int, default=MAX_ROWS, help=f"rows per flush() (default {MAX_ROWS})")
    ap.add_argument("--runs", type=int, default=3, help="repeat, each in a new store (default 3)")
    ap.add_argument("--history", type=int, default=0, help="changes already in the store (default 0)")
    ap.add_argument("--dir", default=None, help="where to put the stores (default: a temporary directory)")
    args = ap.parse_args()
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
