"""hbd must not lie: verdicts, events and loop figures that match what happened.

Busy turns are not stalls (a silent peer dies on time however busy the loop), only time we did not
run is forgiven and forgiving never makes a peer UP, events leave in the order they happened, and a
connection that never pinged stays NEW and is closed quietly. Deadline rules in virtual time
(tests/virtual_time.py) with real loopback sockets; the burst-load figure with real processes.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemons import ROOT, start_server
from inprocess import document, run_until, virtual

from hbd.config import ServerConfig
from hbd.control import query
from hbd.logs import PEER_BURST, log
from hbd.server import WHEEL_RESOLUTION, Server

TURN = 0.3  # a turn of the loop "takes" this long: more than the stall threshold (0.25 s)


class Keep(logging.Handler):
    """Keeps the log records (added after the daemon's Logging, which replaces hbd's handlers)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        log.removeHandler(self)
        super().close()


def by_peer(events: list[tuple[float, str, str, str]]) -> dict[str, list[tuple[float, str]]]:
    out: dict[str, list[tuple[float, str]]] = {}
    for t, event, peer, _reason in events:
        out.setdefault(peer, []).append((t, event))
    return out


def test_busy_turns_forgive_nothing_and_a_silent_peer_dies_on_time(tmp_path: Path) -> None:
    """Every turn takes 0.3 s of work (a handler advancing the virtual clock): no stall, no
    forgiveness, no `up` without a ping; the silent peer is late and dead at its deadlines plus at
    most one turn; the loop lag shows the busy turns."""
    cfg = ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=2.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )
    srv, clock, events = virtual(Server, cfg)
    loop = srv.loop
    busy_r, busy_w = socket.socketpair()
    busy_w.send(b"x")  # never read: ready on every turn
    loop.add_reader(busy_r, lambda: clock.advance(TURN))
    silent, pinger, never = (socket.create_connection(srv.address) for _ in range(3))
    loop.run_once(0)  # accepts all three
    assert len(srv.conns) == 3
    silent.sendall(b"hello silent\nping")
    pinger.sendall(b"hello pinger\nping")
    pinger.setblocking(False)
    start = clock.now
    next_ping = 0.4
    while clock.now - start < 5.0:
        loop.run_once()
        if clock.now - start >= next_ping:
            pinger.sendall(b"ping")
            next_ping += 0.4
        try:
            pinger.recv(4096)
        except BlockingIOError:
            pass
    seen = by_peer(events)
    assert [e for _, e in seen["silent"]] == ["up", "late", "down"], seen["silent"]
    (t_up, _), (t_late, _), (t_down, _) = seen["silent"]
    margin = TURN + WHEEL_RESOLUTION + 1e-3  # the verdict waits for the turn in progress, then a wheel slot
    # its first ping was there when the turn's select() returned (its time), TURN before the busy
    # handler let the turn get to it and log it "up"
    t_ping = t_up - TURN
    assert 1.0 < t_late - t_ping <= 1.0 + margin
    assert 2.0 < t_down - t_ping <= 2.0 + margin
    assert [e for _, e in seen["pinger"]] == ["up"]  # pinging every 0.4 s through it all: never late
    assert set(seen) == {"silent", "pinger"}  # the connection that never pinged: no event at all
    assert silent.recv(100) == b"pong" and silent.recv(100) == b""  # closed
    never.settimeout(1)
    assert never.recv(100) == b""
    assert srv.ops.stalls == 0
    doc = document(srv)
    assert doc["loop"]["stalls"] == 0 and doc["loop"]["max_lag_ms"] >= TURN * 1000
    for s in (silent, pinger, never, busy_r, busy_w):
        s.close()
    srv.ops.close()
    srv.shutdown()
    loop.close()


def test_only_the_time_we_did_not_run_is_forgiven_and_never_as_an_up(tmp_path: Path) -> None:
    """Stopped for 1 s (select() returns 1 s late) while a peer is LATE: its death moves by exactly
    that second; it stays LATE (no `up` without a ping), and the stall is counted."""
    cfg = ServerConfig(host="127.0.0.1", port=0, heartbeat_timeout=2.0, log_file=None, control_socket=None)
    srv, clock, events = virtual(Server, cfg)
    loop = srv.loop
    c = socket.create_connection(srv.address)
    loop.run_once(0)
    c.sendall(b"hello p\nping")
    loop.run_once(0)
    t_up = events[0][0]
    run_until(loop, clock, t_up + 1.5)  # LATE since 1.0
    assert srv.late == 1
    real_poll = loop.selector.poll  # type: ignore[attr-defined]

    def stopped_poll(timeout=None):  # the process is SIGSTOPped for 1 s while it waits
        loop.selector.poll = real_poll  # type: ignore[attr-defined]
        ready = real_poll(timeout)
        clock.advance(1.0)
        return ready

    loop.selector.poll = stopped_poll  # type: ignore[attr-defined]
    run_until(loop, clock, t_up + 4.0)
    assert [e[1] for e in events] == ["up", "late", "down"]
    assert srv.ops.stalls == 1
    t_down = events[2][0]
    assert 3.0 <= t_down - t_up <= 3.0 + WHEEL_RESOLUTION + 1e-3  # 2 s timeout + the 1 s we were stopped
    c.close()
    srv.shutdown()
    loop.close()


def test_ping_then_reset_is_reported_up_then_down(tmp_path: Path) -> None:
    """Clients that send a ping and reset the connection at once: every one is reported `up` (its
    ping) before `down` (the reset), never the other way round."""
    cfg = ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=5.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )
    srv, _clock, events = virtual(Server, cfg)
    loop = srv.loop
    for _ in range(10):
        socks = [socket.create_connection(srv.address) for _ in range(20)]
        loop.run_once(0)  # accepted (ACCEPT_BATCH is 32)
        for s in socks:
            s.sendall(b"ping")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
        for _ in range(3):
            loop.run_once(0)
    seen = by_peer(events)
    assert len(seen) >= 150, f"only {len(seen)} of 200 pings were read before their reset"
    wrong = {peer: [e for _, e in evs] for peer, evs in seen.items() if [e for _, e in evs] != ["up", "down"]}
    assert not wrong, wrong
    print(f"\nping + reset: {len(seen)} of 200 reported, all up then down")
    recent: dict[str, list[str]] = {}  # what the status socket shows, oldest first
    for e in srv.view().daemon.recent:
        recent.setdefault(e.peer, []).append(e.event)
    assert all(evs in (["up", "down"], ["down"]) for evs in recent.values()), recent  # ["down"]: its up scrolled out
    assert srv.conns == {}
    srv.ops.close()
    srv.shutdown()
    loop.close()


def test_a_connection_that_never_pings_stays_new_and_is_closed_quietly(tmp_path: Path) -> None:
    cfg = ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=2.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )
    srv, clock, events = virtual(Server, cfg)
    keep = Keep()
    records = keep.records
    loop = srv.loop
    c = socket.create_connection(srv.address)
    c2 = socket.create_connection(srv.address)
    loop.run_once(0)
    c2.sendall(b"hello quiet 0.5\n")  # a greeting is not a ping
    loop.run_once(0)
    t0 = clock.now - 1000.0
    run_until(loop, clock, t0 + 1.5)
    doc = document(srv)
    assert [p["state"] for p in doc["peers"]] == ["NEW", "NEW"]
    assert srv.late == 0 and "0 late" in srv.status_text()
    run_until(loop, clock, t0 + 2.0 + WHEEL_RESOLUTION + 1e-3)
    assert document(srv)["peers"] == []
    assert c.recv(10) == b"" and c2.recv(10) == b""
    assert events == [] and srv.ops.events == {"up": 0, "late": 0, "down": 0, "flapping": 0, "stable": 0}
    mine = [r for r in records if "no ping" in r.getMessage()]
    assert len(mine) == 2 and all(r.levelno == logging.INFO for r in mine)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    assert srv.stats["timeouts"] == 2
    keep.close()
    c.close()
    c2.close()
    srv.ops.close()
    srv.shutdown()
    loop.close()


BURSTS = r"""
import selectors, socket, sys, time
port, n, burst = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
period, duration = float(sys.argv[4]), float(sys.argv[5])
sel = selectors.DefaultSelector()
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    socks.append(s)
print("connected", flush=True)
payload = b"ping" * burst
end = time.monotonic() + duration
next_burst = time.monotonic()
while time.monotonic() < end:
    now = time.monotonic()
    if now >= next_burst:
        for s in socks:
            try:
                s.send(payload)
            except BlockingIOError:
                pass
        next_burst += period
    for key, _ in sel.select(max(0.0, next_burst - time.monotonic())):
        try:
            key.fileobj.recv(65536)
        except BlockingIOError:
            pass
"""


@pytest.mark.slow
def test_a_silent_peer_dies_on_time_under_bursts_of_pings_from_1500_connections(tmp_path: Path, procs) -> None:
    """Real processes: 1500 connections send bursts of pings, so the server's turns are long; a
    peer that pinged once and one that never pinged are closed at their timeout plus a bounded
    margin, and the loop lag reported by the status socket shows the long turns."""
    n, timeout = 1500, 2.0
    srv = start_server(tmp_path, heartbeat_timeout=timeout, max_clients=n + 10)
    procs.append(srv)
    port = srv.config["port"]
    gen = subprocess.Popen(
        [sys.executable, "-c", BURSTS, str(port), str(n), "500", "0.25", "12"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert gen.stdout is not None and gen.stdout.readline().strip() == "connected"
        time.sleep(2.0)  # the bursts are under way
        mark = srv.mark()
        silent = socket.create_connection(("127.0.0.1", port), timeout=30)
        never = socket.create_connection(("127.0.0.1", port), timeout=30)
        # From before the ping is sent: the server cannot have heard it earlier (measured from the pong,
        # a pong delayed by the load made the close look early).
        t_ping = t_never = time.monotonic()
        silent.sendall(b"hello silent\nping")
        assert silent.recv(4) == b"pong"
        assert silent.recv(10) == b""
        took = time.monotonic() - t_ping
        assert never.recv(10) == b""
        took_never = time.monotonic() - t_never
        doc = json.loads(query(str(tmp_path / "server.sock"), "status"))
        loop = doc["loop"]
        # On a loaded machine the server may be starved (a turn with far less CPU than wall time):
        # that time, and only that, is forgiven. It is logged, so the bound can allow for it.
        stalled = sum(float(m) for m in re.findall(r"event loop stalled for ([\d.]+) s", srv.output()))
        print(
            f"\n{n} connections in bursts of 500 pings every 0.25 s: a silent peer closed {took:.3f} s after its "
            f"ping, one that never pinged after {took_never:.3f} s (heartbeat_timeout {timeout:g} s); "
            f"max loop lag {loop['max_lag_ms']:.0f} ms, stalls {loop['stalls']} ({stalled:.3f} s not running)"
        )
        # The rule is judged by the server's own clock: the registry's row of the silent peer says when
        # it last pinged and when it went DOWN. What this test process saw (``took``) also holds the
        # time it was itself not running on a loaded machine, so it only has to show the close came.
        row = next(p for p in doc["peers"] if p["peer"] == "silent")
        decided = row["since"] - row["last_ping"]
        print(f"the server decided DOWN {decided:.3f} s after the silent peer's ping ({row['reason']})")
        assert row["state"] == "DOWN" and row["reason"] == "timeout", row
        assert timeout <= decided <= timeout + 1.0 + stalled
        assert timeout <= took <= timeout + 30 and took_never <= timeout + 30
        assert srv.count("is back", after=mark) == 0  # no up without a ping
        late = srv.count(r"silent .*is late", after=mark)
        # Peer-caused lines are rate limited per source address (hbd.logs.PEER_BURST a window), and
        # every connection here is 127.0.0.1: on a loaded machine the bursting connections' own LATE
        # lines can take the share before the silent peer's (a CI run saw it: 0 lines, DOWN on time).
        others = srv.count(r"is late") - late  # (the window may have begun before the mark)
        assert late == 1 or (late == 0 and others >= PEER_BURST), (  # the silent peer's lines, to tell why
            late,
            others,
            [ln for ln in srv.output().splitlines() if "silent" in ln or "stalled" in ln][-30:],
        )
        assert loop["max_lag_ms"] > 10  # busy turns show (the figure used to stay at a few ms)
        silent.close()
        never.close()
    finally:
        gen.kill()
        gen.wait()


def test_client_greets_again_on_an_interval_reload_at_most_once_a_second() -> None:
    """hbd servers refuse greetings closer together than 1 s on a connection: a reload's greeting
    (and the new ping pace with it) waits for that, and a reload that keeps the interval sends none."""
    import dataclasses

    from hbd.client import Client
    from hbd.config import ClientConfig

    listener = socket.create_server(("127.0.0.1", 0))
    cfg = ClientConfig(
        servers=(),
        host="127.0.0.1",
        port=listener.getsockname()[1],
        heartbeat_interval=0.5,
        pong_timeout=1.5,
        client_name="web1",
        log_file=None,
        control_socket=None,
    )
    cli, clock, _events = virtual(Client, cfg)
    loop = cli.loop
    loop.run_once(0)
    peer, _ = listener.accept()
    peer.setblocking(False)
    got: list[tuple[float, bytes]] = []

    def run(until: float) -> None:
        while clock.now - 1000.0 < until:
            loop.run_once(max_wait=0.05)
            try:
                data = peer.recv(4096)
            except BlockingIOError:
                continue
            got.append((round(clock.now - 1000.0, 2), data))
            peer.sendall(b"pong" * data.count(b"ping"))

    def reload(**changes: float) -> None:
        new = dataclasses.replace(cli.config, **changes)
        cli.prepare(new)()
        cli.config = new

    run(0.3)
    assert got[0][1] == b"hello web1 0.5\nping"
    reload(heartbeat_interval=3.0, pong_timeout=5.0)
    run(0.9)
    assert all(b"hello" not in d for _, d in got[1:])  # not yet: the first greeting was at 0.0
    run(1.1)
    greetings = [(t, d) for t, d in got if b"hello" in d]
    assert greetings[-1][1] == b"hello web1 3\n" and 1.0 <= greetings[-1][0] <= 1.1
    reload(pong_timeout=6.0)  # same interval: no greeting
    reload(heartbeat_interval=2.0, pong_timeout=6.0)  # within 1 s of the last greeting: waits for 2.0
    run(7.0)
    greetings = [(t, d) for t, d in got if b"hello" in d]
    assert [d for _, d in greetings] == [b"hello web1 0.5\nping", b"hello web1 3\n", b"hello web1 2\n"]
    assert 2.0 <= greetings[2][0] <= 2.1
    pings = [t for t, d in got if b"ping" in d]
    assert pings[:2] == [0.05, 0.5] and len(pings) >= 4  # the old pace while the greeting waited ...
    assert all(1.9 <= b - a <= 2.1 for a, b in itertools.pairwise(pings[2:]))  # ... then the announced pace
    peer.close()
    listener.close()
    cli.shutdown()
    loop.close()
