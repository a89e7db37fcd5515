"""State changes as the status document and the hooks see them, with virtual time.

The daemons run in this process on a loop whose clock only moves when it would otherwise wait
(tests/virtual_time.py), with real loopback sockets, so every transition happens at an exact time.
"""

import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import document, run_until, virtual

from hbd import status
from hbd.client import Client
from hbd.config import ClientConfig, ServerConfig
from hbd.server import WHEEL_RESOLUTION, Server
from hbd.view import PeerRow


def test_server_up_late_up_down_in_virtual_time(tmp_path: Path) -> None:
    cfg = ServerConfig(
        host="127.0.0.1", port=0, heartbeat_timeout=4.0, log_file=None, control_socket=str(tmp_path / "s.sock")
    )
    srv, clock, events = virtual(Server, cfg)
    loop = srv.loop
    c = socket.create_connection(srv.address)
    loop.run_once(0)  # accept
    assert document(srv)["peers"][0]["state"] == "NEW"
    c.sendall(b"hello app1\nping")
    loop.run_once(0)
    assert c.recv(4) == b"pong"
    run_until(loop, clock, 1.0)
    assert document(srv)["peers"][0]["state"] == "UP"
    run_until(loop, clock, 2.5)  # silent for more than half of 4 s
    doc = document(srv)
    assert doc["peers"][0]["state"] == "LATE" and doc["peers"][0]["name"] == "app1"
    c.sendall(b"ping")
    loop.run_once(0)
    assert c.recv(4) == b"pong"
    run_until(loop, clock, 3.0)
    assert document(srv)["peers"][0]["state"] == "UP"
    run_until(loop, clock, 8.0)  # last ping at 2.5: dead just after 6.5
    # a named peer is remembered (issue 12): DOWN, since when and why
    [peer] = document(srv)["peers"]
    assert (peer["name"], peer["state"], peer["reason"], peer["connected"]) == ("app1", "DOWN", "timeout", None)
    assert c.recv(10) == b""
    assert [e[1:] for e in events] == [
        ("up", "app1", "first ping"),
        ("late", "app1", "silent"),
        ("up", "app1", "ping"),
        ("late", "app1", "silent"),
        ("down", "app1", "timeout"),
    ]
    times = [e[0] for e in events]
    # verdicts come at their deadline, at most one deadline-wheel slot (WHEEL_RESOLUTION) later
    assert times[2] == 2.5
    for got, deadline in zip([times[1], times[3], times[4]], [2.0, 4.5, 6.5], strict=True):
        assert deadline <= got <= deadline + WHEEL_RESOLUTION + 1e-9, times
    c.close()
    srv.ops.close()
    srv.shutdown()
    loop.close()


def test_announced_interval_stretches_the_timeout(tmp_path: Path) -> None:
    cfg = ServerConfig(host="127.0.0.1", port=0, heartbeat_timeout=4.0, log_file=None, control_socket=None)
    srv, clock, events = virtual(Server, cfg)
    loop = srv.loop
    c = socket.create_connection(srv.address)
    loop.run_once(0)
    c.sendall(b"hello slow 5\nping")  # pings every 5 s: may be silent for 15 s, not 4
    loop.run_once(0)
    run_until(loop, clock, 14.0)
    assert [e[1] for e in events] == ["up", "late"] and 7.5 <= events[1][0] <= 7.5 + WHEEL_RESOLUTION + 1e-9
    assert document(srv)["peers"][0]["timeout"] == 15.0
    run_until(loop, clock, 16.0)
    assert [e[1] for e in events] == ["up", "late", "down"]
    assert 15.0 <= events[2][0] <= 15.0 + WHEEL_RESOLUTION + 1e-9
    c.close()
    srv.shutdown()
    loop.close()


def test_unreported_peer_never_fires(tmp_path: Path) -> None:
    """A connection that never pings (a port scan) is closed at its timeout without any event."""
    cfg = ServerConfig(host="127.0.0.1", port=0, heartbeat_timeout=2.0, log_file=None, control_socket=None)
    srv, clock, events = virtual(Server, cfg)
    c = socket.create_connection(srv.address)
    run_until(srv.loop, clock, 3.0)
    assert c.recv(10) == b"" and events == []
    c.close()
    srv.shutdown()
    srv.loop.close()


def test_client_up_late_up_down_in_virtual_time() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cfg = ClientConfig(
        servers=(),
        host="127.0.0.1",
        port=port,
        heartbeat_interval=1.0,
        pong_timeout=3.0,
        reconnect_delay=10.0,
        reconnect_max_delay=10.0,
        log_file=None,
        control_socket=None,
    )
    cli, clock, events = virtual(Client, cfg)
    loop = cli.loop
    loop.run_once(0)  # connected
    peer, _ = listener.accept()
    loop.run_once(0)
    assert peer.recv(4) == b"ping"
    peer.sendall(b"pong")
    run_until(loop, clock, 0.5)
    doc = document(cli)
    assert doc["servers"][0]["state"] == "UP" and doc["servers"][0]["rtt_ms"]["last"] < 0.01
    # the next ping (at 1.0) goes unanswered: LATE at 2.5 (half of pong_timeout)
    run_until(loop, clock, 2.4)
    assert document(cli)["servers"][0]["state"] == "UP"
    run_until(loop, clock, 2.6)
    assert document(cli)["servers"][0]["state"] == "LATE"
    assert peer.recv(8) == b"pingping"  # the pings of 1.0 and 2.0
    peer.sendall(b"pongpong")
    loop.run_once(0)
    assert document(cli)["servers"][0]["state"] == "UP"
    run_until(loop, clock, 7.0)  # pings at 3, 4, 5 unanswered: late at 4.5, dead at 6.0
    doc = document(cli)
    assert doc["servers"][0]["state"] == "DOWN"  # until a pong on a new connection
    assert doc["servers"][0]["pong_timeouts"] == 1 and doc["servers"][0]["pongs"] == 3
    assert [e[1:3] for e in events] == [(ev, f"127.0.0.1:{port}") for ev in ("up", "late", "up", "late", "down")]
    assert [e[0] for e in events] == [0.0, 2.5, 2.6, 4.5, 6.0]
    peer.close()
    listener.close()
    cli.shutdown()
    loop.close()


_times = st.none() | st.floats(-1e6, 1e6, allow_nan=False)
_text = st.text(max_size=12)  # any text: quotes, backslashes, control characters, non-ASCII


@settings(max_examples=300, deadline=None)
@given(
    row=st.builds(
        PeerRow,
        peer=_text,
        name=st.none() | _text,
        address=_text,
        state=st.sampled_from(["NEW", "UP", "LATE", "DOWN"]),
        connected=_times,
        last_ping=_times,
        pings=st.integers(0, 10**12),
        timeout=st.floats(0.1, 1e5) | st.integers(1, 10**5),
        interval=st.none() | st.floats(0.1, 1e5) | st.integers(1, 10**5),
        worker=st.none() | st.integers(0, 64),
        since=_times,
        reason=st.none() | _text,
        expected=st.none() | st.booleans(),
        silenced_until=_times,
        flags=st.frozensets(st.sampled_from(["flapping", "pending"])),
        labels=st.lists(st.tuples(_text, _text), max_size=3).map(tuple),
        uptime_24h=st.none() | st.floats(0, 100),
        outages=st.none() | st.integers(0, 10**6),
        down_seconds=st.none() | st.floats(0, 1e7),
    ),
    now=st.floats(0, 1e6),
)
def test_a_rows_json_is_the_documents_text(row: PeerRow, now: float) -> None:
    """status.peer_json writes a row's JSON itself (the listing's hot path): the same text as
    json.dumps of status.peer_doc, for any row."""
    clock = status.Clock(now)
    assert status.peer_json(row, clock) == status._dumps(status.peer_doc(row, clock))


def test_a_rows_json_refuses_what_json_refuses() -> None:
    clock = status.Clock(0.0)
    row = PeerRow("a", "a", "1.2.3.4:5", "UP", None, None, 0, float("inf"), None)
    with pytest.raises(ValueError):
        status._dumps(status.peer_doc(row, clock))
    with pytest.raises(ValueError):
        status.peer_json(row, clock)
