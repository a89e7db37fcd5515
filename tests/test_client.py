"""hbd-client as a real process against hbd-server and against a minimal legacy server."""

import signal
import socket
import threading
import time
from pathlib import Path

from daemons import free_port, start_client, start_server


class LegacyServer:
    """The kind of server existing users run: answers b"ping" with a bare b"pong", nothing else."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.pings = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop:
                data = conn.recv(4)
                if data != b"ping":
                    return
                self.pings += 1
                conn.sendall(b"pong")

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_client_and_server_exchange_heartbeats(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    cli = start_client(tmp_path, srv.config["port"])
    procs += [cli, srv]
    cli.wait_for(r"INFO .*connected to 127\.0\.0\.1")
    for _ in range(3):
        cli.wait_for(r"INFO .*pong from 127\.0\.0\.1:\d+ in \d+\.\d ms", after=cli.mark())
    srv.wait_for(r"INFO .*client 127\.0\.0\.1:\d+ connected")


def test_client_works_with_a_bare_pong_legacy_server(tmp_path: Path, procs) -> None:
    legacy = LegacyServer()
    try:
        cli = start_client(tmp_path, legacy.port)
        procs.append(cli)
        for _ in range(3):
            cli.wait_for(r"pong from", after=cli.mark())
        assert legacy.pings >= 3
        assert cli.count("lost") == 0
    finally:
        legacy.close()


def test_line_wire_and_greeting(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    cli = start_client(tmp_path, srv.config["port"], wire="line", client_name="web1")
    procs += [cli, srv]
    srv.wait_for(r"client 127\.0\.0\.1:\d+ is web1 \(interval 0\.2 s\)")
    cli.wait_for("pong from")
    cli.stop()
    srv.wait_for(r"client web1 \(127\.0\.0\.1:\d+\) disconnected")


def test_client_detects_a_frozen_server_and_recovers(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=3)
    cli = start_client(tmp_path, srv.config["port"], heartbeat_interval=0.2, pong_timeout=0.6)
    procs += [cli, srv]
    cli.wait_for("pong from")
    mark = cli.mark()
    srv.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    t_lost, line = cli.wait_for(r"WARNING .*lost: no pong within 0\.6 s", after=mark)
    unanswered = float(line.split("ping unanswered for ")[1].split(" s")[0])
    assert 0.6 <= unanswered <= 0.6 + 0.1, line  # detected within pong_timeout + 100 ms of the ping
    # and that ping left within one interval of the freeze (generous bound for a loaded machine)
    assert t_lost - stopped <= 0.2 + 0.6 + 0.5, line
    mark = cli.mark()
    srv.signal(signal.SIGCONT)
    cli.wait_for("pong from", timeout=5, after=mark)


def test_client_reconnects_after_server_restart(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    port = srv.config["port"]
    cli = start_client(tmp_path, port)
    procs.append(cli)
    cli.wait_for("pong from")
    srv.kill()
    cli.wait_for(r"lost: server closed the connection|lost: connection error")
    cli.wait_for(r"reconnecting to 127\.0\.0\.1:\d+ in \d", after=0)
    time.sleep(0.5)
    srv2 = start_server(tmp_path, name="server2", port=port)
    procs.append(srv2)
    mark = cli.mark()
    cli.wait_for("connected to", timeout=5, after=mark)
    cli.wait_for("pong from", after=mark)


def test_reconnect_attempts_gives_up_with_exit_79(tmp_path: Path, procs) -> None:
    cli = start_client(tmp_path, free_port(), reconnect_attempts=2)
    procs.append(cli)
    assert cli.proc.wait(10) == 79
    out = cli.output()
    assert out.count("cannot connect: Connection refused") == 3  # the first try + 2 reconnects
    assert "ERROR   giving up on 127.0.0.1:" in out and "after 2 failed reconnect attempts" in out


def test_connect_timeout(tmp_path: Path, procs) -> None:
    # A listener whose backlog is full never completes new handshakes: the connect must time out.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(blocker.getsockname())
        fillers.append(f)
    time.sleep(0.1)
    try:
        cli = start_client(tmp_path, blocker.getsockname()[1], receive_timeout=0.3, reconnect_attempts=1)
        procs.append(cli)
        assert cli.proc.wait(10) == 79
        assert "connect timed out after 0.3 s" in cli.output()
    finally:
        for f in fillers:
            f.close()
        blocker.close()


# -- several servers ------------------------------------------------------------------------------------
def test_several_servers_one_down_with_hooks_and_status(tmp_path: Path, procs) -> None:
    import json

    from hbd.control import query

    srv = start_server(tmp_path)
    procs.append(srv)
    backup_port = free_port()
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$HBD_EVENT $HBD_PEER $HBD_ADDRESS $HBD_ROLE" >> {tmp_path}/events\n')
    hook.chmod(0o755)
    cli = start_client(
        tmp_path,
        srv.config["port"],
        on_change=str(hook),
        servers=[
            {"host": "127.0.0.1", "name": "main"},
            {"host": "127.0.0.1", "port": backup_port, "name": "backup"},
        ],
    )
    procs.append(cli)
    cli.wait_for(r"pong from main \(127\.0\.0\.1:\d+\)")
    cli.wait_for(rf"backup \(127\.0\.0\.1:{backup_port}\): cannot connect: Connection refused")
    doc = json.loads(query(str(tmp_path / "client.sock"), "status"))
    states = {s["peer"]: s["state"] for s in doc["servers"]}
    assert states == {"main": "UP", "backup": "DOWN"}
    for _ in range(3):  # the dead one does not disturb the live one
        cli.wait_for("pong from main", after=cli.mark())

    backup = start_server(tmp_path, name="backup", port=backup_port)  # it comes back
    procs.append(backup)
    cli.wait_for(r"pong from backup", timeout=5)
    events = tmp_path / "events"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "up backup" not in events.read_text():
        time.sleep(0.05)
    lines = events.read_text().splitlines()
    assert f"down backup 127.0.0.1:{backup_port} client" in lines
    assert f"up main 127.0.0.1:{srv.config['port']} client" in lines
    assert lines[-1] == f"up backup 127.0.0.1:{backup_port} client"
    assert cli.count("lost") == 0


def test_reload_adds_a_server_without_touching_the_others(tmp_path: Path, procs) -> None:
    a = start_server(tmp_path, name="a")
    b = start_server(tmp_path, name="b")
    cli = start_client(tmp_path, a.config["port"])
    procs += [cli, a, b]
    cli.wait_for("pong from")
    config = {k: v for k, v in cli.config.items() if k != "host"}
    cli.write_config(
        {
            **config,
            "servers": [
                {"host": "127.0.0.1", "port": a.config["port"]},
                {"host": "127.0.0.1", "port": b.config["port"], "name": "b"},
            ],
        }
    )
    mark = cli.mark()
    cli.signal(signal.SIGHUP)
    cli.wait_for(r"now also pinging b \(127\.0\.0\.1", after=mark)
    cli.wait_for(r"pong from b ", after=mark)
    assert cli.count("lost", after=mark) == 0 and cli.count("connected to 127", after=mark) == 0
    b.wait_for("is web|connected")


def test_exit_79_only_when_every_server_gave_up(tmp_path: Path, procs) -> None:
    cli = start_client(
        tmp_path,
        free_port(),
        reconnect_attempts=1,
        servers=[{"host": "127.0.0.1", "port": free_port()}, {"host": "127.0.0.1", "port": free_port()}],
    )
    procs.append(cli)
    assert cli.proc.wait(10) == 79
    assert cli.count("giving up on") == 2 and "no server left to try" in cli.output()


def test_link_status_says_down_why_and_when_it_retries_in_virtual_time(tmp_path: Path, vclock, vloop) -> None:
    from hbd.client import Client, Link, Target
    from hbd.config import load_client_config
    from hbd.logs import Logging
    from hbd.notify import Notifier

    cfg_file = tmp_path / "client.yaml"
    cfg_file.write_text("host: 127.0.0.1\nport: 54321\nreconnect_delay: 4\nreconnect_max_delay: 4\nlog_file: null\n")
    clock, loop = vclock, vloop
    logs = Logging("hbd-client", journald=False)
    try:
        client = Client(load_client_config(cfg_file), loop=loop, notifier=Notifier({}), logs=logs)
        link = Link(client, Target("127.0.0.1", 54321))
        link.backoff._rand = lambda: 0.8  # 0.8 x 4 s
        assert link.status() == "127.0.0.1:54321 waiting"  # nothing tried yet: no reason to give
        link.connect()
        assert link.status() == "127.0.0.1:54321 connecting"
        link._failed("cannot connect: Connection refused")
        assert link.status() == "127.0.0.1:54321 DOWN (connection refused), retry in 3.2 s"
        clock.advance(2.0)
        assert link.status() == "127.0.0.1:54321 DOWN (connection refused), retry in 1.2 s"
        link.connect()  # under way: 127.0.0.1 needs no lookup, the connect is non-blocking
        assert link.status() == "127.0.0.1:54321 DOWN (connection refused), connecting"
        link.lost("no pong within 2 s")
        assert link.status().startswith("127.0.0.1:54321 DOWN (no pong within 2 s), retry in ")
        link.close()
        assert link.status() == "127.0.0.1:54321 DOWN (no pong within 2 s), gave up"
    finally:
        logs.close()


def test_an_exception_serving_one_link_reconnects_that_link_only() -> None:
    """An unexpected error in one link's handler (here: its pong parser) drops and retries that
    link, with one logged traceback; the process and the other link carry on."""
    from hbd.client import Client
    from hbd.config import ClientConfig, ServerEntry
    from hbd.logs import log
    from hbd.loop import EventLoop
    from hbd.protocol import ClientLink

    class Broken(ClientLink):
        __slots__ = ()

        def feed(self, data: bytes, now: float) -> list[float]:
            raise RuntimeError("injected bug")

    a, b = LegacyServer(), LegacyServer()
    records: list = []
    handler = __import__("logging").Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loop = EventLoop()
    cfg = ClientConfig(
        servers=(ServerEntry("127.0.0.1", a.port, "a"), ServerEntry("127.0.0.1", b.port, "b")),
        heartbeat_interval=0.05,
        pong_timeout=1.0,
        reconnect_delay=0.05,
        reconnect_max_delay=0.1,
        log_file=None,
        control_socket=None,
    )
    client = Client(cfg, loop=loop)
    log.addHandler(handler)  # after the daemon set up its logging
    try:
        client.start()
        link_a, link_b = client.links

        def run_until(cond, limit: float = 5.0) -> None:
            end = time.monotonic() + limit
            while not cond() and time.monotonic() < end:
                loop.run_once(0.01)
            assert cond()

        run_until(
            lambda: link_a.proto is not None and link_a.proto.pongs and link_b.proto is not None and link_b.proto.pongs
        )
        first = link_a.proto
        assert first is not None
        assert link_a.session is not None
        link_a.session.proto = Broken(loop.time(), 0.05, 1.0)
        run_until(lambda: link_a.stats.connects >= 2 and link_a.proto is not None and link_a.proto.pongs > 0)
        pongs_b = link_b.stats.rtt.count
        run_until(lambda: link_b.stats.rtt.count > pongs_b + 3)
        tracebacks = [r for r in records if r.exc_info]
        assert len(tracebacks) == 1 and "injected bug" in str(tracebacks[0].exc_info[1])
        assert "serving the link to a" in tracebacks[0].getMessage()
        assert link_b.stats.connects == 1  # never dropped
    finally:
        log.removeHandler(handler)
        client.shutdown()
        loop.close()
        a.close()
        b.close()


def test_link_lifecycle_survives_any_order_of_connect_reset_eof_silence_and_reload() -> None:
    """Servers that answer, reset, close or stay silent at random, and reloads every 50 ms that add
    and remove servers and change the timings: no link ever hits an unexpected error."""
    import random
    import struct

    from hbd.client import Client
    from hbd.config import ClientConfig, ServerEntry
    from hbd.logs import log
    from hbd.loop import EventLoop

    rng = random.Random(15)
    stop = threading.Event()

    def chaotic(listener: socket.socket) -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            mode = rng.choice(["reset", "close", "answer", "silent", "answer-then-reset"])
            try:
                if mode in ("reset", "answer-then-reset"):
                    if mode == "answer-then-reset":
                        conn.settimeout(0.5)
                        if conn.recv(64):
                            conn.send(b"pong")
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                elif mode == "close":
                    conn.close()
                elif mode == "answer":
                    conn.settimeout(0.3)
                    for _ in range(3):
                        data = conn.recv(64)
                        if not data:
                            break
                        conn.send(b"pong" * data.count(b"ping"))
                    conn.close()
                else:
                    threading.Timer(0.5, conn.close).start()
            except OSError:
                conn.close()

    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    threads = [threading.Thread(target=chaotic, args=(ls,), daemon=True) for ls in listeners]
    for t in threads:
        t.start()
    ports = [ls.getsockname()[1] for ls in listeners]

    def config(i: int) -> ClientConfig:
        chosen = [p for j, p in enumerate(ports) if (i >> j) & 1 or j == i % 3]
        return ClientConfig(
            servers=tuple(ServerEntry("127.0.0.1", p, f"s{p}") for p in chosen),
            client_name="web1" if i % 2 else None,
            heartbeat_interval=0.02 + 0.01 * (i % 3),
            pong_timeout=0.1,
            receive_timeout=0.2,
            reconnect_delay=0.01,
            reconnect_max_delay=0.05,
            log_file=None,
            control_socket=None,
            log_level="error",
        )

    loop = EventLoop()
    client = Client(config(0), loop=loop)
    records: list = []
    handler = __import__("logging").Handler(level=40)
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    try:
        client.start()
        end = time.monotonic() + 3.0
        i = 0
        next_reload = time.monotonic()
        while time.monotonic() < end:
            loop.run_once(0.005)
            if time.monotonic() >= next_reload:
                i += 1
                new = config(i)
                client.prepare(new)()
                client.config = new
                next_reload += 0.05
        assert i >= 30
        assert [r.getMessage() for r in records if r.exc_info or "internal error" in r.getMessage()] == []
        assert sum(link.stats.connects for link in client.links) > 0
    finally:
        log.removeHandler(handler)
        stop.set()
        client.shutdown()
        loop.close()
        for ls in listeners:
            ls.close()
