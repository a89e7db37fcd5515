"""Ends are closed in the turn that reads them and reported after its I/O (issue 14): a mass
disconnect does not hold back the survivors' pongs, and every end is still reported, in order."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from inprocess import virtual

from hbd import server_ends
from hbd.config import ServerConfig
from hbd.server import Server


def test_a_survivors_ping_is_answered_before_the_ends_read_with_it_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 5)
    cfg = ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=30.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )
    srv, _clock, events = virtual(Server, cfg)
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
        s.close()
    survivor.sendall(b"ping\n")
    loop.run_once(0)  # reads the 40 ends and the ping
    survivor.settimeout(0)
    assert survivor.recv(100) == b"pong\n"  # answered in this turn
    assert len(srv.conns) == 1  # the ends are closed now ...
    queued = [conn.peer.name for conn, _, _ in srv.ending]
    downs = [e[2] for e in events if e[1] == "down"]
    assert len(downs) == 5 and len(queued) == 35  # ... and only a turn's share reported
    for _ in range(10):
        loop.run_once(0)
    downs_after = [e[2] for e in events if e[1] == "down"]
    assert downs_after[5:] == queued  # all of them, in the order they were read
    assert sorted(downs_after) == [f"host{i:02d}" for i in range(40)]
    survivor.close()
    srv.ops.close()
    srv.shutdown()
    loop.close()


def test_a_reconnect_of_the_same_name_sees_its_old_end_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_ends, "ENDS_PER_TURN", 0)  # nothing worked off but what must be
    cfg = ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=30.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )
    srv, _clock, events = virtual(Server, cfg)
    loop = srv.loop
    old = socket.create_connection(srv.address)
    loop.run_once(0)
    old.sendall(b"hello web1\nping\n")
    for _ in range(3):
        loop.run_once(0)
    old.close()
    for _ in range(3):
        loop.run_once(0)
    assert len(srv.ending) == 1 and not srv.conns  # closed, its end still queued
    new = socket.create_connection(srv.address)
    loop.run_once(0)
    new.sendall(b"hello web1\nping\n")
    for _ in range(3):
        loop.run_once(0)
    assert [(e[1], e[2]) for e in events if e[2] == "web1"] == [("up", "web1"), ("down", "web1"), ("up", "web1")]
    assert not srv.ending
    new.close()
    srv.ops.close()
    srv.shutdown()
    loop.close()
