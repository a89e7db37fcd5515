"""The one peer registry of a server with ``workers: K``, in the supervisor, fed by the workers.

Each worker reports what its connections do (hbd.registry_remote: greeting, first ping, late, back,
end, a rising peer's pings) as small messages over its private pipe; a connection is keyed by the
worker's number for it and the worker's index (one int: ``Key``), so a reused fd cannot be confused.
The registry's answers are carried out here as in one process (hbd.server_registry, which this
extends: notices logged, counted and hooked — hooks run here and only here — its deadlines from one
loop timer, silences, the state store), except that closing a connection or watching its pings is an
order sent down to the worker that holds it. A worker also gets, for each of its connections, a mark
(the peer's name, state, since, reason, flags, labels, silence, and this registry's accounting of
it: outages, down time, the states of its last 24 h) whenever that changes, never per ping, so that
its status rows are the registry's (UPTIME 24h included); the supervisor's own rows are the peers
with no connection (DOWN, NEW). When a worker dies, all its connections are gone (``worker died``):
their clients reconnect to the other workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, cast

from hbd.connection import Connection
from hbd.logs import PeerLog
from hbd.metrics import peer_labels
from hbd.peer_uptime import Account, parts
from hbd.registry import Action, Close, Expected, Log, Notice, Peer, RegistrySettings, Watch
from hbd.server_registry import Events, ServerRegistry
from hbd.silencing import Silence
from hbd.view import PeerSample, PeerSource
from hbd.workers_codec import (
    PeerBack,
    PeerClose,
    PeerConnected,
    PeerHello,
    PeerKnown,
    PeerLate,
    PeerMark,
    PeerOrder,
    PeerPinged,
    PeerReport,
    PeerWatch,
)

if TYPE_CHECKING:
    from hbd.loop import EventLoop

# A connection's key: that worker's number for it and the worker's index, as one int (a dict key and
# Peer.key for each of 100,000 peers: an int is 28-32 B, a tuple of two ~84 B with its number).
Key = int
WORKER_BITS = 16  # index < 2**16 (workers: at most 64); the number is any int: conn << 16 | index


def worker_of(key: Key) -> int:
    return key & ((1 << WORKER_BITS) - 1)


def conn_of(key: Key) -> int:
    return key >> WORKER_BITS


WORKER_DIED = "worker died"
TOLD_BITS = (1 << 53) - 1  # a float holds an int of up to 53 bits exactly
APPLY_BACKLOG = 256 * 1024  # bytes in a worker's pipe past which a reload's marks wait (MAX_OUTBUF is 1 MiB)


class _Held:
    """What the registry room reads of the connection whose report caused a notice: when it first
    pinged (a hook's standing). That connection is in a worker; its own log lines are written there."""

    __slots__ = ("since",)

    def __init__(self, since: float) -> None:
        self.since = since


class SupervisorRegistry(ServerRegistry):
    def __init__(
        self,
        loop: EventLoop,
        settings: RegistrySettings,
        expected: tuple[Expected, ...],
        peer_log: PeerLog,
        events: Events,
        send: Callable[[int, PeerOrder], None],
        wall: Callable[[], float] = time.time,
        backlog: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__(loop, settings, expected, peer_log, events, _nothing, _never, wall)
        self.send = send  # an order to the worker of that index
        self.backlog = backlog  # bytes waiting in the fullest pipe to a worker
        self.registry.take_reconfigured()  # from now on the registry keeps them for the marks
        self.reload.may_apply = self._may_apply
        self._timeouts: dict[float, float] = {}

    # -- what the workers report ---------------------------------------------------------------------
    def report(self, index: int, msg: PeerReport) -> None:
        key: Key = msg.conn << WORKER_BITS | index
        reg, now = self.registry, self.clock()
        peer = reg.by_key.get(key)
        since = peer.first_ping if peer is not None else now  # when its connection first pinged
        if isinstance(msg, PeerHello):
            actions = reg.hello(key, msg.name, msg.certificate, msg.address)
            if not actions and msg.name in reg.peers:
                self.send(index, PeerKnown(msg.conn))
        elif isinstance(msg, PeerConnected):
            timeout = self._timeouts.setdefault(msg.timeout, msg.timeout)  # one float per value, not per peer
            if len(self._timeouts) > 64:
                self._timeouts.clear()  # the config's timeouts are few; a peer's announced ones could be many
            actions = reg.connected(key, msg.name, msg.certificate, msg.address, timeout, now)
            since = now
            if (peer := reg.by_key.get(key)) is not None:
                peer.first_ping = now
        elif isinstance(msg, PeerPinged):
            actions = reg.pinged(key, msg.silent_for, now)
        elif isinstance(msg, PeerLate):
            actions = reg.late(key, now)
        elif isinstance(msg, PeerBack):
            actions = reg.back(key, now)
        else:
            actions = reg.gone(key, msg.reason, now, msg.last_ping)
        marked = self._apply(actions, cast(Connection, _Held(since)))  # its own lines were logged by its worker
        peer = reg.by_key.get(key)
        if peer is not None and peer.name not in marked:  # (a second look found the mark unchanged)
            self._mark(peer)

    def worker_died(self, index: int, reason: str = WORKER_DIED) -> None:
        """All the connections of that worker are gone (their clients will reconnect to the others)."""
        reg, now = self.registry, self.clock()
        for key in keys_of(index, reg.by_key):
            self.apply(reg.gone(key, reason, now))

    # -- carrying out what the registry says ----------------------------------------------------------------
    def apply(self, actions: list[Action], conn: Connection | None = None) -> None:
        """As in one process; closing and watching are the worker's, and the marks of the peers
        these actions are about follow."""
        self._apply(actions, conn)

    def _apply(self, actions: list[Action], conn: Connection | None) -> Container[str]:
        """apply(); the names of the peers marked."""
        if not actions:  # (a greeting, most reports of a storm: nothing to carry out)
            for peer in self.registry.take_reconfigured():
                self._mark(peer)
            return ()
        names: set[str] = set()
        for action in actions:
            if isinstance(action, Close | Watch):
                key = action.key
                if isinstance(key, int):
                    if isinstance(action, Close):
                        self.send(worker_of(key), PeerClose(conn_of(key), action.reason, action.level))
                    else:
                        self.send(worker_of(key), PeerWatch(conn_of(key), action.on))
            elif isinstance(action, Notice | Log):
                names.add(action.peer)
        super().apply(actions, conn)
        peers = self.registry.peers
        for name in names:
            self._mark(peers.get(name))
        for peer in self.registry.take_reconfigured():  # a reload changed its expected flag or labels
            self._mark(peer)
        return names

    def _mark(self, peer: Peer | None) -> None:
        """Tell the peer's worker what the registry says of it, if that changed."""
        if peer is None or not isinstance(peer.key, int):
            return
        key = peer.key
        silence = self.registry.silenced.get(peer.name)
        outages, down, spans = parts(peer.account)
        until = silence.until if silence is not None else None
        # What its worker was last told is kept in the peer as a hash (a tuple of the registry's own
        # objects was 190 B, plus an entry in a table of 100,000), 53 bits of it as a float (24 B; the
        # 64-bit int was 36 B, 48 as allocated). The connection's key is in it: a peer on a new
        # connection is marked. Equal marks hash equal; two different ones hash equal once in 2**53
        # changes, and then the next change's mark corrects the worker's row.
        # each read once: the state and flags are properties over one int (hbd.registry_types.Peer)
        # (the state as its str: hashing the enum member is a Python-level call)
        named, state, expected, flapping, rising = (
            peer.named,
            peer.status._value_,
            peer.expected,
            peer.flapping,
            peer.rising > 0,
        )
        said = float(
            hash(
                (
                    key,
                    peer.name,
                    named,
                    state,
                    peer.since,
                    peer.reason,
                    expected,
                    flapping,
                    rising,
                    peer.labels,
                    until,
                    outages,
                    down,
                    tuple(spans),
                )
            )
            & TOLD_BITS
        )
        if peer.told == said:
            return
        peer.told = said
        flags = [f for f, on in (("flapping", flapping), ("rising", rising)) if on]
        mark = PeerMark(
            conn_of(key),
            peer.name,
            named,
            state,
            peer.since,
            peer.reason,
            expected,
            flags,
            [[k, v] for k, v in peer.labels],
            until,
            outages,
            down,
            [[start, state] for start, state in spans],
        )
        self.send(worker_of(key), mark)

    # -- reloads, silences: what changes the marks of peers not reporting anything ----------------------------
    def _may_apply(self) -> bool:
        """A reload's next slice (up to a mark per peer, ~200 bytes each) waits while a worker's pipe
        holds more than APPLY_BACKLOG: its orders would be dropped past MAX_OUTBUF (hbd.worker_pool)."""
        return self.backlog() <= APPLY_BACKLOG

    def silence(self, peer: str, seconds: float, reason: str) -> Silence | str:
        done = super().silence(peer, seconds, reason)
        self._mark(self.registry.peers.get(peer))
        return done

    def unsilence(self, peer: str) -> bool:
        done = super().unsilence(peer)
        self._mark(self.registry.peers.get(peer))
        return done

    # -- what status and metrics read ------------------------------------------------------------------------
    def metric_samples(self, offset: float, last: Mapping[Key, float], per: int) -> Iterator[list[PeerSample]]:
        """Every peer's metric values straight from the registry and the accounting, ``per`` peers a
        batch (a scrape takes one per loop turn): the same values as hbd.metrics.peer_sample of the
        peer's row, without making a row and an accounted copy of it for each of 100,000 peers.
        ``last``: the workers' last pings by the key of the connection (monotonic), for a peer whose
        connection is there; else the registry's own. ``offset`` turns them into wall clock."""
        reg = self.registry
        peers = list(reg.peers.values())
        silenced = reg.silenced
        for start in range(0, len(peers), per):
            now = self.clock()
            batch: list[PeerSample] = []
            for peer in peers[start : start + per]:
                name, key = peer.name, peer.key
                pinged = last.get(key) if isinstance(key, int) else None
                if pinged is None:
                    pinged = peer.last_ping
                last_ping = round(pinged + offset, 3) if pinged is not None else None
                acc = peer.account
                batch.append(
                    (
                        peer_labels(name, peer.labels),
                        1 if peer.status.value in ("UP", "LATE") else 0,
                        last_ping,
                        1 if peer.flapping else 0,
                        1 if silenced.get(name) is not None else 0,
                        1 if peer.expected else 0,
                        acc.outages if isinstance(acc, Account) else 0,
                        round(acc.down_seconds(now), 3) if isinstance(acc, Account) else 0.0,  # a span: never DOWN
                    )
                )
            yield batch

    def unconnected_source(self) -> PeerSource:
        """The registry's peers that no worker holds a connection of (DOWN, NEW): the workers show the
        others, with their marks. A snapshot of them, each row made only when read (a filtered
        status: only if kept)."""
        return self.registry.source(account=self.account, unconnected=True)


def _nothing(conn: Connection) -> None:
    """A connection of the supervisor's own: there are none."""


def _never(conn: Connection) -> bool:
    return False


def keys_of(index: int, keys: Iterable[object]) -> list[Key]:
    """The keys of one worker's connections."""
    return [k for k in keys if isinstance(k, int) and worker_of(k) == index]
