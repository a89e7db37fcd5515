"""The status socket: binding rules, the request/response server, and ``hbd status`` against real daemons."""

import itertools
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
from daemons import connect, recv_exactly, start_client, start_server
from helpers import drain, status_of, wait_until

from hbd.cli import main
from hbd.control import BindError, RequestServer, UnixListener
from hbd.loop import EventLoop


# -- binding ----------------------------------------------------------------------------------------
def test_socket_mode_stale_replacement_and_live_owner(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    first = UnixListener(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with pytest.raises(BindError, match="in use by another running hbd"):
        UnixListener(path)  # someone answers on it: never taken over
    first.sock.close()  # a crashed daemon leaves its socket file behind
    second = UnixListener(path)  # stale: replaced
    assert os.path.exists(path)
    first.remove()  # the old owner's cleanup must not delete the new socket
    assert os.path.exists(path)
    second.remove()
    assert not os.path.exists(path)
    second.sock.close()
    Path(path).write_text("not a socket")
    with pytest.raises(BindError, match="exists and is not a socket"):
        UnixListener(path)
    assert Path(path).read_text() == "not a socket"


def test_large_reply_is_written_in_slices_without_stalling_the_loop(tmp_path: Path) -> None:
    """A reader that takes its time gets 4 MB while timers keep running on time."""
    loop = EventLoop()
    listener = UnixListener(str(tmp_path / "c.sock"))
    produced = []

    def handler(request: bytes, wake):
        assert request == b"status"
        for i in range(400):
            produced.append(i)
            yield bytes([65 + i % 26]) * 10_000

    server = RequestServer(loop, listener.sock, handler)
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(loop.time())
        loop.call_later(0.01, tick)

    tick()
    client = socket.socket(socket.AF_UNIX)
    client.connect(listener.path)
    client.sendall(b"status\n")
    client.setblocking(False)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # the client does not read yet: only buffers' worth is produced
        loop.run_once(0.01)
    assert len(produced) < 100
    data = drain(loop, client, 0.01, time.monotonic)
    assert len(data) == 4_000_000 and data[:10_000] == b"A" * 10_000
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.1, max(gaps)
    assert not server.conns
    server.close()
    listener.remove()
    loop.close()


def test_a_request_sent_with_the_connect_is_answered_in_the_turn_that_accepts_it(tmp_path: Path) -> None:
    """Accept, request and reply in one loop turn (three before): under a busy supervisor, whose
    turns take seconds at 400,000 clients, that is the status answer's wait."""
    loop = EventLoop()
    listener = UnixListener(str(tmp_path / "c.sock"))
    server = RequestServer(loop, listener.sock, lambda request, wake: iter([b'{"counts": {}}\n']))
    client = socket.socket(socket.AF_UNIX)
    client.connect(listener.path)
    client.sendall(b"status\n")
    loop.run_once(1.0)  # one turn
    client.setblocking(False)
    assert client.recv(1024) == b'{"counts": {}}\n'
    assert not server.conns
    client.close()
    server.close()
    listener.remove()
    loop.close()


def test_request_limits(tmp_path: Path) -> None:
    loop = EventLoop()
    listener = UnixListener(str(tmp_path / "c.sock"))
    server = RequestServer(loop, listener.sock, lambda req, wake: iter([b"ok " + req + b"\n"]), max_request=64)
    socks = []
    for payload in (b"x" * 200, b"hello\n", b"unterminated"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(listener.path)
        s.sendall(payload)
        if payload == b"unterminated":
            s.shutdown(socket.SHUT_WR)
        s.setblocking(False)
        socks.append(s)
    replies = [b""] * 3
    done = [False] * 3
    deadline = time.monotonic() + 5
    while not all(done) and time.monotonic() < deadline:
        loop.run_once(0.01)
        for i, s in enumerate(socks):
            if done[i]:
                continue
            try:
                chunk = s.recv(100)
            except BlockingIOError:
                continue
            replies[i] += chunk
            done[i] = not chunk
    assert replies == [b'{"error": "request too long"}\n', b"ok hello\n", b"ok unterminated\n"]
    server.close()
    loop.close()


def test_a_request_must_arrive_whole_within_the_deadline_however_it_trickles(tmp_path: Path, vclock, vloop) -> None:
    """A byte every second does not keep a connection: the deadline counts from the accept."""
    from hbd.control import REQUEST_DEADLINE

    clock, loop = vclock, vloop
    listener = UnixListener(str(tmp_path / "c.sock"))
    server = RequestServer(loop, listener.sock, lambda req, wake: iter([b"ok\n"]))
    s = socket.socket(socket.AF_UNIX)
    s.connect(listener.path)
    loop.run_once(0)  # accepted
    t0 = clock()
    assert len(server.conns) == 1
    while server.conns and clock() - t0 < 60:
        s.send(b"s")
        loop.run_once(0)
        clock.advance(0.5)
        loop.run_once(0)
    assert not server.conns
    assert REQUEST_DEADLINE <= clock() - t0 <= REQUEST_DEADLINE + 1.0
    assert server.dropped["slow"] == 1
    s.close()
    server.close()
    listener.remove()


def test_a_full_table_makes_room_by_closing_the_oldest_incomplete_request(tmp_path: Path) -> None:
    from hbd.control import MAX_CONNECTIONS

    loop = EventLoop()
    listener = UnixListener(str(tmp_path / "c.sock"), backlog=64)
    server = RequestServer(loop, listener.sock, lambda req, wake: iter([b"ok " + req + b"\n"]))
    slow = []
    for _ in range(MAX_CONNECTIONS + 8):  # more slow ones than slots
        c = socket.socket(socket.AF_UNIX)
        c.connect(listener.path)
        c.send(b"st")
        slow.append(c)
        loop.run_once(0)
    assert len(server.conns) == MAX_CONNECTIONS
    client = socket.socket(socket.AF_UNIX)
    client.connect(listener.path)
    client.sendall(b"status\n")
    client.setblocking(False)
    reply = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        loop.run_once(0.01)
        try:
            chunk = client.recv(100)
        except BlockingIOError:
            continue
        if not chunk:
            break
        reply += chunk
    assert reply == b"ok status\n"
    assert server.dropped["evicted"] >= 9 and server.dropped["refused"] == 0
    for c in [*slow, client]:
        c.close()
    server.close()
    listener.remove()
    loop.close()


# -- against real daemons ---------------------------------------------------------------------------------
def test_status_table_and_json_with_named_and_unnamed_clients(tmp_path: Path, procs, capsys) -> None:
    # 10 s: the legacy peer pings once and must still be UP (late at half the timeout) after the wait for
    # web1's client process to start and ping twice, which takes seconds on a loaded machine.
    srv = start_server(tmp_path, heartbeat_timeout=10)
    cli = start_client(tmp_path, srv.config["port"], client_name="web1", heartbeat_interval=0.2)
    procs += [cli, srv]
    legacy = connect(srv.config["port"])  # a plain ping client: no greeting, known by its address
    legacy.sendall(b"ping")
    assert recv_exactly(legacy, 4) == b"pong"
    legacy_addr = f"127.0.0.1:{legacy.getsockname()[1]}"
    silent = connect(srv.config["port"])  # connected, never pinged: NEW
    sock = tmp_path / "server.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    doc = wait_until(
        lambda: (
            (d := status_of(sock))
            and len(d["peers"]) == 3
            and any(p["name"] == "web1" and p["pings"] >= 2 for p in d["peers"])
            and d
        )
    )
    peers = {p["peer"]: p for p in doc["peers"]}
    assert doc["role"] == "server" and doc["listen"] == f"127.0.0.1:{srv.config['port']}"
    web1 = peers["web1"]
    assert web1["state"] == "UP" and web1["interval"] == 0.2 and web1["timeout"] == 10
    assert web1["last_ping"] <= doc["now"] and doc["now"] - web1["last_ping"] < 1
    assert peers[legacy_addr]["name"] is None and peers[legacy_addr]["state"] == "UP"
    assert peers[legacy_addr]["pings"] == 1
    assert [p["state"] for p in doc["peers"] if p["pings"] == 0] == ["NEW"]
    assert {"time", "event", "peer", "address", "reason"} <= set(doc["recent"][0])

    assert main(["status", "-s", str(sock)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("hbd-server ") and "3 clients" in lines[0]
    header = next(line for line in lines if line.startswith("PEER"))
    assert header.split() == [
        "PEER",
        "ADDRESS",
        "STATE",
        "SINCE",
        "CONNECTED",
        "LAST",
        "PING",
        "PINGS",
        "TIMEOUT",
        "UPTIME",
        "24h",
        "FLAGS",
    ]
    row = next(line for line in lines if line.startswith("web1 "))
    assert " UP " in row and " ago" in row and " 100.00% " in row  # UP since its first ping
    assert any(line.startswith("-") and legacy_addr in line and " UP " in line for line in lines)
    assert main(["status", "-s", str(sock), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["role"] == "server"

    # the client's own socket: the server it pings, with RTTs
    assert main(["status", "client", "-s", str(tmp_path / "client.sock")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("-  "))
    assert f"127.0.0.1:{srv.config['port']}" in row and " UP " in row
    doc = status_of(tmp_path / "client.sock")
    (server,) = doc["servers"]
    assert doc["name"] == "web1" and server["state"] == "UP" and server["rtt_ms"]["last"] is not None
    assert server["rtt_ms"]["max"] >= server["rtt_ms"]["avg"] > 0 and server["pongs"] >= 1
    legacy.close()
    silent.close()


def test_state_changes_late_up_down_on_a_real_server(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=0.6)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    with connect(srv.config["port"]) as s:
        s.sendall(b"hello db1\nping\n")
        recv_exactly(s, 5)
        wait_until(lambda: status_of(sock)["peers"][0]["state"] == "LATE")
        s.sendall(b"ping\n")
        recv_exactly(s, 5)
        wait_until(lambda: status_of(sock)["peers"][0]["state"] == "UP")
        s.settimeout(3)
        assert s.recv(10) == b""  # silent: closed at the timeout
    doc = status_of(sock)
    assert [(p["name"], p["state"], p["reason"]) for p in doc["peers"]] == [("db1", "DOWN", "timeout")]  # remembered
    assert [(e["event"], e["peer"], e["reason"]) for e in doc["recent"]] == [
        ("up", "db1", "first ping"),
        ("late", "db1", "silent"),
        ("up", "db1", "ping"),
        ("late", "db1", "silent"),
        ("down", "db1", "timeout"),
    ]
    assert doc["events"] == {"up": 2, "late": 2, "down": 1, "flapping": 0, "stable": 0}


def test_reload_moves_the_socket_and_stop_removes_it(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    old, new = tmp_path / "server.sock", tmp_path / "moved.sock"
    assert old.exists()
    taken = UnixListener(str(tmp_path / "taken.sock"))  # a path someone else serves: the reload fails
    srv.write_config({**srv.config, "control_socket": taken.path})
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"ERROR .*reload failed: .*taken\.sock is in use by another running hbd")
    assert status_of(old)["reloads"] == {
        "ok": 0,
        "failed": 1,
        "last_error": f"{taken.path} is in use by another running hbd; stop it or choose another control_socket",
    }
    taken.sock.close()
    taken.remove()
    srv.write_config({**srv.config, "control_socket": str(new)})
    srv.signal(signal.SIGHUP)
    srv.wait_for("status socket is now")
    assert new.exists() and not old.exists()
    assert status_of(new)["reloads"]["ok"] == 1
    assert srv.stop() == 0
    assert not new.exists()


def test_status_without_a_daemon_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["status", "-s", str(tmp_path / "nothing.sock")]) == 1
    err = capsys.readouterr().err
    assert "No such file or directory" in err and "is the daemon running?" in err


def test_missing_directory_disables_the_socket_with_an_info_line(tmp_path: Path, procs) -> None:
    # Run by hand there is no /run/hbd: expected, so a terminal line, not a warning in the error log.
    srv = start_server(tmp_path, control_socket=str(tmp_path / "absent" / "server.sock"))
    procs.append(srv)
    srv.wait_for(r"INFO .*no status socket: the directory .*absent does not exist")
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
    log_file = Path(srv.config["log_file"])
    assert "no status socket" not in (log_file.read_text() if log_file.exists() else "")


def test_workers_status_is_one_document(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5)
    procs.append(srv)
    srv.wait_for("2 workers listening")
    socks = [connect(srv.config["port"]) for _ in range(40)]
    for i, s in enumerate(socks):
        s.sendall(b"hello w%d\nping" % i)
    for s in socks:
        assert recv_exactly(s, 4) == b"pong"
    sock = tmp_path / "server.sock"
    assert stat.S_IMODE(os.stat(f"{sock}.1").st_mode) == 0o600  # the workers' own sockets
    # (the workers report their client counts every second)
    doc = wait_until(lambda: (d := status_of(sock)) and sum(w["clients"] for w in d["workers"]) == 40 and d)
    assert sorted(p["name"] for p in doc["peers"]) == sorted(f"w{i}" for i in range(40))
    for w in doc["workers"]:  # each peer is reported by the worker that serves it
        assert sum(p["worker"] == w["index"] for p in doc["peers"]) == w["clients"]
    assert [w["index"] for w in doc["workers"]] == [1, 2]
    for s in socks:
        s.close()
