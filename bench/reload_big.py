"""A reload at 100,000 expected peers, in a real server: ``python3 -m bench.reload_big [-n 100000 -m 19000]``.

Starts ``hbd server`` (from this checkout, or the one ``--root`` names: to compare with another
version) with a ``peers_file`` of N expected peers (each with an address, every tenth with a label),
connects M of them (``hello hostNNNNNN``, a ping every 5 s) from --procs forked processes, plus a
probe process whose 20 connections ping every 20 ms and note each pong's round trip. Then, after a
quiet window, it rewrites the peers_file and sends SIGHUP; ``--change all`` (the worst case) changes
heartbeat_timeout (the timeout of every expected peer, all 100,000 changed) and the labels of every
tenth, ``--change one`` changes one entry. The reload is applied at the log's "reloaded" or, where the registry applies
its changes a slice per loop turn, at its "expected peers applied" (the log is polled). Measured:

- the probe's pong RTT (p50, p99, max) in the quiet window and during the reload (SIGHUP to applied);
- the loop's own turn histogram from the status socket (read before the quiet window and after the
  reload): how many turns over 20, 50 and 100 ms, and the longest turn if it grew meanwhile.

Needs RLIMIT_NOFILE >= M + 200 for the server; holds the bench lock yourself (``flock``).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from bench.fleet import fleet  # noqa: E402
from bench.mass_down import fork_clients, free_port, head, over, wait  # noqa: E402

PROBES = 20
PROBE_EVERY = 0.02  # seconds between one probe connection's pings


def probe(port: int, stop: int, out: int) -> None:
    """A forked process: PROBES named connections pinging every PROBE_EVERY; once ``stop`` is readable,
    writes [(sent, rtt)] as JSON to ``out``."""
    sel = selectors.DefaultSelector()
    sel.register(stop, selectors.EVENT_READ, -1)
    socks = []
    for k in range(PROBES):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"hello probe{k:02d}\nping\n".encode())
        s.settimeout(30)
        assert s.recv(16).startswith(b"pong")
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, k)
    sent = [0.0] * PROBES  # when each one's ping in flight was sent (0: none in flight)
    due = [time.monotonic() + k * PROBE_EVERY / PROBES for k in range(PROBES)]
    samples: list[tuple[float, float]] = []
    running = True
    while running:
        now = time.monotonic()
        for k in range(PROBES):
            if not sent[k] and now >= due[k]:
                sent[k] = now
                socks[k].send(b"ping\n")
        for key, _ in sel.select(0.002):
            k = key.data
            if k < 0:
                running = False
                continue
            data = key.fileobj.recv(4096)  # type: ignore[union-attr]
            now = time.monotonic()
            if data and sent[k]:
                samples.append((sent[k], now - sent[k]))
                due[k] = sent[k] + PROBE_EVERY
                sent[k] = 0.0
    os.write(out, json.dumps(samples).encode())
    os.close(out)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000


def run(n: int, m: int, procs: int, change: str, quiet: float, root: Path, directory: str) -> dict[str, object]:
    d = Path(directory)
    sock, port, peers = str(d / "server.sock"), free_port(), d / "fleet.yaml"
    fleet(peers, n, 0)
    config = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_timeout": 60,
        "max_clients": m + 1000,
        "max_peers": n + 1000,
        "peers_file": str(peers),
        "state_dir": None,
        "log_file": str(d / "server.log"),
        "log_level": "info",
        "control_socket": sock,
    }
    cfg = d / "server.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("BENCH_PYTHONPATH"), str(root)]))}
    with open(d / "server.out", "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "hbd", "server", "-c", str(cfg)], stdout=out, stderr=out, env=env, cwd=root
        )
    kids: list[int] = []
    try:
        wait("the status socket", lambda: os.path.exists(sock), 120)
        kids = fork_clients(port, m, procs)
        connected = _wait_up(sock, m + 0)  # (mass_down's clients: host%05d, the first m expected peers)
        before = turns(sock)
        time.sleep(2.0)
        start = time.monotonic()
        pr, pw = os.pipe()
        sr, sw = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(pr)
                os.close(sw)
                probe(port, sr, pw)
            finally:
                os._exit(0)
        os.close(pw)
        os.close(sr)
        time.sleep(quiet + 1.0)  # its connections, then the quiet window
        quiet_end = time.monotonic()
        fleet(peers, n, 1 if change == "all" else 0)
        if change == "all":
            cfg.write_text(json.dumps({**config, "heartbeat_timeout": 61}))
        else:
            lines = peers.read_text().splitlines(keepends=True)
            lines[n // 2] = lines[n // 2].replace("}\n", ", timeout: 30}\n")
            peers.write_text("".join(lines))
        log = d / "server.out"
        mark = len(log.read_text())
        sliced = "expected peers applied" in (root / "hbd" / "server_registry.py").read_text()
        hup = time.monotonic()
        server.send_signal(signal.SIGHUP)
        # applied: at "reloaded" (the commit) or, with the registry's slices, once they are all done
        _wait_log(log, mark, "reloaded")
        if sliced and "expected peers:" in log.read_text()[mark:]:
            _wait_log(log, mark, "expected peers applied")
        done = time.monotonic()
        time.sleep(1.0)
        after = turns(sock)
        os.close(sw)  # the probe stops and writes what it measured
        samples = json.loads(_read_all(pr) or b"[]")
        os.waitpid(pid, 0)
    finally:
        for kid in kids:
            os.kill(kid, signal.SIGKILL)
            os.waitpid(kid, 0)
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    log = [
        line
        for line in (d / "server.out").read_text().splitlines()
        if any(w in line for w in ("reload", "expected peers", "stalled", "GCDBG"))
    ]
    quiet_rtts = [rtt for t, rtt in samples if start + 1.0 <= t < quiet_end]
    during = [rtt for t, rtt in samples if hup <= t <= done]
    return {
        "n": n,
        "m": m,
        "change": change,
        "root": str(root),
        "connect_s": round(connected, 1),
        "reload_s": round(done - hup, 2),
        "quiet": {"pings": len(quiet_rtts), **_rtt(quiet_rtts)},
        "during": {"pings": len(during), **_rtt(during)},
        "turns": after["count"] - before["count"],
        "over_20ms": over(after, "20") - over(before, "20"),
        "over_50ms": over(after, "50") - over(before, "50"),
        "over_100ms": over(after, "100") - over(before, "100"),
        "max_ms_before": before["max_ms"],
        "max_ms_after": after["max_ms"],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "log": log[-12:],
        "hup_mono": hup,
        "worst": sorted(
            ((round(t - hup, 3), round(rtt * 1000, 1)) for t, rtt in samples if t >= hup - 1), key=lambda x: -x[1]
        )[:8],
    }


def turns(sock: str) -> dict:
    """The server loop's turn histogram (the status document without its peer list)."""
    return head(sock)["loop"]["turns"]


def _wait_up(sock: str, m: int) -> float:
    """Until m peers are UP (a status document at 100,000 peers is tens of MB: asked every 3 s)."""
    start = time.monotonic()
    while int(head(sock)["counts"]["UP"]) < m:
        if time.monotonic() - start > 300:
            raise SystemExit("timed out waiting for all UP")
        time.sleep(3.0)
    return time.monotonic() - start


def _wait_log(log: Path, mark: int, needle: str, timeout: float = 300.0) -> None:
    """Until ``needle`` is in the server's output past ``mark`` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while needle not in log.read_text()[mark:]:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {needle!r}")
        time.sleep(0.02)


def _rtt(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(values, 0.5), 1),
        "p99_ms": round(pct(values, 0.99), 1),
        "max_ms": round(max(values, default=float("nan")) * 1000, 1),
    }


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", type=int, default=100_000, help="expected peers in the peers_file (default 100000)")
    ap.add_argument("-m", type=int, default=19_000, help="clients connected meanwhile (default 19000)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--change", choices=("all", "one"), default="all", help="what the reload changes")
    ap.add_argument("--quiet", type=float, default=8.0, help="seconds of the quiet window before the SIGHUP")
    ap.add_argument("--root", type=Path, default=ROOT, help="the hbd checkout whose server runs")
    ap.add_argument("--dir", default=None, help="where to put the server's files (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        r = run(args.n, args.m, args.procs, args.change, args.quiet, args.root.resolve(), d)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
