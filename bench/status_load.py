"""Status and metrics at scale, in a real server: ``python3 -m bench.status_load [-n 100000] [--workers 6]``.

Starts ``hbd server`` (``workers: K``, a metrics port) in a temporary directory and connects N named
clients (``hello hostNNNNNN``, a ping every --interval seconds, spread evenly) from --procs forked
processes, each from its own loopback source address (127.77.P.1: one address has ~28,000 ports).
Once all are UP, each client process closes its first --down connections (DOWN peers for the
filters to find). A probe process keeps --probes more connections pinging every 0.5 s and records
every round trip with its send time, so the pong RTT can be cut by phase:

  quiet      nothing asked
  filtered   ``select`` {state: [DOWN, LATE], limit: 100} and a name glob, over the status socket
             (and ``hbd status --state DOWN,LATE`` as a process: what an operator waits for)
  full       the whole ``status`` document, read as fast as the socket gives it
  metrics    GET /metrics, likewise

For each phase: the request times, the probe's RTT p50/p99/max over the phase and over the pings
sent while one of its requests was under way (``rtt_during_ms``: the summary line shows this one),
and the daemon's loop turns in it
(every process together, from the turn histograms of the status document): how many, how many over
20/50/100 ms. Prints one JSON document, then a summary. Needs ``ulimit -n`` 20000 (each process
holds N/procs sockets). Run it under the bench lock: ``flock /tmp/hbd-bench.lock python3 -m ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from bench.stats import summary  # noqa: E402
from hbd.control import query  # noqa: E402

mono = time.monotonic
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the clients -----------------------------------------------------------------------------------------
def clients(port: int, first: int, count: int, source: str, interval: float, down: int, ready: int) -> None:
    """A forked client process: ``count`` named connections, made while the ones made already keep
    pinging (a slow ramp must not let them time out); a byte to ``ready`` once all are connected,
    another once its first ``down`` are closed; pings spread evenly over ``interval``."""
    raise_nofile()
    socks: list[socket.socket | None] = []
    steps = 100
    k = 0
    next_at = mono()
    todo = iter(range(first, first + count))
    connected_at: float | None = None
    closed = False
    while True:
        if connected_at is None:
            for i in todo:
                s = socket.socket()
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # the port at connect: no O(n) bind
                s.bind((source, 0))
                s.settimeout(60)
                s.connect(("127.0.0.1", port))
                s.sendall(f"hello host{i:06d}\nping\n".encode())
                s.setblocking(False)
                socks.append(s)
                if mono() >= next_at:
                    break  # time for the next slice of pings
            else:
                connected_at = mono()
                os.write(ready, b"x")
        elif not closed and mono() - connected_at > 3.0:  # every peer has pinged: these go DOWN
            for j in range(down):
                sock = socks[j]
                if sock is not None:
                    sock.close()
                socks[j] = None
            closed = True
            os.write(ready, b"y")
        delay = next_at - mono()
        if delay > 0 and (connected_at is not None):
            time.sleep(delay)
        if mono() < next_at:
            continue
        next_at += interval / steps
        for sock in socks[k % steps :: steps]:
            if sock is None:
                continue
            try:
                while sock.recv(4096):
                    pass
            except BlockingIOError:
                pass
            except OSError:
                continue
            try:
                sock.send(b"ping\n")
            except OSError:
                pass
        k += 1


def probe(port: int, n: int, out_path: str, ready: int) -> None:
    """A forked probe: ``n`` connections each pinging every 0.5 s (staggered); on SIGTERM, writes
    (send time, rtt) of every answered ping to ``out_path``."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"hello probe{i:04d}\n".encode())
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, i)
    sent = [0.0] * n
    t_send, rtts = array("d"), array("d")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    os.write(ready, b"p")
    period = 0.5
    step = period / n  # probe j pings at due, the next one a step later: one send at a time, in turn
    due = mono()
    j = 0
    while not stop:
        now = mono()
        while due <= now:
            if not sent[j]:  # an unanswered ping is not sent over (it will be counted when answered)
                sent[j] = mono()
                try:
                    socks[j].send(b"ping\n")
                except OSError:
                    sent[j] = 0.0
            j = (j + 1) % n
            due += step
        for key, _ in sel.select(max(due - mono(), 0.0)):
            i = key.data
            try:
                data = socks[i].recv(4096)
            except OSError:
                continue
            now = mono()
            if data and sent[i]:
                t_send.append(sent[i])
                rtts.append(now - sent[i])
                sent[i] = 0.0
    with open(out_path, "wb") as f:
        t_send.tofile(f)
        rtts.tofile(f)


# -- what the daemon says --------------------------------------------------------------------------------
def loop_now(sock: str) -> dict:
    """Every process's loop turns together (the supervisor's document sums them) and the counts."""
    doc = json.loads(query(sock, json.dumps({"request": "select", "limit": 1}), timeout=30))
    workers = {f"worker{w['index']}": w["loop"]["turns"] for w in doc.get("workers", []) if "loop" in w}
    return {"turns": doc["loop"]["turns"], "counts": doc["counts"], "workers": workers}


def per_process(a: dict, b: dict) -> dict:
    """Each process's turns over 20/50/100 ms in a phase (the supervisor's: all less the workers')."""
    out = {}
    for name in b["workers"]:
        if name in a["workers"]:
            wa, wb = a["workers"][name], b["workers"][name]
            out[name] = [over(wb, k) - over(wa, k) for k in ("20", "50", "100")] + [wb["max_ms"]]
    total = [over(b["turns"], k) - over(a["turns"], k) for k in ("20", "50", "100")]
    out["supervisor"] = [t - sum(v[i] for v in out.values()) for i, t in enumerate(total)]
    return out


def over(t: dict, bound: str) -> int:
    return t["count"] - t["le_ms"][bound]


def turns_between(a: dict, b: dict) -> dict:
    first = None
    for bound in ("1", "2", "5", "10", "20", "50", "100", "200", "500", "1000"):
        if over(b, bound) - over(a, bound) == 0:
            first = bound
            break
    return {
        "turns": b["count"] - a["count"],
        "over_20ms": over(b, "20") - over(a, "20"),
        "over_50ms": over(b, "50") - over(a, "50"),
        "over_100ms": over(b, "100") - over(a, "100"),
        "longest_at_most_ms": float(first) if first is not None else None,
    }


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of ``pid`` ("supervisor") and of its children ("workers")."""
    tick = os.sysconf("SC_CLK_TCK")

    def one(p: str) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return {"supervisor": one(str(pid)), "workers": sum(one(k) for k in kids)}


BUSY: list[tuple[float, float]] = []  # when a request was under way: the RTT "while it runs"
PROGRESS: list[list[tuple[float, int]]] = []  # per request: (seconds since its start, bytes read) every 4 MB


def timed_query(sock: str, request: str) -> tuple[float, int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(sock)
        start = mono()
        s.sendall(request.encode() + b"\n")
        return _read_all(s, start)


def scrape(port: int) -> tuple[float, int]:
    start = mono()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return _read_all(s, start)


def _read_all(s: socket.socket, start: float) -> tuple[float, int]:
    """Read to the end; when each 4 MB arrived goes to PROGRESS, the request's span to BUSY."""
    size, mark, progress = 0, 0, []
    while chunk := s.recv(1 << 16):
        if size == 0:
            progress.append((round(mono() - start, 3), 0))
        size += len(chunk)
        if size >= mark:
            progress.append((round(mono() - start, 3), size))
            mark += 4 << 20
    end = mono()
    progress.append((round(end - start, 3), size))
    BUSY.append((start, end))
    PROGRESS.append(progress)
    return end - start, size


def run(a: argparse.Namespace, directory: str) -> dict:
    sock = str(Path(directory) / "server.sock")
    port, mport = free_port(), free_port()
    n = a.n
    config = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_timeout": a.interval * 6,
        "max_clients": 2 * (n + a.probes),  # per worker; SO_REUSEPORT spreads connections unevenly
        "max_peers": n + a.probes + 100,
        "workers": a.workers,
        "backlog": 4096,
        "state_dir": None,
        "log_file": str(Path(directory) / "server.log"),
        "log_level": "info",
        "control_socket": sock,
        "metrics": {"host": "127.0.0.1", "port": mport},
    }
    cfg = Path(directory) / "server.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    hbd_root = Path(a.hbd).resolve() if a.hbd else ROOT  # whose hbd runs (a baseline: another checkout)
    env = {**os.environ, "PYTHONPATH": str(hbd_root)}
    with open(Path(directory) / "server.out", "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "hbd", "server", "-c", str(cfg)], stdout=out, stderr=out, env=env, cwd=hbd_root
        )
    kids: list[int] = []
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    result: dict = {"hbd": str(hbd_root), "n": n, "workers": a.workers, "procs": a.procs, "probes": a.probes}
    result["interval_s"] = a.interval
    probe_out = str(Path(directory) / "probe.bin")
    try:
        deadline = mono() + 30
        while not os.path.exists(sock):
            if mono() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start: see " + str(Path(directory) / "server.out"))
            time.sleep(0.2)
        time.sleep(1.0)
        r, w = os.pipe()
        per = -(-n // a.procs)
        start = mono()
        for k in range(a.procs):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    clients(port, k * per, min(per, n - k * per), f"127.77.{k + 1}.1", a.interval, a.down, w)
                finally:
                    os._exit(0)
            kids.append(pid)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                probe(port, a.probes, probe_out, w)
            finally:
                os._exit(0)
        probe_pid = pid
        kids.append(pid)
        os.close(w)
        for _ in range(2 * a.procs + 1):
            os.read(r, 1)
        os.close(r)
        down = a.down * a.procs
        shown = steady = mono()
        want, seen_up = n - down + a.probes, -1
        while (c := loop_now(sock)["counts"]).get("DOWN", 0) < down or c.get("UP", 0) < want:
            if c.get("UP", 0) != seen_up:
                seen_up, steady = c.get("UP", 0), mono()
            elif mono() - steady > 20 and seen_up >= 0.99 * want and c.get("DOWN", 0) >= down:
                break  # a few refused (a worker's max_clients): measure with what connected
            if mono() - start > 420:
                raise SystemExit(f"timed out waiting for every peer: {c}")
            if mono() - shown > 30:
                print(f"{mono() - start:.0f} s: {c}", file=sys.stderr, flush=True)
                shown = mono()
            time.sleep(1.0)
        result["connect_s"] = round(mono() - start, 1)
        result["counts"] = c
        time.sleep(a.interval)  # a whole ping round in the steady state
        phases: dict[str, dict] = {}

        def phase(name: str, work) -> None:
            first = loop_now(sock)
            before = first["turns"]
            BUSY.clear()
            PROGRESS.clear()
            cpu0 = cpu_seconds(server.pid)
            t0 = mono()
            info = work()
            t1 = mono()
            cpu1 = cpu_seconds(server.pid)
            last = loop_now(sock)
            after = last["turns"]
            busy = list(BUSY)
            if any(len(p) > 3 for p in PROGRESS):
                info["progress"] = list(PROGRESS)
            # the server's CPU over the phase, in cores (1.0: one core all the time)
            cpu = {k: round((cpu1[k] - cpu0[k]) / (t1 - t0), 3) for k in cpu0}
            phases[name] = {
                "start": t0,
                "end": t1,
                "busy": busy,
                **info,
                "cpu_cores": cpu,
                "loop": turns_between(before, after),
                # per process: turns over 20, 50, 100 ms in the phase, and (workers) the longest so far
                "loop_by_process": per_process(first, last),
            }
            print(f"{name}: {json.dumps(phases[name])}", file=sys.stderr, flush=True)

        def quiet(seconds: float):
            return lambda: (time.sleep(seconds), {})[1]

        def filtered():
            times, sizes = [], []
            for i in range(a.repeat * 3):
                req = {"request": "select", "limit": 100}
                req |= {"state": ["DOWN", "LATE"]} if i % 2 == 0 else {"peer": "host0123*"}
                t, size = timed_query(sock, json.dumps(req))
                times.append(t)
                sizes.append(size)
                time.sleep(1.0)
            cli = []
            for _ in range(a.repeat):
                t0 = mono()
                subprocess.run(
                    [sys.executable, "-m", "hbd", "status", "-s", sock, "--state", "DOWN,LATE"],
                    env=env,
                    cwd=hbd_root,
                    stdout=subprocess.DEVNULL,
                    check=True,
                )
                cli.append(mono() - t0)
                time.sleep(1.0)
            return {"times_s": [round(t, 3) for t in times], "bytes": sizes, "cli_s": [round(t, 3) for t in cli]}

        def full():
            times, sizes = [], []
            for _ in range(a.repeat):
                t, size = timed_query(sock, "status")
                times.append(round(t, 3))
                sizes.append(size)
                time.sleep(2.0)
            return {"times_s": times, "bytes": sizes}

        def metrics():
            times, sizes = [], []
            for _ in range(a.repeat):
                t, size = scrape(mport)
                times.append(round(t, 3))
                sizes.append(size)
                time.sleep(2.0)
            return {"times_s": times, "bytes": sizes}

        phase("quiet", quiet(a.quiet))
        phase("filtered", filtered)
        phase("quiet2", quiet(a.quiet / 2))
        phase("full", full)
        phase("quiet3", quiet(a.quiet / 2))
        phase("metrics", metrics)
        phase("quiet4", quiet(a.quiet / 2))
        os.kill(probe_pid, signal.SIGTERM)
        os.waitpid(probe_pid, 0)
        kids.remove(probe_pid)
        raw = Path(probe_out).read_bytes()
        half = len(raw) // 2
        t_send, rtts = array("d"), array("d")
        t_send.frombytes(raw[:half])
        rtts.frombytes(raw[half:])
        for info in phases.values():
            xs = array("d", (rt for t, rt in zip(t_send, rtts, strict=True) if info["start"] <= t < info["end"]))
            info["rtt_ms"] = summary(xs, 1000.0)
            busy = info.pop("busy")
            if busy:  # only the pings sent while one of the phase's requests was under way
                during = (rt for t, rt in zip(t_send, rtts, strict=True) if any(a <= t < b for a, b in busy))
                info["rtt_during_ms"] = summary(array("d", during), 1000.0)
                # the slow round trips: (request, seconds into it, ms), to see which stage of a reply
                slow = [
                    (k, round(t - a, 3), round(rt * 1000, 1))
                    for t, rt in zip(t_send, rtts, strict=True)
                    if rt > 0.010
                    for k, (a, b) in enumerate(busy)
                    if a <= t < b
                ]
                info["slow_during"] = slow[:200]
            info["duration_s"] = round(info.pop("end") - info.pop("start"), 1)
        result["phases"] = phases
        result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        result["loadavg_start"] = load_start
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=100_000, help="named clients (default 100000)")
    ap.add_argument("--workers", type=int, default=6, help="the server's workers (default 6)")
    ap.add_argument("--procs", type=int, default=6, help="client processes (default 6; each holds n/procs sockets)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between a client's pings (default 10)")
    ap.add_argument("--down", type=int, default=20, help="connections each client process closes (DOWN peers)")
    ap.add_argument("--probes", type=int, default=300, help="probe connections, a ping every 0.5 s each")
    ap.add_argument("--quiet", type=float, default=20.0, help="seconds of the first quiet phase")
    ap.add_argument("--repeat", type=int, default=2, help="requests per phase")
    ap.add_argument("--dir", default=None, help="where to put the server's files (default: a temporary directory)")
    ap.add_argument("--hbd", default=None, help="the checkout whose hbd runs (default: this one; e.g. a baseline)")
    ap.add_argument("--out", default=None, help="also write the JSON document to this file")
    a = ap.parse_args()
    raise_nofile()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        r = run(a, d)
    print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1) + "\n")
    quiet = r["phases"]["quiet"]["rtt_ms"]
    for name, p in r["phases"].items():
        rtt = p.get("rtt_during_ms", p["rtt_ms"])
        ratio = rtt["p99"] / quiet["p99"] if quiet.get("p99") else float("nan")
        print(
            f"{name:9s} {p['duration_s']:6.1f} s  requests {p.get('times_s', '-')}  "
            f"rtt p50 {rtt.get('p50', float('nan')):.2f} p99 {rtt.get('p99', float('nan')):.2f} "
            f"max {rtt.get('max', float('nan')):.2f} ms ({ratio:.2f}x quiet p99)  "
            f"turns over 100 ms {p['loop']['over_100ms']}, longest <= {p['loop']['longest_at_most_ms']} ms  "
            f"cpu {p['cpu_cores']}"
        )


if __name__ == "__main__":
    main()
