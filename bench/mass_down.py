"""A mass disconnect with the state store on, in a real server: ``python3 -m bench.mass_down [-n 19000]``.

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

Needs RLIMIT_NOFILE >= N + 100 for the server; the clients split N over --procs processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from hbd.control import query  # noqa: E402

PING_EVERY = 5.0  # seconds between a client's pings (the server's timeout is 60 s: nobody goes LATE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clients(port: int, first: int, count: int, source: str, ready: int) -> None:
    """A forked client process: ``count`` connections, named from ``first``; writes a byte to the
    ``ready`` pipe once all are connected, then pings until killed."""
    socks: list[socket.socket] = []
    for i in range(first, first + count):
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((source, 0))
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


def turns(sock: str) -> dict:
    return json.loads(query(sock, "status"))["loop"]["turns"]


def counts(sock: str) -> dict:
    return json.loads(query(sock, "status"))["counts"]


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
    return time.monotonic() - start


def over(t: dict, bound_ms: str) -> int:
    return t["count"] - t["le_ms"][bound_ms]


def run(n: int, procs: int, directory: str, store: bool = True) -> dict[str, float]:
    state = Path(directory) / "state"
    state.mkdir()
    sock = str(Path(directory) / "server.sock")
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_timeout": 60,
        "max_clients": n + 100,
        "max_peers": n + 100,
        "state_dir": str(state) if store else None,
        "log_file": str(Path(directory) / "server.log"),
        "log_level": "info",
        "control_socket": sock,
    }
    cfg = Path(directory) / "server.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(Path(directory) / "server.out", "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "hbd", "server", "-c", str(cfg)], stdout=out, stderr=out, env=env, cwd=ROOT
        )
    kids: list[int] = []
    try:
        wait("the status socket", lambda: os.path.exists(sock), 30)
        r, w = os.pipe()
        per = -(-n // procs)
        for k in range(procs):
            pid = os.fork()
            if pid == 0:  # a client process: never returns
                try:
                    os.close(r)
                    clients(port, k * per, min(per, n - k * per), f"127.66.{k + 1}.1", w)
                finally:
                    os._exit(0)
            kids.append(pid)
        os.close(w)
        for _ in range(procs):
            os.read(r, 1)
        os.close(r)
        db = str(state / "state.db")
        connected = wait("all UP", lambda: counts(sock)["UP"] == n, 300)
        if store:
            wait("the UP changes in the file", lambda: changes(db, "UP") == n, 120)
        time.sleep(2.0)
        before = turns(sock)
        killed = time.monotonic()
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
        for pid in kids:
            os.waitpid(pid, 0)
        kids = []
        if store:
            wait("the DOWN changes in the file", lambda: changes(db, "DOWN") == n, 300)
        else:
            wait("all DOWN", lambda: counts(sock)["DOWN"] == n, 300)
        written = time.monotonic() - killed
        time.sleep(1.0)
        after = turns(sock)
        down = counts(sock)["DOWN"]
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    text = (Path(directory) / "server.out").read_text()  # its terminal output: written to the end
    m = re.findall(
        r"(\d+) flushes from the loop, the longest ([\d.]+) ms(?: \(CPU ([\d.]+) ms\))?"
        r"(?:; the longest wait for the writer ([\d.]+) ms)?",
        text,
    )
    return {
        "n": n,
        "down": down,
        "connect_s": connected,
        "written_s": written,
        "turns": after["count"] - before["count"],
        # the disconnect phase's turns by duration: how many took at most each bound (ms), cumulative
        "turns_le_ms": {b: after["le_ms"][b] - before["le_ms"].get(b, 0) for b in after["le_ms"]},
        "over_20ms": over(after, "20") - over(before, "20"),
        "over_50ms": over(after, "50") - over(before, "50"),
        "max_ms_before": before["max_ms"],
        "max_ms_after": after["max_ms"],
        "flushes": int(m[-1][0]) if m else -1,
        "longest_flush_ms": float(m[-1][1]) if m else -1.0,
        "longest_flush_cpu_ms": float(m[-1][2]) if m and m[-1][2] else -1.0,
        "longest_lock_wait_ms": float(m[-1][3]) if m and m[-1][3] else -1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=19000, help="named clients that go down at once (default 19000)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--dir", default=None, help="where to put the server's files (default: a temporary directory)")
    ap.add_argument("--no-store", action="store_true", help="state_dir: null (what the loop does without the store)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        r = run(args.n, args.procs, d, store=not args.no_store)
    print(json.dumps(r))
    grew = r["max_ms_after"] > r["max_ms_before"]
    print(
        f"{r['n']} peers down at once: {r['down']} DOWN after {r['written_s']:.1f} s (with the store: all changes in"
        " the file);"
        f" {r['turns']} loop turns, {r['over_20ms']} over 20 ms, {r['over_50ms']} over 50 ms; longest turn"
        f" {r['max_ms_after']:.1f} ms {'(in this phase)' if grew else '(before it: this phase stayed below)'};"
        f" longest hand-over to the store {r['longest_flush_ms']:.1f} ms (CPU {r['longest_flush_cpu_ms']:.1f} ms)"
        f" of {r['flushes']},"
        f" longest wait for its writer's lock {r['longest_lock_wait_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
