"""Run one measurement: start a server, drive it with the load generator, sample /proc, record.

Open loop (the heartbeat fleet): the server is pinned to CPU 0 and the generators to CPU 1, so
the server's CPU time is its own and "19000 clients on one core" is literal. Closed loop
(throughput): nothing is pinned, because ``workers: 2`` needs both cores.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import procstat, servers
from bench.loadgen import make_schedule
from bench.modes import Mode

GRACE = 2.0  # s to wait for outstanding pongs at the end; also the generator's miss deadline


_runs = itertools.count()


def next_src_net() -> str:
    """A fresh 127.x.y network (loopback) per generator run, so no run inherits another's TIME_WAITs."""
    i = next(_runs) + (os.getpid() % 50) * 1000
    return f"127.{1 + i // 250 % 250}.{1 + i % 250}"


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, generator CPUs): split when there are two or more, else share."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def sleep_until(t: float) -> None:
    while (d := t - time.monotonic()) > 0:
        time.sleep(min(d, 0.5))


def gen_command(
    port: int,
    n: int,
    procs: int,
    mode: str,
    start_at: float,
    m: Mode,
    duration: float,
    detect_wait: float,
    silent_frac: float,
    cpus: set[int] | None,
    rate: float,
    hello: str | None = None,
) -> list[str]:
    cmd = [
        servers.PYTHON,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "-n",
        str(n),
        "--procs",
        str(procs),
        "--mode",
        mode,
        "--rate",
        str(rate),
        "--interval",
        str(m.interval),
        "--settle",
        str(m.settle),
        "--duration",
        str(duration),
        "--detect-wait",
        str(detect_wait),
        "--silent-frac",
        str(silent_frac),
        "--deadline",
        str(GRACE),
        "--grace",
        str(GRACE),
        "--start-at",
        repr(start_at),
        "--wire",
        m.wire,
    ]
    if cpus:
        cmd += ["--cpus", ",".join(map(str, sorted(cpus)))]
    cmd += ["--src-net", next_src_net()]
    if hello:
        cmd += ["--hello", hello]
    return cmd


def hello_for(server: str) -> str | None:
    """hbd's clients greet with a name (``hello peer<w>-<k>``), as a fleet of hbd clients does, so the
    registry keeps a named peer for each; the floor and the thread server know no greeting."""
    return "peer" if server == "hbd" else None


def drive(
    srv: servers.Running,
    cmd: list[str],
    start_at: float,
    sch_ss: float,
    sch_se: float,
    hard_end: float,
    cpus: set[int] | None = None,
) -> dict[str, Any]:
    """Run the generator; sample the server's CPU at the window edges and its peak threads in between;
    ``cpus``: the server's own (its core's steal and softirq time in the window, the host's share)."""
    env = {**os.environ, "PYTHONPATH": str(servers.REPO)}
    gen = subprocess.Popen(cmd, cwd=servers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    s: dict[str, Any] = {"threads_max": 0}
    try:
        sleep_until(sch_ss)
        pids = srv.pids()  # workers exist by now
        # schedstat (ns) is the primary; utime+stime (10 ms ticks) is kept as a cross-check
        s["cpu0"], s["tick0"], s["t0"] = procstat.tree_sched_s(pids), procstat.tree_cpu_s(pids), time.monotonic()
        s["us0"] = procstat.tree_user_sys_s(pids)
        gens = procstat.tree(gen.pid)  # (its worker processes are forked by now)
        s["wake0"] = procstat.tree_wakeups(gens)
        s["host0"] = procstat.cpu_times(cpus)
        while time.monotonic() < sch_se:
            s["threads_max"] = max(s["threads_max"], procstat.tree_status(pids)["Threads"])
            time.sleep(min(1.0, max(0.0, sch_se - time.monotonic())))
        s["cpu1"], s["tick1"], s["t1"] = procstat.tree_sched_s(pids), procstat.tree_cpu_s(pids), time.monotonic()
        s["us1"] = procstat.tree_user_sys_s(pids)
        s["wake1"] = procstat.tree_wakeups(gens)
        s["host1"] = procstat.cpu_times(cpus)
        # hbd's own turns up to the window's end (ramp, settle, window): which side stalled, if one did
        s["turns"] = servers.loop_turns(srv.status_path) if srv.status_path else None
        st = procstat.tree_status(pids)
        s["threads_max"] = max(s["threads_max"], st["Threads"])
        s["hwm"], s["rss"] = st["VmHWM"], st["VmRSS"]
        s["alive"] = srv.proc.poll() is None
        out, err = gen.communicate(timeout=max(5.0, hard_end - time.monotonic() + 20.0))
    except subprocess.TimeoutExpired:
        gen.kill()
        out, err = gen.communicate()
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    try:
        s["gen"] = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        s["gen"] = None
        s["gen_error"] = err.decode(errors="replace")[-500:]
    return s


def run_open(name: str, n: int, m: Mode, tmp: Path) -> dict[str, Any]:
    """One server at N heartbeat clients: CPU/ping, RSS/conn, RTT, connect, errors, detection."""
    scpu, gcpu = cpu_split()
    rec: dict[str, Any] = {"kind": "open", "mode": m.name, "server": name, "n": n, "wire": m.wire}
    try:
        srv = servers.start(name, tmp, timeout=m.timeout, cpus=scpu)
    except RuntimeError as e:
        return {**rec, "ok": False, "error": str(e)}
    try:
        time.sleep(min(0.5, m.lead))
        idle = procstat.tree_status(srv.pids())
        duration = m.hold_duration if n == max(m.ns) else m.duration
        # the floor never closes anyone: no detection phase; the thread checker needs up to 1 s more
        silent = m.silent_frac if name != "floor" else 0.0
        extra = m.detect_extra if name == "thread" else min(1.0, m.detect_extra)
        detect_wait = m.timeout + extra if silent > 0 else 0.0
        procs = max(1, math.ceil(n / m.conns_per_gen))
        start_at = time.monotonic() + m.lead
        sch = make_schedule(start_at, n, m.rate, m.settle, duration, detect_wait, GRACE)
        cmd = gen_command(
            srv.port, n, procs, "open", start_at, m, duration, detect_wait, silent, gcpu, m.rate, hello_for(name)
        )
        s = drive(srv, cmd, start_at, sch.ss, sch.se, sch.hard_end, scpu)
    finally:
        srv.stop()
    g, win, cpu = _window(s)
    if g is None:
        return {**rec, "ok": False, "error": f"load generator failed: {s.get('gen_error')}"}
    pongs = g["pongs"]
    rss_idle = idle.get("VmRSS", 0)
    rec.update(
        {
            "ok": True,
            "alive": s["alive"],
            "window_s": round(win, 2),
            "connected": g["connected"],
            "pings": g["pings"],
            "pongs": pongs,
            "missed": g["missed"],
            "errors": g["errors_total"],
            "error_kinds": {k: v for k, v in g["errors"].items() if v},
            "cpu_us_per_ping": round(cpu / pongs * 1e6, 2) if pongs else None,
            "cpu_pct": round(100.0 * cpu / win, 1) if win > 0 else None,
            "cpu_ticks_us_per_ping": round((s["tick1"] - s["tick0"]) / pongs * 1e6, 2) if pongs else None,
            # the same ticks split: the server's own code (user) and the kernel's work for it (system)
            "cpu_user_us_per_ping": round((s["us1"][0] - s["us0"][0]) / pongs * 1e6, 2) if pongs else None,
            "cpu_sys_us_per_ping": round((s["us1"][1] - s["us0"][1]) / pongs * 1e6, 2) if pongs else None,
            # the generator's wake-ups a pong in the window: when the server answers slower than the
            # generator reads, it sleeps before each pong and the wake-up is charged to the server's send
            # (docs/performance.md, "The noise, explained")
            "gen_wakeups_per_pong": round((s["wake1"] - s["wake0"]) / pongs, 3) if pongs else None,
            # what the host did with the server's core in the window (% of the window, 10 ms ticks): time
            # the hypervisor gave to another guest (steal) and network work in softirq context, which
            # the schedstat figure above may not charge to the server; both move between runs
            "server_core_pct": _host_pct(s, win),
            "rss_idle_kb": rss_idle // 1024,
            "rss_peak_kb": s["hwm"] // 1024,
            "rss_per_conn_b": round((s["hwm"] - rss_idle) / n) if n else None,
            "threads": s["threads_max"],
            "rtt_ms": _pick(g["rtt_ms"]),
            "connect_ms": _pick(g["connect_ms"]),
            "detect_ms": _pick(g["silent"]["detect_ms"], ("n", "p50", "p99", "max")),
            "silenced": g["silent"]["silenced"],
            "undetected": g["silent"]["undetected"],
            "timeout_s": m.timeout,
            "gen_procs": g["procs"],
            "gen_cpu_pct": g["gen_cpu_pct"],
            "gen_cpu_max_proc_pct": g["gen_cpu_max_proc_pct"],
            "gen_lag_p99_ms": g["lag_ms"]["p99"],
            "gen_lag_max_ms": g["lag_ms"].get("max"),
            "loop_turns": s.get("turns"),  # hbd: its loop turn histogram (status socket) at the window's end
            "turns": servers.turns_summary(s.get("turns")),
            "pinned": {"server": sorted(scpu) if scpu else None, "gen": sorted(gcpu) if gcpu else None},
        }
    )
    return rec


def _host_pct(s: dict[str, Any], win: float) -> dict[str, float] | None:
    """The server core's steal and softirq time over the window, in per cent of the window."""
    if win <= 0 or "host0" not in s or "host1" not in s:
        return None
    return {k: round(100.0 * (s["host1"][k] - s["host0"][k]) / win, 1) for k in ("steal", "softirq")}


def _window(s: dict[str, Any]) -> tuple[dict[str, Any] | None, float, float]:
    """The generator's result (None if it failed), the measurement window and the server CPU in it."""
    g = s.get("gen")
    if g is None:
        return None, 0.0, 0.0
    return g, s["t1"] - s["t0"], s["cpu1"] - s["cpu0"]


def run_closed(name: str, workers: int, depth: int, m: Mode, tmp: Path) -> dict[str, Any]:
    """Throughput with every conn pinging as soon as its pong returns; no CPU pinning."""
    rec: dict[str, Any] = {
        "kind": "closed",
        "mode": m.name,
        "server": name,
        "workers": workers,
        "depth": depth,
        "n": m.closed_conns,
        "wire": m.wire,
    }
    try:
        # hbd gets the key only for K > 1: its default is one loop, and a core without the option runs
        w = workers if (name == "floor" or workers > 1) else None
        srv = servers.start(name, tmp, timeout=m.timeout, workers=w)
    except RuntimeError as e:
        return {**rec, "ok": False, "error": str(e)}
    try:
        time.sleep(min(0.5, m.lead))
        start_at = time.monotonic() + m.lead
        rate = 10000.0
        sch = make_schedule(start_at, m.closed_conns, rate, m.settle, m.closed_duration, 0.0, GRACE)
        cmd = gen_command(
            srv.port, m.closed_conns, 2, "closed", start_at, m, m.closed_duration, 0.0, 0.0, None, rate, hello_for(name)
        )
        cmd += ["--depth", str(depth)]
        s = drive(srv, cmd, start_at, sch.ss, sch.se, sch.hard_end)
    finally:
        srv.stop()
    g, win, cpu = _window(s)
    if g is None:
        return {**rec, "ok": False, "error": f"load generator failed: {s.get('gen_error')}"}
    rec.update(
        {
            "ok": True,
            "window_s": round(win, 2),
            "throughput": g["throughput"],
            "errors": g["errors_total"],
            "missed": g["missed"],
            "server_cpu_pct": round(100.0 * cpu / win, 1),
            "pongs_per_server_cpu_s": round(g["pongs"] / cpu) if cpu > 0 else None,
            "cpu_us_per_ping": round(cpu / g["pongs"] * 1e6, 2) if g["pongs"] else None,
            "rtt_ms": _pick(g["rtt_ms"]),
            "gen_procs": g["procs"],
            "gen_cpu_pct": g["gen_cpu_pct"],
        }
    )
    return rec


def run_client_idle(m: Mode, tmp: Path) -> dict[str, Any]:
    """hbd client at heartbeat_interval 1 s against the floor: CPU % of one core and RSS."""
    rec: dict[str, Any] = {"kind": "client_idle", "mode": m.name, "interval_s": 1.0}
    floor = servers.start("floor", tmp, timeout=m.timeout)
    try:
        cli = servers.start("hbd", tmp, timeout=1.0, client_of=floor.port)
        try:
            time.sleep(2.0)  # connect and settle
            if cli.proc.poll() is not None:
                return {**rec, "ok": False, "error": f"hbd client exited: {cli.output_tail()}"}
            connected = _established_to(floor.port)
            c0, t0 = procstat.sched_s(cli.pid), time.monotonic()
            time.sleep(m.client_idle_s)
            c1, t1 = procstat.sched_s(cli.pid), time.monotonic()
            st = procstat.status(cli.pid)
            alive = cli.proc.poll() is None
        finally:
            cli.stop()
    finally:
        floor.stop()
    return {
        **rec,
        "ok": alive,
        "connected": connected,
        "seconds": round(t1 - t0, 1),
        "cpu_pct": round(100.0 * (c1 - c0) / (t1 - t0), 4),
        "rss_kb": st.get("VmRSS", 0) // 1024,
        "rss_peak_kb": st.get("VmHWM", 0) // 1024,
    }


def _established_to(port: int) -> int:
    """Count ESTABLISHED loopback TCP connections whose remote port is `port` (the client's link)."""
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "01" and int(parts[2].split(":")[1], 16) == port:
                    n += 1
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return n


def _pick(d: dict[str, Any], keys: tuple[str, ...] = ("p50", "p99", "max")) -> dict[str, Any]:
    return {k: d.get(k) for k in keys}
