"""hbd-server as a real process on 127.0.0.1, driven through real sockets."""

import socket
import sys
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
    r = subprocess.run(
        [sys.executable, "-m", "hbd", "server", "-c", str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=10
    )
    assert r.returncode == 1
    assert f"cannot open the log file {blocker}/server.log: Not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_startup_error(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    other = start_server.__globals__["HbdProcess"](
        "server", {**srv.config, "log_file": None, "control_socket": str(tmp_path / "b.sock")}, tmp_path, name="b"
    )
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
    try:  # without family= create_server makes an AF_INET socket, which cannot bind ::1
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback (::1): {exc.strerror or exc}")
    srv = start_server(tmp_path, host="::1")
    procs.append(srv)
    with socket.create_connection(("::1", srv.config["port"]), timeout=3) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"


# -- in-process, virtual time: greetings, the deadline wheel, errors in one connection --------------
@pytest.fixture
def virtual_server(vclock, vloop):
    """``virtual_server(**config)`` -> (an in-process Server on the virtual loop, its clock)."""
    import logging

    from hbd.config import ServerConfig
    from hbd.server import Server

    def make(**cfg):
        srv = Server(ServerConfig(**{"heartbeat_timeout": 10.0, **cfg}), loop=vloop)
        logging.getLogger("hbd").setLevel(logging.INFO)
        return srv, vclock

    return make


def _pair(srv) -> tuple:
    a, b = socket.socketpair()
    b.setblocking(False)
    fd = a.fileno()
    srv.on_accept(a, ("127.0.0.1", fd))  # (a plain connection keeps the descriptor, not this object)
    return srv.conns[fd], b


def _drain(b: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := b.recv(65536):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_greeting_churn_keeps_one_wheel_entry_per_connection(virtual_server) -> None:
    """12,500 valid greetings with ever-changing long intervals (the attack that grew the server by
    ~3 MB/s): every connection stays filed once, the wheel's structures stay as small as the
    number of connections, and no announced interval counts beyond max_interval."""
    import random

    srv, clock = virtual_server(max_interval=60.0)
    pairs = [_pair(srv) for _ in range(50)]
    rng = random.Random(15)
    try:
        for conn, b in pairs:
            conn.sock.setblocking(True)
            b.send(b"hello w%d 2\nping" % conn.sock.fileno())
        srv.loop.run_once(0)
        for _ in range(250):
            clock.advance(1.0)  # the rate limit allows one greeting a second
            for conn, b in pairs:
                b.send(b"hello w%d %d\nping" % (conn.sock.fileno(), rng.randint(1, 86399)))
            srv.loop.run_once(0)
            for _, b in pairs:
                _drain(b)
            wheel = srv.liveness.wheel
            assert len(wheel) <= len(pairs)
            assert len(wheel._slots) <= len(pairs)
            assert len(wheel._ticks) <= 2 * len(pairs) + 1025
        assert len(srv.conns) == len(pairs)  # valid messages: nobody was closed
        assert all(c.peer.timeout <= 3 * 60.0 for c, _ in pairs)
    finally:
        for _, b in pairs:
            b.close()
        srv.shutdown()


def test_a_greeting_does_not_postpone_the_first_ping(virtual_server) -> None:
    """`hello x 86399` and nothing else used to hold a slot for three days: the first ping is due
    within heartbeat_timeout whatever the greeting announced."""
    srv, clock = virtual_server(heartbeat_timeout=2.0)
    _conn, b = _pair(srv)
    try:
        t0 = clock()
        b.send(b"hello x 86399\n")
        while srv.conns and clock() < t0 + 100:
            srv.loop.run_once()
        assert not srv.conns
        assert clock() - t0 <= 2.0 + 0.1
    finally:
        b.close()
        srv.shutdown()


def test_an_announced_interval_is_capped_by_max_interval(virtual_server) -> None:
    srv, clock = virtual_server(heartbeat_timeout=2.0, max_interval=5.0)
    conn, b = _pair(srv)
    try:
        b.send(b"hello slow 4\nping")
        srv.loop.run_once(0)
        assert conn.peer.timeout == 12.0  # 3 x 4 s
        clock.advance(1.0)
        b.send(b"hello slow 1000\n")  # a re-greeting (a client reload): capped
        srv.loop.run_once(0)
        assert conn.peer.interval == 1000.0 and conn.peer.timeout == 15.0
        t0 = clock()
        while srv.conns and clock() < t0 + 100:
            srv.loop.run_once()
        assert 15.0 - 1.0 < clock() - t0 + 1.0 <= 15.0 + 0.1  # silent since the ping at t0 - 1
    finally:
        b.close()
        srv.shutdown()


class _Records(list):
    """Log records of the hbd logger (it does not propagate, so caplog does not see them)."""

    def __enter__(self):
        import logging

        from hbd.logs import log

        self.handler = logging.Handler()
        self.handler.emit = self.append  # type: ignore[method-assign]
        log.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        from hbd.logs import log

        log.removeHandler(self.handler)


def test_an_exception_in_one_connection_closes_it_alone(virtual_server) -> None:
    """An unexpected error while handling one connection (read path, then deadline path) closes
    that connection with one logged traceback; the server serves the others."""
    from hbd.connection import Connection

    class Broken(Connection):  # a connection is its peer's protocol state (a ServerPeer)
        __slots__ = ()

        def feed(self, data: bytes, now: float) -> bytes:
            raise RuntimeError("injected bug")

    class BrokenDeadline(Connection):
        __slots__ = ()

        def poll(self, now: float):
            raise RuntimeError("injected bug in the deadline path")

    srv, clock = virtual_server(heartbeat_timeout=2.0)
    (bad, bad_b), (good, good_b), (late, late_b) = _pair(srv), _pair(srv), _pair(srv)
    bad.__class__ = Broken
    late.__class__ = BrokenDeadline
    records = _Records()
    with records:
        try:
            bad_b.send(b"ping")
            good_b.send(b"ping")
            srv.loop.run_once(0)
            assert bad.sock.fileno() == -1 and good.sock.fileno() in srv.conns
            assert good_b.recv(16) == b"pong"
            errors = [r for r in records if "internal error" in r.getMessage()]
            assert len(errors) == 1 and errors[0].exc_info is not None
            assert "injected bug" in str(errors[0].exc_info[1])
            for _ in range(20):  # `late` never pings: its deadline check raises; `good` keeps pinging
                clock.advance(0.5)
                good_b.send(b"ping")
                srv.loop.run_once(0)
                assert good_b.recv(16) == b"pong"
            assert late.sock.fileno() == -1
            assert list(srv.conns.values()) == [good]
            assert len([r for r in records if "internal error" in r.getMessage()]) == 2
        finally:
            for s in (bad_b, good_b, late_b):
                s.close()
            srv.shutdown()


def test_a_plain_connection_keeps_the_c_socket_object_alone(virtual_server) -> None:
    """A plain connection's socket is the C object (48 B), not socket.socket's Python layer over it
    (88 B): non-blocking, the same descriptor, served as any (docs/performance.md, "A leaner
    connection layer")."""
    srv, _clock = virtual_server()
    conn, b = _pair(srv)
    try:
        assert type(conn.sock) is socket.SocketType and conn.sock.gettimeout() == 0.0
        assert sys.getsizeof(conn.sock) < 60
        b.send(b"ping")
        srv.loop.run_once(0)
        assert b.recv(16) == b"pong"
    finally:
        srv.shutdown()
        b.close()
    assert conn.sock.fileno() == -1
