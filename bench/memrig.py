"""Where each hbd process's bytes per connection go, on a small rig (``python3 -m bench.memrig``).

hbd as bench/scale.py runs it (``workers:``, a state store, named clients from bench/loadgen.py), under
bench/memprobe.py: each process is probed idle and again after the ramp (and, with --trim, after
``malloc_trim(0)``), and the difference over the connections is printed per process: RSS, anonymous
memory, what glibc's malloc holds (in use / free), pymalloc's arenas and blocks, and the tracked
objects by type. Run it under ``flock /tmp/hbd-bench.lock`` (more than 2,000 connections).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import memprobe, servers
from bench.scale import src_block


def config(port: int, tmp: Path, n: int, workers: int) -> str:
    cfg = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_timeout": 30,
        "max_clients": workers * 19_000,
        "max_peers": n + 100,
        "workers": workers,
        "backlog": 4096,
        "state_dir": str(tmp / "state"),
        "log_file": str(tmp / "hbd.log"),
        "log_level": "info",
        "control_socket": str(tmp / "s.sock"),
    }
    return json.dumps(cfg) + "\n"


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def probe(out: Path, pids: list[int], tag: str, wait: float = 20.0) -> dict[int, dict[str, Any]]:
    (out / memprobe.TAG_FILE).write_text(tag)
    for pid in pids:
        os.kill(pid, memprobe.SIGNAL)
    got: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + wait
    while len(got) < len(pids) and time.monotonic() < end:
        for pid in pids:
            f = out / f"{pid}-{tag}.json"
            if pid not in got and f.exists():
                try:
                    got[pid] = json.loads(f.read_text())
                except ValueError:
                    pass  # still being written
        time.sleep(0.2)
    return got


def _per(x: dict[str, Any], y: dict[str, Any], path: tuple[str, ...], per: float) -> float:
    """(y - x) at ``path`` (keys into the probe's record), per connection."""
    a: Any = x
    b: Any = y
    for key in path:
        a, b = a.get(key, 0), b.get(key, 0)
    return (b - a) / per


def report(pids: list[int], a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], n: int, label: str) -> None:
    print(f"\n== {label}: per connection (n={n:,}; workers share it: the supervisor's over all n) ==")
    for i, pid in enumerate(pids):
        x, y = a.get(pid), b.get(pid)
        if not x or not y:
            print(f"pid {pid}: no probe")
            continue
        per = n if i == 0 else n / (len(pids) - 1)
        who = "supervisor" if i == 0 else f"worker {i}"
        rss, anon = _per(x, y, ("vmrss",), per), _per(x, y, ("rollup", "Anonymous"), per)
        used, free = _per(x, y, ("mallinfo", "uordblks"), per), _per(x, y, ("mallinfo", "fordblks"), per)
        mapped = _per(x, y, ("mallinfo", "hblkhd"), per)
        print(
            f"{who} (pid {pid}): RSS {rss:.0f} B, anon {anon:.0f},"
            f" malloc in use {used:.0f} free {free:.0f} mmapped {mapped:.0f}"
        )
        keys = [k for k in y["pymalloc"] if "bytes" in k or "arenas" in k]
        print("   pymalloc: " + ", ".join(f"{k} {_per(x, y, ('pymalloc', k), per):.0f}" for k in keys))
        if "vmrss_after_trim" in y:
            took = f" (the trim took {y['trim_ms']:.1f} ms)" if "trim_ms" in y else ""
            print(f"   after malloc_trim: RSS {(y['vmrss_after_trim'] - x['vmrss']) / per:.0f} B{took}")
        tx = {t: (c, s) for t, c, s in x["types"]}
        rows = []
        for t, c, s in y["types"]:
            c0, s0 = tx.get(t, (0, 0))
            rows.append((s - s0, t, c - c0))
        rows.sort(reverse=True)
        print("   types: " + ", ".join(f"{t} {dc / per:.2f}x {ds / per:.0f} B" for ds, t, dc in rows[:12]))
        if y.get("list_holders"):
            print(f"   small lists held by: {y['list_holders']}")


def traced(out: Path, pids: list[int], a: str, b: str, n: int, top: int = 25) -> None:
    """What tracemalloc saw allocated between two probes, by line, per connection (--trace)."""
    for i, pid in enumerate(pids):
        x, y = out / f"{pid}-{a}.snap", out / f"{pid}-{b}.snap"
        if not x.exists() or not y.exists():
            continue
        per = n if i == 0 else n / (len(pids) - 1)
        diff = tracemalloc.Snapshot.load(str(y)).compare_to(tracemalloc.Snapshot.load(str(x)), "lineno")
        total = sum(d.size_diff for d in diff)
        who = "supervisor" if i == 0 else f"worker {i}"
        print(f"\n{who} (pid {pid}): tracemalloc {total / per:.0f} B per connection")
        for d in diff[:top]:
            frame = d.traceback[0]
            print(f"  {d.size_diff / per:7.1f} B {d.count_diff / per:6.2f}x  {frame.filename}:{frame.lineno}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=16_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--hold", type=float, default=15.0, help="seconds after the ramp before the probe")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after the loaded probe, and probe again")
    ap.add_argument("--trace", action="store_true", help="tracemalloc in every hbd process: bytes by line")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hbd-memrig-"))
    (tmp / "state").mkdir()
    out = tmp / "probe"
    port = servers.free_port()
    (tmp / "hbd.yaml").write_text(config(port, tmp, args.n, args.workers))
    env = {**os.environ, "PYTHONPATH": str(servers.REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    hbd_env = {**env, "PYTHONTRACEMALLOC": "1"} if args.trace else env
    hbd = subprocess.Popen(
        [servers.PYTHON, "-m", "bench.memprobe", str(out), "server", "-c", str(tmp / "hbd.yaml")],
        cwd=servers.REPO,
        env=hbd_env,
        stdout=open(tmp / "hbd.out", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: servers._preexec(None),
        start_new_session=True,
    )
    gen = None
    try:
        time.sleep(5.0)
        pids = [hbd.pid, *children(hbd.pid)]
        print(f"hbd {pids} in {tmp}", file=sys.stderr, flush=True)
        idle = probe(out, pids, "idle")
        start = time.monotonic() + 1.0
        ramp = args.n / args.rate
        gen = subprocess.Popen(
            [
                servers.PYTHON,
                "-m",
                "bench.loadgen",
                "--port",
                str(port),
                "-n",
                str(args.n),
                "--procs",
                str(max(1, args.workers)),
                "--mode",
                "open",
                "--rate",
                str(args.rate),
                "--interval",
                str(args.interval),
                "--settle",
                "2",
                "--duration",
                str(args.hold + 60),
                "--connect-timeout",
                "30",
                "--start-at",
                str(start),
                "--src-net",
                src_block(),
                "--src-per",
                "1000",
                "--hello",
                "c",
            ],
            cwd=servers.REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            preexec_fn=lambda: servers._preexec(None),
            start_new_session=True,
        )
        time.sleep(max(0.0, start + ramp + args.hold - time.monotonic()))
        print("probing loaded", file=sys.stderr, flush=True)
        loaded = probe(out, pids, "loaded")
        report(pids, idle, loaded, args.n, "idle -> loaded")
        if args.trace:
            traced(out, pids, "idle", "loaded", args.n)
        if args.trim:
            (out / "trim").write_text("")
            trimmed = probe(out, pids, "trimmed")
            report(pids, idle, trimmed, args.n, "idle -> loaded, malloc_trim")
        print(f"\nraw: {out}")
    finally:
        if gen is not None:
            os.killpg(gen.pid, signal.SIGKILL)
        os.killpg(hbd.pid, signal.SIGTERM)
        hbd.wait(30)


if __name__ == "__main__":
    main()
