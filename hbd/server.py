"""hbd-server: accepts clients, answers every ping with a pong, closes clients that fall silent.

``Server`` wires parts that each do one job and know nothing of it: the listener (bind, accept)
calls ``on_accept``; each ``Connection`` (hbd.connection, hbd.server_tls) calls back through the
``Owner`` interface; the liveness part (deadline wheel, verdicts) calls ``on_verdict``; the
reporting part (hbd.server_report) turns what happened into log lines, events and counters. The
server keeps the table of connections and decides admission, closing and what a reload changes;
the peer registry (who the peers are, hbd.server_registry) hears what they do and closes some.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from hbd import peer_address
from hbd.access import AllowList
from hbd.admission import load_security, shut_out
from hbd.config import ServerConfig
from hbd.connection import Connection
from hbd.daemon import Daemon
from hbd.listener import Listener
from hbd.liveness import WHEEL_RESOLUTION, Liveness, timeout_for  # noqa: F401 (WHEEL_RESOLUTION: for the tests)
from hbd.logs import log
from hbd.protocol import Hello, PeerState, StateChange
from hbd.registry import registry_settings
from hbd.registry_remote import RemotePeers
from hbd.reload_process import ChildLoad
from hbd.reloading import Given, Load
from hbd.server_ends import EndQueue
from hbd.server_registry import ServerRegistry, peer_sources, start_registry
from hbd.server_report import ServerReport
from hbd.view import LazySource, PeerRow, ServerCounters, ServerSettings, ServerView, Source, WorkerNumbers, source_rows
from hbd.workers_codec import Numbers, Ready, Reloaded, Status

if TYPE_CHECKING:
    import ssl

    from hbd.workers_codec import WorkerChannel


class Server(Daemon):
    identifier = "hbd-server"

    def __init__(
        self,
        config: ServerConfig,
        *,
        worker: WorkerChannel | None = None,
        reuse_port: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(config, **kwargs)  # type: ignore[arg-type]
        self.worker = worker  # set when this process is one of several workers (hbd.workers)
        self.worker_index = worker.index if worker is not None else None
        self.clock = self.loop.clock
        self.conns: dict[int, Connection] = {}
        self.listener = Listener(self.loop, self.on_accept, lambda: len(self.conns), reuse_port=reuse_port)
        self.liveness = Liveness(self.loop, self.on_verdict, self.is_open)
        self.report = ServerReport(self.peer_log, lambda *a, **kw: self.ops.event(*a, **kw), self.clock)
        self.tls_context: ssl.SSLContext | None = None
        self.allow: AllowList | None = None
        # The peer registry (hbd.server_registry); a worker of several keeps none: the one registry
        # is the supervisor's, and this worker reports to it (hbd.registry_remote).
        self.registry: ServerRegistry | None = None
        self.remote: RemotePeers | None = None
        self.ending = EndQueue(self.loop, lambda conn: self.remote.closed(conn) if self.remote else None, self.conns)
        self.report.before = self.ending.before  # queued ends before a greeting or a change (a takeover)

    # what the status socket and the metrics read
    address = property(lambda self: self.listener.address)
    late = property(lambda self: self.report.late)
    stats = property(lambda self: self.report.stats)
    closed_pings = property(lambda self: self.report.closed_pings)

    # -- Daemon hooks --------------------------------------------------------------------------------
    def loader(self) -> Load:
        if self.worker is not None and self.worker.config is not None:  # validated by the supervisor
            cfg = dataclasses.replace(self.worker.config, log_file=None)  # the supervisor writes the file
            return Given(lambda: cfg)
        plan = None if self.registry is None else self.registry.reload.planner()  # its plan: off the loader
        return ChildLoad("server", self.config.path, self.overrides, plan)

    def start(self) -> None:
        cfg = self.config
        self.tls_context, self.allow = load_security(cfg)
        self.listener.use(self.listener.bind(cfg.host, cfg.port, cfg.backlog))
        self.loop.stall_callbacks.append(self.liveness.on_stall)
        if self.worker is None:  # a worker of several reports to its supervisor's (hbd.registry_remote)
            reg = start_registry(cfg, self.loop, self.peer_log, self.ops, self._close, self.is_open)
            self.registry = self.report.peers = self.silencing = reg
        else:
            self.remote = RemotePeers(
                self.worker.send,
                self._close,
                self.is_open,
                self.peer_log,
                lambda: registry_settings(self.config).name_from,
                self.loop.clock,
            )
            self.report.peers = self.remote
        self.start_status_updates()
        self.report.listening(self.address, cfg, self.max_clients, self.tls_context is not None, self.allow)
        if self.worker is not None:
            self.worker.attach(self.loop, self.reload, self.remote.order if self.remote else None)
            self.worker.send(Ready())

    @property
    def max_clients(self) -> int:
        """The configured limit, or this worker's share of it."""
        cfg = self.config
        return -(-cfg.max_clients // cfg.workers) if self.worker is not None else cfg.max_clients

    def reload_verdict(self, errors: list[str], finished: Callable[[list[str]], None]) -> None:
        if self.registry is None:  # else the answer waits for the registry's slices (hbd.server_reload)
            return finished(errors)
        self.registry.reload.when_applied(lambda: finished(errors))

    def on_reloaded(self, errors: list[str]) -> None:
        if self.worker is not None:  # the supervisor's answer to `hbd reload` waits for this
            self.worker.send(Reloaded(errors[0] if errors else None))

    def on_status_tick(self) -> None:
        if self.worker is not None:
            self.worker.send(Status(len(self.conns), self.late))
            self.worker.send(Numbers(WorkerNumbers(self.counters(), *self.ops.numbers()).to_dict()))

    def prepare(self, new: ServerConfig) -> Callable[[], None]:
        old = self.config
        tls_context, allow = load_security(new)  # new certificates are read on every reload
        sock = None
        if (new.host, new.port) != (old.host, old.port) or new.backlog != old.backlog:
            sock = self.listener.bind(new.host, new.port, new.backlog)  # BindError: the old one keeps serving

        def commit() -> None:
            self._commit_security(tls_context, allow)
            if self.registry is not None:
                self.registry.reconfigure(new, old)
            if sock is not None:
                self.listener.use(sock)
                log.info("now listening on %s:%d", *self.address)
            if new.heartbeat_timeout != old.heartbeat_timeout or new.max_interval != old.max_interval:
                self.liveness.retime(self.conns.values(), new.heartbeat_timeout, new.max_interval)
                if new.heartbeat_timeout != old.heartbeat_timeout:
                    log.info("heartbeat_timeout is now %g s", new.heartbeat_timeout)

        return commit

    def shutdown(self) -> None:
        self.ending.work_off()
        for conn in list(self.conns.values()):
            self._close(conn)  # not a change of theirs: the registry keeps them as they were
        self.listener.close()
        if self.registry is not None:
            self.registry.close()

    def status_text(self) -> str:
        n = len(self.conns)
        return f"{n} client{'s' if n != 1 else ''}, {self.late} late"

    # -- access control ---------------------------------------------------------------------------
    def _commit_security(self, context: ssl.SSLContext | None, allow: AllowList | None) -> None:
        """New TLS and allow settings; connections they no longer admit are closed."""
        turned_on = context is not None and self.tls_context is None
        self.tls_context, self.allow = context, allow
        for conn, why, event in shut_out(list(self.conns.values()), turned_on, allow):
            self.report.no_longer_admitted(conn, why, event)
            self._close(conn)

    # -- admission (the listener's on_accept) --------------------------------------------------------
    def on_accept(self, sock: socket.socket, addr: tuple) -> None:
        if self.allow is not None and not self.allow.allows(addr[0]):
            self.report.denied(addr[0], addr[1])
            sock.close()  # before reading a byte
            return
        if len(self.conns) >= self.max_clients:
            self.report.refused(addr[0], addr[1], self.max_clients)
            sock.close()
            return
        sock.setblocking(False)
        self.report.stats["accepted"] += 1
        address, now, timeout = peer_address.of(addr[0], addr[1]), self.clock(), self.config.heartbeat_timeout
        if self.tls_context is not None:
            from hbd.server_tls import TLSConnection

            assert self.config.tls is not None
            conn: Connection = TLSConnection(
                self, sock, address, now, timeout, self.tls_context, self.config.tls.handshake_timeout
            )
        else:
            conn = Connection(self, bare(sock), address, now, timeout)
        fd = conn.sock.fileno()
        self.conns[fd] = conn
        conn.start(fd)  # calls connected() once the link is usable (TLS: after the handshake)

    # -- the connections' owner (hbd.connection.Owner) -------------------------------------------------
    def is_open(self, conn: Connection) -> bool:
        return self.conns.get(conn.sock.fileno()) is conn

    def counters(self) -> ServerCounters:
        pings = self.closed_pings + sum(conn.peer.pings for conn in self.conns.values())  # when asked only
        return ServerCounters(len(self.conns), self.late, pings, **self.stats)

    def view(self) -> ServerView:
        cfg, addr, conns = self.config, self.address, functools.partial(_listed, self.conns)
        rows, counts, sources, last_pings = _peers_of(self.remote, self.registry, conns, self.worker_index)
        settings = ServerSettings(cfg.heartbeat_timeout, cfg.max_clients, cfg.workers)
        listen = f"{addr[0]}:{addr[1]}" if addr else None
        return ServerView(self.daemon_view(), listen, settings, self.counters(), rows, counts, sources, last_pings)

    def arm(self, conn: Connection, forgiven: float = 0.0) -> None:
        self.liveness.arm(conn, forgiven)

    def connected(self, conn: Connection, how: str) -> None:
        self.report.connected(conn, how)

    def on_events(self, conn: Connection) -> None:
        peer = conn.peer
        events = peer.events or []
        peer.events = None
        for ev in events:
            if not self.is_open(conn):
                return  # what it said before closed it (a refused name)
            if isinstance(ev, Hello):
                self.report.hello(conn, ev, self.config.max_interval)
                peers = self.registry or self.remote
                if peers is not None:
                    peers.hello(conn, ev)
            elif isinstance(ev, StateChange):
                self.report.changed(conn, ev)
                if ev.old is PeerState.NEW and conn.slot != -1:
                    conn.arm()  # filed at the first-ping deadline; LATE comes sooner for a peer that is up
        timeout = timeout_for(peer, self.config.heartbeat_timeout, self.config.max_interval)
        if timeout != peer.timeout and self.is_open(conn):
            peer.timeout = timeout  # a greeting or the first ping: it may ping slowly from now on
            conn.arm()

    def reject(self, conn: Connection, reason: str) -> None:
        """The peer broke the protocol: log (rate-limited per source address) and close it."""
        self._end(conn, self.report.rejected, reason)

    def drop(self, conn: Connection, reason: str, level: int) -> None:
        self._end(conn, self.report.dropped, reason, level)

    def tls_failed(self, conn: Connection, reason: str) -> None:
        """A TLS handshake (or the TLS layer later) failed: log why, rate-limited, and close."""
        self._end(conn, self.report.tls_failed, reason)

    def _end(self, conn: Connection, report: Callable[..., None], *args: object) -> None:
        if conn.peer.events:  # what it did before comes out first
            self.on_events(conn)
        self._close(conn, reported=False)  # now; reported after this turn's I/O (hbd.server_ends)
        self.ending.push(conn, report, args)

    # -- verdicts, errors, closing ---------------------------------------------------------------------
    def on_verdict(self, conn: Connection, change: StateChange) -> None:
        """A deadline decided (liveness): report it; a dead peer is closed."""
        self.report.changed(conn, change)
        if change.new is PeerState.DEAD:
            self.report.stats["timeouts"] += 1
            self._close(conn)

    def contain(self, fileobj: object, callback: object, exc: Exception) -> str | None:
        """An unexpected error while serving one connection: close that one (see Daemon)."""
        conn = getattr(callback, "__self__", None)  # a timer of that connection (TLS handshake)
        if not isinstance(conn, Connection) and fileobj is not None:
            try:
                conn = self.conns.get(fileobj.fileno())  # type: ignore[attr-defined]
            except (OSError, ValueError):  # already closed
                conn = None
        if isinstance(conn, Connection) and conn.owner is self and self.is_open(conn):
            self.report.failed(conn)
            self._close(conn)
            return f"client {conn.label} (closed)"
        return super().contain(fileobj, callback, exc)

    def _close(self, conn: Connection, reported: bool = True) -> None:
        sock = conn.sock
        if self.conns.pop(sock.fileno(), None) is None:
            return
        self.loop.cancel(conn.timer)  # a TLS handshake's timeout (a plain connection has none)
        conn.slot = -1
        self.report.closed(conn)
        if self.remote is not None and reported:  # else once its end is reported (hbd.server_ends)
            self.remote.closed(conn)
        self.loop.forget(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the peer sees EOF now, not whenever we are collected
        except OSError:
            pass
        sock.close()


LastPings = Callable[[], Iterator[tuple[int, float]]]


def _listed(conns: dict[int, Connection]) -> list[Connection]:
    """A snapshot of the connections, taken when a reply first reads the peers (not in ``view()``)."""
    return list(conns.values())


def bare(sock: socket.socket) -> socket.SocketType:
    """The C socket object alone, non-blocking (48 bytes): ``socket.socket`` adds a Python layer of
    40 bytes a connection that a plain connection never uses (it calls recv, send, fileno, shutdown
    and close, all the C object's)."""
    raw = socket.SocketType(sock.family, sock.type, sock.proto, sock.detach())
    raw.setblocking(False)
    return raw


def _peers_of(
    remote: RemotePeers | None,
    registry: ServerRegistry | None,
    conns: Callable[[], list[Connection]],
    worker: int | None,
) -> tuple[Iterable[PeerRow], dict[str, int] | None, tuple[Source, ...], LastPings | None]:
    """A server's peers for its view: a worker's rows carry the supervisor's marks (no counts of its
    own); a single process's come from its registry. Nothing here looks at every peer: ``conns``
    snapshots the connections when a reply first reads them (hbd.view.LazySource). The rows are the
    sources' own (hbd.view.source_rows): one producer for a listing, a scrape and a filtered status."""
    if remote is not None:
        sources: tuple[Source, ...] = (LazySource(lambda: remote.source(conns(), worker)),)
        return source_rows(sources), None, sources, lambda: remote.last_pings(conns())
    sources = peer_sources(registry, conns, worker)
    return source_rows(sources), registry.counts() if registry is not None else None, sources, None
