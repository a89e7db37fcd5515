"""The sans-I/O protocol: plain function calls and made-up times, no sockets, no sleeping."""

import math

import pytest

from hbd.protocol import (
    MAX_JUNK,
    MAX_LINE,
    Answers,
    ClientLink,
    Hello,
    PeerState,
    ProtocolError,
    ServerPeer,
    StateChange,
)


def feed_all(peer: ServerPeer, chunks: list[bytes], now: float = 0.0) -> bytes:
    return b"".join(peer.feed(c, now) for c in chunks)


# -- server side: framing ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chunks", "reply"),
    [
        ([b"ping"], b"pong"),
        ([b"ping\n"], b"pong\n"),
        ([b"ping\r\n"], b"pong\r\n"),
        ([b"pingping"], b"pongpong"),
        ([b"ping\nping\n"], b"pong\npong\n"),
        ([b"pi", b"ng"], b"pong"),
        ([b"p", b"i", b"n", b"g"], b"pong"),
        ([b"ping", b"\n"], b"pong\n"),  # terminator split from its ping: still pong\n on the wire
        ([b"ping\r", b"\n"], b"pong\r\n"),
        ([b"pingpi", b"ngping"], b"pongpongpong"),
        ([b"ping\npi", b"ng\n"], b"pong\npong\n"),
        ([b"\n", b"ping"], b"pong"),  # a blank line is tolerated
    ],
)
def test_server_framing(chunks: list[bytes], reply: bytes) -> None:
    peer = ServerPeer(0.0, 10.0)
    assert feed_all(peer, chunks) == reply
    assert peer.pings == reply.count(b"pong")


def test_bare_ping_gets_bare_pong_and_counts() -> None:
    peer = ServerPeer(0.0, 10.0)
    for i in range(3):
        assert peer.feed(b"ping", float(i)) == b"pong"
    assert peer.pings == 3
    assert peer.last_heard == 2.0


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n", b"pong", b"PING", b"pingx", b"\x00\x01", b"hello \n"])
def test_garbage_is_a_protocol_error(junk: bytes) -> None:
    with pytest.raises(ProtocolError):
        ServerPeer(0.0, 10.0).feed(junk, 0.0)


def test_oversized_line_is_rejected_and_buffer_stays_bounded() -> None:
    peer = ServerPeer(0.0, 10.0)
    with pytest.raises(ProtocolError):
        for _ in range(1000):
            peer.feed(b"hello " + b"a" * 100, 0.0)
    assert len(peer._buf) <= MAX_LINE + 200


def test_one_megabyte_line_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        ServerPeer(0.0, 10.0).feed(b"x" * 1_000_000, 0.0)


def test_endless_blank_lines_are_junk() -> None:
    peer = ServerPeer(0.0, 10.0)
    with pytest.raises(ProtocolError):
        for _ in range(MAX_JUNK + 1):
            peer.feed(b"\n", 0.0)


def test_junk_allowance_resets_on_ping() -> None:
    peer = ServerPeer(0.0, 10.0)
    for _ in range(10):
        peer.feed(b"\n" * (MAX_JUNK // 2), 0.0)
        peer.feed(b"ping", 0.0)


def test_greeting_names_the_peer() -> None:
    peer = ServerPeer(0.0, 10.0)
    assert peer.feed(b"hello web1 2\nping\n", 0.0) == b"pong\n"
    assert peer.name == "web1"
    assert peer.events == [Hello("web1", 2.0), StateChange(PeerState.NEW, PeerState.UP, 0.0)]
    assert peer.interval == 2.0


def test_greeting_split_across_reads() -> None:
    peer = ServerPeer(0.0, 10.0)
    assert feed_all(peer, [b"hel", b"lo db", b"-2\n", b"ping"]) == b"pong"
    assert peer.name == "db-2"


@pytest.mark.parametrize(
    "line", [b"hello \n", b"hello a b c\n", b"hello bad\x01name\n", b"hello x 0\n", b"hello x y\n"]
)
def test_bad_greetings(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        ServerPeer(0.0, 10.0).feed(line, 0.0)


def test_trickled_bytes_do_not_count_as_life() -> None:
    peer = ServerPeer(0.0, 10.0)
    peer.feed(b"pi", 9.0)
    assert peer.last_heard == 0.0
    assert peer.poll(10.5).new is PeerState.DEAD


# -- server side: liveness ---------------------------------------------------------------------------
def test_exact_timeout_boundaries() -> None:
    peer = ServerPeer(90.0, 10.0)
    peer.feed(b"ping", 100.0)
    assert peer.next_deadline() == 105.0
    assert peer.poll(105.0) is None  # silent exactly half the timeout: still UP
    change = peer.poll(105.001)
    assert change == StateChange(PeerState.UP, PeerState.LATE, pytest.approx(5.001))
    assert peer.next_deadline() == 110.0
    assert peer.poll(110.0) is None  # exactly the timeout: not yet dead
    assert peer.poll(110.001).new is PeerState.DEAD


def test_ping_while_late_brings_peer_back_up() -> None:
    peer = ServerPeer(0.0, 10.0)
    peer.feed(b"ping", 0.0)
    peer.events = None
    peer.poll(6.0)
    assert peer.state is PeerState.LATE
    peer.feed(b"ping", 7.0)
    assert peer.state is PeerState.UP
    assert peer.events == [StateChange(PeerState.LATE, PeerState.UP, 7.0)]
    assert peer.next_deadline() == 12.0


def test_a_peer_that_never_pinged_is_never_late_and_dies_at_its_timeout() -> None:
    peer = ServerPeer(0.0, 10.0)
    assert peer.next_deadline() == 10.0
    assert peer.poll(6.0) is None and peer.poll(10.0) is None
    assert peer.state is PeerState.NEW
    assert peer.poll(10.5) == StateChange(PeerState.NEW, PeerState.DEAD, 10.5)


# -- client side ---------------------------------------------------------------------------------------
def test_client_pings_on_schedule_and_measures_rtt() -> None:
    link = ClientLink(0.0, interval=2.0, pong_timeout=5.0)
    assert link.poll(0.0) == b"ping"
    assert link.poll(1.0) == b""
    assert link.next_deadline() == 2.0
    assert link.feed(b"pong", 0.25) == [0.25]
    assert link.poll(2.0) == b"ping"
    assert link.feed(b"po", 2.1) == []
    assert link.feed(b"ng\n", 2.5) == [0.5]
    assert link.pongs == 2


def test_client_line_form() -> None:
    link = ClientLink(0.0, 1.0, 3.0, line=True)
    assert link.poll(0.0) == b"ping\n"
    assert link.feed(b"pong\r\n", 0.1) == [0.1]


def test_client_declares_dead_after_pong_timeout() -> None:
    link = ClientLink(0.0, interval=2.0, pong_timeout=5.0)
    link.poll(0.0)
    link.poll(2.0)
    link.poll(4.0)
    assert link.next_deadline() == math.nextafter(5.0, math.inf)  # the first instant the wait is longer
    link.poll(5.0)
    assert link.answers is not Answers.DEAD
    link.poll(link.next_deadline())  # due means due: no wake-up that finds nothing to do
    assert link.answers is Answers.DEAD
    link.poll(5.001)
    assert link.answers is Answers.DEAD
    assert link.next_deadline() == float("inf")


def test_client_skips_missed_slots_after_a_stall() -> None:
    link = ClientLink(0.0, interval=1.0, pong_timeout=3.0)
    link.poll(0.0)
    link.feed(b"pong", 0.1)
    assert link.poll(10.0) == b"ping"  # one ping, not ten
    assert link.poll(10.0) == b""


def test_client_rejects_garbage_from_server() -> None:
    link = ClientLink(0.0, 1.0, 3.0)
    with pytest.raises(ProtocolError):
        link.feed(b"HTTP/1.1 400\r\n", 0.0)


def test_more_pongs_than_pings_is_a_protocol_error() -> None:
    """A pong nobody asked for is no sign of life (a server streaming pongs looked UP at 0.1 ms)."""
    link = ClientLink(0.0, 1.0, 3.0)
    with pytest.raises(ProtocolError, match="pong without a ping"):
        link.feed(b"pong", 0.0)
    link = ClientLink(0.0, 1.0, 3.0, line=True)
    assert link.poll(0.0) == b"ping\n"
    with pytest.raises(ProtocolError, match="pong without a ping"):
        link.feed(b"pong\npong\n", 0.001)  # the first one answers the ping, the second nothing
    assert link.pongs <= 1


def test_client_late_after_half_the_pong_timeout_and_back_with_the_pong() -> None:
    link = ClientLink(0.0, interval=2.0, pong_timeout=5.0)
    link.poll(0.0)
    assert link.next_deadline() == 2.0
    link.poll(2.0)  # a second ping; the first is still unanswered
    assert link.next_deadline() == math.nextafter(2.5, math.inf)  # wake up to call it late
    link.poll(2.4)
    assert link.answers is Answers.ANSWERING
    link.poll(2.501)
    assert link.answers is Answers.LATE
    assert link.next_deadline() == 4.0  # the next ping; death is due at 5.0
    link.feed(b"pong", 3.0)  # answers the first ping; the second has waited only 1 s
    assert link.answers is Answers.ANSWERING


def test_client_stall_forgiveness_is_exactly_the_time_we_did_not_run() -> None:
    link = ClientLink(0.0, interval=2.0, pong_timeout=5.0)
    link.poll(0.0)
    link.extend(1.0, 4.9)  # our own process did not run from 1.0 to 4.9
    assert link.waiting(6.0) == pytest.approx(2.1)
    link.poll(6.0)
    assert link.answers is Answers.ANSWERING
    assert link.next_deadline() == pytest.approx(6.4)  # late: 2.5 s of waiting, plus the 3.9 s forgiven
    link.poll(6.41)
    assert link.answers is Answers.LATE
    assert link.next_deadline() == 7.0  # the next ping (slots skipped); death is due at 8.9
    link.poll(8.89)
    assert link.answers is not Answers.DEAD
    link.poll(8.91)  # 5 s of waiting that we were there for
    assert link.answers is Answers.DEAD and link.silent_for == pytest.approx(5.01)


def test_greeting_must_come_before_the_first_ping() -> None:
    peer = ServerPeer(0.0, 10.0)
    assert peer.feed(b"ping", 0.0) == b"pong"
    with pytest.raises(ProtocolError, match="greeting after the first ping"):
        peer.feed(b"hello web1 2\n", 0.5)


def test_a_later_greeting_may_change_the_interval_only_and_not_too_often() -> None:
    peer = ServerPeer(0.0, 10.0)
    peer.feed(b"hello web1 2\nping\n", 0.0)
    peer.events = None
    peer.feed(b"hello web1 5\n", 1.0)  # a client reload changed its heartbeat_interval
    assert peer.events == [Hello("web1", 5.0)] and peer.interval == 5.0 and peer.name == "web1"
    peer.feed(b"hello web1 6\nhello web1 7\n", 1.5)  # a burst of 3 is allowed (jitter)...
    with pytest.raises(ProtocolError, match="more often than once every 1 s"):
        peer.feed(b"hello web1 8\n", 1.6)  # ...but not more than one a second on average
    steady = ServerPeer(0.0, 10.0)
    for i in range(1000):  # one a second, for ever
        steady.feed(b"hello web1 %d\nping" % (i % 50 + 1), float(i))
    other = ServerPeer(0.0, 10.0)
    other.feed(b"hello web1 2\nping\n", 0.0)
    with pytest.raises(ProtocolError, match="greeting as 'db1' on a connection that greeted as 'web1'"):
        other.feed(b"hello db1 2\n", 5.0)


def test_the_greeting_rate_limit_does_not_depend_on_how_bytes_are_split() -> None:
    whole = ServerPeer(0.0, 10.0)
    with pytest.raises(ProtocolError):
        whole.feed(b"hello a 2\nhello a 3\nhello a 4\nhello a 5\n", 0.0)
    split = ServerPeer(0.0, 10.0)
    split.feed(b"hello a 2\nhello a 3\nhello a 4\nhel", 0.0)
    with pytest.raises(ProtocolError):
        split.feed(b"lo a 5\n", 0.0)


def test_client_busy_time_is_not_forgiven() -> None:
    """Only stalls (time we did not run) are forgiven; with none, the pong timeout runs as is."""
    link = ClientLink(0.0, interval=10.0, pong_timeout=5.0)
    link.poll(0.0)
    link.extend(7.0, 8.0)  # a stall after the verdict was due changes nothing before it
    link.poll(5.01)
    assert link.answers is Answers.DEAD


def test_a_rising_peer_reports_its_next_ping_and_is_up_after_it() -> None:
    """The server sets RISING on a peer whose pings the registry counts (``rise:``): the next ping
    is a StateChange to UP, through the same test the ping path always makes (state is not UP)."""
    peer = ServerPeer(0.0, 10.0)
    assert peer.feed(b"ping", 1.0) == b"pong"
    peer.events = None
    peer.state = PeerState.RISING
    assert peer.feed(b"ping", 2.5) == b"pong"
    assert peer.events == [StateChange(PeerState.RISING, PeerState.UP, 1.5)] and peer.state is PeerState.UP
    peer.events = None
    assert peer.feed(b"ping", 3.0) == b"pong" and peer.events is None  # not rising: nothing to report
    peer.state = PeerState.RISING
    assert peer.poll(20.0) == StateChange(PeerState.RISING, PeerState.DEAD, 17.0)
