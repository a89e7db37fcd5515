"""The server's registry room: connections report to the peer registry (hbd.registry), and what it
returns is carried out here: connections closed, notices logged, counted and hooked.

The server hands down what this needs (the loop, its peer log, the event sink, a way to close a
connection and to tell whether one is still open); nothing here imports hbd.server. The registry's
own deadlines (startup grace, forgetting, flapping ends, silences ending) run from one loop timer,
filed at the registry's next deadline: nothing runs per ping. A rising peer (``rise:``) is the one
exception: while it rises its connection reports every ping (protocol.PeerState.RISING).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from hbd import tls
from hbd.config import ServerConfig
from hbd.connection import Connection
from hbd.logs import PeerLog, log
from hbd.peer_uptime import Uptime
from hbd.protocol import Hello, PeerState, StateChange
from hbd.registry import (
    Action,
    Close,
    Expected,
    Live,
    Log,
    Notice,
    Registry,
    RegistrySettings,
    Watch,
    expected_peers,
    registry_settings,
)
from hbd.server_reload import RegistryReload
from hbd.silencing import Silence
from hbd.state_store import PeerRecord, SilenceRecord
from hbd.store_writer import Store as Store
from hbd.store_writer import StoreWriter, open_store
from hbd.view import LazySource, PeerRow, PeerSource, Source, Who

if TYPE_CHECKING:
    from hbd.loop import EventLoop, Timer


class Events(Protocol):
    """Where notices go (hbd.ops.Ops): ``event`` counts, remembers and runs the hooks; ``count``
    only counts and remembers (a silenced or flapping peer)."""

    def event(
        self,
        event: str,
        peer: str,
        address: str,
        *,
        name: str | None = None,
        previous: str | None = None,
        reason: str = "",
        standing: float = 0.0,
        **extra: object,
    ) -> None: ...
    def count(self, event: str, peer: str, address: str, previous: str | None, reason: str) -> None: ...


CHANGES = frozenset({"up", "late", "down"})  # the notices that are state changes (history rows)


def log_refused(peer_log: PeerLog, level: int, conn: Connection, reason: str, **extra: object) -> None:
    """The registry closes a connection it refused (max_peers, unexpected, a takeover...): one
    rate-limited line, in one process or in a worker."""
    peer_log.log(
        level,
        conn.source,
        "closing client %s: %s",
        conn.label,
        reason,
        event="refused-peer",
        peer=conn.addr,
        stacklevel=3,
        **extra,
    )


class ServerRegistry:
    def __init__(
        self,
        loop: EventLoop,
        settings: RegistrySettings,
        expected: tuple[Expected, ...],
        peer_log: PeerLog,
        events: Events,
        close: Callable[[Connection], None],
        is_open: Callable[[Connection], bool],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.loop = loop
        self.clock = loop.clock
        self.wall = wall
        self.peer_log = peer_log
        self.events = events
        self.close_conn = close
        self.is_open = is_open
        self.registry = Registry(settings, expected, self.clock(), wall())
        # outages, down time and 24 h uptime per peer, from the changes applied here (kept in the peers)
        self.uptime = Uptime(self.registry.peers, self.registry.orphaned)
        self._timer: Timer | None = None
        self.writer: StoreWriter | None = None
        self.reload = RegistryReload(self.registry, loop, self._reloaded_some)
        self._rearm()

    # -- what the server reports ------------------------------------------------------------------
    def hello(self, conn: Connection, ev: Hello) -> None:
        self.apply(self.registry.hello(conn, ev.name, self._certificate(conn), conn.addr), conn)

    def changed(self, conn: Connection, change: StateChange) -> None:
        """A state change of its connection (after the report logged it)."""
        reg, now, new = self.registry, self.clock(), change.new
        if new is PeerState.UP:
            if change.old is PeerState.NEW:
                peer = conn.peer
                actions = reg.connected(conn, peer.name, self._certificate(conn), conn.addr, peer.timeout, now)
            elif change.old is PeerState.RISING:
                actions = reg.pinged(conn, change.silent_for, now)
            else:
                actions = reg.back(conn, now)
            self.apply(actions, conn)
            if reg.rising(conn) and self.is_open(conn):
                conn.peer.state = PeerState.RISING  # its next ping reports a change again
        elif new is PeerState.LATE:
            self.apply(reg.late(conn, now), conn)
        elif new is PeerState.DEAD:
            self.gone(conn, "timeout")

    def gone(self, conn: Connection, reason: str) -> None:
        """Its connection ends (the server closes it next)."""
        peer = conn.peer
        self.apply(self.registry.gone(conn, reason, self.clock(), peer.last_heard if peer.pings else None), conn)

    def quiet(self, conn: Connection) -> bool:
        """Its lines are logged at info (a silenced peer)."""
        reg = self.registry
        peer = reg.by_key.get(conn)
        return (peer.name if peer is not None else conn.peer.name or conn.addr) in reg.silenced

    def _certificate(self, conn: Connection) -> str | None:
        if self.registry.settings.name_from != "certificate" or not hasattr(conn, "context"):
            return None
        return tls.certificate_name(conn.sock)  # type: ignore[arg-type]  # a TLS connection's SSLSocket

    # -- carrying out what the registry says -------------------------------------------------------------
    def apply(self, actions: list[Action], conn: Connection | None = None) -> None:
        """``conn``: the connection whose report caused these (already logged by the server's report)."""
        for action in actions:
            if isinstance(action, Notice):
                self._notice(action, conn)
            elif isinstance(action, Close):
                self._close(action)
            elif isinstance(action, Log):
                self._log(
                    action.level,
                    _source(action.address or action.peer),
                    "%s",
                    action.message,
                    event="registry",
                    peer=action.peer,
                )
            elif (
                isinstance(action, Watch)
                and action.on
                and isinstance(action.key, Connection)
                and self.is_open(action.key)
            ):
                action.key.peer.state = PeerState.RISING
        if actions:
            self._rearm()

    def _notice(self, n: Notice, conn: Connection | None) -> None:
        if conn is None or n.event in ("flapping", "stable") or n.reason.endswith("on time"):
            # not a change the connection's own log lines told (grace ends, flapping, a rise completed)
            self._log(
                n.level,
                _source(n.address or n.peer),
                "peer %s: %s%s (%s)",
                n.peer,
                n.event,
                " [silenced]" if n.silenced else "",
                n.reason,
                event=n.event,
                peer=n.peer,
            )
        if n.event in CHANGES:
            # at the change's own time, the peer's since: a worker's mark then shows the account
            # in its state and since alone, and the worker keeps none (~220 B per connection)
            self.uptime.change(n.peer, n.new, n.since)
            self.uptime.sweep(self.registry.peers, len(self.registry.peers))
            if self.writer is not None:
                self.writer.change(n.peer, n.old, n.new, n.reason)
        if not n.hook:  # silenced, or flapping: counted and shown, no hook
            self.events.count(n.event, n.peer, n.address, n.old.lower(), n.reason)
            return
        extra: dict[str, object] = {f"label_{k}": v for k, v in n.labels}
        self.events.event(
            n.event,
            n.peer,
            n.address,
            name=n.peer if n.named else None,
            previous=n.old.lower(),
            reason=n.reason,
            standing=self.clock() - conn.since if conn is not None else 0.0,
            expected="1" if n.expected else "0",
            since=f"{n.since + self.wall() - self.clock():.3f}",
            **extra,
        )

    def _close(self, action: Close) -> None:
        conn = action.key
        if not isinstance(conn, Connection) or not self.is_open(conn):
            return
        log_refused(self.peer_log, action.level, conn, action.reason)
        self.close_conn(conn)

    def _log(self, level: int, source: str, msg: str, *args: object, event: str, peer: str) -> None:
        self.peer_log.log(level, source, msg, *args, event=event, peer=peer, stacklevel=3)

    # -- the registry's own deadlines ---------------------------------------------------------------------
    def _rearm(self) -> None:
        due = self.registry.next_deadline()
        timer = self._timer
        if due is None or (timer is not None and timer.when <= due):
            return
        self.loop.cancel(timer)
        self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.apply(self.registry.tick(self.clock(), self.wall()))
        self._rearm()

    def close(self) -> None:
        """At shutdown: a reload's changes are applied, the timer stops; the store writes what it has
        not written yet."""
        self.reload.close()
        self.loop.cancel(self._timer)
        self._timer = None
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def attach(
        self, store: Store, peers: list[PeerRecord], silences: list[SilenceRecord], history_days: int = 30
    ) -> None:
        """Remember what the store remembered (restart continuity), then write changes to it."""
        self.restore(peers, silences)
        self.registry.take_dirty(self.clock(), self.wall())  # what restore() changed is in the store already
        self.writer = StoreWriter(self.loop, store, self.wall, history_days, registry=self.registry, live=self.live)

    # -- reloads -----------------------------------------------------------------------------------------
    def _reloaded_some(self) -> None:  # a slice: the supervisor's marks of its peers, the timer
        self.apply([])
        self._rearm()

    def configure(self, settings: RegistrySettings, expected: tuple[Expected, ...]) -> None:
        """New settings and expected peers, applied at once (tests; a reload is sliced: reconfigure)."""
        self.reload.finish()
        self.apply(self.registry.configure(settings, expected, self.clock()))
        self._rearm()

    def reconfigure(self, new: ServerConfig, old: ServerConfig) -> None:
        """A reload committed (the peers' own changes: a slice per turn, hbd.server_reload)."""
        self.reload.commit(new)
        self._reloaded_some()
        if self.writer is not None:
            self.writer.history_days = new.history_days
        if new.state_dir != old.state_dir:
            log.info("state_dir: the new directory is used from the next start")

    def restore(self, peers: list[PeerRecord], silences: list[SilenceRecord]) -> None:
        self.apply(self.registry.restore(peers, silences, self.clock(), self.wall()))
        self._rearm()

    # -- what status and metrics read ----------------------------------------------------------------------
    def account(self, row: PeerRow) -> PeerRow:
        """``row`` with this process's accounting of its peer: 24 h uptime, outages, seconds down."""
        acc = self.uptime.account(row.peer)
        if acc is None:
            return row
        now = self.clock()
        down = acc.down_seconds(now)
        return replace(row, uptime_24h=acc.uptime(now), outages=acc.outages, down_seconds=down)

    def unknown(self, conns: list[Connection]) -> list[Connection]:
        """Connections that are no peer yet (no first ping) and do not claim a known peer's name:
        shown after the peers, as NEW, for as long as they may wait."""
        by_key, peers = self.registry.by_key, self.registry.peers
        return [c for c in conns if c not in by_key and (c.peer.name is None or c.peer.name not in peers)]

    def counts(self) -> dict[str, int]:
        return self.registry.counts()

    def live(self, key: object) -> Live | None:
        if not isinstance(key, Connection) or key.sock.fileno() < 0:
            return None
        peer = key.peer
        return Live(key.since, peer.last_heard if peer.pings else None, peer.pings, peer.timeout, peer.interval)

    # -- silences (hbd.silencing.Silencing: the status socket's silence requests) -----------------------------
    def silence(self, peer: str, seconds: float, reason: str) -> Silence | str:
        wall = self.wall()
        rec = self.registry.silence(peer, wall + seconds, reason, self.clock(), wall)
        if isinstance(rec, str):
            return rec
        self._rearm()
        why = f": {reason}" if reason else ""
        self._log(logging.INFO, peer, "peer %s silenced for %g s%s", peer, seconds, why, event="silence", peer=peer)
        return Silence(rec.name, rec.until, rec.reason, rec.created)

    def unsilence(self, peer: str) -> bool:
        done = self.registry.unsilence(peer)
        if done:
            self._log(logging.INFO, peer, "peer %s no longer silenced", peer, event="silence", peer=peer)
        return done

    def silences(self) -> list[Silence]:
        return [Silence(s.name, s.until, s.reason, s.created) for s in self.registry.silences()]


def start_registry(
    cfg: ServerConfig,
    loop: EventLoop,
    peer_log: PeerLog,
    events: Events,
    close: Callable[[Connection], None],
    is_open: Callable[[Connection], bool],
) -> ServerRegistry:
    """A server's registry at start-up: its expected peers, and what its state store remembers."""
    reg = ServerRegistry(loop, registry_settings(cfg), expected_peers(cfg), peer_log, events, close, is_open)
    store, peers, silences = open_store(cfg.state_dir)
    if store is not None:
        reg.attach(store, peers, silences, cfg.history_days)
    return reg


def peer_sources(
    reg: ServerRegistry | None, conns: Callable[[], list[Connection]], worker: int | None
) -> tuple[Source, ...]:
    """What a server shows: the registry's peers, then the connections that are no peer yet; without a
    registry, its connections. A filtered status applies its filter before a row is made, and each
    snapshot is taken when something first reads it (hbd.view.LazySource)."""
    if reg is None:
        return (LazySource(lambda: connection_source(conns(), worker)),)
    return (
        LazySource(lambda: reg.registry.source(reg.live, worker, reg.account)),
        LazySource(lambda: connection_source(reg.unknown(conns()), worker, PENDING)),
    )


PENDING = frozenset({"pending"})  # a connection that has not pinged yet: shown, but no peer (no metrics)


def connection_source(conns: list[Connection], worker: int | None, flags: frozenset[str] = frozenset()) -> PeerSource:
    def who(i: int) -> Who | None:
        conn = conns[i]
        if conn.sock.fileno() < 0:
            return None
        return (conn.peer.name, conn.addr, conn.peer.state.value)

    return PeerSource(len(conns), who, lambda i: connection_row(conns[i], worker, flags))


def connection_row(conn: Connection, worker: int | None, flags: frozenset[str]) -> PeerRow | None:
    if conn.sock.fileno() < 0:
        return None  # closed since the snapshot
    peer = conn.peer
    return PeerRow(
        peer.name or conn.addr,
        peer.name,
        conn.addr,
        peer.state.value,
        conn.since,
        peer.last_heard if peer.pings else None,
        peer.pings,
        peer.timeout,
        peer.interval,
        worker,
        flags=flags,
    )


def _source(address: str) -> str:
    """The host of "host:port" (the unit of per-source log limits); a name stays as it is."""
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() else address
