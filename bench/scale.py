"""How many clients one machine holds: ``make bench-scale N=100000`` (``python3 -m bench.scale``).

hbd runs with everything in: ``workers:`` chosen so that every process (the supervisor and each
worker) stays under the 20,000-descriptor cap, a state store in a temporary ``state_dir`` (so the
peer registry's records and the history are written), every client greeting with its own name
(``hello NAME``). The load generator (bench/loadgen.py) spreads the N clients over as many
processes, each on its own loopback source address (127.x.y.z: 28,000 ephemeral ports per address
would not do for more). Every client pings once per --interval; after the steady window 1 % go
silent (their connections stay open) and the server must close each of them at its timeout.

Measured, with the same clock as the generator's schedule:

- connected, errors, missed pongs (a ping not answered within --deadline, at any time of the run:
  never answered, or answered later), false deaths (a
  pinging client that the server closed; and the server's own DOWN count against the silent ones);
- detection time of the silent clients (from their last ping) against the timeout;
- RSS per connection of all hbd processes together: (sum of VmRSS at the window's end - the same
  sum idle) / connected; the same with VmHWM at the end;
- hbd's CPU over the steady window (% of one core), its loop turns (status ``loop.turns``);
- the kernel's side: /proc/net/sockstat, /proc/sys/fs/file-nr, MemAvailable and Slab.

A run stops early (and says so) when MemAvailable falls under --min-free (the machine is shared).
Writes bench/results/scale-N.jsonl and .md; bench/results/scale.png plots every scale-*.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procstat, servers
from bench.loadgen import make_schedule

RESULTS = servers.REPO / "bench" / "results"
FD_CAP = 20_000  # the per-process open-file hard limit on the bench machine
PER_PROC = 17_000  # connections per process: the cap less room for listeners, pipes, the store, logs
MAX_WORKERS = 64  # hbd's own bound on ``workers:``
SILENT_FRAC = 0.01
GiB = 1 << 30
SRC_PER = 1000  # connections per loopback source address


def src_block() -> str:
    """127.A for this run: A from the clock, so that a run's TIME_WAITs (left by the generator's
    closes) are not on the next run's source addresses."""
    return f"127.{100 + int(time.time() / 60) % 150}"


@dataclass(frozen=True)
class Plan:
    n: int
    interval: float
    timeout: float
    rate: float
    settle: float
    window: float
    detect_wait: float
    deadline: float
    workers: int
    gen_procs: int
    status_wait: float = 10.0  # how long one status read may take (status_timeout)

    @property
    def seconds(self) -> float:
        """The generator's schedule from the first connect to its end (without start and stop)."""
        return self.n / self.rate + self.settle + self.window + self.detect_wait


def status_timeout(n: int, interval: float) -> float:
    """How long the supervisor may take to answer a counts-only status read: 10 s, and 1 s more for
    every 500 reports a second that N clients could make of it (a state change per peer per interval
    at worst), at most 45 s (the run's lock time). 250,000 clients at 60 s: 18.3 s."""
    return round(min(45.0, 10.0 + n / interval / 500.0), 1)


def plan(
    n: int,
    interval: float = 10.0,
    timeout: float | None = None,
    rate: float = 1000.0,
    deadline: float = 2.0,
    per_proc: int = PER_PROC,
) -> Plan:
    """Workers and generator processes so that each holds at most PER_PROC connections; a window of
    at least one interval (every client pings in it); a detection wait of the timeout, 5 s and the
    status read's time (the DOWN count is read after every silent client is due and before the
    generator hangs up)."""
    procs = max(1, math.ceil(n / per_proc))
    if procs > MAX_WORKERS:
        raise SystemExit(f"bench.scale: {n} clients need {procs} workers, hbd allows {MAX_WORKERS}")
    timeout = timeout if timeout is not None else 3 * interval
    wait = status_timeout(n, interval)
    return Plan(
        n=n,
        interval=interval,
        timeout=timeout,
        rate=rate,
        settle=5.0,
        window=max(20.0, interval),
        detect_wait=timeout + 5.0 + wait,
        deadline=deadline,
        workers=procs,
        gen_procs=procs,
        status_wait=wait,
    )


def server_yaml(p: Plan, port: int, tmp: Path) -> str:
    config = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_timeout": p.timeout,
        # hbd shares max_clients out evenly, but SO_REUSEPORT's hash does not: a worker's share is
        # about as many as the cap lets it hold, so an unlucky worker never refuses (hbd's bound: 1e6)
        "max_clients": min(p.workers * (FD_CAP - 1000), 1_000_000),
        "max_peers": min(p.n + 100, 1_000_000),
        "workers": p.workers,
        "backlog": 4096,
        "state_dir": str(tmp / "state"),  # the registry's records and the history (history_days: default)
        "log_file": str(tmp / "hbd.log"),
        "log_level": "info",
        "control_socket": str(tmp / "s.sock"),
    }
    return json.dumps(config) + "\n"  # JSON is YAML


# --- the machine's side ------------------------------------------------------------------------


def sockstat(text: str) -> dict[str, int]:
    """/proc/net/sockstat as {"sockets_used": .., "tcp_inuse": .., "tcp_mem_pages": .., ...}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        proto, _, rest = line.partition(":")
        words = rest.split()
        if proto not in ("sockets", "TCP"):
            continue
        for key, val in zip(words[::2], words[1::2], strict=False):
            name = {"mem": "mem_pages"}.get(key, key)
            out[f"{proto.lower()}_{name}"] = int(val)
    return out


def meminfo(text: str) -> dict[str, int]:
    """MemTotal, MemAvailable, Slab, SUnreclaim in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "Slab", "SUnreclaim"):
            out[key] = int(val.split()[0]) * 1024
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _commit() -> str:
    """The code measured: HEAD, and ``+dirty`` when the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=servers.REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "hbd"], cwd=servers.REPO).returncode
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def kernel() -> dict[str, int]:
    k = {**sockstat(_read("/proc/net/sockstat")), **meminfo(_read("/proc/meminfo"))}
    files = _read("/proc/sys/fs/file-nr").split()
    if files:
        k["files_open"] = int(files[0])
        k["files_max"] = int(files[2])
    conntrack = _read("/proc/sys/net/netfilter/nf_conntrack_count").strip()
    if conntrack:
        k["conntrack"] = int(conntrack)
    return k


# --- hbd's side ----------------------------------------------------------------------------------


def status_head(path: Path, timeout: float = 10.0) -> dict[str, Any] | None:
    """The status document without its peer list: read up to ``"peers":[`` and hang up, so that a
    question at a million peers costs the daemon its counters, not a listing of every peer.
    ``timeout`` bounds the whole read, not each recv."""
    mark = b',"peers":['
    buf = b""
    end = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"status\n")
            while mark not in buf:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return None
    head, found, _ = buf.partition(mark)
    try:
        doc = json.loads(head + b"}" if found else head)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def hbd_numbers(path: Path, timeout: float = 10.0, until: float | None = None, tries: int = 3) -> dict[str, Any]:
    """The counts and loop turns from a counts-only status read, retried (each try at most ``timeout``,
    all before ``until``); how long the answer took (``status_s``: the try that answered, from connect
    to the head's end) and how many tries, so that a slow supervisor shows as a number, not a gap."""
    doc: dict[str, Any] | None = None
    took: list[float] = []
    for _ in range(tries):
        t0 = time.monotonic()
        left = timeout if until is None else min(timeout, until - t0)
        if left <= 0.5:
            break
        doc = status_head(path, left)
        took.append(round(time.monotonic() - t0, 3))
        if doc is not None:
            break
    doc = doc or {}
    turns = (doc.get("loop") or {}).get("turns")
    workers = {f"worker{w['index']}": w["loop"]["turns"]["max_ms"] for w in doc.get("workers", []) if "loop" in w}
    worker_turns = [w["loop"]["turns"] for w in doc.get("workers", []) if "loop" in w]
    return {
        "counts": doc.get("counts"),
        "turns": servers.turns_summary(turns),
        "longest_turn_ms_by_worker": workers or None,  # (which process a long turn was in)
        "supervisor_turns": supervisor_turns(turns, worker_turns),
        "status_s": took[-1] if doc else None,
        "status_tries_s": took,
        "status_done": time.monotonic(),
    }


def supervisor_turns(total: dict[str, Any] | None, workers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The supervisor's own turns: the status's ``loop.turns`` are every process's together, each
    worker's are its own. Their difference: how many, how many over 100 ms, and the bucket bound its
    longest fell under (``max_le_ms``; None: over the last bound)."""
    if not total or not workers or any("le_ms" not in w for w in workers):
        return None
    le = {b: n - sum(w["le_ms"].get(b, 0) for w in workers) for b, n in total["le_ms"].items()}
    count = total["count"] - sum(w["count"] for w in workers)
    return {
        "count": count,
        "over_100ms": total["over_100ms"] - sum(w["over_100ms"] for w in workers),
        "max_le_ms": next((float(b) for b, n in le.items() if n >= count and b != "+Inf"), None),
    }


def _read_status(into: dict[str, Any], name: str, path: Path, p: Plan, until: float | None, log: Any) -> None:
    into.update(hbd_numbers(path, p.status_wait, until))
    counts = json.dumps(into["counts"])
    print(f"bench.scale: {name} {counts} status in {into['status_tries_s']} s", file=log, flush=True)


# --- one run --------------------------------------------------------------------------------------


def gen_command(p: Plan, port: int, start_at: float) -> list[str]:
    return [
        servers.PYTHON,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "-n",
        str(p.n),
        "--procs",
        str(p.gen_procs),
        "--mode",
        "open",
        "--rate",
        str(p.rate),
        "--interval",
        str(p.interval),
        "--settle",
        str(p.settle),
        "--duration",
        str(p.window),
        "--detect-wait",
        str(p.detect_wait),
        "--silent-frac",
        str(SILENT_FRAC),
        "--deadline",
        str(p.deadline),
        "--grace",
        str(p.deadline),
        "--connect-timeout",
        "30",
        "--start-at",
        str(start_at),
        "--src-net",
        src_block(),
        "--src-per",
        str(SRC_PER),
        "--hello",
        "c",
    ]


def _hbd_module() -> list[str]:
    """``-m hbd``, or hbd under bench/turntrace.py when HBD_BENCH_TURNTRACE names a file (the
    supervisor's long turns taken apart: its callbacks, their CPU, the collector's passes)."""
    trace = os.environ.get("HBD_BENCH_TURNTRACE")
    return ["-m", "bench.turntrace", trace] if trace else ["-m", "hbd"]


def run(p: Plan, tmp: Path, min_free: int, log: Any = sys.stderr) -> dict[str, Any]:
    """One measured run; the raw record (derive() makes the figures)."""
    (tmp / "state").mkdir()
    port = servers.free_port()
    cfg = tmp / "hbd.yaml"
    cfg.write_text(server_yaml(p, port, tmp))
    status = tmp / "s.sock"
    env = {**os.environ, "PYTHONPATH": str(servers.REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    out = tmp / "hbd.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [servers.PYTHON, *_hbd_module(), "server", "-c", str(cfg)],
            cwd=servers.REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: servers._preexec(None),
        )
    srv = servers.Running("hbd", proc, port, out, status_path=status)
    gen: subprocess.Popen[bytes] | None = None
    rec: dict[str, Any] = {
        "plan": asdict(p),
        "commit": _commit(),
        "loadavg_before": _read("/proc/loadavg").split()[:3],
    }
    try:
        if not servers.wait_ready(srv, 30.0):
            raise RuntimeError(f"hbd did not start: {srv.output_tail()}")
        time.sleep(3.0)  # every worker up and settled before the idle figure
        pids = srv.pids()
        rec["hbd_procs"] = len(pids)
        rec["idle"] = procstat.tree_status(pids)
        rec["idle_rss_by_proc"] = [procstat.status(q).get("VmRSS", 0) for q in pids]
        rec["idle_pss_by_proc"] = [procstat.pss(q) for q in pids]
        rec["kernel_idle"] = kernel()
        start_at = time.monotonic() + 1.0
        sch = make_schedule(start_at, p.n, p.rate, p.settle, p.window, p.detect_wait, p.deadline)
        rec["gen_end"] = sch.end  # the generator hangs up here: a DOWN count read later is not the run's
        gen = subprocess.Popen(
            gen_command(p, port, start_at),
            cwd=servers.REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=None,  # a worker's failure shows in the run's own output
            preexec_fn=lambda: servers._preexec(None),
            start_new_session=True,  # its workers are one process group: stopped together on abort
        )
        ramp_end = start_at + p.n / p.rate
        # before_end: every silent client is due (se + timeout) and the read has status_wait before the
        # generator hangs up (at sch.end: after that every peer goes DOWN and the count means nothing)
        before_end = sch.se + p.timeout + 3.0
        marks = {"start": start_at, "ramp_end": ramp_end, "ss": sch.ss, "se": sch.se, "before_end": before_end}
        seen: dict[str, dict[str, Any]] = {}
        readers: list[threading.Thread] = []
        peak: dict[str, int] = {}
        min_avail = None
        aborted = None
        while gen.poll() is None:
            now = time.monotonic()
            k = kernel()
            avail = k.get("MemAvailable", 0)
            min_avail = avail if min_avail is None else min(min_avail, avail)
            for key in ("tcp_inuse", "tcp_mem_pages", "sockets_used", "files_open", "Slab", "conntrack"):
                if key in k:
                    peak[key] = max(peak.get(key, 0), k[key])
            if avail and avail < min_free:
                aborted = f"MemAvailable {avail / GiB:.1f} GiB < {min_free / GiB:.1f} GiB at t={now - start_at:.0f} s"
                print(f"bench.scale: {aborted}: stopping", file=log, flush=True)
                os.killpg(gen.pid, signal.SIGKILL)
                break
            for name, t in marks.items():
                if name not in seen and now >= t:
                    pids = srv.pids()
                    seen[name] = {
                        "t": now,
                        "wall": time.time(),  # to place hbd's logged stalls
                        "cpu_s": procstat.tree_cpu_s(pids),
                        "cpu_by_proc_s": [procstat.cpu_s(q) for q in pids],  # the supervisor first
                        "mem": procstat.tree_status(pids),
                        "rss_by_proc": [procstat.status(q).get("VmRSS", 0) for q in pids],
                        "pss_by_proc": [procstat.pss(q) for q in pids],
                        "kernel": k,
                    }
                    # the status read in a thread of its own: a supervisor slow to answer (tens of seconds
                    # in a ramp) must not delay the next mark's CPU and memory figures
                    until = sch.end - 0.5 if name == "before_end" else None
                    reader = threading.Thread(target=_read_status, args=(seen[name], name, status, p, until, log))
                    reader.start()
                    readers.append(reader)
            if not seen and now > start_at:
                done = min(p.n, int((now - start_at) * p.rate))
                if int(now) % 30 == 0:
                    print(f"bench.scale: ramp {done}/{p.n}", file=log, flush=True)
            time.sleep(1.0)
        gen_out, _ = gen.communicate(timeout=60)
        for reader in readers:
            reader.join(3 * p.status_wait + 5.0)
        pids = srv.pids()
        rec["end"] = {"mem": procstat.tree_status(pids), **hbd_numbers(status, p.status_wait)}
        rec["marks"] = seen
        rec["peak"] = peak
        rec["min_mem_available"] = min_avail
        rec["aborted"] = aborted
        rec["gen"] = json.loads(gen_out) if gen_out.strip() else None
        rec["loadavg_after"] = _read("/proc/loadavg").split()[:3]
    finally:
        if gen is not None and gen.poll() is None:
            os.killpg(gen.pid, signal.SIGKILL)
            gen.wait(30)
        srv.stop()
        stragglers(str(cfg))
    rec["stalls_logged"] = [line for line in _read(str(out)).splitlines() if "stalled" in line][-5:]
    return rec


def stragglers(config: str) -> None:
    """SIGKILL what is left of this run's hbd: a worker the supervisor restarted while it was being
    stopped is no child of the tree stop() saw (found once at 250,000, orphaned)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if config.encode() in args and b"hbd" in args:
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


# --- the figures (pure: tests/test_bench_scale.py) ----------------------------------------------


def derive(rec: dict[str, Any]) -> dict[str, Any]:
    """The figures of one raw record: what held, what it cost."""
    p = rec["plan"]
    g = rec.get("gen") or {}
    marks = rec.get("marks", {})
    errors = g.get("errors", {})
    connected = g.get("connected", 0)
    silent = g.get("silent", {})
    silenced = silent.get("silenced", 0)
    before = marks.get("before_end") or {}
    late_read = rec.get("gen_end") is not None and before.get("status_done", 0) > rec["gen_end"]
    end_counts = {} if late_read else before.get("counts") or {}
    se_counts = (marks.get("se") or {}).get("counts") or {}
    server_down = end_counts.get("DOWN")
    false_client = errors.get("closed_by_peer", 0) + errors.get("reset", 0)
    false_server = None if server_down is None else max(0, server_down - silenced)
    d: dict[str, Any] = {
        "n": p["n"],
        "interval_s": p["interval"],
        "timeout_s": p["timeout"],
        "workers": p["workers"],
        "gen_procs": p["gen_procs"],
        "connected": connected,
        "errors": sum(errors.values()),
        "missed": None if g.get("missed") is None else g["missed"] + g.get("late_pongs", 0),
        "late_pongs": g.get("late_pongs"),
        "late_rtt_max_ms": g.get("late_rtt_max_ms"),
        "pings": g.get("pings_total"),
        "false_deaths": false_client,
        "server_down": server_down,
        "server_down_at_window_end": se_counts.get("DOWN"),
        "silenced": silenced,
        "undetected": silent.get("undetected"),
        "false_deaths_server": false_server,
        "aborted": rec.get("aborted"),
        "rtt_ms": g.get("rtt_ms"),
        "detect_ms": silent.get("detect_ms"),
        "detect_min_ms": silent.get("detect_min_ms"),
        "gen_cpu_pct": g.get("gen_cpu_pct"),
        "gen_cpu_max_proc_pct": g.get("gen_cpu_max_proc_pct"),
        # how long the supervisor took to answer the counts-only status read: the DOWN count's, and the
        # longest of any mark's (None: no answer within status_wait, after the retries)
        "status_wait_s": p.get("status_wait"),
        "status_end_s": before.get("status_s"),
        "status_max_s": max((m["status_s"] for m in marks.values() if m.get("status_s") is not None), default=None),
        "status_unanswered": sum(1 for m in marks.values() if "status_s" in m and m["status_s"] is None),
    }
    ss, se = marks.get("ss"), marks.get("se")
    idle = rec.get("idle", {})
    if ss and se and connected:
        d["cpu_pct"] = round(100.0 * (se["cpu_s"] - ss["cpu_s"]) / (se["t"] - ss["t"]), 1)
        r0, r1 = marks.get("start"), marks.get("ramp_end")
        if r0 and r1 and len(r0["cpu_by_proc_s"]) == len(r1["cpu_by_proc_s"]):  # the ramp: greetings, registry, store
            span = r1["t"] - r0["t"]
            d["cpu_ramp_pct"] = round(100.0 * (r1["cpu_s"] - r0["cpu_s"]) / span, 1)
            d["cpu_ramp_supervisor_pct"] = round(100.0 * (r1["cpu_by_proc_s"][0] - r0["cpu_by_proc_s"][0]) / span, 1)
        by0, by1 = ss.get("cpu_by_proc_s"), se.get("cpu_by_proc_s")
        if by0 and by1 and len(by0) == len(by1):
            pct = [round(100.0 * (b - a) / (se["t"] - ss["t"]), 1) for a, b in zip(by0, by1, strict=True)]
            d["cpu_supervisor_pct"], d["cpu_worker_max_pct"] = pct[0], max(pct[1:], default=None)
            d["cpu_workers_pct"] = round(sum(pct[1:]), 1)
        d["rss_per_conn_b"] = round((se["mem"]["VmRSS"] - idle["VmRSS"]) / connected)
        by0, by1 = rec.get("idle_rss_by_proc"), se.get("rss_by_proc")
        if by0 and by1 and len(by0) == len(by1):  # where the memory is: the registry's process or the workers
            d["rss_supervisor_per_conn_b"] = round((by1[0] - by0[0]) / connected)
            d["rss_workers_per_conn_b"] = round((sum(by1[1:]) - sum(by0[1:])) / connected)
        by0, by1 = rec.get("idle_pss_by_proc"), se.get("pss_by_proc")
        if by0 and by1 and len(by0) == len(by1) and all(by1):  # proportional: shared pages counted once
            d["pss_per_conn_b"] = round((sum(by1) - sum(by0)) / connected)
            d["pss_supervisor_per_conn_b"] = round((by1[0] - by0[0]) / connected)
            d["pss_workers_per_conn_b"] = round((sum(by1[1:]) - sum(by0[1:])) / connected)
        d["rss_total_mib"] = round(se["mem"]["VmRSS"] / 2**20)
        k, k0 = se["kernel"], rec.get("kernel_idle", {})
        d["kernel"] = {
            "tcp_inuse": k.get("tcp_inuse"),
            "tcp_mem_mib": round(k.get("tcp_mem_pages", 0) * 4096 / 2**20, 1),
            "sockets_used": k.get("sockets_used"),
            "tcp_orphan": k.get("tcp_orphan"),
            "tcp_tw": k.get("tcp_tw"),
            "slab_per_conn_b": round((k.get("Slab", 0) - k0.get("Slab", 0)) / connected),
            "used_per_conn_b": round(((k0.get("MemAvailable", 0) - k.get("MemAvailable", 0)) / connected) if k0 else 0),
            "files_open": k.get("files_open"),
            "files_max": k.get("files_max"),
            "conntrack": k.get("conntrack"),
            "mem_available_gib": round(k.get("MemAvailable", 0) / GiB, 2),
        }
    end_mem = (rec.get("end") or {}).get("mem")
    if end_mem and connected:
        d["hwm_per_conn_b"] = round((end_mem["VmHWM"] - idle["VmHWM"]) / connected)
    if rec.get("min_mem_available") is not None:
        d["min_mem_available_gib"] = round(rec["min_mem_available"] / GiB, 2)
    # the run itself (to just before the generator hangs up), and its end: N disconnects at once
    turns = (marks.get("before_end") or {}).get("turns")
    if turns:
        d["loop_turn_max_ms"] = turns["max_ms"]
        d["loop_turns_over_100ms"] = turns["over_100ms"]
    end_turns = (rec.get("end") or {}).get("turns")
    if end_turns:
        d["loop_turn_max_with_teardown_ms"] = end_turns["max_ms"]
        d["loop_turn_max_with_teardown_by_worker_ms"] = (rec.get("end") or {}).get("longest_turn_ms_by_worker")
        sup = (rec.get("end") or {}).get("supervisor_turns")
        if sup:  # (the supervisor's own longest is known only as its bucket, unless it is the longest of all)
            d["loop_turns_over_100ms_with_teardown_supervisor"] = sup["over_100ms"]
            d["loop_turn_max_with_teardown_supervisor_le_ms"] = sup["max_le_ms"]
    det = d["detect_ms"] or {}
    d["detect_over_timeout_ms"] = None if det.get("max") is None else round(det["max"] - 1000 * p["timeout"], 1)
    d["held"] = bool(
        not d["aborted"]
        and connected == p["n"]
        and d["errors"] == 0
        and d["missed"] == 0
        and false_client == 0
        and false_server == 0
        and d["undetected"] == 0
    )
    return d


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table of derived rows, one per run."""
    head = (
        "| N | interval | workers | connected | errors | missed pongs | false deaths (client / server) | silent"
        " closed after (min-max, timeout) | RSS/conn (VmRSS, VmHWM; PSS) | hbd CPU (supervisor, workers) |"
        " longest loop turn (with the teardown) | kernel slab/conn | status answer (end, slowest) |"
        " held |\n|" + "---|" * 14 + "\n"
    )
    lines = []
    for d in rows:
        det = d.get("detect_ms") or {}
        k = d.get("kernel") or {}
        lines.append(
            f"| {d['n']:,} | {d['interval_s']:g} s | {d['workers']} | {d['connected']:,} | {d['errors']} |"
            f" {d['missed']} | {d['false_deaths']} / {d['false_deaths_server']} |"
            f" {(d.get('detect_min_ms') or 0) / 1000:.3f}-{(det.get('max') or 0) / 1000:.3f} s ({d['timeout_s']:g} s) |"
            f" {d.get('rss_per_conn_b', '-')} B, {d.get('hwm_per_conn_b', '-')} B; {d.get('pss_per_conn_b', '-')} B |"
            f" {d.get('cpu_pct', '-')} % ({d.get('cpu_supervisor_pct', '-')}, {d.get('cpu_workers_pct', '-')}) |"
            f" {d.get('loop_turn_max_ms', '-')} ms ({d.get('loop_turn_max_with_teardown_ms', '-')} ms) |"
            f" {k.get('slab_per_conn_b', '-')} B |"
            f" {_secs(d.get('status_end_s'))}, {_secs(d.get('status_max_s'))} |"
            f" {'yes' if d['held'] else 'NO' + (': ' + d['aborted'] if d['aborted'] else '')} |"
        )
    return head + "\n".join(lines) + "\n"


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f} s"


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(results: Path, path: Path) -> bool:
    """RSS per connection and hbd CPU against N, from every scale-*.jsonl; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [derive(r) for f in sorted(results.glob("scale-*.jsonl")) for r in load(f)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = ((10.0, 30.0, "tab:blue"), (60.0, 90.0, "tab:orange"), (60.0, 180.0, "tab:green"))
    for interval, timeout, colour in series:  # a timeout under 2 x interval: every peer LATE once an interval
        rs = sorted(
            (d for d in rows if (d["interval_s"], d["timeout_s"]) == (interval, timeout) and "rss_per_conn_b" in d),
            key=lambda d: d["n"],
        )
        if not rs:
            continue
        label = f"ping every {interval:g} s, timeout {timeout:g} s"
        ax1.plot([d["n"] for d in rs], [d["rss_per_conn_b"] for d in rs], "o-", color=colour, label=label)
        ax2.plot([d["n"] for d in rs], [d["cpu_pct"] for d in rs], "o-", color=colour, label=label)
        for d in rs:
            if not d["held"]:
                ax1.plot([d["n"]], [d["rss_per_conn_b"]], "x", ms=12, mew=2, color="black")
                ax2.plot([d["n"]], [d["cpu_pct"]], "x", ms=12, mew=2, color="black")
    held = [d["n"] for d in rows if d["held"] and d["interval_s"] in (10.0, 60.0)]
    top = max((d["n"] for d in rows), default=1)
    for ax in (ax1, ax2):
        ax.set_xlim(0, top * 1.1)
        if held:
            ax.axvline(max(held), color="gray", ls=":", label=f"largest held: {max(held):,}")
        ax.set_xlabel("named clients N (hbd with workers, state store and history)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax1.axhline(1200, color="tab:red", ls="--", lw=1, label="target 1.2 KB")
    ax1.set(ylabel="hbd RSS per connection (bytes, VmRSS - idle)", title="Memory per connection", ylim=(0, None))
    ax2.set(ylabel="hbd CPU, % of one core", title="CPU (all hbd processes)", ylim=(0, None))
    ax1.legend(fontsize=8)
    fig.suptitle("hbd at scale: one 2-core machine, x = a run that did not hold", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path) -> None:
    """scale-N.md from the raw records of scale-N.jsonl (derived again: the arithmetic may have
    changed since), and the plot of every scale-*.jsonl next to it."""
    recs = load(out)
    for r in recs:
        r["derived"] = derive(r)
    n = recs[-1]["plan"]["n"]
    out.with_suffix(".md").write_text(
        f"# bench-scale, N = {n:,}\n\nRaw records: {out.name} (one line per run; `python3 -m bench.scale --render"
        f" bench/results/{out.name}` rewrites this table and the plot).\n\n" + markdown([r["derived"] for r in recs])
    )
    plot(out.parent, out.parent / "scale.png")


def main_args(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=100_000, help="clients (default 100000)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between a client's pings (default 10)")
    ap.add_argument("--timeout", type=float, default=None, help="hbd's heartbeat_timeout (default 3 x interval)")
    ap.add_argument("--rate", type=float, default=1000.0, help="connects per second in total (default 1000)")
    ap.add_argument("--deadline", type=float, default=2.0, help="a pong later than this is missed (default 2 s)")
    ap.add_argument("--min-free", type=float, default=4.0, help="stop when MemAvailable falls under this (GiB)")
    ap.add_argument("--per-proc", type=int, default=PER_PROC, help=f"clients per process (default {PER_PROC})")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/scale-N.jsonl")
    ap.add_argument("--render", type=Path, nargs="*", help="no run: rewrite the .md and the plot of these .jsonl")
    a = ap.parse_args(argv)
    if a.render is not None:
        for path in a.render:
            write_report(path)
        return
    p = plan(a.n, a.interval, a.timeout, a.rate, a.deadline, a.per_proc)
    print(
        f"bench.scale: {p.n} clients, ping every {p.interval:g} s, timeout {p.timeout:g} s, {p.workers} workers,"
        f" {p.gen_procs} generator processes, about {p.seconds + 20:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    if p.timeout < 2 * p.interval:  # hbd calls a peer LATE after half its timeout without a ping
        print(
            f"bench.scale: timeout {p.timeout:g} s < 2 x interval: every client goes LATE and back once an interval"
            f" ({p.n / p.interval * 2:.0f} state changes a second for hbd's supervisor)",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="hbd-scale-") as d:
        rec = run(p, Path(d), int(a.min_free * GiB))
    rec["derived"] = derive(rec)
    out = a.out or RESULTS / f"scale-{p.n}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    write_report(out)
    print(json.dumps(rec["derived"]))


def main() -> None:
    main_args()


if __name__ == "__main__":
    main()
