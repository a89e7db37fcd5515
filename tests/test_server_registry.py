"""The registry wired into the server (hbd.server_registry), in virtual time: socketpairs as
connections, the events and hooks' fields the server hands to its operator surface."""

from __future__ import annotations

import ipaddress
import logging
import socket

import pytest
from helpers import Exp, status_document
from virtual_time import run_until

from hbd.config import ServerConfig
from hbd.logs import log
from hbd.protocol import PeerState
from hbd.registry import RegistrySettings
from hbd.server import Server


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
    doc = status_document(srv.view(), vloop)
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


# -- a reload's expected peers, applied a slice per loop turn ------------------------------------------------
def _fleet_file(path, names: list[str], labelled: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    path.write_text("".join(f"- {{name: {n}, labels: {{site: b}}}}\n" if n in labelled else f"- {n}\n" for n in names))


@pytest.fixture
def reloadable(tmp_path, vclock, vloop):
    """A started in-process Server on the virtual loop whose config (and peers_file) is on disk:
    ``srv, fleet = reloadable(names)``; a reload is ``srv.reload()`` then ``run_reload``."""
    from daemons import free_port

    from hbd.config import load_server_config

    made: list[Server] = []

    def make(names: list[str]) -> tuple[Server, object]:
        fleet = tmp_path / "fleet.yaml"
        _fleet_file(fleet, names)
        path = tmp_path / "server.yaml"
        path.write_text(
            f"host: 127.0.0.1\nport: {free_port()}\nheartbeat_timeout: 2\nlog_file: null\ncontrol_socket: null\n"
            f"state_dir: null\nmax_peers: 100000\npeers_file: {fleet}\n"
        )
        srv = Server(load_server_config(path), loop=vloop)
        srv.start()
        made.append(srv)
        return srv, fleet

    yield make
    for srv in made:
        srv.shutdown()


def _snapshot(reg) -> dict[str, tuple]:
    return {p.name: (p.status.value, p.expected, p.labels, p.timeout, p.since, p.grace) for p in reg.peers.values()}


def test_a_reload_applies_its_changes_a_slice_per_turn_and_answers_once_all_are(reloadable, vclock, vloop) -> None:
    from helpers import run_reload

    from hbd.registry import Registry

    old = [f"p{i}" for i in range(3000)]
    srv, fleet = reloadable(old)
    assert srv.registry is not None
    reg = srv.registry.registry
    reference = Registry(reg.settings, reg.expected.values(), vclock())  # the same start, reloaded unsliced
    new = old[500:] + [f"q{i}" for i in range(500)]  # 500 removed, 500 added
    labelled = set(old[500::2])  # and 1250 kept with new labels; the 1250 others unchanged
    _fleet_file(fleet, new, labelled)
    srv.registry.reload.slice = 250
    slices: list[tuple[int, int, int]] = []  # (loop turn, changes applied, changes left)
    apply_some = reg.apply_some

    def counted(budget: int | None = None) -> None:
        before = reg.applying()
        apply_some(budget)
        slices.append((sum(vloop.turn_counts), before - reg.applying(), reg.applying()))

    reg.apply_some = counted  # type: ignore[method-assign]
    answers: list[tuple[list[str], int]] = []
    srv.request_reload(lambda errors: answers.append((errors, reg.applying())))
    run_reload(vloop, srv.reloads)
    assert answers == [([], 0)]  # answered once every change was applied
    assert [n for _, n, _ in slices] == [250] * 9  # 2250 changes; the 1250 unchanged cost nothing
    turns = [t for t, _, _ in slices]
    assert turns == sorted(set(turns))  # one slice per turn
    committed = min(p.since for p in reg.peers.values() if p.name.startswith("q"))
    reference.configure(reg.settings, srv.config.peers, committed)
    assert _snapshot(reg) == _snapshot(reference)
    assert reg.counts() == reference.counts() == {"NEW": 3000, "UP": 0, "LATE": 0, "DOWN": 0}


def test_a_second_sighup_mid_apply_makes_one_more_reload_after_it_and_the_newest_config_wins(
    reloadable, vclock, vloop
) -> None:
    from hbd.registry import Registry

    srv, fleet = reloadable([f"p{i}" for i in range(2000)])
    assert srv.registry is not None
    reg = srv.registry.registry
    srv.registry.reload.slice = 100
    _fleet_file(fleet, [f"q{i}" for i in range(2000)])
    srv.reload()
    while not reg.applying():  # the load runs in a real thread; the virtual clock stands still meanwhile
        vloop.run_once(0)
    vloop.run_once(0)
    vloop.run_once(0)
    assert 0 < reg.applying() < 4000  # mid-apply: another SIGHUP, after the file changed again
    newest = [f"r{i}" for i in range(1500)] + [f"q{i}" for i in range(500)]
    _fleet_file(fleet, newest)
    srv.reload()
    srv.reload()  # (coalesced with the one before)
    while not srv.reloads.idle:
        vloop.run_once(0)
    assert srv.reloads_ok == 2 and reg.applying() == 0
    assert set(reg.peers) == set(newest) and set(reg.expected) == set(newest)
    fresh = Registry(reg.settings, srv.config.peers, vclock())
    assert {n: (p.status, p.expected) for n, p in reg.peers.items()} == {
        n: (p.status, p.expected) for n, p in fresh.peers.items()
    }


def test_an_invalid_config_mid_apply_keeps_the_one_being_applied(reloadable, vclock, vloop) -> None:
    srv, fleet = reloadable([f"p{i}" for i in range(1000)])
    assert srv.registry is not None
    reg = srv.registry.registry
    srv.registry.reload.slice = 100
    _fleet_file(fleet, [f"q{i}" for i in range(1000)])
    srv.reload()
    while not reg.applying():
        vloop.run_once(0)
    fleet.write_text("- {name: bad name}\n")
    srv.reload()
    while not srv.reloads.idle:
        vloop.run_once(0)
    assert (srv.reloads_ok, srv.reloads_failed) == (1, 1)
    assert set(reg.peers) == {f"q{i}" for i in range(1000)} and reg.applying() == 0
    assert "fleet.yaml: line 1: item 1: name: must be" in str(srv.last_reload_error)


def test_what_a_reload_replaces_is_freed_a_slice_per_turn(reloadable, vclock, vloop) -> None:
    from helpers import run_reload

    srv, fleet = reloadable([f"p{i}" for i in range(3000)])
    assert srv.registry is not None
    old = srv.registry.registry.expected
    srv.registry.reload.retirer.slice = 1000
    _fleet_file(fleet, [f"q{i}" for i in range(3000)])
    freed = []
    step = srv.registry.reload.retirer._step

    def counted() -> None:
        before = len(srv.registry.reload.retirer)  # type: ignore[union-attr]
        step()
        freed.append(before - len(srv.registry.reload.retirer))  # type: ignore[union-attr]

    srv.registry.reload.retirer._step = counted  # type: ignore[method-assign]
    srv.reload()
    run_reload(vloop, srv.reloads)
    while len(srv.registry.reload.retirer):
        vloop.run_once(0)
    assert old == {} and max(freed) <= 1000 and sum(freed) == 3000 + 6000  # the old dict, the plan's changes


def test_a_stop_mid_apply_applies_the_rest_at_once(reloadable, vclock, vloop) -> None:
    srv, fleet = reloadable([f"p{i}" for i in range(1000)])
    assert srv.registry is not None
    reg = srv.registry.registry
    srv.registry.reload.slice = 100
    _fleet_file(fleet, [f"q{i}" for i in range(1000)])
    answers: list[list[str]] = []
    srv.request_reload(answers.append)
    while not reg.applying():
        vloop.run_once(0)
    srv.registry.close()  # (as at shutdown: the store, if any, gets the final state)
    assert reg.applying() == 0 and set(reg.peers) == {f"q{i}" for i in range(1000)} and answers == [[]]


def test_a_view_looks_at_no_peer_until_a_reply_reads_them(server, monkeypatch) -> None:
    """``view()`` (every status, select, pings or metrics request) takes no snapshot of the peers:
    at 100,000 peers that was milliseconds per request even for one that reads only the counts. The
    sources and rows snapshot them when a reply first reads them, so a peer that comes between the
    view and the scan is in it."""
    from hbd.status_filter import StatusFilter
    from hbd.status_select import Tally, scan

    srv, _ = server()
    web1 = pair(srv)
    send(srv, web1, b"hello web1\nping\n")
    assert srv.registry is not None
    made: list[str] = []
    reg = srv.registry

    def counted(name: str, fn):
        def wrapper(*args, **kw):
            made.append(name)
            return fn(*args, **kw)

        return wrapper

    monkeypatch.setattr(reg, "unknown", counted("unknown", reg.unknown))
    monkeypatch.setattr(reg.registry, "source", counted("source", reg.registry.source))
    view = srv.view()
    assert view.counts is not None and view.counts["UP"] == 1
    assert made == []
    web2, fresh = pair(srv), pair(srv)
    send(srv, web2, b"hello web2\nping\n")  # after the view: a peer
    send(srv, fresh, b"hello new1\n")  # ... and a connection that has not pinged yet
    tally = Tally()
    rows = [r for batch in scan(view.sources, StatusFilter(), tally) if batch for r in batch]
    assert sorted(r.peer for r in rows) == ["new1", "web1", "web2"]
    assert sorted(made) == ["source", "unknown"]
    # the listing (metrics, a worker's relay) reads the same snapshots: no second one is taken
    assert sorted(r.peer for r in view.peers) == ["new1", "web1", "web2"]
    assert sorted(made) == ["source", "unknown"]


def test_a_supervisors_view_looks_at_no_peer_until_a_reply_reads_them(vloop, monkeypatch) -> None:
    """The same for ``workers: K``: the supervisor's own peers (those no worker holds) are listed
    from the registry when a reply reads them, not in ``view()``."""
    from hbd.workers import Supervisor

    cfg = ServerConfig(host="127.0.0.1", port=0, workers=2, log_file=None, control_socket=None, state_dir=None)
    sup = Supervisor(cfg, loop=vloop)
    sup._start_registry(cfg)
    assert sup.registry is not None
    sup.registry.configure(RegistrySettings(heartbeat_timeout=2.0), (Exp("db1"),))  # type: ignore[arg-type]
    made: list[str] = []
    source = sup.registry.unconnected_source
    monkeypatch.setattr(sup.registry, "unconnected_source", lambda: made.append("source") or source())
    view = sup.view()
    assert made == []
    assert view.sources[0].size == 1 and made == ["source"]
    assert view.sources[0].row(0).peer == "db1"  # type: ignore[union-attr]
    assert [r.peer for r in view.peers] == ["db1"] and made == ["source"]  # the listing: the same snapshot
    sup.registry.close()
