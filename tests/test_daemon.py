"""Signals, reload and sd_notify, on real processes with real signals and a real notify socket."""

import itertools
import signal
import socket
import time
from pathlib import Path

import pytest
from daemons import HbdProcess, connect, free_port, recv_exactly, start_client, start_server
from helpers import NotifySocket


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_on_sigterm_and_sigint(tmp_path: Path, sig: int) -> None:
    srv = start_server(tmp_path)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        srv.signal(sig)
        assert srv.proc.wait(5) == 0
        s.settimeout(2)
        assert s.recv(10) == b""  # its clients were closed, not abandoned
    srv.stop()
    assert "hbd-server stopped" in srv.output() and "Traceback" not in srv.output()


def test_client_stops_cleanly_on_sigterm(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"])
    cli.wait_for("pong from")
    cli.signal(signal.SIGTERM)
    assert cli.proc.wait(5) == 0
    cli.stop()
    srv.wait_for("disconnected")


def test_reload_applies_new_timeout_to_connected_clients(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=30)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        srv.write_config({**srv.config, "heartbeat_timeout": 0.5})
        mark = srv.mark()
        srv.signal(signal.SIGHUP)
        srv.wait_for(r"INFO .*heartbeat_timeout is now 0\.5 s", after=mark)
        srv.wait_for(r"INFO .*reloaded", after=mark)
        s.settimeout(5)
        assert s.recv(10) == b""  # silent for > 0.5 s since the ping: closed under the new rule
    srv.wait_for(r"timed out: silent for .* \(heartbeat_timeout 0\.5 s\)")
    assert srv.proc.poll() is None


def test_reload_with_broken_config_keeps_the_old_one(tmp_path: Path, procs) -> None:
    notify = NotifySocket(tmp_path)
    srv = start_server(tmp_path, env={"NOTIFY_SOCKET": notify.path})
    procs.append(srv)
    notify.wait_for("READY=1")
    good = dict(srv.config)
    for broken, expected in [
        ("port: [unclosed\n", r"ERROR .*reload failed: .*srv\.yaml: line 2, column 1: invalid YAML"),
        ("port: 0\n", r"ERROR .*reload failed: .*srv\.yaml: line 1: port: must be between 1 and 65535, got 0"),
        ("colour: blue\n", r"ERROR .*reload failed: .*srv\.yaml: line 1: colour: unknown key"),
    ]:
        srv.config_path.with_name("srv.yaml")
        srv.config_path.write_text(broken)
        mark = srv.mark()
        srv.signal(signal.SIGHUP)
        srv.wait_for(expected.replace("srv", "server"), after=mark)
        srv.wait_for("still running with the previous configuration", after=mark)
        with connect(good["port"]) as s:  # still serving on the old port
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"pong"
    notify.wait_for("last reload failed")
    srv.config_path.unlink()
    srv.signal(signal.SIGHUP)
    srv.wait_for("cannot read the file: No such file or directory")
    srv.write_config(good)
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    srv.wait_for("INFO .*reloaded", after=mark)
    notify.close()


def test_reload_rebinds_to_a_new_port(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    old, new = srv.config["port"], free_port()
    srv.write_config({**srv.config, "port": new})
    srv.signal(signal.SIGHUP)
    srv.wait_for(f"now listening on 127.0.0.1:{new}")
    with connect(new) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
    with pytest.raises(ConnectionRefusedError):
        connect(old)


def test_reload_to_a_busy_port_keeps_the_old_listener(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    busy = socket.create_server(("127.0.0.1", 0))
    old = srv.config["port"]
    try:
        srv.write_config({**srv.config, "port": busy.getsockname()[1]})
        srv.signal(signal.SIGHUP)
        srv.wait_for(r"ERROR .*reload failed: cannot listen on 127\.0\.0\.1:\d+: Address already in use")
        with connect(old) as s:
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"pong"
    finally:
        busy.close()


def test_client_reload_applies_new_interval(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=5)
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"], heartbeat_interval=1.0, pong_timeout=3)
    procs.append(cli)
    cli.wait_for("pong from")
    cli.write_config({**cli.config, "heartbeat_interval": 0.1, "pong_timeout": 0.5})
    cli.signal(signal.SIGHUP)
    t0, _ = cli.wait_for("reloaded")
    time.sleep(1.0)
    n = sum(1 for t, line in cli.lines if t > t0 and "pong from" in line)
    assert n >= 5, cli.output()


def test_sd_notify_protocol(tmp_path: Path, procs) -> None:
    notify = NotifySocket(tmp_path)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    port = free_port()
    srv = HbdProcess(
        "server", {"host": "127.0.0.1", "port": port, "heartbeat_timeout": 5, "log_file": None}, tmp_path, env=env
    )
    procs.append(srv)
    _, ready = notify.wait_for("READY=1")
    assert "STATUS=0 clients, 0 late" in ready
    with connect(port) as s:  # READY=1 came after the listener was up
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        notify.wait_for("STATUS=1 client, 0 late", timeout=3)
    notify.wait_for("WATCHDOG=1")
    pets = notify.collect("WATCHDOG=1", seconds=1.0)
    gaps = [b - a for a, b in itertools.pairwise(pets)]
    assert len(pets) >= 4 and max(gaps) < 0.35, gaps  # every WATCHDOG_USEC/2 = 0.2 s
    srv.signal(signal.SIGHUP)
    _, reloading = notify.wait_for("RELOADING=1")
    usec = int(reloading.split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
    notify.wait_for("READY=1")
    srv.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert srv.proc.wait(5) == 0
    notify.close()


def test_no_notify_socket_no_problem(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, env={"WATCHDOG_USEC": "100000"})
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"


def test_server_stall_does_not_kill_pinging_clients(tmp_path: Path, procs) -> None:
    """SIGSTOP the server for 2x heartbeat_timeout: clients that kept pinging are not declared dead."""
    srv = start_server(tmp_path, heartbeat_timeout=0.5)
    procs.append(srv)
    socks = [connect(srv.config["port"]) for _ in range(5)]
    for s in socks:
        s.sendall(b"ping")
        recv_exactly(s, 4)
    srv.signal(signal.SIGSTOP)
    sent = 0
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end:
        for s in socks:
            s.sendall(b"ping")
        sent += 1
        time.sleep(0.1)
    srv.signal(signal.SIGCONT)
    for s in socks:
        s.settimeout(3)
        got = b""
        while len(got) < 4 * sent:
            chunk = s.recv(100)
            assert chunk, "the server closed a client that kept pinging"
            got += chunk
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
    srv.wait_for("event loop stalled")
    assert srv.count("timed out") == 0
    for s in socks:
        s.close()


def test_client_status_says_down_why_and_when_it_retries(tmp_path: Path, procs) -> None:
    notify = NotifySocket(tmp_path)
    port = free_port()  # nothing listens there
    cli = start_client(tmp_path, port, reconnect_delay=3, reconnect_max_delay=3, env={"NOTIFY_SOCKET": notify.path})
    procs.append(cli)
    _, status = notify.wait_for(f"STATUS=127.0.0.1:{port} DOWN (connection refused), retry in ", timeout=5)
    delay = float(status.split("retry in ")[1].split()[0])
    assert 0.0 <= delay <= 3.0, status  # counts down from the (jittered) 3 s backoff, refreshed every second
    notify.close()
