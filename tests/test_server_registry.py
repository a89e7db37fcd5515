"""The registry wired into the server (hbd.server_registry), in virtual time: socketpairs as
connections, the events and hooks' fields the server hands to its operator surface."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

import pytest
from virtual_time import run_until

from hbd.access import Network
from hbd.config import ServerConfig
from hbd.logs import log
from hbd.protocol import PeerState
from hbd.registry import RegistrySettings
from hbd.server import Server


@dataclass(frozen=True)
class Exp:
    name: str
    address: Network | None = None
    timeout: float | None = None
    labels: tuple[tuple[str, str], ...] = ()


@pytest.fixture
def server(vclock, vloop):
    """``server(settings, expected)`` -> a started in-process Server on the virtual loop, with its
    registry set as given, and the events it reported: (time, event, peer, reason, hooked, fields)."""
    made: list[Server] = []

    def make(expected: tuple = (), **settings: object) -> tuple[Server, list]:
        srv = Server(
            ServerConfig(
                host="127.0.0.1", port=0, heartbeat_timeout=2.0, log_file=None, control_socket=None, state_dir=None
            ),
            loop=vloop,
        )
        events: list = []
        srv.ops.event = lambda event, peer, address, **kw: events.append(  # type: ignore[method-assign]
            (round(vclock() - 1000.0, 2), event, peer, kw.get("reason"), True, kw)
        )
        srv.ops.count = lambda event, peer, address, previous, reason: events.append(  # type: ignore[method-assign]
            (round(vclock() - 1000.0, 2), event, peer, reason, False, {})
        )
        srv.start()
        assert srv.registry is not None
        srv.registry.configure(RegistrySettings(heartbeat_timeout=2.0, **settings), expected)  # type: ignore[arg-type]
        logging.getLogger("hbd").setLevel(logging.INFO)
        made.append(srv)
        return srv, events

    yield make
    for srv in made:
        srv.shutdown()


def pair(srv: Server, host: str = "127.0.0.1") -> socket.socket:
    a, b = socket.socketpair()
    b.setblocking(False)
    srv.on_accept(a, (host, 40000 + a.fileno()))
    return b


def send(srv: Server, b: socket.socket, data: bytes) -> None:
    b.send(data)
    srv.loop.run_once(0)
    try:
        b.recv(65536)
    except BlockingIOError:
        pass


def peers(srv: Server) -> dict[str, tuple]:
    return {r.peer: (r.state, r.reason) for r in srv.view().peers}


def test_a_named_peer_that_times_out_stays_down(server, vclock, vloop) -> None:
    srv, events = server()
    b = pair(srv)
    send(srv, b, b"hello web1\nping")
    run_until(vloop, vclock, vclock() + 5)
    assert peers(srv) == {"web1": ("DOWN", "timeout")}
    assert srv.view().counts == {"NEW": 0, "UP": 0, "LATE": 0, "DOWN": 1}
    assert [e[1:5] for e in events] == [
        ("up", "web1", "first ping", True),
        ("late", "web1", "silent", True),
        ("down", "web1", "timeout", True),
    ]
    b.close()


def test_an_expected_peer_never_connected_is_down_once_with_its_fields(server, vclock, vloop) -> None:
    srv, events = server((Exp("db1", timeout=3.0, labels=(("rack", "r1"),)),))
    assert peers(srv) == {"db1": ("NEW", "not seen yet")}
    run_until(vloop, vclock, vclock() + 2.9)
    assert events == []
    run_until(vloop, vclock, vclock() + 100)
    [(t, event, peer, reason, hooked, kw)] = events
    assert (t, event, peer, reason, hooked) == (3.0, "down", "db1", "never connected", True)
    assert kw["expected"] == "1" and kw["label_rack"] == "r1" and float(kw["since"]) > 1e9
    assert peers(srv) == {"db1": ("DOWN", "never connected")}


def test_an_expected_legacy_client_is_matched_by_its_address(server, vclock, vloop) -> None:
    srv, _events = server((Exp("db1", ipaddress.ip_network("127.0.0.1/32")),))
    b = pair(srv)
    send(srv, b, b"ping")
    assert peers(srv) == {"db1": ("UP", "first ping")}
    b.close()


def test_a_duplicate_name_takes_over_and_the_old_connection_is_closed(server, vclock, vloop) -> None:
    srv, events = server()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    old = pair(srv)
    send(srv, old, b"hello web1\nping")
    new = pair(srv)
    send(srv, new, b"hello web1\nping")
    assert old.recv(10) == b""  # closed
    assert len(srv.conns) == 1 and list(peers(srv)) == ["web1"]
    assert [e[1] for e in events] == ["up"]  # no down for a name still connected
    [line] = [r for r in records if "replaced by a newer connection" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.getMessage().count("127.0.0.1:") == 3
    new.close()
    log.removeHandler(handler)


def test_a_silenced_peer_runs_no_hook(server, vclock, vloop) -> None:
    srv, events = server()
    assert srv.registry is not None
    silence = srv.registry.silence("web1", 3600, "maintenance")
    assert not isinstance(silence, str) and silence.peer == "web1" and silence.reason == "maintenance"
    b = pair(srv)
    send(srv, b, b"hello web1\nping")
    run_until(vloop, vclock, vclock() + 5)
    assert [(e[1], e[4]) for e in events] == [("up", False), ("late", False), ("down", False)]
    [row] = srv.view().peers
    assert row.state == "DOWN" and row.silenced_until is not None
    assert srv.ops.events["down"] == 0  # counted by ops.count (replaced in this test)
    b.close()


def test_rise_reports_pings_only_while_rising(server, vclock, vloop) -> None:
    srv, events = server(rise=3)
    b = pair(srv)
    send(srv, b, b"hello web1\nping")
    run_until(vloop, vclock, vclock() + 5)  # down
    b.close()
    b = pair(srv)
    send(srv, b, b"hello web1\nping")
    [conn] = srv.conns.values()
    assert conn.peer.state is PeerState.RISING and peers(srv)["web1"] == ("DOWN", "rising: 1 of 3 pings")
    vclock.advance(0.5)
    send(srv, b, b"ping")
    assert conn.peer.state is PeerState.RISING and peers(srv)["web1"][0] == "DOWN"
    vclock.advance(0.5)
    send(srv, b, b"ping")
    assert peers(srv)["web1"] == ("UP", "3 pings on time")
    assert conn.peer.state is PeerState.UP
    vclock.advance(0.5)
    send(srv, b, b"ping")
    assert conn.peer.events is None and conn.peer.state is PeerState.UP  # no more reports: the ping path as ever
    assert [e[1] for e in events] == ["up", "late", "down", "up"]
    b.close()


def test_a_reload_applies_new_expected_peers(server, vclock, vloop) -> None:
    srv, events = server()
    assert srv.registry is not None
    srv.registry.configure(RegistrySettings(heartbeat_timeout=2.0), (Exp("db9"),))
    assert peers(srv) == {"db9": ("NEW", "not seen yet")}
    run_until(vloop, vclock, vclock() + 3)
    assert [e[1:4] for e in events] == [("down", "db9", "never connected")]


def test_connections_that_have_not_pinged_follow_the_peers(server, vclock, vloop) -> None:
    srv, _events = server((Exp("db1"),))
    b = pair(srv)
    send(srv, b, b"hello db1\n")  # claims a known name: shown once, as the peer
    c = pair(srv)
    rows = list(srv.view().peers)
    assert [(r.peer, r.state, r.since is None) for r in rows] == [
        ("db1", "NEW", False),
        (f"127.0.0.1:{40000 + list(srv.conns.values())[1].sock.fileno()}", "NEW", True),
    ]
    assert "pending" in rows[1].flags  # shown by status, but no peer: no metrics series of its own
    b.close()
    c.close()


class FakeStore:
    """The state store's queueing side, in memory (the real one is tested on SQLite files)."""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.peers: dict[str, object] = {}
        self.silences: dict[str, object] = {}
        self.changes: list = []
        self.runs: list[float] = []
        self.alives: list[float] = []
        self.prunes: list[float] = []
        self.flushes = 0
        self.closed = False

    def put_peer(self, rec) -> None:
        self.peers[rec.name] = rec

    def forget_peer(self, name: str) -> None:
        self.peers[name] = None

    def put_silence(self, rec) -> None:
        self.silences[rec.name] = rec

    def drop_silence(self, name: str) -> None:
        self.silences[name] = None

    def add_change(self, rec) -> None:
        self.changes.append(rec)

    def start_run(self, now: float) -> None:
        self.runs.append(now)

    def alive(self, now: float) -> None:
        self.alives.append(now)

    def prune_changes(self, before: float) -> None:
        self.prunes.append(before)

    def flush(self) -> bool:
        self.flushes += 1
        return False

    def take_messages(self) -> list[str]:
        return []

    def close(self) -> None:
        self.closed = True


def test_the_store_gets_changes_from_a_flush_timer_and_restores_peers(server, vclock, vloop) -> None:
    import time as _time

    from hbd.registry import PeerRecord, SilenceRecord

    srv, events = server()
    reg = srv.registry
    assert reg is not None
    store = FakeStore()
    wall = _time.time()
    remembered = [
        PeerRecord("web1", "127.0.0.1:1", "UP", wall - 100, wall - 1, "ping", False, 2.0, ()),
        PeerRecord("web2", "127.0.0.1:2", "DOWN", wall - 50, wall - 60, "timeout", False, 2.0, ()),
    ]
    reg.attach(store, remembered, [SilenceRecord("web2", wall + 600, "fixing", wall - 10)])
    assert peers(srv) == {"web1": ("NEW", "waiting for it after a restart"), "web2": ("DOWN", "timeout")}
    assert reg.registry.silenced["web2"].reason == "fixing"
    b = pair(srv)
    send(srv, b, b"hello web1\nping")  # back within its grace (its timeout): up, and no down
    run_until(vloop, vclock, vclock() + 1.0)
    assert [e[1] for e in events] == ["up"]
    assert store.flushes >= 1 and store.peers["web1"].state == "UP"  # type: ignore[attr-defined]
    assert [(c.peer, c.old, c.new) for c in store.changes] == [("web1", "NEW", "UP")]
    assert "web2" not in store.peers  # restored as it was: nothing to write back
    srv.shutdown()
    assert store.closed and store.peers["web1"].last_ping is not None  # type: ignore[attr-defined]
    b.close()


def test_the_history_gets_every_change_the_runs_signs_of_life_and_pruning(server, vclock, vloop) -> None:
    """Each up/late/down is queued as a change (wall time, reason, side server) when it is applied;
    the run starts at attach, is alive every second and at close; pruning past history_days once a minute."""
    srv, _ = server()
    reg = srv.registry
    assert reg is not None
    wall = [1_700_000_000.0]
    reg.wall = lambda: wall[0]
    store = FakeStore()
    reg.attach(store, [], [], history_days=2)
    assert reg.writer is not None
    reg.writer.wall = lambda: wall[0]
    assert store.runs == [wall[0]] and store.alives == []
    b = pair(srv)
    send(srv, b, b"hello web1\nping")
    run_until(vloop, vclock, vclock() + 1.0)
    wall[0] += 1.5
    run_until(vloop, vclock, vclock() + 1.5)  # timeout 2 s: late
    wall[0] += 10
    run_until(vloop, vclock, vclock() + 10)  # down
    assert [(c.peer, c.old, c.new, c.side) for c in store.changes] == [
        ("web1", "NEW", "UP", "server"),
        ("web1", "UP", "LATE", "server"),
        ("web1", "LATE", "DOWN", "server"),
    ]
    assert store.changes[0].time == 1_700_000_000.0 and store.changes[2].reason
    assert store.prunes == [1_700_000_000.0 - 2 * 86400]  # at the first flush, then once a minute
    assert len(store.alives) == 12  # every second of the 12.5 s so far
    run_until(vloop, vclock, vclock() + 60)
    assert len(store.prunes) == 2 and len(store.alives) == 72
    srv.shutdown()
    assert len(store.alives) == 73 and store.closed
    b.close()


def test_many_graces_ending_at_once_are_worked_through_a_batch_per_turn(server, vclock, vloop) -> None:
    srv, events = server(tuple(Exp(f"db{i}") for i in range(1200)))
    assert srv.registry is not None
    batches = []
    tick = srv.registry.registry.tick
    srv.registry.registry.tick = lambda now, wall: batches.append(len(r := tick(now, wall))) or r  # type: ignore[method-assign]
    run_until(vloop, vclock, vclock() + 3)
    assert srv.view().counts == {"NEW": 0, "UP": 0, "LATE": 0, "DOWN": 1200}
    assert len(events) == 1200 and max(batches) <= 500 and len(batches) >= 3


def test_a_flapping_peer_gets_one_flapping_hook_then_none_until_one_stable(server, vclock, vloop) -> None:
    srv, events = server(flap_threshold=2, flap_window=10.0)
    for _ in range(4):  # up, down, up, down, ... 8 changes
        b = pair(srv)
        send(srv, b, b"hello web1\nping")
        b.close()
        run_until(vloop, vclock, vclock() + 0.1)
    assert [(e[1], e[4]) for e in events] == [
        ("up", True),
        ("down", True),
        ("up", False),
        ("flapping", True),
        *[(e, False) for e in ("down", "up", "down", "up", "down")],
    ]
    [row] = srv.view().peers
    assert "flapping" in row.flags
    del events[:]
    run_until(vloop, vclock, vclock() + 11)
    assert [(e[1], e[2], e[3], e[4]) for e in events] == [("stable", "web1", "no change for 10 s: DOWN", True)]


def test_status_and_metrics_show_each_peers_outages_down_time_and_uptime(server, vclock, vloop) -> None:
    """From the changes applied in this process (hbd.peer_uptime), never from the store: none here."""
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from hbd import metrics, status
    from hbd.status_doc import parse_document

    srv, _ = server()
    b = pair(srv)
    send(srv, b, b"hello web1\nping")
    run_until(vloop, vclock, vclock() + 5)  # up at once, late at 1 s, down at 2 s (timeout 2 s)
    b.close()
    [row] = srv.view().peers
    assert row.state == "DOWN" and row.outages == 1 and row.down_seconds == pytest.approx(3.0, abs=0.2)
    assert row.uptime_24h == pytest.approx(100 * 2 / 5, abs=5)  # UP and LATE 2 s of the 5 known
    doc = json.loads(b"".join(status.server_document(srv.view())))
    assert doc["peers"][0]["outages"] == 1 and doc["peers"][0]["uptime_24h"] == pytest.approx(40, abs=5)
    text = status.render(parse_document(doc))
    header = next(line for line in text.splitlines() if line.startswith("PEER"))
    assert "UPTIME 24h" in header
    assert next(line for line in text.splitlines() if line.startswith("web1")).split()[-2].endswith("%")
    families = {f.name: f for f in text_string_to_metric_families(metrics.collect(srv.view()).render().decode())}
    assert [(s.labels["peer"], s.value) for s in families["hbd_peer_outages"].samples if s.name.endswith("_total")] == [
        ("web1", 1)
    ]
    [down] = [s for s in families["hbd_peer_down_seconds"].samples if s.name.endswith("_total")]
    assert down.value == pytest.approx(3.0, abs=0.2)
