"""Hostile input while healthy clients ping: garbage, 1 MB floods, slowloris, a flood beyond
max_clients. Healthy clients must see no missed pong and a p99 RTT within 2x the quiet baseline."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from daemons import ROOT, connect, free_port, recv_exactly, start_client, start_server
from fleet import FleetProcess
from helpers import report

from hbd.control import query

HEALTHY, INTERVAL, TIMEOUT, MAX_CLIENTS = 100, 0.2, 2.0, 400
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy (package builds set one)
# Loopback RTTs are ~0.1-0.3 ms: "2x" of that is scheduler noise on a shared 2-core machine (2-2.5 ms p99 was
# seen with other test suites running), so the baseline is at least 10 ms. What this still catches is the loop
# being held: a hostile peer that blocks it for 20 ms or more pushes the p99 of ~1200 pongs past the bound.
RTT_FLOOR = 0.010


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(0.99 * len(v)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def attack_once(srv, port: int) -> tuple[dict, float, float, int, int]:
    """A quiet period, then every attack at once; returns the attack's summary, the quiet window
    and the server's RSS before and at its peak."""
    time.sleep(0.5)
    quiet_from = time.monotonic()
    time.sleep(3.0)
    quiet_to = time.monotonic()
    rss_before = rss_kib(srv.pid)
    rss_peak = [rss_before]
    sampling = True

    def sample() -> None:
        while sampling:
            rss_peak.append(rss_kib(srv.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attack = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hostile.py"), str(port), str(MAX_CLIENTS), str(TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    sampling = False
    sampler.join()
    assert attack.returncode == 0, attack.stderr
    result = json.loads(attack.stdout.strip().splitlines()[-1])
    result["quiet"] = (quiet_from, quiet_to)
    time.sleep(TIMEOUT + 0.5)  # the connections admitted by the max_clients flood time out
    return result, quiet_from, quiet_to, rss_before, max(rss_peak)


@pytest.mark.slow
def test_hostile_peers_do_not_hurt_healthy_clients(tmp_path: Path, procs) -> None:
    """Two rounds. Everything must hold in both, except the RTT bound, which must hold in at least
    one: this 2-core machine also runs the attacker, the healthy clients and the test itself, and
    other work on it can skew one round's percentiles."""
    srv = start_server(tmp_path, heartbeat_timeout=TIMEOUT, max_clients=MAX_CLIENTS)
    procs.append(srv)
    port = srv.config["port"]
    fleet = FleetProcess(
        {
            "host": "127.0.0.1",
            "port": port,
            "heartbeat_interval": INTERVAL,
            "pong_timeout": 1.0,
            "reconnect_delay": 0.2,
            "reconnect_max_delay": 1.0,
        },
        HEALTHY,
        tmp_path,
    )
    try:
        assert len(fleet.wait_up(HEALTHY)) == HEALTHY
        rounds = [attack_once(srv, port) for _ in range(2)]
    finally:
        fleet.stop()
    rtts = fleet.stats["rtts"]
    downs = [e for e in fleet.events if e[0] in ("down", "late")]
    assert not downs, f"healthy clients missed pongs: {downs[:5]}"
    rtt_ok = []
    for n, (result, quiet_from, quiet_to, rss_before, rss_peak) in enumerate(rounds, 1):
        quiet = [r for t, r in rtts if quiet_from <= t < quiet_to]
        loud = [r for t, r in rtts if result["t_start"] <= t <= result["t_end"]]
        base = max(p99(quiet), RTT_FLOOR)
        slow = result["slowloris_close_after"]
        floods = result["flood_closed_after"]
        report(
            f"hostile input while 100 healthy clients ping every 0.2 s (round {n})",
            [
                f"quiet: {len(quiet)} pongs, p99 RTT {p99(quiet) * 1000:.3f} ms (baseline for the check: "
                f"{base * 1000:.3f} ms)",
                f"under attack ({result['t_end'] - result['t_start']:.1f} s): {len(loud)} pongs, "
                f"p99 RTT {p99(loud) * 1000:.3f} ms, max {max(loud) * 1000:.3f} ms; missed or late pongs: {len(downs)}",
                f"garbage connections closed: {result['garbage_closed']}/500",
                f"1 MB floods: {sum(f is not None for f in floods)}/20 closed by the server, the last after "
                f"{max(f or 99 for f in floods):.3f} s",
                f"slowloris peers closed: {result['slowloris_closed']}/100, after {min(slow):.3f}-{max(slow):.3f} s "
                f"(heartbeat_timeout {TIMEOUT:g} s)",
                f"beyond max_clients ({MAX_CLIENTS}): {result['beyond_max_opened']} opened, "
                f"{result['beyond_max_refused']} closed at once",
                f"server RSS: {rss_before / 1024:.1f} MiB before, peak {rss_peak / 1024:.1f} MiB",
            ],
        )
        rtt_ok.append(p99(loud) <= 2 * base)
        assert result["garbage_closed"] == 500
        # Real time seen by a loaded attacker process: generous bounds (the deadline rule itself is
        # tested in virtual time, test_liveness/test_verdicts; the size rule in test_protocol).
        assert None not in floods and max(floods) < 3.0, floods
        assert result["slowloris_closed"] == 100 and max(slow) <= TIMEOUT + 1.5, slow[-5:]
        assert result["beyond_max_refused"] >= result["beyond_max_opened"] - MAX_CLIENTS
        assert rss_peak - rss_before < 50 * 1024, "server memory grew by more than 50 MiB"
    assert any(rtt_ok), "p99 RTT under attack was above 2x the quiet baseline in both rounds"
    log_lines = (tmp_path / "server.log").read_text().splitlines()
    report(
        "server log file after both rounds", [f"warning/error lines: {len(log_lines)} (for ~2,400 hostile connections)"]
    )
    assert len(log_lines) < 200, "peer-caused lines were not rate-limited"
    # what the limiter held back is still reported, once its window is over
    srv.wait_for(r"WARNING .*suppressed \d+ 'protocol-error' lines caused by 127\.0\.0\.1 in the last 10 s", timeout=15)


# -- peers that try to kill a daemon or grow it without bound -------------------------------------


class FakeServer:
    """A TCP server on 127.0.0.1 that treats every connection with ``handle(sock)`` in a thread."""

    def __init__(self, handle) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.accepted = 0
        self.stopped = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.handle, args=(conn, self), daemon=True).start()

    def close(self) -> None:
        self.stopped = True
        self._thread.join(2)
        self.sock.close()


def reset_at_once(conn: socket.socket, server: FakeServer) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    conn.close()


def stream_pongs(conn: socket.socket, server: FakeServer) -> None:
    with conn:
        try:
            while not server.stopped:
                conn.sendall(b"pong" * 64)
        except OSError:
            pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_resetting_server_kills_neither_the_client_nor_its_healthy_link(tmp_path: Path, procs) -> None:
    """A server that resets each connection right after accepting it (SO_LINGER 0), next to a good
    one: the client (with a greeting to send) keeps the good link up and retries the bad one."""
    good = start_server(tmp_path, heartbeat_timeout=2)
    procs.append(good)
    bad = FakeServer(reset_at_once)
    try:
        cli = start_client(
            tmp_path,
            good.config["port"],
            client_name="web1",
            reconnect_delay=0.02,
            reconnect_max_delay=0.05,
            servers=[
                {"host": "127.0.0.1", "port": good.config["port"], "name": "good"},
                {"host": "127.0.0.1", "port": bad.port, "name": "bad"},
            ],
        )
        procs.append(cli)
        cli.wait_for(r"pong from good")
        time.sleep(4.0)
        assert cli.proc.poll() is None, cli.output()[-3000:]
        assert bad.accepted >= 20
        mark = cli.mark()
        cli.wait_for(r"pong from good", after=mark)
        cli.wait_for(r"reconnecting to bad", after=mark)
        assert cli.count(r"link to good .*lost") == 0
        assert cli.count("Traceback") == 0
        resets = bad.accepted
    finally:
        bad.close()
    report(
        "server resetting every connection at accept, next to a good one",
        [f"{resets} resets in 4 s: client alive, good link never lost"],
    )


def test_a_server_streaming_pongs_is_a_protocol_error_not_an_up_link(tmp_path: Path, procs) -> None:
    """More pongs than pings: the client closes the link (logged) and reconnects with backoff; it
    never reports the link up and its CPU stays low (it was 100 %, with a 0.1 ms 'RTT')."""
    flood = FakeServer(stream_pongs)
    try:
        cli = start_client(tmp_path, flood.port, reconnect_delay=0.2, reconnect_max_delay=1.0)
        procs.append(cli)
        cli.wait_for(r"lost: protocol error: pong without a ping")
        cpu0 = cpu_seconds(cli.pid)
        time.sleep(3.0)
        cpu = cpu_seconds(cli.pid) - cpu0
        numbers = query(cli.config["control_socket"], "metrics").decode()
        assert cli.proc.poll() is None
        assert cpu < 0.6, f"the client burned {cpu:.2f} s of CPU in 3 s against a pong flood"
        assert re.search(r"^hbd_client_link_up\{[^}]*\} 0$", numbers, re.M), numbers
        assert re.search(r"^hbd_client_pongs_total\{[^}]*\} 0$", numbers, re.M), numbers
        assert cli.count("pong from") == 0
        attempts = flood.accepted
        assert attempts <= 30  # backoff with full jitter: up to 0.2, 0.4, 0.8, 1, 1, ... s (not a tight loop)
    finally:
        flood.close()
    report(
        "server streaming unsolicited pongs",
        [f"client CPU {cpu * 1000:.0f} ms in 3 s; link never up; {attempts} connections (backoff)"],
    )


def _trickle(path_or_port, n: int, stop: threading.Event, opened: list) -> None:
    """n connections that send one byte a second and never finish a request."""
    socks = []
    for _ in range(n):
        if isinstance(path_or_port, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path_or_port)
        else:
            s = socket.create_connection(("127.0.0.1", path_or_port))
        socks.append(s)
        opened.append(s)
    while not stop.wait(1.0):
        for s in list(socks):
            try:
                s.send(b"s" if isinstance(path_or_port, str) else b"G")
            except OSError:  # closed by the daemon: come back, as an attacker would
                socks.remove(s)
                try:
                    if isinstance(path_or_port, str):
                        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s2.connect(path_or_port)
                    else:
                        s2 = socket.create_connection(("127.0.0.1", path_or_port))
                    socks.append(s2)
                    opened.append(s2)
                except OSError:
                    pass
    for s in socks:
        s.close()


def test_slow_connections_lock_out_neither_status_nor_metrics(tmp_path: Path, procs) -> None:
    """40 connections on each of the status socket and the metrics port, each sending a byte a
    second and never a whole request: status queries and scrapes still answer at once."""
    mport = free_port()
    srv = start_server(tmp_path, heartbeat_timeout=2, metrics={"port": mport})
    procs.append(srv)
    srv.wait_for("metrics on")
    path = srv.config["control_socket"]
    stop = threading.Event()
    opened: list = []
    threads = [
        threading.Thread(target=_trickle, args=(target, 40, stop, opened), daemon=True) for target in (path, mport)
    ]
    for t in threads:
        t.start()
    worst_status = worst_scrape = 0.0
    try:
        time.sleep(1.0)
        for _ in range(8):
            t0 = time.monotonic()
            assert b"server" in query(path, "status", timeout=5)
            worst_status = max(worst_status, time.monotonic() - t0)
            t0 = time.monotonic()
            with DIRECT.open(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                assert b"hbd_server_clients" in r.read()
            worst_scrape = max(worst_scrape, time.monotonic() - t0)
            time.sleep(0.7)
        assert worst_status < 2.0 and worst_scrape < 2.0, (worst_status, worst_scrape)
        srv.wait_for(r"WARNING .*status socket: closed a connection: ")
        srv.wait_for(r"WARNING .*metrics endpoint: closed a connection: ")
        # rate-limited: a line per endpoint per 10 s, however many were closed
        assert srv.count(r"closed a connection: ") <= 4, srv.output()
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    report(
        "40 slow connections each on the status socket and metrics port",
        [
            f"slowest status query {worst_status * 1000:.0f} ms, slowest scrape {worst_scrape * 1000:.0f} ms "
            f"({len(opened)} slow connections opened)"
        ],
    )


def test_out_of_descriptors_no_listener_spins(tmp_path: Path, procs) -> None:
    """Descriptors exhausted, with a connection pending on the client port, the status socket and
    the metrics port: every listener pauses (the status and metrics ones used to spin at 100 %)."""
    mport = free_port()
    srv = start_server(tmp_path, heartbeat_timeout=10, metrics={"port": mport})
    procs.append(srv)
    srv.wait_for("metrics on")
    in_use = len(os.listdir(f"/proc/{srv.pid}/fd"))
    resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (in_use + 3, in_use + 3))
    socks = [connect(srv.config["port"]) for _ in range(10)]  # hbd can take 3 of them
    status = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.wait_for(r"cannot accept new clients: Too many open files")
        status.connect(srv.config["control_socket"])
        status.sendall(b"status\n")
        scrape = socket.create_connection(("127.0.0.1", mport))
        socks.append(scrape)
        scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        time.sleep(0.5)
        cpu0 = cpu_seconds(srv.pid)
        time.sleep(3.0)
        cpu = cpu_seconds(srv.pid) - cpu0
        assert cpu < 0.9, f"the server burned {cpu:.2f} s of CPU in 3 s while out of descriptors"
        srv.wait_for(r"status socket: cannot accept: Too many open files; pausing accepts")
        srv.wait_for(r"metrics endpoint: cannot accept: Too many open files; pausing accepts")
        assert srv.count(r"status socket: cannot accept") == 1  # once per 10 s, not per attempt
        for s in socks[:10]:
            s.close()
        status.settimeout(5)
        assert b"server" in recv_all(status)  # accepted and answered once descriptors are free
        scrape.settimeout(5)
        assert recv_all(scrape).startswith(b"HTTP/1.0 200")
    finally:
        status.close()
        for s in socks:
            s.close()
    report("out of file descriptors, status and scrape pending", [f"server CPU {cpu * 1000:.0f} ms in 3 s"])


def recv_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.mark.slow
def test_greeting_churn_leaves_server_memory_flat(tmp_path: Path, procs) -> None:
    """10,000+ valid greetings with ever-changing long intervals (one per connection per second,
    the most the server allows) plus connections that greet as fast as they can (closed at their
    fourth greeting, past the burst): the server's RSS stays flat (it grew ~3 MB/s)."""
    srv = start_server(tmp_path, heartbeat_timeout=5)
    procs.append(srv)
    port = srv.config["port"]
    conns = [connect(port) for _ in range(400)]
    rng = random.Random(15)
    stop = threading.Event()
    fast = {"closed": 0}

    def greet_fast() -> None:
        while not stop.is_set():
            try:
                with connect(port) as s:
                    while not stop.is_set():  # until the server closes it (at once, now)
                        s.sendall(b"".join(b"hello f %d\nping" % rng.randint(1, 86399) for _ in range(500)))
                        try:
                            while s.recv(65536, socket.MSG_DONTWAIT):  # read the pongs, as a client would
                                pass
                        except BlockingIOError:
                            pass
            except OSError:
                pass
            fast["closed"] += 1
            time.sleep(0.05)

    sent = 0
    try:
        for i, s in enumerate(conns):
            s.sendall(b"hello w%d 2\nping" % i)
        for s in conns:
            recv_exactly(s, 4)
        time.sleep(1.0)
        rss_before = rss_kib(srv.pid)
        churner = threading.Thread(target=greet_fast, daemon=True)
        churner.start()
        for _ in range(26):
            t0 = time.monotonic()
            for i, s in enumerate(conns):
                s.sendall(b"hello w%d %d\nping" % (i, rng.randint(1, 86399)))
                sent += 1
            for s in conns:
                assert recv_exactly(s, 4) == b"pong"
            time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        stop.set()
        churner.join(10)
        rss_after = rss_kib(srv.pid)
    finally:
        stop.set()
        for s in conns:
            s.close()
    assert rss_after - rss_before < 3 * 1024, f"RSS grew from {rss_before} to {rss_after} KiB"
    assert sent >= 10_000
    assert fast["closed"] >= 20
    report(
        "greeting churn",
        [
            f"{sent} valid greetings on 400 connections over 27 s + {fast['closed']} "
            f"connections greeting as fast as they can: RSS {rss_before / 1024:.1f} -> "
            f"{rss_after / 1024:.1f} MiB"
        ],
    )
