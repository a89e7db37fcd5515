"""Property-based tests of the sans-I/O protocol (hypothesis): splitting never changes the outcome,
the input buffer stays within its cap, and arbitrary bytes raise nothing but ProtocolError."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbd import protocol
from hbd.protocol import MAX_LINE, ClientLink, Hello, PeerState, ProtocolError, ServerPeer

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces that make streams interesting: valid messages, their fragments, and a little junk.
PIECES = st.sampled_from(
    [
        b"ping",
        b"ping",
        b"ping\n",
        b"ping\r\n",
        b"\n",
        b"\r\n",
        b"\r",
        b"pi",
        b"ng",
        b"hello ",
        b"hello web1\n",
        b"hello db-2.example:7 2.5\n",
        b"hello x 0\n",
        b"hello  \n",
        b"p",
        b"x",
        b"\x00",
        b"\xff",
        b"PING",
    ]
)
LONG_HELLO = st.integers(200, 300).map(lambda n: b"hello a 1." + b"0" * n + b"\n")  # valid, but how long?
STREAM = st.lists(st.one_of(PIECES, LONG_HELLO, st.binary(max_size=4)), max_size=40).map(b"".join)


def run_server(chunks: list[bytes]) -> tuple[str, bytes, int, list]:
    """Feed chunks one read at a time; the outcome is (ok|error, replies, pings, greetings)."""
    peer = ServerPeer(0.0, 10.0)
    out = []
    try:
        for c in chunks:
            out.append(peer.feed(c, 0.0))  # one instant: the outcome may depend on time (greeting rate), not on splits
            assert len(peer._buf) <= MAX_LINE, len(peer._buf)
    except ProtocolError:
        return "error", b"", 0, []
    hellos = [(e.name, e.interval) for e in (peer.events or []) if isinstance(e, Hello)]
    return "ok", b"".join(out), peer.pings, hellos


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


@SETTINGS
@given(STREAM, st.lists(st.integers(0, 10_000), max_size=12))
def test_server_any_split_gives_the_same_result_as_unsplit(data: bytes, cuts: list[int]) -> None:
    assert run_server(split(data, cuts)) == run_server([data])


@SETTINGS
@given(STREAM)
def test_server_byte_at_a_time_is_the_same_as_unsplit(data: bytes) -> None:
    assert run_server([data[i : i + 1] for i in range(len(data))] or [b""]) == run_server([data])


@SETTINGS
@given(st.lists(st.binary(max_size=600), max_size=20))
def test_server_fuzz_only_protocol_errors_and_bounded_buffer(chunks: list[bytes]) -> None:
    peer = ServerPeer(0.0, 10.0)
    for c in chunks:
        try:
            reply = peer.feed(c, 1.0)
        except ProtocolError:
            return
        assert len(peer._buf) <= MAX_LINE
        assert set(reply.replace(b"pong", b"").replace(b"\r", b"").replace(b"\n", b"")) == set()


@SETTINGS
@given(st.lists(st.sampled_from([b"p", b"i", b"n", b"\n", b"hello", b" ", b"a"]), max_size=300))
def test_trickled_bytes_without_a_complete_ping_never_count_as_life(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    peer = ServerPeer(0.0, 10.0)
    try:
        for i, c in enumerate(pieces):
            peer.feed(c, float(i + 1))
    except ProtocolError:
        return
    if b"ping" not in data:
        assert peer.last_heard == 0.0 and peer.pings == 0
    else:
        assert peer.pings == data.count(b"ping")


PONG_STREAM = st.lists(st.sampled_from([b"pong", b"pong\n", b"pong\r\n", b"\n", b"po", b"ng"]), max_size=30).map(
    b"".join
)


def run_client(chunks: list[bytes]) -> tuple[str, int]:
    link = ClientLink(0.0, 1.0, 3.0)
    link._sent.extend([0.0] * 100)  # pings outstanding, so every pong is matched
    try:
        for c in chunks:
            link.feed(c, 0.5)
            assert len(link._buf) < 4
    except ProtocolError:
        return "error", 0
    return "ok", link.pongs


@SETTINGS
@given(PONG_STREAM, st.lists(st.integers(0, 10_000), max_size=12))
def test_client_any_split_gives_the_same_pongs(data: bytes, cuts: list[int]) -> None:
    assert run_client(split(data, cuts)) == run_client([data])


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_client_fuzz_only_protocol_errors(chunks: list[bytes]) -> None:
    run_client(chunks)


def peer_state(peer: ServerPeer) -> tuple:
    events = [(type(e).__name__, *(getattr(e, f) for f in e.__slots__)) for e in peer.events or []]
    return (peer.state, peer.last_heard, peer.pings, peer._echo, peer._junk, peer._buf, events)


@SETTINGS
@given(st.lists(st.tuples(PIECES, st.floats(0.0, 2.0)), max_size=60))
def test_server_steady_state_fast_path_is_the_generic_parser(reads: list[tuple[bytes, float]]) -> None:
    """feed() answers a whole ``ping`` or ``ping\\n`` from an UP peer without its parser loop (most
    reads: docs/performance.md); fed one byte at a time, the same reads never take that path. Reply,
    state, events and error come out the same after every read."""
    fast, slow = ServerPeer(0.0, 3.0), ServerPeer(0.0, 3.0)
    now = 0.0
    for data, dt in reads:
        now += dt
        try:
            reply = fast.feed(data, now)
        except ProtocolError:
            reply = None
        try:
            reply_slow: bytes | None = b"".join(slow.feed(data[i : i + 1], now) for i in range(len(data)))
        except ProtocolError:
            reply_slow = None
        assert reply == reply_slow
        if reply is None:
            return
        assert peer_state(fast) == peer_state(slow)
        fast.poll(now)  # verdicts too (LATE, DEAD): the path is taken only while UP
        slow.poll(now)


_TIMEOUTS = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
_CHANGES = st.lists(st.one_of(st.sampled_from(list(PeerState)), _TIMEOUTS), max_size=12)


@SETTINGS
@given(first=_TIMEOUTS, changes=_CHANGES, now=st.floats(0, 1e6))
def test_the_verdicts_offset_follows_every_change_of_state_and_timeout(
    first: float, changes: list[PeerState | float], now: float
) -> None:
    """The wheel files a peer ``due_in`` after its last ping (hbd.liveness): half its timeout while UP,
    its timeout otherwise, whatever was set in whatever order; and the timeout reads back exactly."""
    peer = ServerPeer(now, first)
    timeout = first
    for change in [*changes, PeerState.UP]:
        if isinstance(change, PeerState):
            peer.state = change
        else:
            peer.timeout = timeout = change
        assert peer.timeout == timeout
        assert peer.due_in == (timeout / 2 if peer.state is PeerState.UP else timeout)
        assert peer.next_deadline() == peer.last_heard + peer.due_in


def test_a_first_ping_and_a_silence_move_the_offset_with_the_state() -> None:
    """The state changes the protocol itself makes (a ping: UP; silence: LATE, DEAD) go through the same
    setter: the wheel's next look moves from the timeout to half of it and back."""
    peer = ServerPeer(0.0, 10.0)
    assert peer.due_in == 10.0
    peer.feed(b"ping", 1.0)
    assert peer.state is PeerState.UP and peer.due_in == 5.0 and peer.next_deadline() == 6.0
    assert peer.poll(6.5) is not None and peer.state is PeerState.LATE and peer.due_in == 10.0
    peer.feed(b"ping", 7.0)
    assert peer.state is PeerState.UP and peer.due_in == 5.0


def test_peers_with_one_timeout_share_its_half_and_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A product per peer would be a float per connection (24 bytes at 100,000 peers: 2.4 MB), twice
    where others keep the timeout they read; distinct timeouts (greetings' intervals are anyone's) keep
    the memo within its bound (emptied first: other tests' timeouts may have filled it)."""
    monkeypatch.setattr(protocol, "_HALF", {})
    monkeypatch.setattr(protocol, "_WHOLE", {})
    timeout = 31.25
    a, b = ServerPeer(0.0, timeout), ServerPeer(0.0, timeout)
    a.feed(b"ping", 1.0)
    b.feed(b"ping", 1.0)
    assert a.due_in is b.due_in and a.timeout is timeout and b.timeout is timeout
    for k in range(3 * protocol.HALVES_KEPT):
        peer = ServerPeer(0.0, 1000.0 + k / 7)
        peer.state = PeerState.UP
        assert peer.timeout == 1000.0 + k / 7 and peer.due_in == (1000.0 + k / 7) / 2
    assert len(protocol._HALF) <= protocol.HALVES_KEPT and len(protocol._WHOLE) <= protocol.HALVES_KEPT


def test_a_memo_filled_by_strangers_timeouts_still_shares_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greetings' intervals are anyone's: 256 strangers with distinct intervals must not leave the memo
    full for good, so that a timeout a reload brings (every peer's) would cost a float per peer again."""
    monkeypatch.setattr(protocol, "_HALF", {})
    monkeypatch.setattr(protocol, "_WHOLE", {})
    for k in range(protocol.HALVES_KEPT + 5):
        stranger = ServerPeer(0.0, 500.0 + k / 3)
        stranger.state = PeerState.UP
    assert len(protocol._HALF) <= protocol.HALVES_KEPT and len(protocol._WHOLE) <= protocol.HALVES_KEPT
    timeout = 42.5  # the new heartbeat_timeout
    a, b = ServerPeer(0.0, timeout), ServerPeer(0.0, timeout)
    a.state = b.state = PeerState.UP
    assert a.due_in is b.due_in and a.timeout is timeout and b.timeout is timeout
