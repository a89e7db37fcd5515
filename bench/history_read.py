"""What ``hbd history`` costs on a large store: PEERS peers with CHANGES state changes each over 30 days
and a server restarted every 3 days, in a state store (the store's schema, rows inserted in bulk);
then ``python3 -m hbd history`` (table, and ``--json``) in a process of its own, timed with its CPU
and peak RSS.

Usage: python3 -m bench.history_read [--peers 19000] [--changes 10]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hbd.state_store import StateStore

DAY = 86400.0


def make_store(state_dir: Path, peers: int, changes: int, now: float) -> int:
    rnd = random.Random(1)
    rows = []
    for p in range(peers):
        name, state = f"host{p:05d}", "UP"
        rows.append((now - 30 * DAY, name, "NEW", "UP", "first ping"))
        for t in sorted(rnd.uniform(now - 30 * DAY, now) for _ in range(changes - 1)):
            new = "DOWN" if state == "UP" else "UP"
            rows.append((t, name, state, new, "no ping for 10 s" if new == "DOWN" else "first ping"))
            state = new
    rows.sort()
    runs = [(now - 30 * DAY + i * 3 * DAY, now - 30 * DAY + (i + 1) * 3 * DAY - 60) for i in range(10)]
    runs[-1] = (runs[-1][0], now - 1)
    StateStore.open(str(state_dir)).close()  # the store's own schema; then rows in bulk, faster than flush()
    conn = sqlite3.connect(state_dir / "state.db", isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO changes (time, peer, old, new, reason, side) VALUES (?, ?, ?, ?, ?, 'server')", rows)
    conn.executemany("INSERT INTO runs (started, alive) VALUES (?, ?)", runs)
    conn.executemany(
        "INSERT INTO peers (name, address, state, since, last_ping, reason, expected, timeout, labels)"
        " VALUES (?, '', 'UP', 0, ?, '', 0, 10, '{}')",
        [(f"host{p:05d}", now) for p in range(peers)],
    )
    conn.execute("COMMIT")
    conn.close()
    return len(rows)


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS MiB) of one child process (its own rusage, from wait4)."""
    start = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as child:
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        err = child.stderr.read().decode() if child.stderr else ""
    if child.returncode != 0:
        sys.exit(f"{' '.join(argv)}: exit {child.returncode}: {err.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=19000)
    ap.add_argument("--changes", type=int, default=10, help="state changes per peer over 30 days")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        state_dir.mkdir()
        rows = make_store(state_dir, args.peers, args.changes, time.time())
        config = Path(tmp) / "server.yaml"
        config.write_text(f"state_dir: {state_dir}\n")
        size = os.path.getsize(state_dir / "state.db") / 2**20
        print(f"store: {args.peers} peers, {rows} changes, {size:.1f} MiB")
        hbd = [sys.executable, "-m", "hbd", "history", "-c", str(config)]
        one = f"host{args.peers // 2:05d}"
        for label, argv in (("table", hbd), ("--json", [*hbd, "--json"]), ("one peer", [*hbd, one])):
            wall, cpu, rss = timed(argv)
            print(f"hbd history {label}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss:.0f} MiB peak RSS")


if __name__ == "__main__":
    main()
