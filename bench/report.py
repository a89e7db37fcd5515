"""Turn run records into ratios to the floor, target verdicts, a terminal table and a machine record."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from typing import Any

from bench.servers import REPO

Rec = dict[str, Any]


def machine() -> Rec:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    soft_hard = _nofile()
    return {
        "kind": "machine",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "nofile": soft_hard,
    }


def _nofile() -> list[int]:
    import resource

    return list(resource.getrlimit(resource.RLIMIT_NOFILE))


def add_ratios(recs: list[Rec]) -> None:
    """cpu_x_floor and rss_x_floor on every open-loop record that has a floor run at the same N."""
    floor = {r["n"]: r for r in recs if r.get("kind") == "open" and r["server"] == "floor" and r.get("ok")}
    for r in recs:
        f = floor.get(r.get("n")) if r.get("kind") == "open" and r.get("ok") else None
        if f is None:
            continue
        r["cpu_x_floor"] = _ratio(r.get("cpu_us_per_ping"), f.get("cpu_us_per_ping"))
        r["rss_x_floor"] = _ratio(r.get("rss_per_conn_b"), f.get("rss_per_conn_b"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _open(recs: list[Rec], server: str) -> dict[int, Rec]:
    return {r["n"]: r for r in recs if r.get("kind") == "open" and r["server"] == server and r.get("ok")}


def cpu_pairs(recs: list[Rec]) -> Rec | None:
    """CPU per ping of hbd over the floor's in each pair at one N: the open runs' own (pair 0) and the
    ``cpu_pair`` runs after them (bench.__main__); the median of the pairs' ratios is the estimate."""
    pairs: dict[int, dict[str, Rec]] = {}
    for r in recs:
        if r.get("kind") == "cpu_pair" and r.get("ok"):
            pairs.setdefault(r["pair"], {})[r["server"]] = r
    if not pairs:
        return None
    n = next(iter(next(iter(pairs.values())).values()))["n"]
    first = {r["server"]: r for r in recs if r.get("kind") == "open" and r.get("n") == n and r.get("ok")}
    rows = [first] + [pairs[k] for k in sorted(pairs)]
    done = [p for p in rows if "floor" in p and "hbd" in p]
    if not done:
        return None
    xs = [_ratio(p["hbd"]["cpu_us_per_ping"], p["floor"]["cpu_us_per_ping"]) for p in done]
    known = [x for x in xs if x is not None]
    if not known:
        return None
    return {
        "n": n,
        "x": xs,
        "median": round(statistics.median(known), 2),
        "floor_us": [p["floor"]["cpu_us_per_ping"] for p in done],
        "hbd_us": [p["hbd"]["cpu_us_per_ping"] for p in done],
        "gen_wakeups_per_pong": [[p[s].get("gen_wakeups_per_pong") for s in ("floor", "hbd")] for p in done],
        "steal_pct": [[(p[s].get("server_core_pct") or {}).get("steal") for s in ("floor", "hbd")] for p in done],
    }


def targets(recs: list[Rec]) -> list[Rec]:
    """The issue's targets, each with the measured value and a verdict (None: not measured)."""
    hbd = _open(recs, "hbd")
    out: list[Rec] = []

    def add(name: str, value: Any, limit: str, met: bool | None, at: str = "") -> None:
        out.append({"kind": "target", "name": name, "value": value, "limit": limit, "met": met, "at": at})

    n10 = 10000 if 10000 in hbd else max((n for n in hbd if n <= 10000), default=None)
    r = hbd.get(n10) if n10 else None
    x = r.get("cpu_x_floor") if r else None
    add("cpu_per_ping_vs_floor", x, "<= 1.3x", None if x is None else x <= 1.3, f"N={n10}")
    if (pairs := cpu_pairs(recs)) is not None:
        med = pairs["median"]
        add("cpu_per_ping_vs_floor_pairs", pairs, "<= 1.2x, median of the pairs", med <= 1.2, f"N={pairs['n']}")
    b = r.get("rss_per_conn_b") if r else None
    add("rss_per_conn", b, "<= 1024 B", None if b is None else b <= 1024, f"N={n10}")
    if hbd:
        nmax = max(hbd)
        h = hbd[nmax]
        ok = h["errors"] == 0 and h["missed"] == 0 and h["connected"] == nmax and h.get("alive", True)
        add(
            "hold_clients",
            {
                "n": nmax,
                "window_s": h["window_s"],
                "errors": h["errors"],
                "missed": h["missed"],
                "connected": h["connected"],
            },
            "19000 for 60 s, 0 errors, 0 missed",
            ok and nmax >= 19000 and h["window_s"] >= 59.5,
            f"N={nmax}",
        )
        worst = max(hbd.values(), key=lambda q: q["connect_ms"]["p99"] or 0)
        p99 = worst["connect_ms"]["p99"]
        add("connect_p99_ms", p99, "< 5 ms", None if p99 is None else p99 < 5.0, f"worst, N={worst['n']}")
    if r:
        d = r["detect_ms"]["p99"]
        lim = r["timeout_s"] * 1000 + 50
        add(
            "detect_p99_ms",
            d,
            f"<= {lim:g} ms",
            None if d is None else d <= lim and r["undetected"] == 0,
            f"N={n10}, timeout {r['timeout_s']:g} s",
        )
    for srv in ("hbd", "floor"):
        closed = {
            r["workers"]: r
            for r in recs
            if r.get("kind") == "closed" and r["server"] == srv and r.get("ok") and r.get("depth", 1) == 1
        }
        if 1 in closed and 2 in closed:
            c1, c2 = closed[1], closed[2]
            x = _ratio(c2["throughput"], c1["throughput"])
            # what two cores would give if the generator ran elsewhere: per-core efficiency x 2
            proj = _ratio(2 * (c2["pongs_per_server_cpu_s"] or 0), c1["pongs_per_server_cpu_s"])
            val = {
                "measured": x,
                "projected": proj,
                "gen_cpu_pct": [c1["gen_cpu_pct"], c2["gen_cpu_pct"]],
                "server_cpu_pct": [c1["server_cpu_pct"], c2["server_cpu_pct"]],
            }
            if srv == "hbd":
                add("workers2_vs_1", val, ">= 1.7x", None if x is None else x >= 1.7, "closed loop, measured")
            else:  # not a target: what this machine and generator can show at all
                add("floor_workers2_vs_1", val, "reference ceiling", None, "closed loop, measured")
        elif srv == "hbd":
            add("workers2_vs_1", None, ">= 1.7x", None, "not measured")
    cl = next((r for r in recs if r.get("kind") == "client_idle"), None)
    if cl and cl.get("ok"):
        add(
            "client_idle",
            {"cpu_pct": cl["cpu_pct"], "rss_mb": round(cl["rss_kb"] / 1024, 1)},
            "< 0.1 % CPU, < 25 MB",
            cl["cpu_pct"] < 0.1 and cl["rss_kb"] < 25 * 1024,
            "interval 1 s",
        )
    return out


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(recs: list[Rec]) -> str:
    cols = [
        ("server", 7),
        ("N", 6),
        ("us/ping", 8),
        ("xfloor", 6),
        ("cpu%", 5),
        ("B/conn", 7),
        ("xfloor", 6),
        ("thr", 6),
        ("rtt50", 6),
        ("rtt99", 6),
        ("rttmax", 7),
        ("conn99", 7),
        ("err", 5),
        ("miss", 5),
        ("det99", 7),
        ("gen%", 5),
        ("genlag99", 8),
        ("turnmax", 8),
        (">100ms", 6),
    ]
    lines = [
        "open loop: N clients x 1 ping/s; times in ms; det99 = server-side detection p99; genlag99 = the"
        " generator's lag p99; turnmax, >100ms = hbd's longest loop turn and turns over 100 ms (to the window's end)",
        " ".join(h.rjust(w) for h, w in cols),
    ]
    for r in recs:
        if r.get("kind") != "open":
            continue
        if not r.get("ok"):
            lines.append(
                f"{r['server']:>7} {r['n']:>6}  {'skipped' if r.get('skipped') else 'FAILED'}: "
                f"{(r.get('error') or '')[:90]}"
            )
            continue
        vals = [
            r["server"],
            r["n"],
            _f(r["cpu_us_per_ping"], 2),
            _f(r.get("cpu_x_floor"), 2),
            _f(r["cpu_pct"]),
            r["rss_per_conn_b"],
            _f(r.get("rss_x_floor"), 2),
            r["threads"],
            _f(r["rtt_ms"]["p50"], 2),
            _f(r["rtt_ms"]["p99"], 2),
            _f(r["rtt_ms"]["max"], 1),
            _f(r["connect_ms"]["p99"], 2),
            r["errors"],
            r["missed"],
            _f(r["detect_ms"]["p99"], 0),
            _f(r["gen_cpu_pct"]),
            _f(r.get("gen_lag_p99_ms"), 1),
            _f((r.get("turns") or {}).get("max_ms"), 1),
            _f((r.get("turns") or {}).get("over_100ms")),
        ]
        lines.append(" ".join(str(v).rjust(w) for v, (_, w) in zip(vals, cols, strict=True)))
    closed = [r for r in recs if r.get("kind") == "closed"]
    if closed:
        lines += [
            "",
            "closed loop: each conn pings again as soon as its pong returns",
            f"{'server':>7} {'workers':>7} {'conns':>6} {'pong/s':>9} {'srv cpu%':>8} {'us/ping':>8} "
            f"{'rtt99':>6} {'err':>4} {'gen cpu%':>8}",
        ]
        for r in closed:
            if not r.get("ok"):
                lines.append(f"{r['server']:>7} {r['workers']:>7}  FAILED: {(r.get('error') or '')[:90]}")
                continue
            lines.append(
                f"{r['server']:>7} {r['workers']:>7} {r['n']:>6} {r['throughput']:>9.0f} "
                f"{r['server_cpu_pct']:>8.1f} {_f(r['cpu_us_per_ping'], 2):>8} "
                f"{_f(r['rtt_ms']['p99'], 2):>6} {r['errors']:>4} {_f(r['gen_cpu_pct']):>8}"
            )
    for r in recs:
        if r.get("kind") == "client_idle":
            lines += [
                "",
                f"hbd client idle (interval 1 s, {r.get('seconds')} s): "
                + (
                    f"{r['cpu_pct']:.4f} % of one core, RSS {r['rss_kb'] / 1024:.1f} MB, connected={r['connected']}"
                    if r.get("ok")
                    else f"FAILED: {r.get('error')}"
                ),
            ]
    tg = [r for r in recs if r.get("kind") == "target"]
    if tg:
        lines += ["", "targets:"]
        for t in tg:
            verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            lines.append(f"  {verdict:>6}  {t['name']:<24} {t['limit']:<34} {t['at']:<24} {t['value']!s}")
    return "\n".join(lines)


def markdown(recs: list[Rec]) -> str:
    """The open-loop, closed-loop and target tables as Markdown, for docs/performance.md."""
    mach = next((r for r in recs if r.get("kind") == "machine"), {})
    out = [
        f"Run {mach.get('date', '?')} at commit {mach.get('commit', '?')}: {mach.get('nproc')} x "
        f"{mach.get('cpu_model')}, {mach.get('mem_gb')} GB, Linux {mach.get('kernel')}, "
        f"Python {mach.get('python')}; fd limit {mach.get('nofile')}.",
        "",
        "| server | N | CPU µs/ping | x floor | CPU % | RSS B/conn | x floor | threads | RTT p50/p99/max ms "
        "| connect p99 ms | errors | missed | detect p99 ms | generator CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in recs:
        if r.get("kind") != "open":
            continue
        if not r.get("ok"):
            out.append(f"| {r['server']} | {r['n']} | {r.get('error', 'failed')} |" + " |" * 11)
            continue
        rtt = r["rtt_ms"]
        out.append(
            f"| {r['server']} | {r['n']} | {_f(r['cpu_us_per_ping'], 2)} | {_f(r.get('cpu_x_floor'), 2)} "
            f"| {_f(r['cpu_pct'])} | {r['rss_per_conn_b']} | {_f(r.get('rss_x_floor'), 2)} | {r['threads']} "
            f"| {_f(rtt['p50'], 2)} / {_f(rtt['p99'], 2)} / {_f(rtt['max'], 1)} | {_f(r['connect_ms']['p99'], 2)} "
            f"| {r['errors']} | {r['missed']} | {_f(r['detect_ms']['p99'], 0)} | {_f(r['gen_cpu_pct'])} |"
        )
    closed = [r for r in recs if r.get("kind") == "closed"]
    if closed:
        out += [
            "",
            "| closed loop | workers | conns | pongs/s | server CPU % | pongs per server CPU-s | generator CPU % |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in closed:
            if r.get("ok"):
                out.append(
                    f"| {r['server']} | {r['workers']} | {r['n']} | {r['throughput']:.0f} | {r['server_cpu_pct']} "
                    f"| {r.get('pongs_per_server_cpu_s')} | {r['gen_cpu_pct']} |"
                )
            else:
                out.append(f"| {r['server']} | {r['workers']} | {r.get('error', 'failed')} | | | | |")
    cl = next((r for r in recs if r.get("kind") == "client_idle" and r.get("ok")), None)
    if cl:
        out += [
            "",
            f"hbd client idle, heartbeat_interval 1 s, {cl['seconds']} s: {cl['cpu_pct']:.3f} % of one "
            f"core, RSS {cl['rss_kb'] / 1024:.1f} MB.",
        ]
    tg = [r for r in recs if r.get("kind") == "target"]
    if tg:
        out += ["", "| target | limit | measured | where | verdict |", "|---|---|---|---|---|"]
        for t in tg:
            verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            out.append(f"| {t['name']} | {t['limit']} | {t['value']} | {t['at']} | {verdict} |")
    return "\n".join(out) + "\n"


def main() -> None:
    """Re-render a results file's targets and Markdown: python3 -m bench.report bench/results/full.jsonl"""
    import json
    import sys
    from pathlib import Path

    src = Path(sys.argv[1])
    recs = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") != "target"]
    add_ratios(recs)
    recs += targets(recs)
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    src.with_suffix(".md").write_text(markdown(recs))
    print(table(recs))


if __name__ == "__main__":
    main()
