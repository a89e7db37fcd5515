"""An end is taken off epoll in the turn that sees its hang-up, closed and reported in later turns'
shares (issue 14): a mass disconnect does not hold back the survivors' pongs, and every end is still
closed and reported, in order, its last data answered as before."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from inprocess import virtual

from hbd import server_ends
from hbd.config import ServerConfig
from hbd.connection import RECV_SIZE
from hbd.server import Server


def config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=30.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )


def greet(srv: Server, line: bytes) -> socket.socket:
    """A new connection that says ``line``, served for a few turns."""
    new = socket.create_connection(srv.address)
    srv.loop.run_once(0)
    new.sendall(line)
    for _ in range(3):
        srv.loop.run_once(0)
    return new


def stop(srv: Server) -> None:
    srv.ops.close()
    srv.shutdown()
    srv.loop.close()


def test_a_survivors_ping_is_answered_before_the_ends_seen_with_it_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 5)
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    ending = [socket.create_connection(srv.address) for _ in range(40)]
    survivor = socket.create_connection(srv.address)
    for _ in range(3):
        loop.run_once(0)  # accepted (32 a turn)
    for i, s in enumerate(ending):
        s.sendall(f"hello host{i:02d}\nping\n".encode())
    survivor.sendall(b"hello survivor\nping\n")
    for _ in range(5):
        loop.run_once(0)
    assert survivor.recv(100) == b"pong\n"
    assert sum(e[1] == "up" for e in events) == 41
    for s in ending:
        s.recv(100)  # its pong: it closes with nothing unread (a FIN, not a reset)
        s.close()
    survivor.sendall(b"ping\n")
    loop.run_once(0)  # sees the 40 hang-ups and the ping
    survivor.settimeout(0)
    assert survivor.recv(100) == b"pong\n"  # answered in this turn
    hung = [conn.peer.name for conn in srv.ending.hung]
    assert len(hung) == 35 and len(srv.conns) == 36  # all off epoll, only a turn's share closed ...
    assert not list(srv.ending) and len([e for e in events if e[1] == "down"]) == 5  # ... and reported
    for _ in range(10):
        loop.run_once(0)
    downs_after = [e[2] for e in events if e[1] == "down"]
    assert len(srv.conns) == 1 and not srv.ending.hung
    assert downs_after[5:] == hung  # all of them, in the order they hung up
    assert sorted(downs_after) == [f"host{i:02d}" for i in range(40)]
    survivor.close()
    stop(srv)


def test_a_reconnect_of_the_same_name_sees_its_old_end_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 0)  # nothing worked off but what must be
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    old = socket.create_connection(srv.address)
    loop.run_once(0)
    old.sendall(b"hello web1\nping\n")
    for _ in range(3):
        loop.run_once(0)
    old.close()
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.ending.hung) == 1 and len(srv.conns) == 1  # off epoll, still open, its end queued
    new = greet(srv, b"hello web1\nping\n")
    assert [(e[1], e[2]) for e in events if e[2] == "web1"] == [("up", "web1"), ("down", "web1"), ("up", "web1")]
    assert not srv.ending and not any(srv.is_open(conn) for conn in srv.ending.hung)  # (skipped in their turn)
    new.close()
    stop(srv)


def test_what_a_peer_sent_before_its_end_is_answered_as_before(tmp_path: Path) -> None:
    """Data and the end in one event (a greeting and a last ping, then a close): read and answered at
    the close, as when every end was read from the loop; then the end."""
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    last = socket.create_connection(srv.address)
    loop.run_once(0)
    last.sendall(b"hello brief\nping\n")
    last.shutdown(socket.SHUT_WR)  # its end is in the kernel before the server reads a byte
    for _ in range(3):
        loop.run_once(0)
    last.settimeout(5)
    assert last.recv(100) == b"pong\n"
    assert last.recv(100) == b""  # closed after the answer
    assert [(e[1], e[2]) for e in events if e[2] == "brief"] == [("up", "brief"), ("down", "brief")]
    assert not srv.conns and not srv.ending.hung
    last.close()
    stop(srv)


def test_while_select_returns_full_batches_a_turn_closes_only_a_small_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """60 ends and a survivor's ping behind them, 8 events a select(): each turn takes 8 off epoll and
    closes at most ENDS_WHEN_BUSY; the ping is answered within ceil(61 / 8) turns, before most ends
    are closed; once select() is no longer full, the rest are closed ENDS_PER_TURN a turn."""
    monkeypatch.setattr(server_ends, "ENDS_WHEN_BUSY", 2)
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 20)
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    ending = [socket.create_connection(srv.address) for _ in range(60)]
    survivor = socket.create_connection(srv.address)
    for _ in range(3):
        loop.run_once(0)
    for i, s in enumerate(ending):
        s.sendall(f"hello host{i:02d}\nping\n".encode())
    survivor.sendall(b"hello survivor\nping\n")
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.conns) == 61 and sum(e[1] == "up" for e in events) == 61
    assert survivor.recv(100) == b"pong\n"
    monkeypatch.setattr(loop.selector, "max_events", 8)
    for s in ending:
        s.recv(100)
        s.close()
    survivor.sendall(b"ping\n")
    survivor.settimeout(0)
    closed, turns = [], 0
    while True:
        before = len(srv.conns)
        loop.run_once(0)
        turns += 1
        closed.append(before - len(srv.conns))
        try:
            if survivor.recv(100) == b"pong\n":
                break
        except BlockingIOError:
            pass
        assert turns < 8, closed
    # full batches: a small share closed in each turn; the last, not full, closes a full turn's share
    assert all(n <= 2 for n in closed[:-1]) and closed[-1] <= 20, closed
    assert len(srv.ending.hung) == 60 - sum(closed) >= 60 - 2 * (turns - 1) - 20
    while srv.ending.hung or list(srv.ending):
        before = len(srv.conns)
        loop.run_once(0)
        assert before - len(srv.conns) <= 20
    assert len(srv.conns) == 1 and sum(e[1] == "down" for e in events) == 60
    survivor.close()
    stop(srv)


def test_a_peer_that_sent_more_than_a_close_reads_before_its_end_is_read_the_usual_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More data before the end than READS_AT_END reads take: the rest is read from the loop again,
    every ping answered, then the end."""
    monkeypatch.setattr(server_ends, "READS_AT_END", 1)
    pings = 3 * RECV_SIZE // 5  # three reads' worth (a read's size is a constant in on_read: RECV_SIZE)
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    chatty = socket.create_connection(srv.address)
    loop.run_once(0)
    chatty.sendall(b"hello chatty\n" + b"ping\n" * pings)
    chatty.shutdown(socket.SHUT_WR)
    for _ in range(10):
        loop.run_once(0)
    chatty.settimeout(5)
    got = b""
    while data := chatty.recv(1000):
        got += data
    assert got == b"pong\n" * pings
    assert [(e[1], e[2]) for e in events if e[2] == "chatty"] == [("up", "chatty"), ("down", "chatty")]
    assert not srv.conns
    chatty.close()
    stop(srv)


def test_a_greeting_works_off_only_the_ends_of_its_name_unless_a_name_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect storm right after a mass disconnect: a greeting must not pay for every queued end
    (the first one would make one long turn). Ends of other names stay queued; its own name's is
    closed and reported first; a connection without a greeting name (its identity may be its
    address) still works off everything, in order."""
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 0)  # nothing worked off but what must be
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    old = [socket.create_connection(srv.address) for _ in range(3)]
    for _ in range(2):
        loop.run_once(0)
    for name, s in zip(("a", "b", "c"), old, strict=True):
        s.sendall(f"hello {name}\nping\n".encode())
    for _ in range(3):
        loop.run_once(0)
    for s in old:
        s.recv(100)
        s.close()
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.ending.hung) == 3 and not [e for e in events if e[1] == "down"]

    d = greet(srv, b"hello d\nping\n")
    assert not [e for e in events if e[1] == "down"]  # nothing of a, b, c was needed
    b = greet(srv, b"hello b\nping\n")
    assert [(e[1], e[2]) for e in events if e[2] == "b"] == [("up", "b"), ("down", "b"), ("up", "b")]
    assert [e[2] for e in events if e[1] == "down"] == ["b"]
    legacy = greet(srv, b"ping\n")  # no name: it may be anyone's address
    assert sorted(e[2] for e in events if e[1] == "down") == ["a", "b", "c"]
    assert not srv.ending
    for s in (d, b, legacy):
        s.close()
    stop(srv)


def test_a_greeting_works_off_the_nameless_ends_but_not_the_other_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ends queued after a partition, one of them without a greeting name (its greeting still unread at
    its hang-up, or it never greeted): a new greeting closes that one (and reports it if it still has no
    name) and its own name's end, not every queued end: at 100,000 clients a worker's greeting or
    change after the partition made one turn of all its 16,000 ends (390 ms of CPU). What the nameless
    one said before its end is heard first: a greeting there makes its end that name's."""
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 0)  # nothing worked off but what must be
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    old = [socket.create_connection(srv.address) for _ in range(4)]
    for _ in range(2):
        loop.run_once(0)
    for name, s in zip(("a", "b", "c"), old[:3], strict=True):
        s.sendall(f"hello {name}\nping\n".encode())
    for _ in range(3):
        loop.run_once(0)
    for s in old[:3]:
        s.recv(100)
        s.close()
    old[3].sendall(b"hello e\nping\n")  # its greeting and its end in one event: not read at the hang-up
    old[3].close()
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.ending.hung) == 4 and srv.ending.unnamed == 1 and not [e for e in events if e[1] == "down"]

    d = greet(srv, b"hello d\nping\n")
    assert [(e[1], e[2]) for e in events if e[2] == "e"] == [("up", "e")]  # the nameless one's data heard ...
    assert srv.ending.unnamed == 0  # ... its end now queued as e's
    assert not [e for e in events if e[1] == "down"]  # a, b, c, e stay queued
    b = greet(srv, b"hello b\nping\n")
    assert [(e[1], e[2]) for e in events if e[2] == "b"] == [("up", "b"), ("down", "b"), ("up", "b")]
    assert [e[2] for e in events if e[1] == "down"] == ["b"]
    for s in (d, b):
        s.close()
    stop(srv)


def test_a_reconnect_sees_its_old_end_first_when_that_greeting_was_unread_at_the_hang_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 0)
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    other = socket.create_connection(srv.address)
    old = socket.create_connection(srv.address)
    for _ in range(2):
        loop.run_once(0)
    other.sendall(b"hello other\nping\n")
    for _ in range(3):
        loop.run_once(0)
    other.recv(100)
    other.close()
    old.sendall(b"hello web1\nping\n")
    old.close()
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.ending.hung) == 2 and srv.ending.unnamed == 1
    new = greet(srv, b"hello web1\nping\n")
    assert [(e[1], e[2]) for e in events if e[2] == "web1"] == [("up", "web1"), ("down", "web1"), ("up", "web1")]
    assert not [e for e in events if e[2] == "other" and e[1] == "down"]  # another name's end stays queued
    new.close()
    stop(srv)


def test_once_select_is_no_longer_full_a_turn_closes_and_reports_a_bounded_share(tmp_path: Path) -> None:
    """A partition's ends queued, nothing else ready: each turn closes and reports at most
    ENDS_PER_TURN (64) of them, oldest first, until none is left (256 a turn were 42-44 ms of a
    worker's CPU in a 100,000-client teardown on the loaded machine)."""
    srv, _clock, events = virtual(Server, config(tmp_path))
    loop = srv.loop
    ending = [socket.create_connection(srv.address) for _ in range(200)]
    for _ in range(8):
        loop.run_once(0)  # accepted (32 a turn)
    for i, s in enumerate(ending):
        s.sendall(f"hello host{i:03d}\nping\n".encode())
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.conns) == 200
    for s in ending:
        s.recv(100)
        s.close()
    shares: list[int] = []
    while srv.conns or srv.ending.hung or list(srv.ending):
        before = len(srv.conns)
        loop.run_once(0)
        shares.append(before - len(srv.conns))
        assert len(shares) < 20, shares
    assert max(shares) <= 64 and sum(shares) == 200, shares
    assert sum(e[1] == "down" for e in events) == 200
    stop(srv)
