"""hbd.registry_remote: the worker's stand-in for the supervisor's registry (its unit parts; the whole
is tested with real workers in tests/test_workers_registry.py)."""

from __future__ import annotations

import logging
import resource
import socket
import tracemalloc
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from inprocess import RunningClock
from virtual_time import VirtualSelector

from hbd.config import ServerConfig
from hbd.logs import PeerLog
from hbd.loop import EventLoop
from hbd.peer_uptime import WINDOW, Account
from hbd.registry_remote import Mark, RemotePeers
from hbd.server import Server
from hbd.workers_codec import Decoder, Message, PeerMark, encode


def remote() -> RemotePeers:
    return RemotePeers(lambda msg: None, lambda conn: None, lambda conn: True, PeerLog(logging.getLogger("t")))


def test_a_connections_mark_costs_little_memory() -> None:
    """At 100,000 connections each byte per connection counts: the worker keeps what its rows show of
    each mark (and the peer's account), shared where equal, not the message as it came over the pipe.
    Kept as received it measured ~1,170 B per connection (the message, its lists, a second dict);
    an account is kept only when it tells more than the mark's state and since (~450 -> ~260 B); its
    reason is shared with equal ones (~260 -> ~200 B: each mark had its own "first ping" string)."""
    n = 20000
    peers = remote()
    frames = [
        encode(
            PeerMark(
                i,
                f"peer{i:06d}",
                True,
                "UP",
                1.0,
                "first ping",
                True,
                [],
                [["role", "web"]],
                None,
                0,
                0.0,
                [[1.0, "UP"]],
            )
        )
        for i in range(n)
    ]
    for i in range(n):  # stand-ins: order() looks a connection up and reads its peer's name
        peers.conns[i] = SimpleNamespace(peer=SimpleNamespace(name=f"peer{i:06d}"))  # type: ignore[assignment]
    decoder = Decoder(down=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in frames:
            (msg,) = decoder.feed(frame)
            peers.order(msg)  # type: ignore[arg-type]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sum(conn.mark is not None for conn in peers.conns.values()) == n
    assert used / n < 120, f"{used / n:.0f} B per connection for its mark"


def test_a_mark_shows_the_same_account_whether_kept_or_made() -> None:
    """A peer UP since its mark with no outage keeps no account: its row reads what one kept would."""
    for state in ("UP", "LATE", "DOWN"):
        mark = PeerMark(1, "web1", True, state, 1000.0, "", False, [], [], None, 0, 0.0, [[1000.0, state]])
        made, kept = Mark(mark, "web1", {}), Account.of(mark.outages, mark.down, mark.spans)
        assert made.account is None
        for now in (1000.0, 2000.0, 1000.0 + WINDOW * 2):
            a = made.accounted()
            assert (a.uptime(now), a.down_seconds(now), a.outages) == (
                kept.uptime(now),
                kept.down_seconds(now),
                kept.outages,
            )
    for outages, down, spans in ((1, 0.0, [[1000.0, "UP"]]), (0, 0.0, [[999.0, "UP"]]), (0, 0.0, [])):
        mark = PeerMark(1, "web1", True, "UP", 1000.0, "", False, [], [], None, outages, down, spans)
        assert Mark(mark, "web1", {}).account is not None  # more than the mark tells: kept


class _Channel:
    """A worker's end of the pipes, in process: what it sends is kept, encoded (as it would be)."""

    def __init__(self) -> None:
        self.index = 1
        self.config = None
        self.up: list[bytes] = []
        self.orders: Callable[[Message], None] | None = None

    def send(self, msg: Message) -> None:
        self.up.append(encode(msg))

    def attach(self, loop: object, reload: object, orders: Callable[[Message], None] | None = None) -> None:
        self.orders = orders


def test_a_greeted_pinging_marked_connection_costs_its_worker_little_memory() -> None:
    """Everything a worker keeps for a connection at 100,000 clients (issue 14 section 3): accepted,
    greeted with its own name, pinging, marked by the supervisor (the mark through the codec), measured
    with tracemalloc over 2,500 real connections, each from its own ip:port as in the field. ~740 B a
    connection before this round's cuts (docs/performance.md, "A connection's bytes in a worker"):
    its address as a string (~65 B), the loop's table keyed by an int of its own (32 B), the worker
    registry's number for it and its mark in two tables keyed by the connection (~75 B), a set of the
    connections the registry was told of (~30 B); ~560 B after."""
    n = 2500
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * n + 200:
        pytest.skip(f"needs RLIMIT_NOFILE >= {2 * n + 200} (hard limit is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, 2 * n + 200), hard))
    cfg = ServerConfig(host="127.0.0.1", port=0, heartbeat_timeout=30.0, log_file=None, control_socket=None)
    clock = RunningClock()  # a float of its own at every reading, as a real clock's: a time kept costs its float
    vloop = EventLoop(clock=clock, selector=VirtualSelector(clock))
    channel = _Channel()
    srv = Server(cfg, loop=vloop, worker=channel)  # type: ignore[arg-type]
    srv.start()
    logging.getLogger("hbd").setLevel(logging.WARNING)  # no line per connection (as the journal would take them)
    pairs = [socket.socketpair() for _ in range(n)]
    for _a, b in pairs:
        b.setblocking(False)
    marks = [
        encode(PeerMark(i + 1, f"c1-{i}", True, "UP", 1.5, "first ping", False, [], [], None, 0, 0.0, [[1.5, "UP"]]))
        for i in range(n)
    ]
    decoder = Decoder(down=True)

    def serve() -> None:  # until every connection's bytes are read (256 ready sockets a turn)
        for _ in range(4 * n // 256 + 4):
            vloop.run_once(0)
            if not vloop.selector.last_ready:  # type: ignore[attr-defined]
                return

    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i, (a, b) in enumerate(pairs):
            srv.on_accept(a, (f"10.1.{i // 250}.{i % 250 + 1}", 30000 + i))
            b.send(f"hello c1-{i}\n".encode())
        serve()
        for _a, b in pairs:
            b.send(b"ping")
        serve()
        assert channel.orders is not None
        for frame in marks:
            for msg in decoder.feed(frame):
                channel.orders(msg)
        channel.up.clear()  # the reports sent: the pipe's, not kept
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        conns = list(srv.conns.values())
        assert len(conns) == n and all(c.peer.pings == 1 and c.mark is not None for c in conns)
        assert used / n < 760, f"{used / n:.0f} B per connection kept by its worker"
    finally:
        tracemalloc.stop()
        srv.shutdown()
        for _a, b in pairs:
            b.close()
        vloop.close()
