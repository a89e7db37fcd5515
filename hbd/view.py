"""What a daemon shows the operator: typed, read-only snapshots that status.py and metrics.py render.

Each daemon produces one view when asked (``view()``): a ``ServerView``, ``SupervisorView`` or
``ClientView``, each carrying the ``DaemonView`` every daemon shares. Renderers read these and
nothing else, so they import no daemon module and a daemon's internals can change freely.

Times are the loop's monotonic clock (``DaemonView.now`` is the snapshot's); renderers convert them
to wall time. Rows are immutable; ``ServerView.peers`` is produced while it is iterated (one pass,
from a snapshot of the connections taken by ``view()``), so a large table is serialised a slice at a
time without a second copy.

The peer registry (issue 12) fills the optional parts: a row's ``since``, ``reason``, ``flags``,
``labels`` and ``silenced_until``, and ``counts`` by state. Renderers show them when present (with
``counts``, the metrics give every listed peer its own series: ``hbd_peer_up`` and friends).
This module imports nothing from hbd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

PEER_STATES = ("NEW", "UP", "LATE", "DOWN")  # the registry's states (today's servers show NEW, UP, LATE)
EVENTS = ("up", "late", "down", "flapping", "stable")  # the last two: the registry's
HOOK_RESULTS = ("ok", "failed", "timeout", "error", "dropped", "coalesced")


class RecentEvent(NamedTuple):
    """One peer state change, as kept for the status reply."""

    time: float  # wall clock (when it happened is history, not liveness)
    event: str
    peer: str
    address: str
    previous: str | None
    reason: str


# Event loop turn durations, seconds (hbd.loop keeps the histogram): a turn over 0.1 s delays every peer.
TURN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Turns:
    """The event loop's turn durations: counts per bound of ``bounds``, then +Inf (not cumulative),
    their sum and the longest turn, seconds."""

    bounds: tuple[float, ...] = TURN_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(TURN_BUCKETS) + 1)
    sum: float = 0.0
    max: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def over(self, limit: float) -> int:
        """Turns longer than ``limit``, which is one of the bounds (so the buckets say it exactly)."""
        return sum(self.counts[self.bounds.index(limit) + 1 :])

    def plus(self, other: Turns) -> Turns:
        """Both processes' turns together (a worker's with its supervisor's); other bounds count as none."""
        if other.bounds != self.bounds or len(other.counts) != len(self.counts):
            return self
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Turns(self.bounds, counts, self.sum + other.sum, max(self.max, other.max))

    def to_dict(self) -> dict[str, object]:
        return {"counts": list(self.counts), "sum": self.sum, "max": self.max}

    @classmethod
    def from_dict(cls, d: object) -> Turns:
        """Tolerant, like WorkerNumbers.from_dict: anything but TURN_BUCKETS' shape counts as no turns."""
        if not isinstance(d, Mapping):
            return cls()
        counts, total, longest = d.get("counts"), d.get("sum"), d.get("max")
        if (
            not isinstance(counts, list)
            or len(counts) != len(TURN_BUCKETS) + 1
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
            or not isinstance(total, int | float)
            or not isinstance(longest, int | float)
        ):
            return cls()
        return cls(TURN_BUCKETS, tuple(counts), float(total), float(longest))


class LoopNumbers(NamedTuple):
    lag: float  # seconds
    max_lag: float
    stalls: int
    turns: Turns = Turns()


@dataclass(frozen=True, slots=True)
class DaemonView:
    """What every daemon reports: who it is, its reloads, its loop, its hooks and state changes."""

    role: str  # "server" or "client" (a supervisor is a server)
    now: float  # the loop's monotonic time of this snapshot
    started: float  # wall clock
    status: str  # the STATUS= line
    reloads_ok: int
    reloads_failed: int
    last_reload_error: str | None
    loop: LoopNumbers
    hooks: Mapping[str, int]  # HOOK_RESULTS, then "running" and "queued"
    events: Mapping[str, int]  # EVENTS
    recent: tuple[RecentEvent, ...]


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One peer a server knows."""

    peer: str  # how it is shown: its name, else its address
    name: str | None
    address: str
    state: str  # PEER_STATES
    connected: float | None  # monotonic; None when not connected (a registry's DOWN peer)
    last_ping: float | None  # monotonic; None before the first ping
    pings: int
    timeout: float
    interval: float | None
    worker: int | None = None  # which worker serves it (``workers: K``)
    # Filled by the registry (issue 12); None / empty from a server without one.
    since: float | None = None  # monotonic: in this state since
    reason: str | None = None
    expected: bool | None = None
    silenced_until: float | None = None  # wall clock
    flags: frozenset[str] = frozenset()  # e.g. "flapping"; "pending": a connection that is no peer yet
    labels: tuple[tuple[str, str], ...] = ()
    # This process's accounting of the peer's changes (hbd.peer_uptime): None before its first change.
    uptime_24h: float | None = None  # percent of the known time UP or LATE, over at most the last 24 h
    outages: int | None = None
    down_seconds: float | None = None


Who = tuple[str | None, str, str]  # how a peer would be shown: (its name or None, address, state)

# One peer's per-peer metric values: its labels (rendered), up, last ping (wall clock or None),
# flapping, silenced, expected, outages, seconds down. A scrape keeps these, not rows, until every
# family is out.
PeerSample = tuple[str, int, float | None, int, int, int, int, float]
# (wall-clock offset, the workers' last pings (monotonic) by the registry's key of the connection,
# peers per batch) -> batches of samples
SampleBatches = Callable[[float, Mapping[int, float], int], Iterator[list[PeerSample]]]


@dataclass(frozen=True, slots=True)
class PeerSource:
    """A snapshot of things a server may show as peer rows, for a filtered status: ``who(i)`` says
    cheaply how the i-th one would be shown (None: it is not), so that a filter is applied before
    its row is made (``row(i)``; None: gone since the snapshot). ``size`` items, 0 to size - 1."""

    size: int
    who: Callable[[int], Who | None]
    row: Callable[[int], PeerRow | None]


class LazySource:
    """A ``PeerSource`` made when a scan first looks at it, not when the view is: a view then costs
    nothing per peer (a snapshot of 100,000 peers is milliseconds) until a status reads its peers,
    and a request that never does (the counts, a worker's last pings, a scrape's head) never pays."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[[], PeerSource]) -> None:
        self._make: Callable[[], PeerSource] | None = make
        self._made: PeerSource | None = None

    def get(self) -> PeerSource:
        if self._made is None:
            assert self._make is not None
            self._made, self._make = self._make(), None
        return self._made

    @property
    def size(self) -> int:
        return self.get().size

    @property
    def who(self) -> Callable[[int], Who | None]:
        return self.get().who

    @property
    def row(self) -> Callable[[int], PeerRow | None]:
        return self.get().row


Source = PeerSource | LazySource


def source_rows(sources: Iterable[Source]) -> Iterator[PeerRow]:
    """Every row of ``sources`` in order, made as they are read (a ``LazySource`` takes its snapshot
    at its first row): the peers a view's ``peers`` streams (metrics, a worker's relay) are so the
    very ones a filtered status scans, from one producer."""
    for source in sources:
        row = source.row
        for i in range(source.size):
            made = row(i)
            if made is not None:
                yield made


class ServerCounters(NamedTuple):
    """One server process's counters; a worker sends them to its supervisor, which sums them."""

    clients: int = 0
    late: int = 0
    pings: int = 0
    accepted: int = 0
    refused: int = 0
    timeouts: int = 0
    rejected: int = 0
    denied: int = 0
    tls_failed: int = 0

    def plus(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a + b for a, b in zip(self, other, strict=True)))


class ServerSettings(NamedTuple):
    heartbeat_timeout: float
    max_clients: int
    workers: int


@dataclass(frozen=True, slots=True)
class WorkerNumbers:
    """What a worker reports to its supervisor every second (for the metrics)."""

    counters: ServerCounters
    events: Mapping[str, int]
    hooks: Mapping[str, int]
    loop: LoopNumbers

    def to_dict(self) -> dict[str, object]:
        c, loop = self.counters, self.loop
        return {
            **c._asdict(),
            "events": dict(self.events),
            "hooks": dict(self.hooks),
            "lag": loop.lag,
            "max_lag": loop.max_lag,
            "stalls": loop.stalls,
            "turns": loop.turns.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> WorkerNumbers:
        """Tolerant: what is missing or not a number counts as 0 (a worker of another version)."""

        def num(key: str) -> float:
            v = d.get(key, 0)
            return v if isinstance(v, int | float) and not isinstance(v, bool) else 0

        def ints(key: str) -> dict[str, int]:
            v = d.get(key)
            if not isinstance(v, Mapping):
                return {}
            return {str(k): n for k, n in v.items() if isinstance(n, int) and not isinstance(n, bool)}

        counters = ServerCounters(*(int(num(k)) for k in ServerCounters._fields))
        return cls(
            counters,
            ints("events"),
            ints("hooks"),
            LoopNumbers(float(num("lag")), float(num("max_lag")), int(num("stalls")), Turns.from_dict(d.get("turns"))),
        )


@dataclass(frozen=True, slots=True)
class ServerView:
    daemon: DaemonView
    listen: str | None  # "host:port", None before it listens
    config: ServerSettings
    counters: ServerCounters
    peers: Iterable[PeerRow]  # one pass
    counts: Mapping[str, int] | None = None  # peers by state, from the registry
    sources: tuple[Source, ...] = ()  # the same peers, for a filtered status (hbd.status_select)
    # a worker's connected peers (its number for each connection) and when each last pinged
    # (monotonic): the supervisor's metrics ask (hbd.ping_times)
    last_pings: Callable[[], Iterator[tuple[int, float]]] | None = None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    index: int
    pid: int
    clients: int
    late: int
    numbers: WorkerNumbers | None  # None until it first reported


@dataclass(frozen=True, slots=True)
class SupervisorView:
    """``workers: K``: connected peers are shown by the workers that hold them (status relays them,
    with what the supervisor's registry says of each); the others are the supervisor's ``peers``."""

    daemon: DaemonView
    listen: str
    config: ServerSettings
    workers: tuple[WorkerRow, ...]  # by index
    counts: Mapping[str, int] | None = None  # peers by state, from the registry
    peers: Iterable[PeerRow] = ()  # the registry's peers no worker holds a connection of (one pass)
    # fills in the registry's accounting (uptime, outages, down time) of a row a worker relayed
    account: Callable[[PeerRow], PeerRow] | None = None
    sources: tuple[Source, ...] = ()  # ``peers``, for a filtered status (hbd.status_select)
    samples: SampleBatches | None = None  # the same peers' metric values, without a row each (the metrics)


@dataclass(frozen=True, slots=True)
class Rtt:
    """Round trips of one link: histogram counts (per bound, then +Inf), sum and count."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int
    last: float | None
    max: float


@dataclass(frozen=True, slots=True)
class LinkRow:
    """One server a client pings."""

    peer: str
    name: str | None
    address: str
    state: str  # NEW, UP, LATE, DOWN
    since: float | None  # monotonic
    link: str  # the connection's own state: waiting, connecting, up, gave up
    last_pong: float | None  # monotonic
    rtt: Rtt
    pings: int
    timeouts: int
    connects: int
    retries: int
    outstanding: int
    next_attempt: float | None  # monotonic, while waiting to reconnect


class ClientSettings(NamedTuple):
    heartbeat_interval: float
    pong_timeout: float
    reconnect_attempts: int


@dataclass(frozen=True, slots=True)
class ClientView:
    daemon: DaemonView
    name: str | None
    config: ClientSettings
    links: tuple[LinkRow, ...] = field(default=())


DaemonViews = ServerView | SupervisorView | ClientView
