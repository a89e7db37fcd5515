"""One connection of a client link on its own (hbd.client_session.Session), in virtual time over a
real socketpair: what it sends, when, and what it reports to its owner."""

from __future__ import annotations

import socket

from virtual_time import run_until

from hbd.client_session import Session
from hbd.config import ClientConfig
from hbd.metrics import LinkStats


class Owner:
    def __init__(self, session_of) -> None:
        self.calls: list[tuple] = []
        self.session_of = session_of

    def pongs(self, rtts: list[float], now: float, back: bool, answering: bool) -> None:
        self.calls.append(("pongs", len(rtts), back, answering))

    def late(self, waited: float, pong_timeout: float, now: float) -> None:
        self.calls.append(("late", round(waited, 3), pong_timeout))

    def lost(self, reason: str, peer_caused: bool = False) -> None:
        self.calls.append(("lost", reason, peer_caused))
        self.session_of().close()  # as a Link does


def session(vloop, **cfg: object) -> tuple[Session, Owner, socket.socket, LinkStats]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    config = ClientConfig(**{"heartbeat_interval": 1.0, "pong_timeout": 2.0, "log_file": None, **cfg})  # type: ignore[arg-type]
    stats = LinkStats()
    holder: list[Session] = []
    owner = Owner(lambda: holder[0])
    s = Session(vloop, vloop.time(), ours, config, stats, owner, tls=False)
    holder.append(s)
    s.start(config)
    return s, owner, theirs, stats


def recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return b""


def test_greets_pings_and_counts_pongs(vloop, vclock) -> None:
    s, owner, peer, stats = session(vloop, client_name="web1")
    assert recv(peer) == b"hello web1 1\nping"
    peer.send(b"pong")
    run_until(vloop, vclock, 1000.5)
    assert owner.calls == [("pongs", 1, False, True)] and stats.rtt.count == 1 and stats.pings == 1
    run_until(vloop, vclock, 1001.01)
    assert recv(peer) == b"ping" and stats.pings == 2
    s.close()
    peer.close()


def test_a_silent_server_is_late_then_lost_and_the_session_stops(vloop, vclock) -> None:
    s, owner, peer, stats = session(vloop)
    run_until(vloop, vclock, 1010.0)
    assert [c[0] for c in owner.calls] == ["late", "lost"]
    assert owner.calls[0][1] >= 1.0  # half the pong timeout
    assert owner.calls[1][1].startswith("no pong within 2 s") and stats.timeouts == 1
    assert s.closed and s.timer is None and peer.recv(100)  # what it sent before giving up
    peer.close()


def test_a_late_answer_reports_back_and_eof_is_a_loss(vloop, vclock) -> None:
    s, owner, peer, _ = session(vloop)
    run_until(vloop, vclock, 1001.5)  # the ping at 0 is 1.5 s unanswered: late
    assert [c[0] for c in owner.calls] == ["late"]
    peer.send(b"pong")
    run_until(vloop, vclock, 1001.6)
    assert owner.calls[-1] == ("pongs", 1, True, True)
    while recv(peer):  # read what it sent, so that closing is an EOF, not a reset
        pass
    peer.close()
    run_until(vloop, vclock, 1001.7)
    assert owner.calls[-1] == ("lost", "server closed the connection", False) and s.closed


def test_garbage_from_the_server_is_a_peer_caused_loss(vloop, vclock) -> None:
    s, owner, peer, _ = session(vloop)
    peer.send(b"HTTP/1.1 400 Bad Request\r\n")
    run_until(vloop, vclock, 1000.1)
    assert owner.calls[-1][0] == "lost" and owner.calls[-1][2] is True and s.closed
    peer.close()
