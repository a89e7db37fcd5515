"""Prometheus exposition: the format (checked with prometheus_client's parser) and real scrapes over HTTP."""

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemons import connect, free_port, recv_exactly, start_client, start_server

from hbd import __version__
from hbd.control import query
from hbd.metrics import Exposition, Histogram

parser = pytest.importorskip("prometheus_client.parser")
# Straight to 127.0.0.1 whatever http_proxy says (debhelper points it at a dead port during builds).
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(port: int) -> dict:
    """{(family, sample name, frozenset(labels)): value} from GET /metrics, via the reference parser."""
    with http.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_exposition_format_and_histogram() -> None:
    h = Histogram([0.001, 0.01, 0.1])
    for v in (0.0005, 0.001, 0.002, 0.5):
        h.observe(v)
    out = Exposition()
    out.one("x_total", "counter", "A help text with \\ and\nnewline.", 3, {"peer": 'we"ird\\name\n'})
    out.family("rtt_seconds", "histogram", "Round trips.")
    out.histogram("rtt_seconds", h, {"server": "a"})
    fams = {f.name: f for f in parser.text_string_to_metric_families(out.render().decode())}
    (sample,) = fams["x"].samples
    assert sample.labels == {"peer": 'we"ird\\name\n'} and sample.value == 3
    buckets = {s.labels["le"]: s.value for s in fams["rtt_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 2, "0.01": 3, "0.1": 3, "+Inf": 4}  # le is inclusive and cumulative
    count = next(s.value for s in fams["rtt_seconds"].samples if s.name == "rtt_seconds_count")
    assert count == 4


def test_server_and_client_metrics_over_http(tmp_path: Path, procs) -> None:
    sport, cport = free_port(), free_port()
    srv = start_server(tmp_path, heartbeat_timeout=0.8, metrics={"port": sport})
    dead = free_port()
    cli = start_client(
        tmp_path,
        srv.config["port"],
        metrics={"host": "127.0.0.1", "port": cport},
        servers=[{"host": "127.0.0.1", "name": "main"}, {"host": "127.0.0.1", "port": dead}],
    )
    procs += [cli, srv]
    srv.wait_for(f"metrics on http://127.0.0.1:{sport}/metrics")
    with connect(srv.config["port"]) as s:  # one that pings once, then times out
        s.sendall(b"ping")
        recv_exactly(s, 4)
        s.settimeout(3)
        assert s.recv(4) == b""
    with connect(srv.config["port"]) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # a protocol error
        s.settimeout(3)
        s.recv(10)
    for _ in range(3):
        cli.wait_for("pong from main", after=cli.mark())
    m = scrape(sport)
    assert value(m, "hbd_info", role="server", version=__version__) == 1
    assert value(m, "hbd_server_clients") == 1
    assert value(m, "hbd_server_pings_total") >= 4
    assert value(m, "hbd_server_connections_total", result="accepted") == 3
    assert value(m, "hbd_server_timeouts_total") == 1
    assert value(m, "hbd_server_protocol_errors_total") == 1
    assert value(m, "hbd_peer_events_total", event="down") == 1
    assert value(m, "hbd_reloads_total", result="ok") == 0
    assert 0 <= value(m, "hbd_loop_lag_max_seconds") < 1

    c = scrape(cport)
    main = {"server": "main", "address": f"127.0.0.1:{srv.config['port']}"}
    other = {"server": f"127.0.0.1:{dead}", "address": f"127.0.0.1:{dead}"}
    assert value(c, "hbd_client_link_up", **main) == 1 and value(c, "hbd_client_link_up", **other) == 0
    pongs = value(c, "hbd_client_pongs_total", **main)
    assert pongs >= 3 and value(c, "hbd_client_rtt_seconds_count", **main) == pongs
    assert value(c, "hbd_client_rtt_seconds_bucket", le="+Inf", **main) == pongs
    assert value(c, "hbd_client_rtt_seconds_bucket", le="0.1", **main) == pongs  # loopback is fast
    assert value(c, "hbd_client_pings_total", **main) >= pongs
    assert value(c, "hbd_client_connects_total", **other) >= 1 and value(c, "hbd_client_pongs_total", **other) == 0

    for path, code in (("/nope", 404), ("/", 200)):
        try:
            with http.open(f"http://127.0.0.1:{sport}{path}", timeout=5) as r:
                assert r.status == code
        except urllib.error.HTTPError as exc:
            assert exc.code == code
    with socket.create_connection(("127.0.0.1", sport), timeout=5) as s:
        s.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 405 ")


def test_workers_metrics_are_summed(tmp_path: Path, procs) -> None:
    mport = free_port()
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5, metrics={"port": mport})
    procs.append(srv)
    srv.wait_for("2 workers listening")
    socks = [connect(srv.config["port"]) for _ in range(30)]
    for s in socks:
        s.sendall(b"ping")
    for s in socks:
        recv_exactly(s, 4)
    deadline = time.monotonic() + 5
    while True:  # workers report every second
        m = scrape(mport)
        if value(m, "hbd_server_clients") == 30 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert value(m, "hbd_server_clients") == 30 and value(m, "hbd_server_workers") == 2
    assert value(m, "hbd_server_pings_total") == 30
    # each worker's loop turns, shown per worker and summed with the supervisor's own
    doc = json.loads(query(srv.config["control_socket"], "status", timeout=10))
    per_worker = [w["loop"]["turns"]["count"] for w in doc["workers"]]
    assert len(per_worker) == 2 and min(per_worker) > 0, doc["workers"]
    assert doc["loop"]["turns"]["count"] > sum(per_worker)
    assert value(m, "hbd_loop_turn_seconds_count") > 0
    assert value(m, "hbd_peer_events_total", event="up") == 30
    for s in socks:
        s.close()


def test_a_big_exposition_is_streamed_a_chunk_per_loop_turn() -> None:
    """10,000 peers: their values are read ROWS_PER_TURN rows per turn (the loop runs in between), the text is
    the same as the all-at-once exposition and parses, and no chunk is big."""
    from hbd import metrics
    from hbd.view import DaemonView, LoopNumbers, PeerRow, ServerCounters, ServerSettings, ServerView

    daemon = DaemonView("server", 1000.0, 1_700_000_000.0, "", 0, 0, None, LoopNumbers(0.0, 0.0, 0), {}, {}, ())
    rows = [
        PeerRow(f"p{i}", f"p{i}", f"10.0.{i // 250}.{i % 250}:1", "UP" if i % 7 else "DOWN", 990.0, 999.0, 1, 10.0, 2.0)
        for i in range(10_000)
    ]
    counts = {"NEW": 0, "UP": 8571, "LATE": 0, "DOWN": 1429}
    turns = []

    def view() -> ServerView:
        return ServerView(daemon, "x:1", ServerSettings(10.0, 100, 1), ServerCounters(), iter(rows), counts=counts)

    chunks = list(metrics.exposition(view(), lambda: turns.append(1)))
    assert len(turns) == 10_000 // metrics.ROWS_PER_TURN and chunks.count(None) == len(turns)
    body = b"".join(c for c in chunks if c is not None)

    def steady(text: bytes) -> list[bytes]:  # the wall clock moved between the two: last pings differ
        return [line for line in text.split(b"\n") if not line.startswith(b"hbd_peer_last_ping_timestamp_seconds{")]

    assert steady(body) == steady(metrics.collect(view()).render())
    assert max(len(c) for c in chunks if c is not None) < 200_000
    fams = {f.name: f for f in parser.text_string_to_metric_families(body.decode())}
    assert len(fams["hbd_peer_up"].samples) == 10_000
    assert sum(s.value for s in fams["hbd_peer_up"].samples) == 8571


def test_workers_peer_series_come_from_the_registry_and_the_workers_pings(tmp_path: Path, procs) -> None:
    mport = free_port()
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=30, metrics={"port": mport})
    procs.append(srv)
    srv.wait_for("2 workers listening")
    socks = []
    for i in range(12):
        s = connect(srv.config["port"])
        s.sendall(b"hello m%d\nping" % i)
        socks.append(s)
    for s in socks:
        recv_exactly(s, 4)
    socks.pop(3).close()
    started = time.time()
    deadline = time.monotonic() + 10
    while True:
        m = scrape(mport)
        up = {dict(k[1])["peer"]: v for k, v in m.items() if k[0] == "hbd_peer_up"}
        if (up.get("m3") == 0 and len(up) == 12) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert up == {f"m{i}": (0 if i == 3 else 1) for i in range(12)}
    pings = {dict(k[1])["peer"]: v for k, v in m.items() if k[0] == "hbd_peer_last_ping_timestamp_seconds"}
    assert len(pings) == 12  # the connected ones' from their workers, m3's from the registry
    assert all(started - 30 < v <= time.time() for v in pings.values()), pings
    assert value(m, "hbd_peer_outages_total", peer="m3") == 1
    with socket.create_connection(("127.0.0.1", mport), timeout=5) as s:  # HEAD: the head alone
        s.sendall(b"HEAD /metrics HTTP/1.0\r\n\r\n")
        head = b""
        while chunk := s.recv(4096):
            head += chunk
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    for s in socks:
        s.close()
