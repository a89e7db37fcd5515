"""Benchmark runner: ``python3 -m bench --mode quick|full``.

For each N, runs the floor, hbd and the thread-per-client fixture back to back (so ratios come
from the same minutes of a noisy machine), then the closed-loop throughput runs (``workers``
1 and 2) and the hbd-client idle cost. Writes JSON lines and a PNG and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import plot, report, runner
from bench.modes import MODES, Mode
from bench.servers import REPO

RESULTS = REPO / "bench" / "results"


def coped(r: dict[str, Any]) -> str | None:
    """Why a thread-per-client run counts as 'could not cope' (None when it coped)."""
    if not r.get("ok"):
        return r.get("error") or "failed"
    n = r["n"]
    if r["connected"] < 0.99 * n:
        return f"only {r['connected']} of {n} connected"
    if r["errors"] > 0.01 * n:
        return f"{r['errors']} errors"
    if r["missed"] > 0.01 * max(1, r["pings"]):
        return f"{r['missed']} missed pongs"
    return None


def estimate_s(m: Mode, servers: list[str]) -> float:
    def one(n: int) -> float:
        return (m.hold_duration if n == max(m.ns) else m.duration) + n / m.rate + m.settle + m.timeout + 7

    per = sum(one(n) for n in m.ns)
    pairs = 2 * (m.cpu_pairs - 1) * one(m.cpu_n) if m.cpu_n in m.ns and {"floor", "hbd"} <= set(servers) else 0.0
    closed = len(m.closed_depths) * len(m.closed_workers) * 2 * (m.closed_duration + m.settle + 4)
    return per * len(servers) + pairs + closed + m.client_idle_s + 5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--servers", default=None, help="comma list out of floor,hbd,thread (default: all)")
    ap.add_argument("--ns", default=None, help="comma list of N, overriding the mode's")
    ap.add_argument("--only", choices=("open", "closed", "client"), default=None, help="run one part only")
    ap.add_argument("--wire", choices=("bare", "line"), default=None, help="ping form (default: the mode's)")
    ap.add_argument("--out", type=Path, default=None, help="results directory")
    ap.add_argument("--name", default=None, help="file stem for .jsonl/.png (default: the mode)")
    a = ap.parse_args(argv)
    m = MODES[a.mode]
    if a.ns:
        m = Mode(**{**m.__dict__, "ns": tuple(int(x) for x in a.ns.split(","))})
    if a.wire:
        m = Mode(**{**m.__dict__, "wire": a.wire})
    names = a.servers.split(",") if a.servers else list(m.servers)
    out_dir = a.out or (RESULTS if m.name == "full" else RESULTS / "tmp")
    stem = a.name or m.name
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, png, md = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.png", out_dir / f"{stem}.md"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    mach = report.machine()
    recs: list[dict[str, Any]] = [mach]
    print(
        f"bench {m.name}: servers {','.join(names)}, N {list(m.ns)}, wire {m.wire}; about "
        f"{estimate_s(m, names) / 60:.1f} min on {mach['nproc']} x {mach['cpu_model']}",
        flush=True,
    )
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hbd-bench-") as td:
        tmp = Path(td)
        if a.only in (None, "open"):
            thread_gave_up: str | None = None
            for n in m.ns:
                for name in names:
                    if name == "thread" and (thread_gave_up or n > m.thread_max_n):
                        why = thread_gave_up or f"N > {m.thread_max_n}"
                        r = {
                            "kind": "open",
                            "mode": m.name,
                            "server": name,
                            "n": n,
                            "ok": False,
                            "skipped": True,
                            "error": f"skipped: {why}",
                        }
                    else:
                        r = runner.run_open(name, n, m, tmp)
                        if name == "thread" and (why := coped(r)):
                            thread_gave_up = f"could not cope at N={n} ({why})"
                    recs.append(r)
                    _progress(r)
            if m.cpu_n in m.ns and {"floor", "hbd"} <= set(names):
                for k in range(1, m.cpu_pairs):  # ABBA: hbd first in odd pairs, so a drift cancels
                    for name in ("hbd", "floor") if k % 2 else ("floor", "hbd"):
                        r = {**runner.run_open(name, m.cpu_n, m, tmp), "kind": "cpu_pair", "pair": k}
                        recs.append(r)
                        print(
                            f"  pair {k} {name:>6} n={m.cpu_n}: {r.get('cpu_us_per_ping')} us/ping{_host(r)}",
                            flush=True,
                        )
        if a.only in (None, "closed"):
            for d in m.closed_depths:
                for w in m.closed_workers:
                    for name in ("floor", "hbd"):
                        if name in names:
                            r = runner.run_closed(name, w, d, m, tmp)
                            recs.append(r)
                            _progress(r)
        if a.only in (None, "client") and m.client_idle_s > 0 and "hbd" in names:
            r = runner.run_client_idle(m, tmp)
            recs.append(r)
            _progress(r)
    report.add_ratios(recs)
    recs += report.targets(recs)
    mach["wall_s"] = round(time.monotonic() - t_start, 1)
    with open(jsonl, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    md.write_text(report.markdown(recs))
    print()
    print(report.table(recs))
    title = (
        f"hbd bench ({m.name}) {mach['date']}: {mach['nproc']} x {mach['cpu_model']}, "
        f"Linux {mach['kernel']}, Python {mach['python']}; server pinned to 1 core"
    )
    drew = plot.plot(recs, png, title)
    print(f"\nwrote {jsonl}, {md}" + (f" and {png}" if drew else " (no plot: python3-matplotlib missing)"))
    print(f"wall time {mach['wall_s']:.0f} s")
    return 0


def _host(r: dict[str, Any]) -> str:
    """The host's share of the server's core in the window: a noisy window shows here first."""
    h = r.get("server_core_pct")
    return f", server core: steal {h['steal']} %, softirq {h['softirq']} %" if h else ""


def _progress(r: dict[str, Any]) -> None:
    if not r.get("ok"):
        print(
            f"  {r['kind']:>11} {r.get('server', ''):>6} n={r.get('n', '')}: {r.get('error', 'failed')[:200]}",
            flush=True,
        )
    elif r["kind"] == "open":
        print(
            f"  open   {r['server']:>6} n={r['n']:<6} {r['cpu_us_per_ping']} us/ping, "
            f"{r['rss_per_conn_b']} B/conn, err {r['errors']}, missed {r['missed']}, "
            f"conn p99 {r['connect_ms']['p99']} ms, detect p99 {r['detect_ms']['p99']} ms, "
            f"gen {r['gen_cpu_pct']} %" + _host(r),
            flush=True,
        )
        t = r.get("turns")
        print(
            f"         rtt p99 {r['rtt_ms']['p99']} max {r['rtt_ms']['max']} ms, generator lag p99 "
            f"{r['gen_lag_p99_ms']} max {r.get('gen_lag_max_ms')} ms"
            + (
                f"; hbd loop turns {t['count']}: 99 % <= {t['p99_le_ms']} ms, max {t['max_ms']} ms, "
                f"{t['over_10ms']} over 10 ms, {t['over_100ms']} over 100 ms"
                if t
                else ""
            ),
            flush=True,
        )
    elif r["kind"] == "closed":
        print(
            f"  closed {r['server']:>6} workers={r['workers']} depth={r['depth']} {r['throughput']:.0f} pong/s, "
            f"server {r['server_cpu_pct']} %, gen {r['gen_cpu_pct']} %",
            flush=True,
        )
    else:
        print(f"  client idle: {r['cpu_pct']} % CPU, {r['rss_kb']} kB RSS", flush=True)


if __name__ == "__main__":
    sys.exit(main())
