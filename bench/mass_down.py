"""Mass events in a real server: ``python3 -m bench.mass_down [-n 19000] [--workers K] [--reconnect[-now]]``.

Starts ``hbd server`` with a state_dir in a temporary directory, connects N named clients (``hello
hostNNNNN``, then a ping every few seconds) from --procs forked processes, waits until the server
shows all N UP and the store holds their changes, then SIGKILLs the client processes at once: the
kernel closes all N sockets, the registry marks every peer DOWN and queues N history rows and N peer
records. Measured (the loop's own numbers, from the status socket before and after; the store's from
the server's log at shutdown):

- the loop turns of the disconnect phase: how many, how many over 20 ms and 50 ms, the longest;
- the loop turns' histogram of that phase (``turns_le_ms``: turns that took at most each bound);
- the loop's share of the state store over the whole run (the server logs it at close): the longest
  hand-over (the timer that gives the writer thread the registry's changed peers and wakes it) and
  the longest wait for the writer's lock (the writer holds it while it takes a batch);
- how long until all N DOWN changes were in the file (read with a read-only connection).

With ``--workers K`` the server is a supervisor and K workers (N may then pass the per-process
descriptor cap). Every phase (the ramp, the disconnect, with ``--reconnect`` the reconnect storm)
reports the loop turns over 20, 50 and 100 ms of every process (from the histograms in the head of
the status document: the bench reads only the head, never the peer list), and a probe process keeps
``--probes`` connections pinging every 100 ms throughout: their pong RTT is what a surviving peer
saw during each phase. ``--reconnect-now`` starts the reconnect right after the kill instead (one
phase, ``down+reconnect``: the greetings come in while the server still works off the ends).

Needs RLIMIT_NOFILE >= N + 100 for a single server process (N / K + 100 for a worker); the clients
split N over --procs processes (default: one per 15,000), from source addresses 127.66.P.A (a new
A every 10,000 connections, so the ephemeral ports never run out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout (for the server it starts)


PING_EVERY = 5.0  # seconds between a client's pings (the server's timeout is 60 s: nobody goes LATE)
PER_SOURCE = 10000  # connections per source address (the ephemeral port range holds about 28,000)
PROBE_EVERY = 0.1  # seconds between a probe connection's pings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clients(port: int, first: int, count: int, proc: int, ready: int) -> None:
    """A forked client process: ``count`` connections, named from ``first``; writes a byte to the
    ``ready`` pipe once all are connected, then pings until killed."""
    socks: list[socket.socket] = []
    for i in range(first, first + count):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((f"127.66.{proc + 1}.{(i - first) // PER_SOURCE + 1}", 0))
        s.settimeout(30)
        s.connect(("127.0.0.1", port))
        s.sendall(f"hello host{i:05d}\nping\n".encode())
        s.setblocking(False)
        socks.append(s)
    os.write(ready, b"x")
    while True:
        time.sleep(PING_EVERY)
        for s in socks:
            try:
                while s.recv(4096):  # the pongs, so that the buffers never fill
                    pass
            except BlockingIOError:
                pass
            except OSError:
                continue
            try:
                s.send(b"ping\n")
            except OSError:
                pass


def fork_clients(port: int, n: int, procs: int) -> list[int]:
    """``n`` clients (host00000 on) spread over ``procs`` forked processes; returns their pids once
    every process has connected its share."""
    r, w = os.pipe()
    per = -(-n // procs)
    pids = []
    for k in range(procs):
        pid = os.fork()
        if pid == 0:  # a client process: never returns
            try:
                os.close(r)
                clients(port, k * per, min(per, n - k * per), k, w)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(w)
    for _ in range(procs):
        os.read(r, 1)
    os.close(r)
    return pids


def probe(port: int, m: int, ready: int, control: int, out: int) -> None:
    """A forked probe: ``m`` connections that ping every PROBE_EVERY s, each as soon as the previous
    pong is back and its time has come. Each byte read from ``control`` closes a phase: the pong RTTs
    of that phase (seconds, sorted) are written to ``out`` as a JSON line."""
    socks = []
    for i in range(m):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"hello probe{i:03d}\nping\n".encode())
        socks.append(s)
    for s in socks:
        s.recv(64)  # the first pong
        s.setblocking(False)
    os.write(ready, b"x")
    sent: dict[int, float] = {}  # fd -> when the ping now out was sent
    due = {s.fileno(): time.monotonic() + PROBE_EVERY * i / m for i, s in enumerate(socks)}
    by_fd = {s.fileno(): s for s in socks}
    rtts: list[float] = []
    while True:
        now = time.monotonic()
        for fd, when in due.items():
            if fd not in sent and when <= now:
                by_fd[fd].send(b"ping\n")
                sent[fd] = now
        readable, _, _ = select.select([*by_fd, control], [], [], 0.01)
        now = time.monotonic()
        for fd in readable:
            if fd == control:
                if not os.read(control, 1):
                    return
                rtts.sort()
                os.write(out, (json.dumps({"n": len(rtts), "rtts": rtts}) + "\n").encode())
                rtts = []
                continue
            data = by_fd[fd].recv(4096)
            if not data:
                return
            if fd in sent:
                rtts.append(now - sent.pop(fd))
                due[fd] = max(due[fd] + PROBE_EVERY, now)


def head(sock: str) -> dict:
    """The status document without its peer list (the peers are never serialised for it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock)
        s.sendall(b"status\n")
        buf = b""
        while b',"peers":[' not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit(f"no status head: {buf[:200]!r}")
            buf += chunk
    return json.loads(buf[: buf.index(b',"peers":[')] + b"}")


def loops(doc: dict) -> dict[str, dict]:
    """Each process's turn histogram: the server's, or the supervisor's own and each worker's."""
    workers = {f"worker{w['index']}": w["loop"]["turns"] for w in doc.get("workers", []) if "loop" in w}
    if not workers:
        return {"server": doc["loop"]["turns"]}
    total = doc["loop"]["turns"]  # every process's together: the supervisor's own is the difference
    own = {"count": total["count"] - sum(t["count"] for t in workers.values())}
    own["le_ms"] = {b: n - sum(t["le_ms"][b] for t in workers.values()) for b, n in total["le_ms"].items()}
    own["max_ms"] = total["max_ms"] if total["max_ms"] > max(t["max_ms"] for t in workers.values()) else None
    return {"supervisor": own, **workers}


def counts(sock: str) -> dict:
    return head(sock)["counts"]


def changes(db: str, new: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM changes WHERE new = ?", (new,)).fetchone()[0]
    finally:
        conn.close()


def wait(what: str, predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)
    took = time.monotonic() - start
    print(f"{what}: {took:.1f} s", file=sys.stderr, flush=True)
    return took


def over(t: dict, bound_ms: str) -> int:
    return t["count"] - t["le_ms"][bound_ms]


def phase(before: dict[str, dict], after: dict[str, dict], rtt: dict) -> dict:
    """Turns of each process between two readings: how many, over 20/50/100 ms; the longest so far;
    and the probes' pong RTT in the phase."""
    rtts = rtt["rtts"]
    out: dict = {
        "rtt_n": rtt["n"],
        "rtt_p99_ms": round(rtts[int(len(rtts) * 0.99)] * 1000, 2) if rtts else None,
        "rtt_max_ms": round(rtts[-1] * 1000, 2) if rtts else None,
    }
    for name, a in after.items():
        b = before.get(name) or {"count": 0, "le_ms": {k: 0 for k in a["le_ms"]}}
        out[name] = {
            "turns": a["count"] - b["count"],
            **{f"over_{ms}ms": over(a, ms) - over(b, ms) for ms in ("20", "50", "100")},
            "max_ms_so_far": a["max_ms"],
        }
    return out


def progress(name: str, p: dict) -> None:
    """A phase's figures as soon as it is done (stderr): a run cut short by its time slot keeps them."""
    print(json.dumps({"phase": name, **p}), file=sys.stderr, flush=True)


def run(
    n: int,
    procs: int,
    directory: str,
    store: bool = True,
    workers: int = 0,
    probes: int = 20,
    reconnect: bool = False,
    reconnect_now: bool = False,
) -> dict:
    state = Path(directory) / "state"
    state.mkdir()
    sock = str(Path(directory) / "server.sock")
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_timeout": 60,
        # each worker takes max_clients / K, and the kernel spreads connections over the workers'
        # SO_REUSEPORT sockets by a hash, not evenly (at 100,000 over 6: up to 330 over the mean): room
        # for that, or the workers that are full refuse the rest and "all UP" never comes
        "max_clients": (n + probes) * 21 // 20 + 100 if workers else n + probes + 100,
        "max_peers": n + probes + 100,
        "state_dir": str(state) if store else None,
        "log_file": str(Path(directory) / "server.log"),
        "log_level": "info",
        "control_socket": sock,
    }
    if workers:
        config["workers"] = workers
    cfg = Path(directory) / "server.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(Path(directory) / "server.out", "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "hbd", "server", "-c", str(cfg)], stdout=out, stderr=out, env=env, cwd=ROOT
        )
    kids: list[int] = []
    prober = 0
    phases: dict[str, dict] = {}
    db = str(state / "state.db")
    try:
        wait("the status socket", lambda: os.path.exists(sock), 30)
        wait("the workers", lambda: len(head(sock).get("workers", [])) == workers, 30)
        pr, pw = os.pipe()
        cr, cw = os.pipe()
        orr, ow = os.pipe()
        prober = os.fork()
        if prober == 0:
            try:
                os.close(pr)
                os.close(cw)
                os.close(orr)
                probe(port, probes, pw, cr, ow)
            finally:
                os._exit(0)
        for fd in (pw, cr, ow):
            os.close(fd)
        os.read(pr, 1)
        rtt_lines = os.fdopen(orr)

        def rtt() -> dict:
            os.write(cw, b"x")
            return json.loads(rtt_lines.readline())

        def start_clients() -> list[int]:
            return fork_clients(port, n, procs)

        def reading() -> dict[str, dict]:
            time.sleep(2.0)  # the workers report their numbers every second
            return loops(head(sock))

        rtt()
        before = reading()
        kids = start_clients()
        up = probes + n
        connected = wait("all UP", lambda: counts(sock)["UP"] == up, 600)
        if store:
            wait("the UP changes in the file", lambda: changes(db, "UP") == up, 300)
        phases["ramp"] = phase(before, after := reading(), rtt())
        progress("ramp", phases["ramp"])
        killed = time.monotonic()
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
        for pid in kids:
            os.waitpid(pid, 0)
        kids = []
        if reconnect_now:  # all N again at once while the server still works off their ends
            started = time.monotonic()
            kids = start_clients()
            if store:
                wait("the DOWN changes in the file", lambda: changes(db, "DOWN") == n, 300)
            wait("all UP again", lambda: counts(sock)["UP"] == up, 600)
            phases["down+reconnect"] = phase(after, reading(), rtt())
            phases["down+reconnect"]["up_again_s"] = round(time.monotonic() - started, 2)
            progress("down+reconnect", phases["down+reconnect"])
            reconnect = False
        elif store:
            wait("the DOWN changes in the file", lambda: changes(db, "DOWN") == n, 300)
        else:
            wait("all DOWN", lambda: counts(sock)["DOWN"] == n, 300)
        written = time.monotonic() - killed
        if not reconnect_now:
            phases["down"] = phase(after, after2 := reading(), rtt())
            phases["down"]["down_s"] = round(written, 2)
            progress("down", phases["down"])
        down = counts(sock)["DOWN"]
        if reconnect:
            started = time.monotonic()
            kids = start_clients()
            wait("all UP again", lambda: counts(sock)["UP"] == up, 600)
            phases["reconnect"] = phase(after2, reading(), rtt())
            phases["reconnect"]["up_again_s"] = round(time.monotonic() - started, 2)
            progress("reconnect", phases["reconnect"])
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if prober:
            os.kill(prober, signal.SIGKILL)
            os.waitpid(prober, 0)
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    text = (Path(directory) / "server.out").read_text()  # its terminal output: written to the end
    m = re.findall(
        r"(\d+) flushes from the loop, the longest ([\d.]+) ms(?: \(CPU ([\d.]+) ms\))?"
        r"(?:; the longest wait for the writer ([\d.]+) ms)?",
        text,
    )
    stalls = re.findall(r"event loop stalled for ([\d.]+) s", text)
    return {
        "n": n,
        "workers": workers,
        "down": down,
        "connect_s": round(connected, 2),
        "written_s": round(written, 2),
        "flushes": int(m[-1][0]) if m else -1,
        "longest_flush_ms": float(m[-1][1]) if m else -1.0,
        "stalls_logged_s": [float(x) for x in stalls],
        "phases": phases,
        "longest_flush_cpu_ms": float(m[-1][2]) if m and m[-1][2] else -1.0,
        "longest_lock_wait_ms": float(m[-1][3]) if m and m[-1][3] else -1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=19000, help="named clients that go down at once (default 19000)")
    ap.add_argument("--procs", type=int, default=0, help="client processes (default: one per 15,000, at least 2)")
    ap.add_argument("--workers", type=int, default=0, help="server workers (default 0: one process)")
    ap.add_argument("--probes", type=int, default=20, help="connections pinging every 100 ms throughout (default 20)")
    ap.add_argument("--reconnect", action="store_true", help="then reconnect all N at once (a reconnect storm)")
    ap.add_argument(
        "--reconnect-now",
        action="store_true",
        help="reconnect all N right after they were killed, while the server still works off their ends",
    )
    ap.add_argument("--dir", default=None, help="where to put the server's files (default: a temporary directory)")
    ap.add_argument("--no-store", action="store_true", help="state_dir: null (what the loop does without the store)")
    args = ap.parse_args()
    procs = args.procs or max(2, -(-args.n // 15000))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        r = run(
            args.n,
            procs,
            d,
            store=not args.no_store,
            workers=args.workers,
            probes=args.probes,
            reconnect=args.reconnect,
            reconnect_now=args.reconnect_now,
        )
    print(json.dumps(r))
    print(
        f"{r['n']} peers ({r['workers'] or 'no'} workers): all UP in {r['connect_s']:.1f} s; DOWN after"
        f" {r['written_s']:.1f} s{' (with the store: all changes in the file)' if r['flushes'] >= 0 else ''};"
        f" longest hand-over to the store {r['longest_flush_ms']:.1f} ms (CPU {r['longest_flush_cpu_ms']:.1f} ms)"
        f" of {r['flushes']}, longest wait for its writer's lock {r['longest_lock_wait_ms']:.2f} ms;"
        f" stalls logged {r['stalls_logged_s']}"
    )
    for name, p in r["phases"].items():
        procs_text = ", ".join(
            f"{k} {v['turns']} turns, {v['over_20ms']}/{v['over_50ms']}/{v['over_100ms']} over 20/50/100 ms"
            f" (longest so far {v['max_ms_so_far']} ms)"
            for k, v in p.items()
            if isinstance(v, dict)
        )
        print(
            f"  {name}: probe RTT p99 {p['rtt_p99_ms']} ms, max {p['rtt_max_ms']} ms ({p['rtt_n']} pongs); {procs_text}"
        )


if __name__ == "__main__":
    main()
