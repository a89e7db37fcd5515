"""Prometheus metrics: the text exposition format (0.0.4) over a minimal HTTP/1.0 responder.

hbd writes the format itself rather than using ``prometheus_client``: that library's metric
objects take a lock on every update and its HTTP server runs in a thread, and neither belongs on a
single-threaded loop that must answer 19,000 pings a second. Here nothing is counted per ping that
was not counted already (``ServerPeer.pings``, the daemons' ``stats``); values are collected from
the daemon when a scrape arrives, and the HTTP side is a ``control.RequestServer`` on the same
loop. The tests check the output with prometheus_client's own parser.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice

from hbd import __version__
from hbd.control import Reply
from hbd.view import (
    EVENTS,
    HOOK_RESULTS,
    PEER_STATES,
    ClientView,
    DaemonViews,
    LoopNumbers,
    PeerRow,
    PeerSample,
    Rtt,
    ServerCounters,
    ServerView,
    SupervisorView,
    Turns,
)

# Client ping->pong round trips, seconds: sub-millisecond on a LAN up to the longest pong_timeout.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Bucket counts, sum and count; ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = RTT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        return _cumulative(self.bounds, self.counts)


class LinkStats:
    """Lifetime counters of one client link (across reconnects)."""

    __slots__ = ("connects", "last_pong", "pings", "rtt", "rtt_last", "rtt_max", "timeouts")

    def __init__(self) -> None:
        self.pings = 0
        self.timeouts = 0
        self.connects = 0  # connection attempts
        self.rtt = Histogram()
        self.rtt_last: float | None = None
        self.rtt_max = 0.0
        self.last_pong: float | None = None

    def pong(self, rtt: float, now: float) -> None:
        self.rtt.observe(rtt)
        self.rtt_last = rtt
        if rtt > self.rtt_max:
            self.rtt_max = rtt
        self.last_pong = now

    def rtt_view(self) -> Rtt:
        h = self.rtt
        return Rtt(h.bounds, tuple(h.counts), h.sum, h.count, self.rtt_last, self.rtt_max)


def _cumulative(bounds: tuple[float, ...], counts: Iterable[int]) -> list[tuple[str, int]]:
    out = []
    total = 0
    for bound, n in zip([*map(_num, bounds), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, total))
    return out


# -- exposition ------------------------------------------------------------------------------------
def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class Exposition:
    """Collects metric families (each written once, its samples together) and renders the text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        assert name not in self._seen, name
        self._seen.add(name)
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_num(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value, labels)

    def histogram(self, name: str, hist: Histogram | Rtt | Turns, labels: dict[str, str]) -> None:
        for bound, n in _cumulative(hist.bounds, hist.counts):
            self.sample(f"{name}_bucket", n, {**labels, "le": bound})
        self.sample(f"{name}_sum", hist.sum, labels)
        self.sample(f"{name}_count", hist.count, labels)

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


# -- what each daemon exposes ------------------------------------------------------------------------
def collect(view: DaemonViews, peers: bool = True) -> Exposition:
    """Every family (``peers`` False: all but the per-peer ones, which ``exposition`` streams)."""
    d = view.daemon
    workers = [w.numbers for w in view.workers if w.numbers is not None] if isinstance(view, SupervisorView) else []
    out = Exposition()
    out.one("hbd_info", "gauge", "Always 1; the labels say what runs.", 1, {"role": d.role, "version": __version__})
    out.one("hbd_start_time_seconds", "gauge", "When this daemon started, Unix time.", round(d.started, 3))
    out.family("hbd_reloads_total", "counter", "Configuration reloads (SIGHUP) by result.")
    out.sample("hbd_reloads_total", d.reloads_ok, {"result": "ok"})
    out.sample("hbd_reloads_total", d.reloads_failed, {"result": "failed"})
    loop = d.loop
    for numbers in workers:  # the worst loop among the supervisor's and the workers', their turns together
        loop = LoopNumbers(
            max(loop.lag, numbers.loop.lag),
            max(loop.max_lag, numbers.loop.max_lag),
            loop.stalls + numbers.loop.stalls,
            loop.turns.plus(numbers.loop.turns),
        )
    out.one(
        "hbd_loop_lag_seconds",
        "gauge",
        "How long something ready could wait for the event loop in its last "
        "turn: how late the wake-up was plus how long the turn took.",
        loop.lag,
    )
    out.one("hbd_loop_lag_max_seconds", "gauge", "The largest event loop lag so far.", loop.max_lag)
    out.one(
        "hbd_loop_stalls_total",
        "counter",
        "Times the process did not run for over 250 ms (a wake-up that "
        "late, or a turn that much longer than the CPU it used).",
        loop.stalls,
    )
    out.family(
        "hbd_loop_turn_seconds",
        "histogram",
        "Event loop turns by how long their work took (from the wake-up to the end of the turn's "
        "callbacks); nothing else is served meanwhile. All of the daemon's processes together.",
    )
    out.histogram("hbd_loop_turn_seconds", loop.turns, {})
    out.one("hbd_loop_turn_max_seconds", "gauge", "The longest event loop turn so far.", loop.turns.max)
    events = _summed(d.events, [n.events for n in workers])
    out.family("hbd_peer_events_total", "counter", "Peer state changes (what on_change hooks are run for).")
    for event in EVENTS:
        out.sample("hbd_peer_events_total", events.get(event, 0), {"event": event})
    hooks = _summed(d.hooks, [n.hooks for n in workers])
    out.family(
        "hbd_hooks_total",
        "counter",
        "on_change hook runs by outcome (dropped: the queue was full; "
        "coalesced: replaced by a later change of the same peer before it ran).",
    )
    for result in HOOK_RESULTS:
        out.sample("hbd_hooks_total", hooks.get(result, 0), {"result": result})
    out.one("hbd_hooks_running", "gauge", "on_change hooks running now.", hooks.get("running", 0))
    out.one("hbd_hooks_queued", "gauge", "on_change hook runs waiting for a free slot.", hooks.get("queued", 0))
    if isinstance(view, ClientView):
        _collect_client(view, out)
    elif isinstance(view, SupervisorView):
        total = ServerCounters()
        for numbers in workers:
            total = total.plus(numbers.counters)
        out.one("hbd_server_workers", "gauge", "Worker processes running.", len(view.workers))
        _collect_server(total, view.counts, out)
        if view.counts is not None and peers:  # the one registry's peers (hbd.supervisor_metrics streams them)
            _collect_peers(view, out)
    else:
        _collect_server(view.counters, view.counts, out)
        if view.counts is not None and peers:  # a registry's view: every known peer has its own series
            _collect_peers(view, out)
    return out


PEER_FAMILIES = (  # (name, type, help, the sample's field)
    ("hbd_peer_up", "gauge", "1 while the peer pings on time (UP or LATE), else 0.", 1),
    ("hbd_peer_last_ping_timestamp_seconds", "gauge", "When the peer last pinged, Unix time.", 2),
    ("hbd_peer_flapping", "gauge", "1 while the peer is flagged as flapping.", 3),
    ("hbd_peer_silenced", "gauge", "1 while the peer is silenced (maintenance).", 4),
    ("hbd_peer_expected", "gauge", "1 for a peer listed in peers: (expected to be alive), else 0.", 5),
    ("hbd_peer_outages_total", "counter", "Times the peer went DOWN since this server started.", 6),
    (
        "hbd_peer_down_seconds_total",
        "counter",
        "Seconds the peer was DOWN since this server started (the current outage too).",
        7,
    ),
)
CHUNK = 1000  # samples per chunk of a streamed exposition (about 50 KB, under a millisecond)
ROWS_PER_TURN = 250  # peers' values gathered per loop turn while a scrape reads them (about a millisecond)


def peer_sample(row: PeerRow, offset: float, last_ping: float | None = None) -> PeerSample:
    """``row``'s values; ``offset`` turns its monotonic times into wall clock; ``last_ping`` (wall
    clock) overrides the row's (a worker's, for the supervisor's registry row)."""
    if last_ping is None and row.last_ping is not None:
        last_ping = round(row.last_ping + offset, 3)
    return (
        peer_labels(row.peer, row.labels),
        1 if row.state in ("UP", "LATE") else 0,
        last_ping,
        1 if "flapping" in row.flags else 0,
        1 if row.silenced_until is not None else 0,
        1 if row.expected else 0,
        row.outages or 0,
        round(row.down_seconds or 0.0, 3),
    )


def peer_labels(peer: str, labels: Iterable[tuple[str, str]]) -> str:
    """A peer's label set as the per-peer series carry it."""
    if not labels and "\\" not in peer and '"' not in peer and "\n" not in peer:
        return f'{{peer="{peer}"}}'  # most peers: nothing to escape, no labels of their own
    return _labels({"peer": peer, **dict(labels)})


def peer_chunks(samples: Sequence[PeerSample]) -> Iterator[bytes]:
    """The per-peer families, each family's samples together, CHUNK samples per chunk.

    A value is written with ``repr``: a sample's values are ints and finite floats (times, seconds),
    for which that is what ``_num`` writes, at a fraction of its cost (7 lines per peer)."""
    for name, kind, help_text, field in PEER_FAMILIES:
        yield f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n".encode()
        for start in range(0, len(samples), CHUNK):
            part = samples[start : start + CHUNK]
            if field == 2:  # the last ping: None before the first one (no sample)
                text = "".join([f"{name}{s[0]} {v!r}\n" for s in part if (v := s[2]) is not None])
            else:
                text = "".join([f"{name}{s[0]} {s[field]!r}\n" for s in part])
            if text:
                yield text.encode()


def _collect_peers(view: ServerView | SupervisorView, out: Exposition) -> None:
    offset = time.time() - view.daemon.now  # monotonic -> wall clock
    # the registry's peers (a connection that has not pinged yet is no peer: no series of its own)
    samples = [peer_sample(row, offset) for row in view.peers if "pending" not in row.flags]
    for name, _, _, _ in PEER_FAMILIES:
        out._seen.add(name)
    out.lines.append(b"".join(peer_chunks(samples)).decode().rstrip("\n"))


def _summed(own: Mapping[str, int], others: list[Mapping[str, int]]) -> dict[str, int]:
    total = dict(own)
    for numbers in others:
        for k, v in numbers.items():
            total[k] = total.get(k, 0) + v
    return total


def _collect_server(n: ServerCounters, counts: Mapping[str, int] | None, out: Exposition) -> None:
    out.one("hbd_server_clients", "gauge", "Clients connected now.", n.clients)
    out.one(
        "hbd_server_clients_late", "gauge", "Connected clients that are late (silent over half the timeout).", n.late
    )
    out.one("hbd_server_pings_total", "counter", "Pings received; each one is answered with a pong.", n.pings)
    out.family(
        "hbd_server_connections_total",
        "counter",
        "Client connections by what became of them at accept (refused: max_clients; denied: allow).",
    )
    out.sample("hbd_server_connections_total", n.accepted, {"result": "accepted"})
    out.sample("hbd_server_connections_total", n.refused, {"result": "refused"})
    out.sample("hbd_server_connections_total", n.denied, {"result": "denied"})
    out.one("hbd_server_timeouts_total", "counter", "Clients closed for silence (heartbeat_timeout).", n.timeouts)
    out.one("hbd_server_protocol_errors_total", "counter", "Clients closed for breaking the protocol.", n.rejected)
    out.one("hbd_server_tls_failures_total", "counter", "TLS handshakes (or TLS sessions) that failed.", n.tls_failed)
    if counts is not None:  # from the registry (issue 12)
        out.family("hbd_peers", "gauge", "Known peers by state.")
        for state in PEER_STATES:
            out.sample("hbd_peers", counts.get(state, 0), {"state": state})


def _collect_client(view: ClientView, out: Exposition) -> None:
    per = [({"server": row.name or row.address, "address": row.address}, row) for row in view.links]
    out.family("hbd_client_link_up", "gauge", "1 while the server answers pings (UP or LATE), else 0.")
    for labels, row in per:
        out.sample("hbd_client_link_up", 1 if row.state in ("UP", "LATE") else 0, labels)
    for name, attr, help_text in (
        ("hbd_client_pings_total", "pings", "Pings sent."),
        ("hbd_client_pong_timeouts_total", "timeouts", "Links declared dead: a ping unanswered for pong_timeout."),
        ("hbd_client_connects_total", "connects", "Connection attempts (the first one and every reconnect)."),
    ):
        out.family(name, "counter", help_text)
        for labels, row in per:
            out.sample(name, getattr(row, attr), labels)
    out.family("hbd_client_pongs_total", "counter", "Pongs received.")
    for labels, row in per:
        out.sample("hbd_client_pongs_total", row.rtt.count, labels)
    out.family("hbd_client_rtt_seconds", "histogram", "Ping to pong round-trip time.")
    for labels, row in per:
        out.histogram("hbd_client_rtt_seconds", row.rtt, labels)


# -- HTTP ------------------------------------------------------------------------------------------------
def exposition(view: DaemonViews, breathe: Callable[[], None] | None = None) -> Reply:
    """The whole exposition, a chunk at a time: the daemon's families, then the per-peer ones.
    The peers' values are taken ROWS_PER_TURN rows per loop turn (``breathe`` arranges the next turn's
    wake-up; None: all at once), then written family by family, so that 100,000 peers never hold
    the loop for long and what is kept meanwhile is one small tuple per peer."""
    yield collect(view, peers=False).render()
    if isinstance(view, ClientView) or view.counts is None:
        return
    offset = time.time() - view.daemon.now  # monotonic -> wall clock
    rows = iter(view.peers)
    samples: list[PeerSample] = []
    while batch := list(islice(rows, ROWS_PER_TURN)):
        samples += [peer_sample(row, offset) for row in batch if "pending" not in row.flags]
        if breathe is not None:
            breathe()
            yield None
    yield from peer_chunks(samples)


def http_head(request: bytes) -> tuple[Reply | None, bool]:
    """An HTTP request head -> (the whole reply unless it is GET or HEAD /metrics, HEAD?)."""
    line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return iter([_http(400, "Bad Request", b"bad request\n")]), False
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return iter([_http(405, "Method Not Allowed", b"only GET\n", extra="Allow: GET, HEAD\r\n")]), False
    if target == "/metrics":
        return None, method == "HEAD"
    if target == "/":
        page = b'<html><body><a href="/metrics">hbd metrics</a></body></html>\n'
        return iter([_http(200, "OK", page, content_type="text/html", head_only=method == "HEAD")]), False
    return iter([_http(404, "Not Found", b"not found; try /metrics\n")]), False


# The exposition is streamed: no Content-Length, the body ends when the connection closes (HTTP/1.0).
STREAM_HEAD = f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nConnection: close\r\n\r\n".encode()


def http_reply(view: Callable[[], DaemonViews], request: bytes, breathe: Callable[[], None] | None = None) -> Reply:
    """Answer one HTTP request head: GET /metrics (or /) with the exposition, else an error."""
    other, head_only = http_head(request)
    if other is not None:
        yield from other
        return
    yield STREAM_HEAD
    if not head_only:
        yield from exposition(view(), breathe)


def busy() -> Reply:
    """Too many big replies under way (hbd.commands.MAX_BIG): come back at the next scrape."""
    yield _http(503, "Service Unavailable", b"busy: other scrapes or status requests are under way\n")


def _http(
    code: int,
    reason: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    )
    return head.encode() + (b"" if head_only else body)
