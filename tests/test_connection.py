"""A server connection's read path on real sockets: the steady ping answered in on_read itself
(docs/performance.md, "CPU per ping with everything in"), events before the reply, a full send
buffer, a peer that does not read its pongs, the end and garbage."""

from __future__ import annotations

import inspect
import socket
import sys
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from helpers import bytes_each, close_pairs
from hypothesis import given, settings
from hypothesis import strategies as st

from hbd.connection import MAX_OUTBUF, RECV_SIZE, Connection
from hbd.protocol import MAX_LINE, Hello, PeerState, ProtocolError, ServerPeer, StateChange
from hbd.selector import IN


class FakeLoop:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.writers: dict[object, object] = {}
        self.clock = clock

    @property
    def woke(self) -> float:  # when "select()" found the socket ready: the owner's now
        return self.clock()

    def add_writer(self, sock: object, callback: object) -> None:
        self.writers[sock] = callback

    def remove_writer(self, sock: object) -> None:
        del self.writers[sock]

    def watches(self, sock: object) -> bool:
        return False  # read through a callback: writes wait through one too


class Owner:
    """Records what a connection hands to its server."""

    def __init__(self) -> None:
        self.loop = FakeLoop(self.clock)
        self.now = 100.0
        self.calls: list[tuple] = []
        self.events: list[object] = []
        self.open = True
        self.close_on_hello = False

    def clock(self) -> float:
        return self.now

    def is_open(self, conn: Connection) -> bool:
        return self.open

    def arm(self, conn: Connection, forgiven: float = 0.0) -> None:
        self.calls.append(("arm",))

    def on_events(self, conn: Connection) -> None:
        events, conn.peer.events = conn.peer.events or [], None
        self.events += events
        if self.close_on_hello and any(isinstance(e, Hello) for e in events):
            self.open = False

    def connected(self, conn: Connection, how: str) -> None:
        self.calls.append(("connected",))

    def drop(self, conn: Connection, reason: str, level: int) -> None:
        self.calls.append(("drop", reason))

    def reject(self, conn: Connection, reason: str) -> None:
        self.calls.append(("reject", reason))

    def tls_failed(self, conn: Connection, reason: str) -> None:
        self.calls.append(("tls_failed", reason))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(2.0)
    yield ours, theirs
    ours.close()
    theirs.close()


def connection(owner: Owner, sock: socket.socket) -> Connection:
    return Connection(owner, sock, "127.0.0.1:5000", owner.now, 3.0)  # type: ignore[arg-type]


def test_steady_pings_are_answered_in_their_own_form_and_counted(pair) -> None:
    ours, theirs = pair
    owner = Owner()
    conn = connection(owner, ours)
    theirs.send(b"ping")
    conn.on_read()
    assert theirs.recv(16) == b"pong"
    assert owner.events == [StateChange(PeerState.NEW, PeerState.UP, 0.0)]  # the first ping: through on_events
    for i, (ping, pong) in enumerate([(b"ping", b"pong"), (b"ping\n", b"pong\n"), (b"ping", b"pong")] * 3):
        owner.now += 1.0
        theirs.send(ping)
        conn.on_read()  # the steady state: no events, straight into the send buffer
        assert theirs.recv(16) == pong
        assert conn.peer.pings == i + 2 and conn.peer.last_heard == owner.now
    assert len(owner.events) == 1 and conn.outbuf == b"" and owner.calls == []


def test_a_greeting_reaches_the_owner_before_the_reply_and_a_refused_one_gets_none(pair) -> None:
    ours, theirs = pair
    owner = Owner()
    conn = connection(owner, ours)
    theirs.send(b"hello web1\nping\n")
    conn.on_read()
    assert owner.events[0] == Hello("web1", None)
    assert theirs.recv(16) == b"pong\n"
    owner2, (ours2, theirs2) = Owner(), socket.socketpair()
    with ours2, theirs2:
        ours2.setblocking(False)
        owner2.close_on_hello = True  # the registry refused the name: closed before its pong
        conn2 = connection(owner2, ours2)
        theirs2.send(b"hello web1\nping\n")
        conn2.on_read()
        theirs2.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs2.recv(16)


def test_a_full_send_buffer_queues_the_pong_until_writable_and_a_non_reader_is_rejected(pair) -> None:
    ours, theirs = pair
    owner = Owner()
    conn = connection(owner, ours)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    filler = 0
    with pytest.raises(BlockingIOError):
        while True:
            filler += ours.send(b"x" * 4096)
    theirs.send(b"ping")
    conn.on_read()  # the pong does not fit: queued, and the connection waits for writability
    assert conn.outbuf == b"pong" and owner.loop.writers == {ours: conn.on_write}
    theirs.send(b"ping\n")
    conn.on_read()  # behind what is queued, never before it
    assert conn.outbuf == b"pongpong\n"
    got = b""
    while len(got) < filler:
        got += theirs.recv(65536)
    conn.on_write()
    assert conn.outbuf == b"" and owner.loop.writers == {}
    theirs.settimeout(2.0)
    assert theirs.recv(16) == b"pongpong\n"
    # a peer that pings but never reads: dropped once MAX_OUTBUF is queued, not buffered without end
    with pytest.raises(BlockingIOError):
        while True:
            ours.send(b"x" * 4096)
    owner.now += 1.0
    for _ in range(MAX_OUTBUF // 4 + 1):
        theirs.send(b"ping")
        conn.on_read()
        if owner.calls:
            break
    assert owner.calls[-1][0] == "reject" and "does not read its pongs" in owner.calls[-1][1]
    assert len(conn.outbuf) <= MAX_OUTBUF


def test_the_end_and_garbage_go_to_the_owner(pair) -> None:
    ours, theirs = pair
    owner = Owner()
    conn = connection(owner, ours)
    theirs.send(b"GET / HTTP/1.0\r\n")
    conn.on_read()
    assert owner.calls == [("reject", "unexpected bytes b'GET / HTTP/1.0\\r\\n'")]
    theirs.shutdown(socket.SHUT_WR)
    conn.on_read()
    assert owner.calls[-1] == ("drop", "disconnected")


def test_a_started_connection_costs_the_loop_little_memory() -> None:
    """What serving a connection adds in the loop: the selector's entry to the connection itself
    (hbd.loop.EventLoop.watch; with its int and the table's growth ~90 B), not a SelectorKey, its
    entry, a callback list and a bound method (311 B before: docs/performance.md, "A leaner
    connection layer")."""
    from hbd.loop import EventLoop

    loop = EventLoop()
    owner = Owner()
    owner.loop = loop  # type: ignore[assignment]
    owner.ending = type("Ends", (), {"on_hangup": staticmethod(lambda sock: None)})()  # type: ignore[attr-defined]
    pairs = [socket.socketpair() for _ in range(400)]
    conns = [connection(owner, a) for a, _ in pairs]
    try:
        per = bytes_each(conns, Connection.start)
        assert per < 130, f"{per:.0f} bytes per connection"
    finally:
        close_pairs(loop, pairs)


def test_a_connection_is_one_object_with_its_peers_state(pair) -> None:
    """A connection is its ServerPeer (one slotted object: ~190 B), not a Connection and a ServerPeer
    (~225 B) with a float of its own for the greeting bucket (24 B): 258 B before. Its address, its
    own ``ip:port`` as accepted, is kept packed in an int (32 B; the string: 63-65 B, 80 as allocated):
    ~257 B a connection with the string (with a worker registry's two slots: ~273 B), ~232 B now."""
    owner = Owner()
    ours, _ = pair
    addresses = [(f"10.1.{i // 250}.{i % 250 + 1}", 30000 + i) for i in range(1000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    conns = [Connection(owner, ours, f"{ip}:{port}", owner.now, 3.0) for ip, port in addresses]  # type: ignore[arg-type]
    per = (tracemalloc.get_traced_memory()[0] - before) / len(conns)
    tracemalloc.stop()
    assert per < 245, f"{per:.0f} bytes per connection"
    assert conns[0].peer is conns[0]
    assert [c.addr for c in conns] == [f"{ip}:{port}" for ip, port in addresses]
    assert conns[-1].source == "10.1.3.250" and conns[-1].label == "10.1.3.250:30999"
    ipv6 = Connection(owner, ours, "[::1]:5000", owner.now, 3.0)  # type: ignore[arg-type]
    assert (ipv6.addr, ipv6.source, ipv6.label) == ("[::1]:5000", "[::1]", "[::1]:5000")


def test_a_watched_connection_waits_for_room_through_its_own_events(pair) -> None:
    """On the loop (epoll, EventLoop.watch): a pong that does not fit is queued, the connection is
    watched for room too, on_read(EPOLLOUT) sends the queue and the watch goes back to reads; a
    peer that never reads is still rejected at MAX_OUTBUF."""
    import select as select_mod

    from hbd.loop import EventLoop

    ours, theirs = pair
    loop = EventLoop()
    owner = Owner()
    owner.loop = loop  # type: ignore[assignment]
    owner.ending = type("Ends", (), {"on_hangup": staticmethod(lambda sock: None)})()  # type: ignore[attr-defined]
    conn = connection(owner, ours)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        conn.start()
        filler = 0
        with pytest.raises(BlockingIOError):
            while True:
                filler += ours.send(b"x" * 4096)
        theirs.send(b"ping")
        loop.run_once(0)
        assert conn.outbuf == b"pong" and loop.watches(ours)
        assert loop._epoll is not None and loop._epoll.handlers[ours.fileno()] is conn
        got = b""
        while len(got) < filler:
            got += theirs.recv(65536)
        for _ in range(5):
            loop.run_once(0)
        assert conn.outbuf == b"" and theirs.recv(16) == b"pong"
        conn.on_read(select_mod.EPOLLOUT)  # no longer watched for room: a stray one sends nothing
        assert owner.calls[-1] == ("connected",)
        with pytest.raises(BlockingIOError):
            while True:
                ours.send(b"x" * 4096)
        for _ in range(MAX_OUTBUF // 4 + 1):
            theirs.send(b"ping")
            loop.run_once(0)
            if owner.calls[-1][0] != "connected":
                break
        assert owner.calls[-1][0] == "reject" and len(conn.outbuf) <= MAX_OUTBUF
    finally:
        loop.forget(ours)
        loop.close()


class ScriptedSocket:
    """recv() returns the given bytes once; send() takes everything."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sent = b""

    def recv(self, size: int) -> bytes:
        data, self.data = self.data, b""
        return data

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)


_PEER_FIELDS = ("state", "last_heard", "pings", "_buf", "_echo", "_junk", "name", "interval", "timeout")


@settings(max_examples=600, deadline=None)
@given(
    state=st.sampled_from(list(PeerState)),
    buf=st.sampled_from([b"", b"p", b"pin", b"ping\r", b"hello ab"]),
    echo=st.booleans(),
    junk=st.integers(0, 1024),
    pings=st.integers(0, 300),
    data=st.sampled_from([b"ping", b"ping\n", b"ping\r\n", b"pingping", b"\n", b"pong", b"hello a\n", b"p", b"x"]),
)
def test_a_reads_inlined_answer_is_exactly_what_feed_does(state, buf, echo, junk, pings, data) -> None:
    """on_read answers the usual read (one whole ping from an UP peer, nothing buffered) itself rather
    than through feed(): for every state and input the peer ends as feed() leaves it and the bytes sent
    are feed()'s reply, so the inlined form cannot drift from the protocol's rule."""
    owner = Owner()
    sock = ScriptedSocket(data)
    conn = Connection(owner, sock, "127.0.0.1:5000", 50.0, 3.0)  # type: ignore[arg-type]
    twin = ServerPeer(50.0, 3.0)
    for peer in (conn, twin):
        peer.state, peer._buf, peer._echo, peer._junk, peer.pings = state, buf, echo, junk, pings
    try:
        reply = twin.feed(data, owner.now)
    except ProtocolError as exc:
        reply, refused = b"", str(exc)
    else:
        refused = None
    conn.on_read()
    assert [getattr(conn, f) for f in _PEER_FIELDS] == [getattr(twin, f) for f in _PEER_FIELDS]
    assert owner.events + (conn.events or []) == (twin.events or [])
    if refused is None:
        assert sock.sent == reply and owner.calls == []
    else:
        assert sock.sent == b"" and owner.calls == [("reject", refused)]


def test_the_constants_the_read_is_written_with_are_the_modules() -> None:
    assert inspect.getsource(Connection.on_read).count("bits != 1") == 1 and IN == 1
    assert inspect.getsource(Connection.on_read).count("recv(448)") == 1 and RECV_SIZE == 448


def test_a_reads_bytes_object_is_a_small_object_and_holds_a_whole_line() -> None:
    """The read's size is chosen for CPython's small-object allocator (requests up to 512 bytes):
    a bigger one costs a malloc() and a shrinking realloc() a ping. It still holds a line."""
    assert sys.getsizeof(b"x" * RECV_SIZE) <= 512
    assert MAX_LINE + len(b"\n") < RECV_SIZE
