"""The one registry of ``workers: K`` in virtual time: the supervisor's SupervisorRegistry and two
in-process worker Servers (their RemotePeers), every message through the real codec, delivered
when ``pump()`` says (as the pipes would: later, never inside the call that sent it)."""

from __future__ import annotations

import logging
import select
import socket
import tracemalloc
from types import SimpleNamespace

import pytest
from virtual_time import run_until

from hbd.config import ServerConfig
from hbd.logs import log
from hbd.protocol import NAME_PATTERN
from hbd.registry import RegistrySettings
from hbd.server import Server
from hbd.supervisor_registry import SupervisorRegistry
from hbd.view import PeerRow, source_rows
from hbd.worker_pool import MAX_OUTBUF, WorkerPool
from hbd.workers_codec import (
    MAX_REASON,
    Decoder,
    Message,
    PeerBack,
    PeerClose,
    PeerConnected,
    PeerGone,
    PeerHello,
    PeerKnown,
    PeerLate,
    PeerMark,
    PeerOrder,
    PeerPinged,
    PeerWatch,
    encode,
)

T0 = 1000.0
REPORTS = (PeerHello, PeerConnected, PeerPinged, PeerLate, PeerBack, PeerGone)


class Channel:
    """A worker's end of the pipes, in process: what it sends waits in ``up`` for pump()."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.config = None
        self.up: list[bytes] = []
        self.orders = None

    def send(self, msg: Message) -> None:
        if isinstance(msg, REPORTS):
            frame = encode(msg)
            assert len(frame) <= select.PIPE_BUF
            self.up.append(frame)

    def attach(self, loop, reload, orders=None) -> None:
        self.orders = orders


class Fleet:
    """The supervisor's registry and two workers; ``events``: (event, peer, reason, hooked)."""

    def __init__(self, vloop, settings: RegistrySettings, expected: tuple = ()) -> None:
        self.loop = vloop
        self.events: list[tuple[str, str, str, bool]] = []
        self.down: dict[int, list[bytes]] = {1: [], 2: []}
        self.sup = SupervisorRegistry(
            vloop,
            settings,
            expected,
            _peer_log(vloop),
            self,  # the Events sink (hbd.server_registry.Events)
            lambda index, order: self.down[index].append(encode(order)),
        )
        self.channels = {i: Channel(i) for i in (1, 2)}
        self.workers = {}
        cfg = ServerConfig(
            host="127.0.0.1", port=0, heartbeat_timeout=2.0, log_file=None, control_socket=None, state_dir=None
        )
        for i, ch in self.channels.items():
            srv = Server(cfg, loop=vloop, worker=ch)  # type: ignore[arg-type]
            srv.start()
            self.workers[i] = srv

    def event(self, event: str, peer: str, address: str, **kw: object) -> None:
        self.events.append((event, peer, str(kw["reason"]), True))

    def count(self, event: str, peer: str, address: str, previous: str | None, reason: str) -> None:
        self.events.append((event, peer, reason, False))

    def pump(self) -> None:
        """Deliver everything sent so far, both ways, until nothing is left."""
        self.loop.run_once(0)
        while any(ch.up for ch in self.channels.values()) or any(self.down.values()):
            for i, ch in self.channels.items():
                frames, ch.up = ch.up, []
                for msg in Decoder().feed(b"".join(frames)):
                    self.sup.report(i, msg)  # type: ignore[arg-type]
            for i, frames in self.down.items():
                self.down[i] = []
                for msg in Decoder(down=True).feed(b"".join(frames)):
                    self.channels[i].orders(msg)  # type: ignore[misc]
            self.loop.run_once(0)

    def connect(self, index: int, port: int) -> socket.socket:
        a, b = socket.socketpair()
        b.setblocking(False)
        self.workers[index].on_accept(a, ("127.0.0.1", port))
        return b

    def say(self, b: socket.socket, data: bytes) -> None:
        b.send(data)
        self.pump()
        try:
            b.recv(65536)
        except BlockingIOError:
            pass

    def rows(self) -> dict[str, tuple]:
        """Every row status shows: the workers' and the supervisor's own."""
        out: dict[str, tuple] = {}
        for srv in self.workers.values():
            for r in srv.view().peers:
                assert r.peer not in out, r.peer  # a name is never shown twice
                out[r.peer] = (r.state, r.reason, r.worker, r.silenced_until is not None, tuple(sorted(r.flags)))
        for r in unconnected_rows(self.sup):
            assert r.peer not in out, r.peer
            out[r.peer] = (r.state, r.reason, None, r.silenced_until is not None, tuple(sorted(r.flags)))
        return out

    def close(self) -> None:
        for srv in self.workers.values():
            srv.shutdown()
        self.sup.close()


def unconnected_rows(sup: SupervisorRegistry) -> list[PeerRow]:
    """The supervisor's own rows (peers no worker holds), as its view lists them."""
    return list(source_rows((sup.unconnected_source(),)))


def _peer_log(vloop):
    from hbd.logs import PeerLog

    return PeerLog(vloop.clock)


@pytest.fixture
def fleet(vloop):
    made: list[Fleet] = []

    def make(expected: tuple = (), **settings: object) -> Fleet:
        f = Fleet(vloop, RegistrySettings(heartbeat_timeout=2.0, **settings), expected)  # type: ignore[arg-type]
        logging.getLogger("hbd").setLevel(logging.INFO)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_a_name_on_two_workers_is_one_row_and_the_newer_takes_over(fleet) -> None:
    f = fleet()
    a = f.connect(1, 40001)
    f.say(a, b"hello web1\nping\n")
    assert f.rows() == {"web1": ("UP", "first ping", 1, False, ())}
    b = f.connect(2, 40002)
    f.say(b, b"hello web1\nping\n")
    assert a.recv(100) == b"" and not f.workers[1].conns  # closed on worker 1 by the registry's order
    assert f.rows() == {"web1": ("UP", "first ping", 2, False, ())}
    assert f.events == [("up", "web1", "first ping", True)]  # no down for a name still connected
    b.close()
    f.pump()
    assert f.rows() == {"web1": ("DOWN", "disconnected", None, False, ())}
    assert f.events[1:] == [("down", "web1", "disconnected", True)]


def test_a_greeting_with_a_known_name_is_one_row_until_its_first_ping(fleet) -> None:
    f = fleet()
    a = f.connect(1, 40001)
    f.say(a, b"hello web1\nping\n")
    a.close()
    f.pump()
    b, c = f.connect(2, 40002), f.connect(2, 40003)
    f.say(b, b"hello web1\n")  # a known name: the registry's DOWN row stands for it, as in one process
    f.say(c, b"hello web9\n")  # a new one: shown as a connection, NEW
    rows = f.rows()
    assert rows["web1"] == ("DOWN", "disconnected", None, False, ())
    assert rows["web9"][0] == "NEW"
    f.say(b, b"ping\n")
    assert f.rows()["web1"] == ("UP", "ping", 2, False, ())


def test_a_refused_greeting_is_closed_by_its_worker(fleet) -> None:
    f = fleet(unexpected="reject")
    a = f.connect(1, 40001)
    f.say(a, b"hello web1\n")
    assert a.recv(100) == b"" and not f.workers[1].conns
    assert f.rows() == {} and f.events == []


def test_an_expected_peer_never_seen_is_down_in_the_supervisors_rows_and_its_hook_runs_once(fleet, vclock) -> None:
    f = fleet(expected=(SimpleNamespace(name="db1", address=None, timeout=5.0, labels=(("rack", "r1"),)),))
    assert f.rows() == {"db1": ("NEW", "not seen yet", None, False, ())}
    run_until(f.loop, vclock, vclock() + 6)
    assert f.rows() == {"db1": ("DOWN", "never connected", None, False, ())}
    assert f.events == [("down", "db1", "never connected", True)]
    a = f.connect(2, 40001)
    f.say(a, b"hello db1\nping\n")
    [row] = [r for r in f.workers[2].view().peers]
    assert (row.state, row.expected, row.labels) == ("UP", True, (("rack", "r1"),))  # the mark came down


def test_a_rising_peer_is_watched_on_its_worker_until_rise_pings(fleet, vclock) -> None:
    f = fleet(rise=3)
    a = f.connect(1, 40001)
    f.say(a, b"hello web1\nping\n")
    a.close()
    f.pump()
    b = f.connect(2, 40002)
    f.say(b, b"hello web1\nping\n")  # the first of three: the registry orders its pings watched
    assert f.rows()["web1"] == ("DOWN", "rising: 1 of 3 pings", 2, False, ("rising",))
    vclock.advance(0.2)
    f.say(b, b"ping\n")
    assert f.rows()["web1"] == ("DOWN", "rising: 2 of 3 pings", 2, False, ("rising",))
    vclock.advance(0.2)
    f.say(b, b"ping\n")
    assert f.rows()["web1"] == ("UP", "3 pings on time", 2, False, ())
    assert [e[:2] for e in f.events] == [("up", "web1"), ("down", "web1"), ("up", "web1")]
    vclock.advance(0.2)
    f.say(b, b"ping\n")  # no longer watched: nothing goes up per ping
    assert not f.channels[2].up


def test_a_silence_reaches_the_worker_and_its_peer_goes_down_without_a_hook(fleet, caplog) -> None:
    f = fleet()
    a = f.connect(1, 40001)
    f.say(a, b"hello web1\nping\n")
    done = f.sup.silence("web1", 60, "maintenance")
    assert not isinstance(done, str) and done.reason == "maintenance"
    f.pump()
    assert f.rows()["web1"][3] is True  # its worker's row shows the silence
    with caplog.at_level(logging.INFO, logger=log.name):
        a.send(b"garbage that is no protocol at all\n" * 3)
        f.pump()
    assert f.rows()["web1"][0] == "DOWN"
    assert f.events[-1][:2] == ("down", "web1") and f.events[-1][3] is False  # counted, not hooked
    assert f.sup.unsilence("web1") and f.rows()["web1"][3] is False


def test_a_dead_workers_connections_are_gone_and_reconnect_elsewhere(fleet) -> None:
    f = fleet()
    a, b = f.connect(1, 40001), f.connect(2, 40002)
    f.say(a, b"hello w1\nping\n")
    f.say(b, b"hello w2\nping\n")
    f.sup.worker_died(1)
    rows = {r.peer: r for r in unconnected_rows(f.sup)}
    assert (rows["w1"].state, rows["w1"].reason) == ("DOWN", "worker died")
    assert "w2" not in rows
    c = f.connect(2, 40003)
    f.say(c, b"hello w1\nping\n")
    assert [r.peer for r in unconnected_rows(f.sup)] == []
    assert [e[:3] for e in f.events][-2:] == [("down", "w1", "worker died"), ("up", "w1", "ping")]


def test_report_frames_fit_in_an_atomic_pipe_write() -> None:
    name = "n" * 64
    assert __import__("re").match(NAME_PATTERN, name)
    address = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%eth0]:65535"
    for msg in (
        PeerHello(2**53, name, name, address),
        PeerConnected(2**53, name, name, address, 1e9),
        PeerPinged(2**53, 1e9),
        PeerLate(2**53),
        PeerBack(2**53),
        PeerGone(2**53, "é" * MAX_REASON, 1e9),
    ):
        assert len(encode(msg)) <= select.PIPE_BUF
        assert Decoder().feed(encode(msg)) == [msg]
    orders: list[PeerOrder] = [
        PeerClose(7, "replaced", logging.WARNING),
        PeerWatch(7, True),
        PeerKnown(7),
        PeerMark(7, "web1", True, "UP", T0, "ping", False, ["flapping"], [["rack", "r1"]], None),
        PeerMark(7, "web1", True, "UP", T0, "ping", False, [], [], None, 1, 2.5, [[T0 - 3, "DOWN"], [T0, "UP"]]),
    ]
    assert Decoder(down=True).feed(b"".join(encode(m) for m in orders)) == orders


def test_orders_to_a_worker_that_does_not_read_are_bounded() -> None:
    sent: list = []
    w = SimpleNamespace(index=1, outbuf=b"")
    pool = SimpleNamespace(workers={100: w}, orders_dropped=0, send=lambda w, msg: sent.append(msg))
    WorkerPool.order(pool, 1, PeerWatch(1, True))  # type: ignore[arg-type]
    w.outbuf = b"x" * (MAX_OUTBUF + 1)  # it stopped reading: it will be killed as hung and restarted
    WorkerPool.order(pool, 1, PeerWatch(2, True))  # type: ignore[arg-type]
    WorkerPool.order(pool, 9, PeerWatch(3, True))  # type: ignore[arg-type]  # no such worker (restarting)
    assert sent == [PeerWatch(1, True)] and pool.orders_dropped == 1


def test_the_scrapes_samples_from_the_registry_are_those_of_the_rows(fleet) -> None:
    """hbd.supervisor_metrics takes every peer's metric values straight from the registry (no row per
    peer): they are what metrics.peer_sample makes of each peer's accounted row."""
    from hbd.metrics import peer_sample

    f = fleet()
    socks = [f.connect(1 + i % 2, 41000 + i) for i in range(5)]
    for i, s in enumerate(socks):
        f.say(s, b"hello m%d\nping\n" % i)
    socks[2].close()
    f.pump()
    f.sup.silence("m3", 600, "maintenance")
    src = f.sup.registry.source(account=f.sup.account)
    rows = [src.row(i) for i in range(src.size)]
    offset, last = 1000.0, {f.sup.registry.peers["m1"].key: 5000.5}  # m1's worker's: by its connection's key
    expected = [peer_sample(r, offset, 6000.5 if r.peer == "m1" else None) for r in rows if r is not None]
    batches = list(f.sup.metric_samples(offset, last, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [s for b in batches for s in b] == expected
    assert {s[0]: (s[1], s[4]) for s in expected}['{peer="m2"}'] == (0, 0)  # down
    assert {s[0]: (s[1], s[4]) for s in expected}['{peer="m3"}'] == (1, 1)  # up, silenced
    for s in socks:
        s.close()


def test_a_reloads_marks_go_down_a_slice_per_turn_and_wait_while_a_workers_pipe_is_full(fleet, vclock) -> None:
    """A reload that changes the labels of every connected peer sends each one's mark in its slice,
    never all in one turn, and holds the slices while a worker's pipe is past APPLY_BACKLOG (past
    MAX_OUTBUF its orders would be dropped)."""
    from hbd.config import ServerConfig
    from hbd.peers_config import ExpectedPeer
    from hbd.supervisor_registry import APPLY_BACKLOG

    names = [f"p{i:02d}" for i in range(30)]
    f = fleet(tuple(ExpectedPeer(n) for n in names))
    socks = [f.connect(1, 40000 + i) for i in range(30)]
    for s, n in zip(socks, names, strict=True):
        f.say(s, f"hello {n}\nping\n".encode())
    assert {r[0] for r in f.rows().values()} == {"UP"}
    backlog = [APPLY_BACKLOG + 1]
    f.sup.backlog = lambda: backlog[0]
    f.sup.reload.slice = 10
    base = dict(host="127.0.0.1", port=1, heartbeat_timeout=2.0, log_file=None, control_socket=None, state_dir=None)
    old = ServerConfig(**base, peers=tuple(ExpectedPeer(n) for n in names))  # type: ignore[arg-type]
    new = ServerConfig(**base, peers=tuple(ExpectedPeer(n, labels=(("site", "b"),)) for n in names))  # type: ignore[arg-type]
    f.sup.reconfigure(new, old)
    for _ in range(5):  # the pipe is full: nothing is applied, nothing sent
        vclock.advance(0.02)
        f.loop.run_once(0)
    assert f.sup.registry.applying() == 30 and f.down[1] == []
    backlog[0] = 0
    per_turn = []
    while f.sup.registry.applying():
        vclock.advance(0.02)
        f.loop.run_once(0)
        per_turn.append(len(f.down[1]) - sum(per_turn))
    assert per_turn == [10, 10, 10]
    f.pump()
    worker_rows = {r.peer: r.labels for r in f.workers[1].view().peers}
    assert worker_rows == {n: (("site", "b"),) for n in names}
    for s in socks:
        s.close()


def _cost_per_change(vloop, vclock, n: int, changes: int = 2000) -> float:
    """Seconds (process time) per state change report (LATE, then back) with ``n`` peers connected."""
    import time

    sent: list[PeerOrder] = []
    sup = SupervisorRegistry(
        vloop,
        RegistrySettings(heartbeat_timeout=90.0, max_peers=n + 10),
        (),
        _peer_log(vloop),
        SimpleNamespace(event=lambda *a, **k: None, count=lambda *a, **k: None),  # type: ignore[arg-type]
        lambda index, order: sent.append(order),
    )
    for c in range(n):
        sup.report(c % 4, PeerHello(c, f"c{c}", None, "127.0.0.1:1"))
        sup.report(c % 4, PeerConnected(c, f"c{c}", None, "127.0.0.1:1", 90.0))
    vclock.advance(50.0)
    sent.clear()
    started = time.process_time()
    for c in range(changes // 2):
        sup.report(c % 4, PeerLate(c))
        sup.report(c % 4, PeerBack(c))
    took = time.process_time() - started
    assert len(sent) == changes  # a mark per change: the registry took every one
    sup.close()
    return took / changes


def test_a_state_change_costs_the_supervisor_the_same_at_any_number_of_peers(vloop, vclock) -> None:
    """bench-scale's push to 250,000 (issue 14): every peer went LATE and back once a ping interval,
    N/30 changes a second; a cost per change growing with N would make that quadratic."""
    small = min(_cost_per_change(vloop, vclock, 1000) for _ in range(2))
    large = _cost_per_change(vloop, vclock, 30_000)
    assert large < 4 * small + 50e-6, (small, large)  # generous: a shared, loaded machine


class _Quiet:
    """An Events sink that keeps nothing (a memory measurement counts the registry only)."""

    def event(self, *args: object, **kw: object) -> None:
        pass

    def count(self, *args: object, **kw: object) -> None:
        pass


def test_what_the_supervisor_keeps_per_connection_is_small(vloop) -> None:
    """At 100,000 peers each byte per peer counts: what each connection's worker was last told (to
    send a mark only when it changes) is kept as a tuple of the registry's own objects. Kept as the
    PeerMark message it measured ~520 B per connection in hbd.supervisor_registry; now ~310 B."""
    n = 20000
    sent: list[PeerOrder] = []
    sup = SupervisorRegistry(
        vloop, RegistrySettings(max_peers=2 * n), (), _peer_log(vloop), _Quiet(), lambda i, o: sent.append(o)
    )
    frames = [
        encode(m)
        for i in range(n)
        for m in (PeerHello(i, f"p{i}", None, f"127.0.0.1:{i}"), PeerConnected(i, f"p{i}", None, f"127.0.0.1:{i}", 9.0))
    ]
    decoder = Decoder()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for frame in frames:
            for msg in decoder.feed(frame):
                sup.report(1, msg)  # type: ignore[arg-type]
        sent.clear()  # the marks sent: the pipes' (encoded at once), not kept
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(sup.registry.by_key) == n
    here = [tracemalloc.Filter(True, "*/hbd/supervisor_registry.py")]
    used = sum(s.size_diff for s in after.filter_traces(here).compare_to(before.filter_traces(here), "filename"))
    assert used / n < 400, f"{used / n:.0f} B per connection kept by the supervisor's registry"


def test_a_fresh_peers_mark_leaves_its_worker_no_account(vloop) -> None:
    """The registry's account of a peer starts at the change's own time (its since), not at a later
    reading of the clock: the mark of a peer UP since its first ping then tells its account by its
    state and since alone, and the worker keeps no Account for it (~220 B per connection; at
    100,000 clients every worker kept one, as the clock moved between the change and the account)."""
    from hbd.registry_remote import Mark

    sent: list[PeerOrder] = []
    sup = SupervisorRegistry(vloop, RegistrySettings(), (), _peer_log(vloop), _Quiet(), lambda i, o: sent.append(o))
    ticks = iter(range(1, 1000))
    sup.clock = lambda: T0 + next(ticks) * 0.001  # a real clock moves between two readings
    sup.report(1, PeerHello(7, "web1", None, "127.0.0.1:7"))
    sup.report(1, PeerConnected(7, "web1", None, "127.0.0.1:7", 9.0))
    (mark,) = [m for m in sent if isinstance(m, PeerMark)]
    assert mark.spans == [[mark.since, "UP"]]
    (msg,) = Decoder(down=True).feed(encode(mark))
    assert Mark(msg, "web1", {}).account is None  # type: ignore[arg-type]


def _ticking_supervisor(vloop, n: int, sent: list[PeerOrder]) -> SupervisorRegistry:
    """A supervisor's registry for ``n`` peers whose clock moves between two readings (as a real one
    does), the marks it sends kept in ``sent``."""
    sup = SupervisorRegistry(
        vloop, RegistrySettings(max_peers=2 * n), (), _peer_log(vloop), _Quiet(), lambda i, o: sent.append(o)
    )
    ticks = iter(range(1, 10 * n))
    sup.clock = lambda: T0 + next(ticks) * 1e-4
    return sup


def test_a_connected_peer_costs_the_supervisor_little_memory(vloop) -> None:
    """Everything the supervisor keeps for a named peer on a worker's connection (the registry's Peer,
    its name, address and key, the tables' entries, its account, its flap history, what its worker was
    told), measured with tracemalloc over 20,000 peers: ~1,050 B per peer before the cuts of issue 14
    (the mark kept as a 13-tuple plus a tuple of its spans, in a table of its own; two float("inf")
    per peer; an account list with room for four; a timeout float per peer), ~780 B after; ~650 B with
    the account in the Peer (a fresh peer's: its one span, no Account, no table entry); ~575 B with
    the connection's key one int and its first ping in the Peer (no table of first pings); ~525 B
    with its one state change's time kept alone (no tuple of one); ~470 B with an account UP since
    its first change kept as that time alone (no span tuple); ~400 B with the Peer's 16 slots, its
    address packed and the mark's hash a float (the third round: see the test below)."""
    n = 20000
    sent: list[PeerOrder] = []
    sup = _ticking_supervisor(vloop, n, sent)
    frames = [
        encode(m)
        for i in range(n)
        for m in (
            PeerHello(i, f"c1-{i}", None, f"127.106.1.12:{30000 + i}"),
            PeerConnected(i, f"c1-{i}", None, f"127.106.1.12:{30000 + i}", 30.0),
        )
    ]
    decoder = Decoder()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in frames:
            for msg in decoder.feed(frame):
                sup.report(1, msg)  # type: ignore[arg-type]
            sent.clear()  # the marks sent: the pipes' (encoded at once), not kept
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(sup.registry.by_key) == n
    assert used / n < 410, f"{used / n:.0f} B per peer kept by the supervisor"


def test_a_connected_peers_slots_address_and_mark_hash_cost_the_supervisor_less(vloop) -> None:
    """The third round (issue 14 section 3), measured as the daemon runs: six workers, every peer's
    address its own ip:port (as in the field), the state store's writer taking the changed peers as
    they come (500 at a time). Over 20,000 peers tracemalloc counted ~450 B per peer before it (the
    Peer's 19 slots 184 B, its address string ~67 B, the mark's 64-bit hash 36 B) and ~380 B after:
    named, expected and the rising count in one slot and its grace and first ping in one (16 slots,
    160 B), an IPv4 address packed into an int (32 B, hbd.peer_address), the hash's 53 bits as a
    float (24 B)."""
    n = 20000
    sent: list[PeerOrder] = []
    sup = _ticking_supervisor(vloop, n, sent)
    frames = []
    for i in range(n):
        worker, conn = i % 6 + 1, i // 6
        name, address = f"c{worker}-{conn}", f"10.{worker}.{conn // 250 % 250}.{conn % 250 + 1}:{30000 + conn}"
        for m in (PeerHello(conn, name, None, address), PeerConnected(conn, name, None, address, 30.0)):
            frames.append((worker, encode(m)))
    decoders = {w: Decoder() for w in range(1, 7)}
    reg = sup.registry
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, (worker, frame) in enumerate(frames):
            for msg in decoders[worker].feed(frame):
                sup.report(worker, msg)  # type: ignore[arg-type]
            sent.clear()  # the marks sent: the pipes' (encoded at once), not kept
            if i % 1000 == 999:
                reg.take_dirty(sup.clock(), T0)  # the store's writer, twice a second
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(reg.by_key) == n
    assert used / n < 400, f"{used / n:.0f} B per peer kept by the supervisor"
    assert all(isinstance(p._address, int) for p in reg.peers.values())


class _Standing(_Quiet):
    def __init__(self) -> None:
        self.hooked: list[tuple[str, float]] = []

    def event(self, event: str, peer: str, address: str, *, standing: float = 0.0, **kw: object) -> None:
        self.hooked.append((event, standing))


def test_a_connections_key_is_one_int_and_a_hooks_standing_is_its_first_ping(vloop) -> None:
    """A connection is keyed by one int (its number and worker: no tuple per peer) and its first
    ping is kept in its Peer (no table of its own): the orders go to the right worker with the
    worker's own number, however large, and a hook's standing is the time since that first ping."""
    from hbd.supervisor_registry import WORKER_BITS, conn_of, worker_of

    sent: list[tuple[int, PeerOrder]] = []
    events = _Standing()
    sup = SupervisorRegistry(vloop, RegistrySettings(), (), _peer_log(vloop), events, lambda i, o: sent.append((i, o)))
    now = [T0]
    sup.clock = lambda: now[0]
    big = 2**40 + 5  # a worker's number grows with every connection it ever had
    for index, conn in ((64, big), (1, 3)):
        key = conn << WORKER_BITS | index
        assert (worker_of(key), conn_of(key)) == (index, conn)
    sup.report(64, PeerHello(big, "web1", None, "127.0.0.1:7"))
    sup.report(64, PeerConnected(big, "web1", None, "127.0.0.1:7", 9.0))
    now[0] = T0 + 100.0
    sup.report(2, PeerHello(3, "web1", None, "127.0.0.1:8"))
    sup.report(2, PeerConnected(3, "web1", None, "127.0.0.1:8", 9.0))  # takes over: the old one is closed
    assert [(i, o.conn) for i, o in sent if isinstance(o, PeerClose)] == [(64, big)]
    assert [(i, o.conn) for i, o in sent if isinstance(o, PeerMark)][-1] == (2, 3)
    now[0] = T0 + 130.0
    sup.report(2, PeerGone(3, "timed out", None))
    assert events.hooked[0] == ("up", 0.0) and events.hooked[-1] == ("down", 30.0)
    assert not sup.registry.by_key


def test_a_workers_last_pings_reach_the_scrape_by_the_key_of_each_connection(fleet) -> None:
    """A worker answers the scrape's ``pings`` with a 16-byte record per connected peer (its number
    for the connection, the last ping; no name to write or parse: it was a JSON line per peer, ~36 ms
    a worker and ~85 ms in the supervisor at 100,000 peers, unpaced); the supervisor keys each record
    as its registry keys the connection, and the samples carry the worker's time in wall clock."""
    from hbd import commands
    from hbd.ping_times import RECORD, Reader
    from hbd.supervisor_registry import WORKER_BITS

    f = fleet()
    socks = [f.connect(1 + i % 2, 42000 + i) for i in range(5)]
    for i, s in enumerate(socks):
        f.say(s, b"hello p%d\nping\n" % i)
    socks[2].close()
    f.pump()
    last: dict[int, float] = {}
    for index, srv in f.workers.items():
        answer = b"".join(c for c in commands._pings(srv.view()) if c is not None)
        pinged = {c.peer.name: c.peer.last_heard for c in srv.conns.values()}
        assert len(answer) == RECORD.size * len(pinged)
        reader = Reader()
        for start in range(0, len(answer), 5):  # as a relay may cut it
            last.update({conn << WORKER_BITS | index: t for conn, t in reader.feed(answer[start : start + 5])})
        for name, t in pinged.items():
            assert last[f.sup.registry.peers[name].key] == t
    assert len(last) == 4  # p2 is gone: its last ping is the registry's own
    offset = 1.7e9
    by_label = {s[0]: s[2] for b in f.sup.metric_samples(offset, last, 100) for s in b}
    for name, peer in f.sup.registry.peers.items():
        t = last.get(peer.key, peer.last_ping)  # type: ignore[arg-type]
        assert by_label[f'{{peer="{name}"}}'] == round(t + offset, 3)
    for s in socks:
        s.close()
