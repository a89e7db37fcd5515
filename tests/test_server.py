"""hbd-server as a real process on 127.0.0.1, driven through real sockets."""

import socket
import time
from pathlib import Path

import pytest
from daemons import connect, recv_exactly, start_server


def test_bare_ping_gets_bare_pong(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):  # no newline, nothing else follows
            s.recv(10)


@pytest.mark.parametrize(
    ("chunks", "reply"),
    [([b"ping\n"], b"pong\n"), ([b"pingping"], b"pongpong"), ([b"pi", b"ng"], b"pong"), ([b"ping\r\n"], b"pong\r\n")],
)
def test_framing_over_real_sockets(tmp_path: Path, procs, chunks, reply) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        for c in chunks:
            s.sendall(c)
            time.sleep(0.05)  # separate reads on the server
        assert recv_exactly(s, len(reply)) == reply


def test_silent_client_is_closed_within_timeout_plus_100ms(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=0.5)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        last = time.monotonic()  # the server heard the ping no later than this
        s.settimeout(5)
        assert s.recv(10) == b""  # EOF: the server really closed the socket
        silent = time.monotonic() - last
    assert silent + 0.01 >= 0.5 and silent <= 0.6, f"closed after {silent:.3f} s"
    srv.wait_for(r"WARNING .*timed out: silent for 0\.5\d* s")


def test_late_warning_before_death(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=0.6)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        srv.wait_for(r"WARNING .*is late: silent for 0\.3")
        s.sendall(b"ping")
        recv_exactly(s, 4)
        srv.wait_for(r"INFO .*is back")


def test_pinging_client_stays_connected(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=0.5)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        for _ in range(12):  # 1.2 s, longer than the timeout
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"pong"
            time.sleep(0.1)
    assert srv.count("timed out") == 0


def test_garbage_and_oversize_close_only_that_client(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=5)
    procs.append(srv)
    port = srv.config["port"]
    good = connect(port)
    with connect(port) as bad:
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
        bad.settimeout(3)
        assert bad.recv(100) == b""
    with connect(port) as flood:
        try:
            flood.sendall(b"a" * 1_000_000)
        except (ConnectionResetError, BrokenPipeError):
            pass
        flood.settimeout(3)
        try:
            assert flood.recv(100) == b""
        except ConnectionResetError:
            pass
    good.sendall(b"ping")
    assert recv_exactly(good, 4) == b"pong"
    good.close()
    first = srv.wait_for(r"WARNING .*closing client .*unexpected bytes")
    srv.wait_for(r"WARNING .*closing client .*unexpected bytes", after=srv.lines.index(first) + 1)
    time.sleep(0.2)
    assert srv.count(r"WARNING .*closing client .*unexpected bytes") == 2  # logged once each


def test_max_clients_refuses_at_once(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, max_clients=2, heartbeat_timeout=5)
    procs.append(srv)
    port = srv.config["port"]
    keep = [connect(port) for _ in range(2)]
    for s in keep:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
    extra = connect(port)
    extra.settimeout(2)
    t0 = time.monotonic()
    try:
        assert extra.recv(10) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - t0 < 1.0
    srv.wait_for(r"WARNING .*refused .*max_clients \(2\) reached")
    keep[0].sendall(b"ping")
    assert recv_exactly(keep[0], 4) == b"pong"
    for s in [*keep, extra]:
        s.close()


def test_error_log_file_holds_warnings_and_errors_only(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=0.3)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        s.settimeout(3)
        s.recv(10)
    srv.wait_for("timed out")
    srv.stop()
    text = (tmp_path / "server.log").read_text()
    assert "timed out" in text and "WARNING" in text
    assert "INFO" not in text and "listening on" not in text and "connected" not in text


def test_unwritable_log_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    from daemons import ROOT, free_port

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"host: 127.0.0.1\nport: {free_port()}\nlog_file: {blocker}/server.log\n")
    r = subprocess.run([sys.executable, "-m", "hbd", "server", "-c", str(cfg)], capture_output=True, text=True,
                       cwd=ROOT, timeout=10)
    assert r.returncode == 1
    assert f"cannot open the log file {blocker}/server.log: Not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_startup_error(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    other = start_server.__globals__["HbdProcess"](
        "server", {**srv.config, "log_file": None, "control_socket": str(tmp_path / "b.sock")}, tmp_path, name="b")
    assert other.proc.wait(10) == 1
    other.stop()
    assert "cannot listen on 127.0.0.1" in other.output() and "Address already in use" in other.output()
    assert "Traceback" not in other.output()


def test_many_clients_in_one_thread(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=5)
    procs.append(srv)
    socks = [connect(srv.config["port"]) for _ in range(200)]
    for s in socks:
        s.sendall(b"ping")
    for s in socks:
        assert recv_exactly(s, 4) == b"pong"
    threads = int(Path(f"/proc/{srv.pid}/status").read_text().split("Threads:")[1].split()[0])
    assert threads == 1
    for s in socks:
        s.close()


def test_ipv6_listener(tmp_path: Path, procs) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0)).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    srv = start_server(tmp_path, host="::1")
    procs.append(srv)
    with socket.create_connection(("::1", srv.config["port"]), timeout=3) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
