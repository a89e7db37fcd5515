"""The peer registry: who the server's peers are and what state each one is in (sans-I/O).

One registry per server owns every known peer's identity, state, timestamps, reason, flap history
and silence; status, metrics and hooks read it and nothing else. Like hbd.protocol it touches no
socket, no clock and no logger: connections report what happened (with ``now``), and the registry
returns what to do (``Close`` a connection, a ``Notice`` to log / count / hook, a ``Log`` line,
``Watch`` a connection's pings). Connections are opaque hashable keys.

Identity: the greeting name; with ``name_from: certificate`` the certificate's name (a greeting
naming someone else is refused); an unnamed legacy client is its address ("ip:port") unless its
source address matches an expected peer's ``address:``, then it is that peer. A connection joins
its peer at its first ping (a greeting alone holds nothing); a second live connection with the
same name takes over and the older one is closed, so a name is never shown twice and never
reported ``down`` while it is connected.

Times are monotonic except silences (wall clock: an operator's "until 14:00") and the records
written to the state store (wall clock: they outlive the process).

Bounds: per-peer state is a __slots__ object; each event costs O(1) (dicts, a heap of deadlines
with at most one live entry per peer, compacted when stale ones pile up); the flap history of a
peer holds at most flap_threshold + 1 times.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import re
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from itertools import islice
from typing import NamedTuple, Protocol

from hbd.access import Network
from hbd.config import ServerConfig
from hbd.protocol import NAME_PATTERN
from hbd.state_store import PeerRecord, SilenceRecord
from hbd.view import PeerRow

MAX_SILENCES = 100_000  # silences kept (names need not be known peers): bounds what `hbd silence` can cost
MAX_REASON = 256  # characters of an operator's silence reason kept
DIRTY_BATCH = 500  # peer records take_dirty() returns per call (the store writes 500 rows per flush)
TICK_BUDGET = 500  # peers tick() looks at per call (each may make a notice: a log line, an event, a hook)

_NAME_RE = re.compile(NAME_PATTERN)

Key = Hashable  # a connection, as the server identifies it
_FLAGS = {  # a row's flags by (flapping, rising): made once, not per row
    (f, r): frozenset(name for name, on in (("flapping", f), ("rising", r)) if on)
    for f in (False, True)
    for r in (False, True)
}


class PeerStatus(Enum):
    NEW = "NEW"  # expected (or remembered across a restart) and not seen yet: waiting for its first ping
    UP = "UP"
    LATE = "LATE"
    DOWN = "DOWN"


class Expected(Protocol):
    """An expected peer from the config (hbd.config's ExpectedPeer has these attributes)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> Network | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    heartbeat_timeout: float = 10.0  # the timeout of a peer that announced none
    forget_after: float = 604800.0
    startup_grace: float | None = None  # None: each peer's timeout
    unexpected: str = "allow"  # allow | warn | reject
    rise: int = 1
    flap_threshold: int = 5
    flap_window: float = 300.0
    max_peers: int = 10000
    name_from: str = "greeting"  # greeting | certificate


def registry_settings(cfg: ServerConfig) -> RegistrySettings:
    """The registry's settings from a server's configuration."""
    return RegistrySettings(
        heartbeat_timeout=cfg.heartbeat_timeout,
        forget_after=cfg.forget_after,
        startup_grace=cfg.startup_grace,
        unexpected=cfg.unexpected,
        rise=cfg.rise,
        flap_threshold=cfg.flap_threshold,
        flap_window=cfg.flap_window,
        max_peers=cfg.max_peers,
        name_from=cfg.tls.name_from if cfg.tls is not None else "greeting",
    )


def expected_peers(cfg: ServerConfig) -> tuple[Expected, ...]:
    return cfg.peers


def _show(net: Network | None) -> str:
    """An expected peer's address until it connects: an address, a network, or nothing."""
    if net is None:
        return ""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


class Dirty(NamedTuple):
    """What changed since the last take_dirty(): what the state store must write."""

    peers: list[PeerRecord]
    forgotten: list[str]
    silences: list[SilenceRecord]
    unsilenced: list[str]


# -- actions ----------------------------------------------------------------------------------------
class Close(NamedTuple):
    """Close this connection (a refused name, or the older of two connections with one name)."""

    key: Key
    reason: str
    peer: str
    level: int = logging.WARNING


class Notice(NamedTuple):
    """A peer's state changed (``up``, ``late``, ``down``) or its flapping did (``flapping``,
    ``stable``): log it (``level``), count it, and run the hooks when ``hook``."""

    peer: str
    event: str
    old: str
    new: str
    reason: str
    silenced: bool
    level: int
    hook: bool
    address: str
    expected: bool
    since: float  # monotonic: when it happened
    labels: tuple[tuple[str, str], ...]
    named: bool  # False for an unnamed legacy client (its identity is its address)


class Log(NamedTuple):
    """A line worth logging that is no state change (unexpected peers, forgetting, silences)."""

    level: int
    peer: str
    address: str
    message: str


class Watch(NamedTuple):
    """Report this connection's every ping (``pinged``) while ``on``: its peer is rising."""

    key: Key
    on: bool


Action = Close | Notice | Log | Watch


class Live(NamedTuple):
    """What the server knows of a connected peer's connection, for its row."""

    connected: float  # monotonic
    last_ping: float | None
    pings: int
    timeout: float
    interval: float | None


class AddressBook:
    """The expected peers' ``address:`` (addresses and networks), to know a legacy client by its
    source address: one dict lookup per prefix length in use (at most 33 + 129), whatever their number."""

    __slots__ = ("_by_len",)

    def __init__(self, expected: Iterable[Expected] = ()) -> None:
        self._by_len: dict[int, dict[Network, str]] = {}  # prefix length -> network -> expected name
        for e in expected:
            if e.address is not None:
                self._by_len.setdefault(e.address.prefixlen, {})[e.address] = e.name

    def match(self, address: str) -> str | None:
        """The expected peer whose ``address:`` holds this source address ("ip:port")."""
        if not self._by_len:
            return None
        host = address.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for prefixlen, nets in self._by_len.items():
            if prefixlen > ip.max_prefixlen:
                continue
            name = nets.get(ipaddress.ip_network((ip, prefixlen), strict=False))
            if name is not None:
                return name
        return None


class Silences:
    """Maintenance silences by name (known peers or not), with their wall-clock ends: a heap of when
    to look (monotonic; at most one live entry per name, compacted), and what the store must write."""

    def __init__(self) -> None:
        self.by_name: dict[str, Silence] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._dirty: set[str] = set()

    def add(self, name: str, until: float, reason: str, now: float, wall: float) -> SilenceRecord | str:
        if not _NAME_RE.match(name):
            return f"not a peer name: {name[:64]!r}"
        if until <= wall:
            return "the silence would already be over"
        if name not in self.by_name and len(self.by_name) >= MAX_SILENCES:
            return f"too many silences ({MAX_SILENCES})"
        reason = reason[:MAX_REASON]
        old = self.by_name.get(name)
        created = old.created if old is not None else wall
        self._put(name, Silence(until, reason, created, now + (until - wall)))
        self._dirty.add(name)
        return SilenceRecord(name, until, reason, created)

    def _put(self, name: str, silence: Silence) -> None:
        self.by_name[name] = silence
        self._seq += 1
        heapq.heappush(self._heap, (silence.due, self._seq, name))
        if len(self._heap) > 2 * len(self.by_name) + 64:
            live = self.by_name
            self._heap = [e for e in self._heap if e[2] in live and live[e[2]].due == e[0]]
            heapq.heapify(self._heap)

    def remove(self, name: str) -> bool:
        if self.by_name.pop(name, None) is None:
            return False
        self._dirty.add(name)
        return True

    def records(self) -> list[SilenceRecord]:
        return [SilenceRecord(n, s.until, s.reason, s.created) for n, s in self.by_name.items()]

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float, wall: float) -> list[str]:
        """The names whose silence ended by ``wall``."""
        ended = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, name = heapq.heappop(heap)
            silence = self.by_name.get(name)
            if silence is None or silence.due != when:
                continue
            if silence.until > wall:  # the wall clock was set back: look again then
                silence.due = now + (silence.until - wall)
                self._put(name, silence)
                continue
            del self.by_name[name]
            self._dirty.add(name)
            ended.append(name)
        return ended

    def take_dirty(self) -> tuple[list[SilenceRecord], list[str]]:
        """(silences to write, names whose silence is to be deleted) since the last call."""
        put = [SilenceRecord(n, s.until, s.reason, s.created) for n in self._dirty if (s := self.by_name.get(n))]
        dropped = [n for n in self._dirty if n not in self.by_name]
        self._dirty = set()
        return put, dropped

    def load(self, records: Iterable[SilenceRecord], now: float, wall: float) -> None:
        """Silences from the store that have not ended."""
        for s in records:
            if s.until > wall and _NAME_RE.match(s.name) and len(self.by_name) < MAX_SILENCES:
                self._put(s.name, Silence(s.until, s.reason, s.created, now + (s.until - wall)))


class Silence:
    __slots__ = ("created", "due", "reason", "until")

    def __init__(self, until: float, reason: str, created: float, due: float) -> None:
        self.until = until  # wall clock
        self.reason = reason
        self.created = created  # wall clock
        self.due = due  # monotonic: when tick() looks at it


class Peer:
    __slots__ = (
        "address",
        "changes",
        "expected",
        "filed",
        "flapping",
        "grace",
        "key",
        "labels",
        "last_ping",
        "name",
        "named",
        "reason",
        "rising",
        "since",
        "status",
        "timeout",
    )

    def __init__(self, name: str, address: str, status: PeerStatus, now: float, timeout: float, named: bool) -> None:
        self.name = name
        self.named = named  # False: an unnamed legacy client, known by its address
        self.address = address
        self.status = status
        self.since = now
        self.last_ping: float | None = None
        self.reason = ""
        self.expected = False
        self.labels: tuple[tuple[str, str], ...] = ()
        self.timeout = timeout
        self.key: Key | None = None  # its connection, once it pinged on one
        self.rising = 0  # on-time pings counted while it rises from DOWN (0: not rising)
        self.flapping = False
        self.changes: deque[float] | None = None  # recent state changes (flap detection), made on first use
        self.grace = float("inf")  # NEW: DOWN "never connected" at this time
        self.filed = float("inf")  # when its live entry in the deadline heap is due


class Registry:
    def __init__(
        self, settings: RegistrySettings, expected: Iterable[Expected] = (), now: float = 0.0, wall: float = 0.0
    ) -> None:
        self.settings = settings
        self.peers: dict[str, Peer] = {}
        self.by_key: dict[Key, Peer] = {}
        self.expected: dict[str, Expected] = {}
        self.addresses = AddressBook()
        self._counts = dict.fromkeys(PeerStatus, 0)
        self._heap: list[tuple[float, int, Peer]] = []
        self._seq = 0
        self.silences_ = Silences()
        self.silenced = self.silences_.by_name  # name -> Silence (read by the server's log levels)
        self._dirty: dict[str, None] = {}  # names to write, oldest first (an ordered set)
        self._forgotten: set[str] = set()
        self.configure(settings, expected, now)

    # -- configuration -------------------------------------------------------------------------------
    def configure(self, settings: RegistrySettings, expected: Iterable[Expected], now: float) -> list[Action]:
        """New settings and expected peers (start-up and every reload). A newly expected peer is
        NEW with its grace starting now; one no longer listed becomes forgettable."""
        self.settings = settings
        new = {e.name: e for e in expected}
        old = self.expected
        self.expected = new
        self.addresses = AddressBook(new.values())
        actions: list[Action] = []
        for name in old.keys() - new.keys():
            peer = self.peers.get(name)
            if peer is None:
                continue
            peer.expected = False
            self._dirty[name] = None
            if peer.key is None and peer.status is PeerStatus.NEW:
                self._forget(peer)  # never seen: nothing to remember
            else:
                self._schedule(peer)
        for name, e in new.items():
            peer = self.peers.get(name)
            timeout = e.timeout if e.timeout is not None else settings.heartbeat_timeout
            if peer is None:
                peer = Peer(name, _show(e.address), PeerStatus.NEW, now, timeout, True)
                self.peers[name] = peer
                self._counts[PeerStatus.NEW] += 1
                peer.reason = "not seen yet"
                peer.grace = now + self._grace(timeout)
            elif peer.key is None:
                peer.timeout = timeout
            if not peer.expected or peer.labels != e.labels:
                self._dirty[name] = None
            peer.expected = True
            peer.labels = e.labels
            self._schedule(peer)
        return actions

    def _grace(self, timeout: float) -> float:
        grace = self.settings.startup_grace
        return timeout if grace is None else grace

    # -- identity --------------------------------------------------------------------------------------
    def identify(self, name: str | None, certificate: str | None, address: str) -> tuple[str, bool] | str:
        """(identity, named) for a connection, or why it is refused."""
        if self.settings.name_from == "certificate":
            if certificate is None:
                return "no certificate name (tls.name_from: certificate)"
            if name is not None and name != certificate:
                return f"name mismatch: it greeted as {name}, its certificate names {certificate}"
            return certificate, True
        if name is not None:
            return name, True
        expected = self.addresses.match(address)
        if expected is not None:
            return expected, True
        return address, False

    def _admit(self, identity: str, key: Key) -> Close | None:
        """Whether a connection may be this peer: unexpected names and max_peers."""
        if identity in self.expected:
            return None
        if self.settings.unexpected == "reject":
            return Close(key, f"{identity} is not an expected peer (unexpected: reject)", identity)
        if identity not in self.peers and len(self.peers) >= self.settings.max_peers:
            return Close(key, f"max_peers ({self.settings.max_peers}) reached: {identity} refused", identity)
        return None

    def hello(self, key: Key, name: str, certificate: str | None, address: str) -> list[Action]:
        """A connection greeted: refuse it now if its name is not acceptable (nothing is bound yet)."""
        who = self.identify(name, certificate, address)
        if isinstance(who, str):
            return [Close(key, who, name)]
        refused = self._admit(who[0], key)
        return [refused] if refused is not None else []

    # -- what connections report -------------------------------------------------------------------------
    def connected(
        self, key: Key, name: str | None, certificate: str | None, address: str, timeout: float, now: float
    ) -> list[Action]:
        """The connection's first ping: it is this peer's connection from now on."""
        who = self.identify(name, certificate, address)
        if isinstance(who, str):
            return [Close(key, who, name or address)]
        identity, named = who
        refused = self._admit(identity, key)
        if refused is not None:
            return [refused]
        actions: list[Action] = []
        peer = self.peers.get(identity)
        if peer is None:
            if self.settings.unexpected == "warn":
                actions.append(Log(logging.WARNING, identity, address, f"{identity} is not an expected peer"))
            peer = Peer(identity, address, PeerStatus.NEW, now, timeout, named)
            self.peers[identity] = peer
            self._counts[PeerStatus.NEW] += 1
        old_key = peer.key
        if old_key is not None and old_key != key:
            self.by_key.pop(old_key, None)
            actions.append(
                Close(
                    old_key,
                    f"{identity}: replaced by a newer connection from {address} (this one is from {peer.address})",
                    identity,
                )
            )
        peer.key = key
        self.by_key[key] = peer
        peer.address = address
        peer.timeout = timeout
        peer.last_ping = now
        peer.grace = float("inf")
        self._dirty[identity] = None
        if peer.status is PeerStatus.DOWN and self.settings.rise > 1:
            peer.rising = 1
            peer.reason = f"rising: 1 of {self.settings.rise} pings"
            actions.append(Watch(key, True))
            return actions
        peer.rising = 0
        if peer.status is not PeerStatus.UP:
            reason = "first ping" if peer.status is PeerStatus.NEW else "ping"
            self._change(peer, PeerStatus.UP, reason, now, actions)
        return actions

    def pinged(self, key: Key, silent_for: float, now: float) -> list[Action]:
        """A ping on a watched connection (its peer is rising from DOWN)."""
        peer = self.by_key.get(key)
        if peer is None or not peer.rising:
            return [Watch(key, False)]
        peer.last_ping = now
        rise = self.settings.rise
        if silent_for > peer.timeout / 2:
            peer.rising = 1  # late: the count starts again with this ping
        else:
            peer.rising += 1
        if peer.rising < rise:
            peer.reason = f"rising: {peer.rising} of {rise} pings"
            return []
        peer.rising = 0
        actions: list[Action] = [Watch(key, False)]
        self._change(peer, PeerStatus.UP, f"{rise} pings on time", now, actions)
        return actions

    def late(self, key: Key, now: float) -> list[Action]:
        """Its connection is silent for more than half its timeout."""
        peer = self.by_key.get(key)
        actions: list[Action] = []
        if peer is None:
            return actions
        if peer.rising:
            return actions  # still DOWN; the late ping that ends this starts the count again
        self._change(peer, PeerStatus.LATE, "silent", now, actions)
        return actions

    def back(self, key: Key, now: float) -> list[Action]:
        """A ping after it was late."""
        peer = self.by_key.get(key)
        actions: list[Action] = []
        if peer is None:
            return actions
        peer.last_ping = now
        if peer.rising:
            peer.rising = 1  # a late ping: the count starts again
            return actions
        self._change(peer, PeerStatus.UP, "ping", now, actions)
        return actions

    def gone(self, key: Key, reason: str, now: float, last_ping: float | None = None) -> list[Action]:
        """Its connection ended (timed out, disconnected, broke the protocol...). Nothing happens for
        a connection that never pinged or that a newer one replaced."""
        peer = self.by_key.pop(key, None)
        actions: list[Action] = []
        if peer is None or peer.key != key:
            return actions
        peer.key = None
        if last_ping is not None:
            peer.last_ping = last_ping
        if peer.rising:
            peer.rising = 0
            peer.reason = reason
            actions.append(Watch(key, False))
        self._change(peer, PeerStatus.DOWN, reason, now, actions)
        self._dirty[peer.name] = None
        if not peer.named and not peer.expected:
            self._forget(peer)  # an unnamed legacy client: its address will not come back
        else:
            self._schedule(peer)
        return actions

    def rising(self, key: Key) -> bool:
        peer = self.by_key.get(key)
        return peer is not None and peer.rising > 0

    # -- state changes -----------------------------------------------------------------------------------
    def _change(self, peer: Peer, new: PeerStatus, reason: str, now: float, actions: list[Action]) -> None:
        old = peer.status
        if old is new:
            return
        counts = self._counts
        counts[old] -= 1
        counts[new] += 1
        peer.status = new
        peer.since = now
        peer.reason = reason
        self._dirty[peer.name] = None
        silenced = peer.name in self.silenced
        flapping_now = self._flap(peer, now)
        quiet = silenced or peer.flapping
        level = logging.INFO if quiet or new is PeerStatus.UP else logging.WARNING
        name = new._value_  # the plain attribute: Enum's .value is a property, slower on every change
        actions.append(self._notice(peer, name.lower(), old._value_, name, reason, silenced, level, not quiet, now))
        if flapping_now:
            n, window = self.settings.flap_threshold, self.settings.flap_window
            why = f"more than {n} changes within {window:g} s; its hooks wait until it is stable"
            actions.append(
                self._notice(
                    peer,
                    "flapping",
                    name,
                    name,
                    why,
                    silenced,
                    logging.INFO if silenced else logging.WARNING,
                    not silenced,
                    now,
                )
            )
        self._schedule(peer)

    def _notice(
        self,
        peer: Peer,
        event: str,
        old: str,
        new: str,
        reason: str,
        silenced: bool,
        level: int,
        hook: bool,
        now: float,
    ) -> Notice:
        return Notice(
            peer.name,
            event,
            old,
            new,
            reason,
            silenced,
            level,
            hook,
            peer.address,
            peer.expected,
            now,
            peer.labels,
            peer.named,
        )

    def _flap(self, peer: Peer, now: float) -> bool:
        """Record a change; True when it makes the peer flapping."""
        n = self.settings.flap_threshold
        changes = peer.changes
        if changes is None or changes.maxlen != n + 1:
            changes = peer.changes = deque(changes or (), maxlen=n + 1)
        changes.append(now)
        if peer.flapping or len(changes) <= n or now - changes[0] > self.settings.flap_window:
            return False
        peer.flapping = True
        return True

    # -- deadlines -------------------------------------------------------------------------------------
    def _due(self, peer: Peer) -> float:
        """When tick() must next look at this peer."""
        due = peer.grace if peer.status is PeerStatus.NEW and peer.key is None else float("inf")
        if peer.status is PeerStatus.DOWN and peer.key is None and not peer.expected:
            due = min(due, peer.since + self.settings.forget_after)
        if peer.flapping and peer.changes:
            due = min(due, peer.changes[-1] + self.settings.flap_window)
        return due

    def _schedule(self, peer: Peer) -> None:
        due = self._due(peer)
        if due < peer.filed:  # a later due time is found when the earlier entry comes (and re-filed)
            peer.filed = due
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, peer))
            if len(self._heap) > 2 * len(self.peers) + 64:
                self._compact()

    def _compact(self) -> None:
        """Drop stale entries (peers forgotten, or filed again sooner): O(N), after N stale ones."""
        self._heap = [e for e in self._heap if e[2].filed == e[0] and self.peers.get(e[2].name) is e[2]]
        heapq.heapify(self._heap)

    def next_deadline(self) -> float | None:
        """When tick() has something to do (monotonic; it may find nothing then)."""
        due = self._heap[0][0] if self._heap else None
        sdue = self.silences_.next_due()
        return sdue if sdue is not None and (due is None or sdue < due) else due

    def tick(self, now: float, wall: float, budget: int = TICK_BUDGET) -> list[Action]:
        """Apply what is due: grace ends (DOWN "never connected"), forgetting, flapping ends
        (``stable``), silences ending. At most ``budget`` peers per call: when more are due (10,000
        expected peers whose grace ends at once), next_deadline() stays due and the caller calls
        again on its next turn, so that no turn of the loop works through them all."""
        actions: list[Action] = []
        heap = self._heap
        while heap and heap[0][0] <= now and budget > 0:
            when, _, peer = heapq.heappop(heap)
            if peer.filed != when or self.peers.get(peer.name) is not peer:
                continue  # stale
            budget -= 1
            peer.filed = float("inf")
            self._due_now(peer, now, actions)
            if self.peers.get(peer.name) is peer:
                self._schedule(peer)
        for name in self.silences_.expire(now, wall):
            known = self.peers.get(name)
            actions.append(Log(logging.INFO, name, known.address if known else "", f"the silence on {name} ended"))
        return actions

    def _due_now(self, peer: Peer, now: float, actions: list[Action]) -> None:
        if peer.status is PeerStatus.NEW and peer.key is None and peer.grace <= now:
            peer.grace = float("inf")
            reason = "never connected" if peer.last_ping is None else "not back after a restart"
            self._change(peer, PeerStatus.DOWN, reason, now, actions)
            if not peer.expected and not peer.named:
                self._forget(peer)
                return
        if (
            peer.status is PeerStatus.DOWN
            and peer.key is None
            and not peer.expected
            and now >= peer.since + self.settings.forget_after
        ):
            self._forget(peer)
            actions.append(Log(logging.INFO, peer.name, peer.address, f"forgetting {peer.name}: down since long"))
            return
        if peer.flapping and peer.changes and now >= peer.changes[-1] + self.settings.flap_window:
            peer.flapping = False
            peer.changes.clear()
            self._dirty[peer.name] = None
            silenced = peer.name in self.silenced
            state = peer.status.value
            window = self.settings.flap_window
            actions.append(
                self._notice(
                    peer,
                    "stable",
                    state,
                    state,
                    f"no change for {window:g} s: {state}",
                    silenced,
                    logging.INFO,
                    not silenced,
                    now,
                )
            )

    def _forget(self, peer: Peer) -> None:
        if self.peers.get(peer.name) is not peer:
            return
        del self.peers[peer.name]
        self._counts[peer.status] -= 1
        if peer.key is not None:
            self.by_key.pop(peer.key, None)
        peer.filed = float("inf")
        self._dirty.pop(peer.name, None)
        if peer.named:
            self._forgotten.add(peer.name)

    # -- silences (their own object: they need not name a known peer) ----------------------------------
    def silence(self, name: str, until: float, reason: str, now: float, wall: float) -> SilenceRecord | str:
        """Silence a peer (known or not) until ``until`` (wall clock); an error string if refused."""
        return self.silences_.add(name, until, reason, now, wall)

    def unsilence(self, name: str) -> bool:
        return self.silences_.remove(name)

    def silences(self) -> list[SilenceRecord]:
        return self.silences_.records()

    # -- what status and metrics read ----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {s.value: n for s, n in self._counts.items()}

    def __len__(self) -> int:
        return len(self.peers)

    def rows(self, live: Callable[[Key], Live | None] | None = None, worker: int | None = None) -> Iterator[PeerRow]:
        """One row per known peer, made as they are read (from a snapshot of the peers)."""
        silenced = self.silenced
        for peer in list(self.peers.values()):
            info = live(peer.key) if live is not None and peer.key is not None else None
            silence = silenced.get(peer.name)
            flags = _FLAGS[peer.flapping, peer.rising > 0]
            yield PeerRow(
                peer.name,
                peer.name if peer.named else None,
                peer.address,
                peer.status.value,
                info.connected if info is not None else None,
                info.last_ping if info is not None and info.last_ping is not None else peer.last_ping,
                info.pings if info is not None else 0,
                info.timeout if info is not None else peer.timeout,
                info.interval if info is not None else None,
                worker,
                since=peer.since,
                reason=peer.reason,
                expected=peer.expected,
                silenced_until=silence.until if silence is not None else None,
                flags=flags,
                labels=peer.labels,
            )

    # -- the state store -------------------------------------------------------------------------------------
    def take_dirty(
        self, now: float, wall: float, live: Callable[[Key], Live | None] | None = None, limit: int = DIRTY_BATCH
    ) -> Dirty:
        """What changed since it was last taken, as wall-clock records: at most ``limit`` peers (the
        oldest changes first; ``dirty()`` says how many wait), so that taking them is one bounded step."""
        offset = wall - now
        records = []
        dirty = self._dirty
        names = list(islice(dirty, limit))
        for name in names:
            del dirty[name]
            peer = self.peers.get(name)
            if peer is None or not (peer.named or peer.expected):
                continue
            last = peer.last_ping
            if live is not None and peer.key is not None:
                info = live(peer.key)
                if info is not None and info.last_ping is not None:
                    last = info.last_ping
            records.append(
                PeerRecord(
                    name,
                    peer.address,
                    peer.status.value,
                    peer.since + offset,
                    None if last is None else last + offset,
                    peer.reason,
                    peer.expected,
                    peer.timeout,
                    peer.labels,
                )
            )
        silences, gone = self.silences_.take_dirty()
        taken = Dirty(records, sorted(self._forgotten), silences, gone)
        self._forgotten = set()
        return taken

    def dirty(self) -> int:
        """Peers waiting to be taken by take_dirty()."""
        return len(self._dirty)

    def mark_connected_dirty(self) -> None:
        """Every connected peer is to be written (at shutdown: their last pings)."""
        self._dirty.update((p.name, None) for p in self.by_key.values())

    def restore(
        self, peers: Iterable[PeerRecord], silences: Iterable[SilenceRecord], now: float, wall: float
    ) -> list[Action]:
        """After a restart: remembered peers come back as NEW with a grace of their timeout (DOWN
        ones stay DOWN, since when and why); silences that have not ended come back."""
        offset = now - wall  # wall -> monotonic
        actions: list[Action] = []
        for rec in peers:
            if not _NAME_RE.match(rec.name):
                continue
            peer = self.peers.get(rec.name)
            if peer is None:
                if len(self.peers) >= self.settings.max_peers or self.settings.unexpected == "reject":
                    continue  # no room, or a name that would be refused now
                if rec.state == PeerStatus.NEW.value:
                    continue  # expected once, never seen, no longer listed
                peer = Peer(rec.name, rec.address, PeerStatus.NEW, now, rec.timeout, True)
                self.peers[rec.name] = peer
                self._counts[PeerStatus.NEW] += 1
            elif peer.key is not None:
                continue  # already connected again
            peer.address = rec.address or peer.address
            peer.last_ping = None if rec.last_ping is None else min(rec.last_ping + offset, now)
            if rec.state == PeerStatus.DOWN.value:
                self._counts[peer.status] -= 1
                self._counts[PeerStatus.DOWN] += 1
                peer.status = PeerStatus.DOWN
                peer.since = min(rec.since + offset, now)
                peer.reason = rec.reason
                peer.grace = float("inf")
            else:
                if not peer.expected:
                    peer.timeout = rec.timeout
                if rec.last_ping is not None or not peer.expected:  # else its startup grace runs
                    peer.since = now
                    peer.reason = "waiting for it after a restart"
                    peer.grace = now + peer.timeout
            self._schedule(peer)
        self.silences_.load(silences, now, wall)
        return actions
