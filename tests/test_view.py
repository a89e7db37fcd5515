"""The typed views: what status.py and metrics.py render, and nothing else."""

import ast
import dataclasses
import json
from pathlib import Path

from helpers import status_document
from prometheus_client.parser import text_string_to_metric_families

from hbd import metrics, status, status_select
from hbd.status_doc import parse_document
from hbd.status_filter import StatusFilter
from hbd.view import (
    DaemonView,
    LazySource,
    LoopNumbers,
    PeerRow,
    PeerSource,
    RecentEvent,
    ServerCounters,
    ServerSettings,
    ServerView,
    SupervisorView,
    Turns,
    WorkerNumbers,
    WorkerRow,
    source_rows,
)

HBD = Path(__file__).resolve().parent.parent / "hbd"


def _imports(module: str) -> set[str]:
    tree = ast.parse((HBD / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_renderers_import_no_daemon() -> None:
    for module in ("status", "metrics", "view"):
        daemons = {m for m in _imports(module) if m.split(".")[-1] in ("server", "client", "workers", "daemon", "ops")}
        assert not daemons, (module, daemons)
    assert not {m for m in _imports("view") if m.startswith("hbd")}


def test_the_server_side_does_not_call_back_into_the_renderers() -> None:
    """server.py used to ask metrics.server_numbers(ops) for its own counters (issue 11)."""
    for module in ("server", "workers"):
        assert not {m for m in _imports(module) if m in ("hbd.metrics", "hbd.status", "hbd.ops")}, module


def _daemon(role: str = "server") -> DaemonView:
    return DaemonView(
        role,
        1000.0,
        1_700_000_000.0,
        "2 clients, 0 late",
        1,
        0,
        None,
        LoopNumbers(0.001, 0.002, 0),
        {"ok": 1, "failed": 0, "timeout": 0, "error": 0, "dropped": 0, "running": 0, "queued": 0},
        {"up": 2, "late": 0, "down": 1},
        (RecentEvent(1_700_000_100.0, "down", "web2", "10.0.0.2:4000", "UP", "silent for 10 s"),),
    )


def _counters() -> ServerCounters:
    return ServerCounters(clients=2, late=0, pings=40, accepted=3, refused=0, timeouts=1)


def test_a_registry_shaped_view_renders_without_changing_status_or_metrics() -> None:
    """What issue 12's registry will produce (DOWN rows with since/reason/flags, counts by state)."""
    rows = [
        PeerRow(
            "web1",
            "web1",
            "10.0.0.1:4000",
            "UP",
            990.0,
            999.0,
            20,
            10.0,
            2.0,
            since=990.0,
            expected=True,
            labels=(("rack", "a1"),),
        ),
        PeerRow(
            "web2",
            "web2",
            "10.0.0.2:4000",
            "DOWN",
            None,
            900.0,
            20,
            10.0,
            2.0,
            since=910.0,
            reason="silent for 10 s",
            flags=frozenset({"flapping"}),
        ),
    ]
    view = ServerView(
        _daemon(),
        "0.0.0.0:7000",
        ServerSettings(10.0, 100, 1),
        _counters(),
        rows,
        counts={"NEW": 0, "UP": 1, "LATE": 0, "DOWN": 1},
    )
    doc = status_document(view)
    assert doc["counts"] == {"NEW": 0, "UP": 1, "LATE": 0, "DOWN": 1}
    web1, web2 = doc["peers"]
    assert web1["expected"] is True and web1["labels"] == {"rack": "a1"} and web1["flapping"] is False
    assert web2["state"] == "DOWN" and web2["connected"] is None and web2["reason"] == "silent for 10 s"
    assert web2["flapping"] is True and web2["since"] == round(web2["last_ping"] + 10.0, 3)
    text = status.render(parse_document(doc))
    assert "2 peers: 1 up, 0 late, 0 new, 1 down" in text
    header = next(line for line in text.splitlines() if line.startswith("PEER"))
    assert header.split()[3] == "SINCE" and header.split()[-1] == "FLAGS"
    rows_text = [line for line in text.splitlines() if line.startswith("web")]
    assert rows_text[0].startswith("web2 ")  # problems first
    assert rows_text[0].endswith("flapping (silent for 10 s)") and rows_text[1].endswith("expected")
    families = {f.name: f for f in text_string_to_metric_families(metrics.collect(view).render().decode())}
    assert {s.labels["state"]: s.value for s in families["hbd_peers"].samples} == {
        "NEW": 0,
        "UP": 1,
        "LATE": 0,
        "DOWN": 1,
    }
    up = {s.labels["peer"]: (s.value, s.labels.get("rack")) for s in families["hbd_peer_up"].samples}
    assert up == {"web1": (1, "a1"), "web2": (0, None)}
    assert {s.labels["peer"]: s.value for s in families["hbd_peer_flapping"].samples} == {"web1": 0, "web2": 1}
    assert {s.labels["peer"]: s.value for s in families["hbd_peer_expected"].samples} == {"web1": 1, "web2": 0}
    last = {s.labels["peer"]: s.value for s in families["hbd_peer_last_ping_timestamp_seconds"].samples}
    assert abs((last["web1"] - last["web2"]) - 99.0) < 0.01


def test_todays_rows_keep_todays_document() -> None:
    rows = [PeerRow("10.0.0.1:4000", None, "10.0.0.1:4000", "NEW", 999.0, None, 0, 10.0, None)]
    view = ServerView(_daemon(), None, ServerSettings(10.0, 100, 1), _counters(), rows)
    doc = status_document(view)
    assert list(doc["peers"][0]) == [
        "peer",
        "name",
        "address",
        "state",
        "connected",
        "last_ping",
        "pings",
        "timeout",
        "interval",
    ]
    # no registry: the counts are the connections the scan saw (the tail's), not a registry's
    assert doc["registry"] is False and doc["counts"] == {"NEW": 1}
    assert doc["recent"][0]["reason"] == "silent for 10 s"
    exposition = metrics.collect(view).render().decode()
    assert "hbd_peers" not in exposition and "hbd_peer_up" not in exposition


def test_peers_are_serialised_a_slice_at_a_time_in_one_pass() -> None:
    made = []

    def rows():
        for i in range(status.SLICE * 2 + 1):
            made.append(i)
            yield PeerRow(f"p{i}", f"p{i}", f"10.0.0.1:{i}", "UP", 999.0, 999.0, 1, 10.0, None)

    view = ServerView(_daemon(), None, ServerSettings(10.0, 100, 1), _counters(), rows())
    chunks = status.peers_fragment(view)  # a worker's rows for its supervisor's scrape
    first = next(chunks)
    assert len(made) <= status.SLICE + 1  # rows are made as they are serialised, not all up front
    assert len(json.loads(b"[" + first + b"]")) == status.SLICE
    assert len(json.loads(next(chunks).lstrip(b",").join((b"[", b"]")))) == status.SLICE


def test_a_views_listing_is_its_sources_rows_in_order_each_snapshot_at_its_first_row() -> None:
    """``source_rows``: what metrics and a worker's relay stream is what a filtered status scans (one
    producer). Gone items (None) are left out; a lazy source is made only when the listing reaches it."""
    made: list[str] = []

    def row(name: str) -> PeerRow:
        return PeerRow(name, name, "10.0.0.1:1", "UP", 999.0, 999.0, 1, 10.0, None)

    def lazy(tag: str, names: list[str | None]) -> LazySource:
        def make() -> PeerSource:
            made.append(tag)
            return PeerSource(len(names), lambda i: None, lambda i: None if names[i] is None else row(names[i]))

        return LazySource(make)

    rows = source_rows((lazy("peers", ["a", None, "b"]), lazy("new", ["c"])))
    assert made == []
    assert next(rows).peer == "a" and made == ["peers"]
    assert next(rows).peer == "b" and made == ["peers"]  # the gone one is skipped
    assert next(rows).peer == "c" and made == ["peers", "new"]
    assert next(rows, None) is None


def test_worker_numbers_cross_the_pipe_and_sum() -> None:
    n = WorkerNumbers(_counters(), {"up": 2, "late": 0, "down": 1}, {"ok": 1, "running": 1}, LoopNumbers(0.1, 0.3, 2))
    assert WorkerNumbers.from_dict(json.loads(json.dumps(n.to_dict()))) == n
    junk = WorkerNumbers.from_dict({"clients": "many", "pings": True, "events": [1], "lag": None})
    assert junk.counters == ServerCounters() and junk.events == {} and junk.loop == LoopNumbers(0.0, 0.0, 0)
    view = SupervisorView(
        _daemon(),
        "0.0.0.0:7000",
        ServerSettings(10.0, 100, 2),
        (WorkerRow(1, 11, 2, 0, n), WorkerRow(2, 12, 2, 0, n), WorkerRow(3, 13, 0, 0, None)),
    )
    families = {f.name: f for f in text_string_to_metric_families(metrics.collect(view).render().decode())}
    assert families["hbd_server_pings"].samples[0].value == 80
    assert families["hbd_server_workers"].samples[0].value == 3
    assert families["hbd_loop_lag_max_seconds"].samples[0].value == 0.3
    assert families["hbd_loop_stalls"].samples[0].value == 4
    assert {s.labels["event"]: s.value for s in families["hbd_peer_events"].samples} == {
        "up": 6,
        "late": 0,
        "down": 3,
        "flapping": 0,
        "stable": 0,
    }


def test_loop_turns_cross_the_pipe_per_worker_and_sum_in_status_and_metrics() -> None:
    """A worker's turn histogram reaches its supervisor, which shows it per worker and every
    process's together (status ``loop.turns``, metric ``hbd_loop_turn_seconds``)."""
    own = Turns(counts=(90, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0), sum=0.05, max=0.0015)
    busy = Turns(counts=(50, 0, 0, 0, 0, 0, 3, 1, 0, 0, 1), sum=3.2, max=2.4)
    n = WorkerNumbers(_counters(), {}, {}, LoopNumbers(0.1, 0.3, 2, busy))
    assert WorkerNumbers.from_dict(json.loads(json.dumps(n.to_dict()))) == n
    for junk in (None, [1], {"counts": [1, 2]}, {"counts": [-1] * 11, "sum": 0, "max": 0}, {"counts": [0] * 11}):
        assert WorkerNumbers.from_dict({"turns": junk}).loop.turns == Turns()
    daemon = dataclasses.replace(_daemon(), loop=LoopNumbers(0.001, 0.002, 0, own))
    view = SupervisorView(
        daemon,
        "0.0.0.0:7000",
        ServerSettings(10.0, 100, 2),
        (WorkerRow(1, 11, 2, 0, n), WorkerRow(2, 12, 2, 0, n), WorkerRow(3, 13, 0, 0, None)),
    )
    head = next(status_select.supervisor_select(view, StatusFilter(), None, None, lambda: None))  # type: ignore[arg-type]
    doc = json.loads(head + b"]}")
    turns = doc["loop"]["turns"]
    assert turns["count"] == 95 + 2 * 55 and turns["over_100ms"] == 2 * 2 and turns["max_ms"] == 2400.0
    assert turns["le_ms"]["1"] == 90 + 2 * 50 and turns["le_ms"]["100"] == 95 + 2 * 53 and turns["le_ms"]["+Inf"] == 205
    assert abs(turns["sum_ms"] - 6450.0) < 1e-6
    per_worker = [w.get("loop", {}).get("turns") for w in doc["workers"]]
    assert per_worker[0] == per_worker[1] and per_worker[0]["count"] == 55 and per_worker[0]["over_100ms"] == 2
    assert per_worker[2] is None  # not reported yet
    families = {f.name: f for f in text_string_to_metric_families(metrics.collect(view).render().decode())}
    samples = {(s.name, s.labels.get("le")): s.value for s in families["hbd_loop_turn_seconds"].samples}
    assert samples[("hbd_loop_turn_seconds_bucket", "0.001")] == 190
    assert samples[("hbd_loop_turn_seconds_bucket", "0.1")] == 201
    assert samples[("hbd_loop_turn_seconds_bucket", "+Inf")] == samples[("hbd_loop_turn_seconds_count", None)] == 205
    assert abs(samples[("hbd_loop_turn_seconds_sum", None)] - 6.45) < 1e-9
    assert families["hbd_loop_turn_max_seconds"].samples[0].value == 2.4


def test_a_server_shows_its_own_turns() -> None:
    view = ServerView(_daemon(), None, ServerSettings(10.0, 100, 1), _counters(), [])
    doc = status_document(view)
    assert doc["loop"]["turns"] == {
        "count": 0,
        "sum_ms": 0.0,
        "max_ms": 0.0,
        "over_100ms": 0,
        "le_ms": {k: 0 for k in ("1", "2", "5", "10", "20", "50", "100", "200", "500", "1000", "+Inf")},
    }
    parse_document(doc)  # the CLI still reads it
