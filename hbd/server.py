"""hbd-server: accepts clients, answers every ping with a pong, closes clients that fall silent.

One ``Connection`` per client wires its socket to a ``protocol.ServerPeer``; this module owns the
sockets and timers and never parses bytes itself. Each connection is filed once in a deadline
wheel (``hbd.wheel``) at the peer's next deadline and re-filed lazily when that comes, so a ping
costs no timer operation at all and the loop's heap holds one timer for all connections.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hbd.accept import ACCEPT_PAUSE, Acceptor
from hbd.access import AllowList
from hbd.config import ServerConfig, load_server_config
from hbd.daemon import Daemon, StartError
from hbd.logs import fields, log
from hbd.loop import Timer
from hbd.names import listen_info
from hbd.protocol import Hello, PeerState, ProtocolError, ServerPeer, StateChange, peer_timeout
from hbd.view import PeerRow, ServerCounters, ServerSettings, ServerView, WorkerNumbers
from hbd.wheel import DeadlineWheel

if TYPE_CHECKING:
    import ssl

    from hbd.workers import WorkerChannel

ACCEPT_BATCH = 32  # accepts per loop turn: drains a reconnect storm, yet peers are served between batches
MAX_OUTBUF = 64 * 1024  # a peer that pings but never reads its pongs is dropped past this
RECV_SIZE = 4096
WHEEL_RESOLUTION = 0.01  # verdicts come at most this late; the issue allows 100 ms, benchmarks 50
STALLS_KEPT = 256  # recent stalls of our own loop remembered for forgiveness; older ones are forgotten


class Connection:
    __slots__ = ("addr", "outbuf", "peer", "server", "since", "slot", "sock", "timer")
    # Errors that mean "try again later"; an except clause is evaluated only when something is
    # raised, so the TLS subclass can widen this at no cost to the plain path.
    BLOCKING: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)

    def __init__(self, server: Server, sock: socket.socket, addr: str, now: float) -> None:
        self.server = server
        self.sock = sock
        self.addr = addr
        self.since = now
        self.peer = ServerPeer(now, server.config.heartbeat_timeout)
        self.outbuf = b""
        self.timer: Timer | None = None  # only for the TLS handshake timeout
        self.slot = -1  # the deadline-wheel slot this connection is filed under; -1: none

    @property
    def label(self) -> str:
        name = self.peer.name
        return f"{name} ({self.addr})" if name else self.addr

    def on_read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except self.BLOCKING:
            return
        except OSError as exc:
            self.server.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        self.received(data)

    def received(self, data: bytes) -> None:
        """Bytes from the peer (b"" at end of file), after any TLS layer."""
        if not data:
            self.server.drop(self, "disconnected", logging.INFO)
            return
        peer = self.peer
        try:
            reply = peer.feed(data, self.server.clock())
        except ProtocolError as exc:
            self.server.reject(self, str(exc))
            return
        if peer.events:  # before the reply: a send that finds the peer gone reports its end after this
            self.server.on_events(self)
        if reply:
            self.send(reply)

    def send(self, data: bytes) -> None:
        if self.outbuf:
            if len(self.outbuf) + len(data) > MAX_OUTBUF:
                self.server.reject(self, f"does not read its pongs ({len(self.outbuf)} bytes queued)")
                return
            self.outbuf += data
            return
        try:
            sent = self.sock.send(data)
        except self.BLOCKING:
            sent = 0
        except OSError as exc:
            self.server.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        if sent < len(data):
            self.outbuf = data[sent:]
            self.server.loop.add_writer(self.sock, self.on_write)

    def on_write(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except self.BLOCKING:
            return
        except OSError as exc:
            self.server.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        self.outbuf = self.outbuf[sent:]
        if not self.outbuf:
            self.server.loop.remove_writer(self.sock)

    def arm(self, forgiven: float = 0.0) -> None:
        """(Re)file the connection under its next deadline. A connection stays filed once: if its
        filing is due no later than the new deadline it stays (the wheel re-files it lazily then, as
        after a ping), else it is moved; so no sequence of messages can pile up entries."""
        server = self.server
        # Never at or before now: the rules are strict (silent for MORE than the timeout), so a
        # check exactly at the deadline changes nothing and must not be re-filed for the same instant.
        when = max(self.peer.next_deadline() + forgiven, server.clock() + WHEEL_RESOLUTION)
        if self.slot != -1:
            if server.wheel.tick(when) >= self.slot:
                return
            server.wheel.discard(self.slot, self)
        self.slot = server.file(self, when)


class Server(Daemon):
    identifier = "hbd-server"

    def __init__(
        self, config: ServerConfig, *, worker: WorkerChannel | None = None, reuse_port: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(config, **kwargs)  # type: ignore[arg-type]
        self.worker = worker  # set when this process is one of several workers (hbd.workers)
        self.worker_index = worker.index if worker is not None else None
        self.reuse_port = reuse_port
        self.clock = self.loop.clock
        self.conns: dict[int, Connection] = {}
        self.wheel: DeadlineWheel[Connection] = DeadlineWheel(WHEEL_RESOLUTION)
        self._wheel_timer: Timer | None = None
        self._in_wheel = False
        self.listener: socket.socket | None = None
        self.acceptor: Acceptor | None = None
        self.address: tuple[str, int] | None = None
        self.late = 0
        self.stats = {"accepted": 0, "refused": 0, "timeouts": 0, "rejected": 0, "denied": 0, "tls_failed": 0}
        self.tls_context: ssl.SSLContext | None = None
        self.allow: AllowList | None = None
        self.closed_pings = 0  # pings of connections already closed (metrics add the open ones)
        self._stalls: deque[tuple[float, float]] = deque(maxlen=STALLS_KEPT)  # (from, to) we did not run

    # -- Daemon hooks --------------------------------------------------------------------------------
    def load(self) -> ServerConfig:
        return load_server_config(self.config.path, self.overrides)

    def start(self) -> None:
        self.tls_context, self.allow = self._security(self.config)
        self.listener = self._bind(self.config)
        self.address = self.listener.getsockname()[:2]
        self.acceptor = self._acceptor(self.listener)
        self.loop.stall_callbacks.append(self.on_stall)
        self.start_status_updates()
        log.info(
            "listening on %s:%d (heartbeat_timeout %g s, max_clients %d%s%s)",
            *self.address, self.config.heartbeat_timeout, self.max_clients,
            ", TLS" + (" with client certificates" if self.config.tls and self.config.tls.require_client_cert else "")
            if self.tls_context else "",
            f", allow {len(self.allow.nets)} network{'s' if len(self.allow.nets) != 1 else ''}" if self.allow else "",
        )
        if self.worker is not None:
            self.worker.send("R")

    @property
    def max_clients(self) -> int:
        """The configured limit, or this worker's share of it."""
        cfg = self.config
        return -(-cfg.max_clients // cfg.workers) if self.worker is not None else cfg.max_clients

    def on_reloaded(self, errors: list[str]) -> None:
        if self.worker is not None:  # the supervisor's answer to `hbd reload` waits for this
            self.worker.send("H ok" if not errors else f"H failed {errors[0]}")

    def on_status_tick(self) -> None:
        if self.worker is not None:
            self.worker.send(f"S {len(self.conns)} {self.late}")
            self.worker.send("M " + json.dumps(WorkerNumbers(self.counters(), *self.ops.numbers()).to_dict()))

    def prepare(self, new: ServerConfig) -> Callable[[], None]:
        old = self.config
        tls_context, allow = self._security(new)  # new certificates are read on every reload
        listener = None
        if (new.host, new.port) != (old.host, old.port) or new.backlog != old.backlog:
            listener = self._bind(new)  # may raise StartError: the old listener keeps serving

        def commit() -> None:
            self._commit_security(tls_context, allow)
            if listener is not None:
                assert self.listener is not None and self.acceptor is not None
                self.acceptor.close()
                self.listener.close()
                self.listener = listener
                self.address = listener.getsockname()[:2]
                self.acceptor = self._acceptor(listener)
                log.info("now listening on %s:%d", *self.address)
            if new.heartbeat_timeout != old.heartbeat_timeout or new.max_interval != old.max_interval:
                for conn in self.conns.values():  # new timeouts apply to connected peers too
                    conn.peer.timeout = self.timeout_for(conn.peer, new)
                    if conn.slot != -1:  # not still in a TLS handshake
                        conn.arm()
                if new.heartbeat_timeout != old.heartbeat_timeout:
                    log.info("heartbeat_timeout is now %g s", new.heartbeat_timeout)

        return commit

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def status_text(self) -> str:
        n = len(self.conns)
        return f"{n} client{'s' if n != 1 else ''}, {self.late} late"

    def counters(self) -> ServerCounters:
        pings = self.closed_pings + sum(conn.peer.pings for conn in self.conns.values())  # when asked only
        return ServerCounters(len(self.conns), self.late, pings, **self.stats)

    def view(self) -> ServerView:
        cfg = self.config
        addr = self.address
        return ServerView(self.daemon_view(), f"{addr[0]}:{addr[1]}" if addr else None,
                          ServerSettings(cfg.heartbeat_timeout, cfg.max_clients, cfg.workers), self.counters(),
                          _peer_rows(list(self.conns.values()), self.worker_index))

    # -- access control ---------------------------------------------------------------------------
    def _security(self, cfg: ServerConfig) -> tuple[ssl.SSLContext | None, AllowList | None]:
        context = None
        if cfg.tls is not None:
            from hbd import tls

            try:
                context = tls.server_context(cfg.tls)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise StartError(f"tls: cannot load the certificate files: {exc}") from None
        return context, AllowList(cfg.allow) if cfg.allow else None

    def _commit_security(self, context: ssl.SSLContext | None, allow: AllowList | None) -> None:
        """New TLS and allow settings; connections they no longer admit are closed."""
        turned_on = context is not None and self.tls_context is None
        self.tls_context, self.allow = context, allow
        for conn in list(self.conns.values()):
            if allow is not None and not allow.allows(conn.addr.rsplit(":", 1)[0].strip("[]")):
                log.warning("closing client %s: no longer in the allow list", conn.label,
                            extra=fields(peer=conn.addr, event="denied"))
                self._close(conn)
            elif turned_on and type(conn) is Connection:
                log.warning("closing client %s: TLS is now required", conn.label,
                            extra=fields(peer=conn.addr, event="tls-required"))
                self._close(conn)

    # -- listener ------------------------------------------------------------------------------------
    def _bind(self, cfg: ServerConfig) -> socket.socket:
        try:
            family, _, _, _, addr = listen_info(cfg.host, cfg.port)  # a host name: bounded wait
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise StartError(f"cannot resolve listen address {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:  # workers share the port; the kernel spreads connections
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            sock.listen(cfg.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StartError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        return sock

    def _acceptor(self, listener: socket.socket) -> Acceptor:
        return Acceptor(self.loop, listener, self.on_accept, self._accept_failed, batch=ACCEPT_BATCH)

    def on_accept(self, sock: socket.socket, addr: tuple) -> None:
        if self.allow is not None and not self.allow.allows(addr[0]):
            self.stats["denied"] += 1
            self._peer_log(logging.WARNING, addr[0], "denied %s:%d: not in the allow list",
                           addr[0], addr[1], event="denied", peer=f"{addr[0]}:{addr[1]}")
            sock.close()  # before reading a byte
            return
        if len(self.conns) >= self.max_clients:
            self.stats["refused"] += 1
            self._peer_log(
                logging.WARNING, addr[0], "refused %s:%d: max_clients (%d) reached",
                addr[0], addr[1], self.max_clients, event="refused",
            )
            sock.close()
            return
        self._add(sock, f"{addr[0]}:{addr[1]}")

    def _accept_failed(self, exc: OSError) -> None:
        log.error(
            "cannot accept new clients: %s (%d connected); pausing accepts for %g s",
            exc.strerror, len(self.conns), ACCEPT_PAUSE, extra=fields(event="accept-error"),
        )

    # -- connections ---------------------------------------------------------------------------------
    def _add(self, sock: socket.socket, addr: str) -> None:
        sock.setblocking(False)
        self.stats["accepted"] += 1
        if self.tls_context is not None:
            from hbd.server_tls import TLSConnection

            tconn = TLSConnection(self, sock, addr, self.clock())
            self.conns[sock.fileno()] = tconn
            tconn.start()  # logs "connected" once the handshake is done
            return
        conn = Connection(self, sock, addr, self.clock())
        self.conns[sock.fileno()] = conn
        self.loop.add_reader(sock, conn.on_read)
        conn.arm()
        self._peer_log(logging.INFO, addr.rsplit(":", 1)[0], "client %s connected", addr, event="connected",
                       peer=addr)

    # -- deadlines -------------------------------------------------------------------------------------
    def file(self, conn: Connection, when: float) -> int:
        slot = self.wheel.add(when, conn)
        timer = self._wheel_timer
        if self._in_wheel:
            return slot  # _on_wheel arms the timer for the earliest slot when it is done
        if timer is None or timer.when > slot * WHEEL_RESOLUTION:
            self.loop.cancel(timer)
            self._wheel_timer = self.loop.call_at(slot * WHEEL_RESOLUTION, self._on_wheel)
        return slot

    def _on_wheel(self) -> None:
        self._wheel_timer = None
        self._in_wheel = True
        now = self.clock()
        add = self.wheel.add
        try:
            for slot, conns in self.wheel.pop_due(now):
                for conn in conns:
                    if conn.slot != slot:
                        continue  # closed since
                    when = conn.peer.next_deadline()
                    if when > now:  # it pinged since it was filed (the usual case): just re-file
                        conn.slot = add(when, conn)
                    else:
                        conn.slot = -1
                        try:
                            self.check(conn)
                        except Exception as exc:  # that connection only: the others are still due
                            self.loop.report_error(conn.sock, self.check, exc)
        finally:
            self._in_wheel = False
        when = self.wheel.next_time()
        if when is not None:
            self._wheel_timer = self.loop.call_at(when, self._on_wheel)

    def check(self, conn: Connection) -> None:
        """The connection's deadline came: apply the silence rule."""
        now = self.clock()
        peer = conn.peer
        if now - peer.last_heard > peer.timeout / 2:
            # Last look before a verdict: pings may be waiting in our buffer if this very turn of
            # the loop was delayed (we were stopped or starved between select() and now).
            conn.on_read()
            if self.conns.get(conn.sock.fileno()) is not conn:
                return  # that read found the end of the connection
            now = self.clock()
        # Time our own loop did not run (SIGSTOP, starvation) is not the peer's silence: we could not
        # have heard it. Only that time is forgiven, never time we spent working, and forgiving never
        # makes a peer UP: only a ping does.
        forgiven = self.forgiven(peer.last_heard, now) if self._stalls else 0.0
        change = peer.poll(now - forgiven)
        if change is not None:
            if forgiven:  # logs and hooks tell the whole silence
                change = StateChange(change.old, change.new, change.silent_for + forgiven)
            self._on_change(conn, change)
            if change.new is PeerState.DEAD:
                self.stats["timeouts"] += 1
                self._close(conn)
                return
        conn.arm(forgiven)

    def forgiven(self, since: float, now: float) -> float:
        """Seconds of [since, now] during which our loop was stalled."""
        total = 0.0
        for start, end in reversed(self._stalls):  # newest first: only those in the silence count
            if end <= since:
                break
            lo = start if start > since else since
            hi = end if end < now else now
            if hi > lo:
                total += hi - lo
        return total

    def on_stall(self, planned: float, woke: float) -> None:
        self._stalls.append((planned, woke))
        log.warning(
            "event loop stalled for %.3f s; extending client deadlines by that much", woke - planned,
            extra=fields(event="stall", lag_ms=round((woke - planned) * 1000)),
        )

    def on_events(self, conn: Connection) -> None:
        peer = conn.peer
        events = peer.events or []
        peer.events = None
        for ev in events:
            if isinstance(ev, Hello):
                cap = self.config.max_interval
                self._peer_log(
                    logging.INFO, conn.addr.rsplit(":", 1)[0], "client %s is %s%s%s", conn.addr, ev.name,
                    f" (interval {ev.interval:g} s)" if ev.interval else "",
                    f" (counted as max_interval {cap:g} s)" if ev.interval and ev.interval > cap else "",
                    event="hello", peer=conn.addr, name=ev.name,
                )
            elif isinstance(ev, StateChange):
                self._on_change(conn, ev)
                if ev.old is PeerState.NEW and conn.slot != -1:
                    conn.arm()  # filed at the first-ping deadline; LATE comes sooner for a peer that is up
        timeout = self.timeout_for(peer, self.config)
        if timeout != peer.timeout and self.conns.get(conn.sock.fileno()) is conn:
            peer.timeout = timeout  # a greeting or the first ping: it may ping slowly from now on
            conn.arm()

    @staticmethod
    def timeout_for(peer: ServerPeer, cfg: ServerConfig) -> float:
        """heartbeat_timeout until the first ping, whatever the greeting announced (a greeting
        alone must not hold a slot); then 3 intervals, the interval capped by max_interval."""
        if not peer.pings or peer.interval is None:
            return cfg.heartbeat_timeout
        return peer_timeout(cfg.heartbeat_timeout, min(peer.interval, cfg.max_interval))

    def _on_change(self, conn: Connection, change: StateChange) -> None:
        if change.old is PeerState.LATE:
            self.late -= 1
        if change.new is PeerState.LATE:
            self.late += 1
        # Rate-limited per source address: a flood of silent connections from one host must not
        # flood the journal with late/timed-out lines.
        source = conn.addr.rsplit(":", 1)[0]
        kw = {"event": change.new.value.lower(), "peer": conn.addr, "name": conn.peer.name,
              "silent_ms": round(change.silent_for * 1000)}
        if change.old is PeerState.NEW and change.new is PeerState.DEAD:
            # Never pinged (a port scan, a client that is not hbd): not a peer we ever reported, so
            # its end is no warning, no state change and no hook; the line is rate-limited.
            self._peer_log(logging.INFO, source, "closing client %s: no ping within %g s", conn.label,
                           conn.peer.timeout, **{**kw, "event": "no-ping"})
            return
        if change.new is PeerState.DEAD:
            self._peer_log(
                logging.WARNING, source, "client %s timed out: silent for %.3f s (heartbeat_timeout %g s); closing",
                conn.label, change.silent_for, conn.peer.timeout, **kw,
            )
        elif change.new is PeerState.LATE:
            self._peer_log(logging.WARNING, source, "client %s is late: silent for %.3f s",
                           conn.label, change.silent_for, **kw)
        elif change.old is PeerState.NEW:
            log.debug("client %s is up: first ping", conn.label, extra=fields(**kw, peer_address=conn.addr))
        else:
            self._peer_log(logging.INFO, source, "client %s is back: ping after %.3f s",
                           conn.label, change.silent_for, **kw)
        if change.new is PeerState.DEAD:
            event, reason = "down", "timeout"
        elif change.new is PeerState.LATE:
            event, reason = "late", "silent"
        else:
            event, reason = "up", "first ping" if change.old is PeerState.NEW else "ping"
        if conn.peer.pings:  # one that never pinged was never reported up, so its end is no news
            self._report(conn, event, change.old, reason, silent_ms=round(change.silent_for * 1000))

    def contain(self, fileobj: object, callback: object, exc: Exception) -> str | None:
        """An unexpected error while serving one connection: close that one (see Daemon)."""
        conn = getattr(callback, "__self__", None)  # a timer of that connection (TLS handshake)
        if not isinstance(conn, Connection) and fileobj is not None:
            try:
                conn = self.conns.get(fileobj.fileno())  # type: ignore[attr-defined]
            except (OSError, ValueError):  # already closed
                conn = None
        if isinstance(conn, Connection) and conn.server is self and self.conns.get(conn.sock.fileno()) is conn:
            self.stats["rejected"] += 1
            if conn.peer.pings:
                self._report(conn, "down", conn.peer.state, "internal error")
            self._close(conn)
            return f"client {conn.label} (closed)"
        return super().contain(fileobj, callback, exc)

    def _report(self, conn: Connection, event: str, old: PeerState, reason: str, **extra: object) -> None:
        """A state change for the status socket, metrics and on_change hooks."""
        self.ops.event(event, conn.peer.name or conn.addr, conn.addr, name=conn.peer.name,
                       previous=old.value.lower(), reason=reason, standing=self.clock() - conn.since, **extra)

    def reject(self, conn: Connection, reason: str) -> None:
        """The peer broke the protocol: log (rate-limited per source address) and close it."""
        if conn.peer.events:  # what it did before comes out first
            self.on_events(conn)
        self.stats["rejected"] += 1
        if conn.peer.pings:
            self._report(conn, "down", conn.peer.state, "protocol error")
        self._peer_log(
            logging.WARNING, conn.addr.rsplit(":", 1)[0], "closing client %s: %s",
            conn.label, reason, event="protocol-error", peer=conn.addr,
        )
        self._close(conn)

    def drop(self, conn: Connection, reason: str, level: int) -> None:
        if conn.peer.events:  # what it did before comes out first
            self.on_events(conn)
        self._peer_log(level, conn.addr.rsplit(":", 1)[0], "client %s %s", conn.label, reason,
                       event="disconnected", peer=conn.addr, name=conn.peer.name)
        if conn.peer.pings:
            self._report(conn, "down", conn.peer.state, reason)
        self._close(conn)

    def tls_failed(self, conn: Connection, reason: str) -> None:
        """A TLS handshake (or the TLS layer later) failed: log why, rate-limited, and close."""
        if conn.peer.events:  # what it did before comes out first
            self.on_events(conn)
        self.stats["tls_failed"] += 1
        if conn.peer.pings:  # the TLS layer failed on a link that was up
            self._report(conn, "down", conn.peer.state, f"TLS error: {reason}")
        self._peer_log(logging.WARNING, conn.addr.rsplit(":", 1)[0], "TLS handshake with %s failed: %s",
                       conn.label, reason, event="tls-failed", peer=conn.addr)
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        sock = conn.sock
        if self.conns.pop(sock.fileno(), None) is None:
            return
        self.loop.cancel(conn.timer)
        conn.timer = None
        conn.slot = -1
        self.closed_pings += conn.peer.pings
        if conn.peer.state is PeerState.LATE:
            self.late -= 1
        self.loop.forget(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the peer sees EOF now, not whenever we are collected
        except OSError:
            pass
        sock.close()

    def _peer_log(self, level: int, source: str, msg: str, *args: object, event: str, peer: str = "",
                  name: str | None = None, **more: object) -> None:
        """A line a peer can cause: rate-limited per source address and kind, per kind, and in total."""
        self.peer_log.log(level, source, msg, *args, event=event, peer=name or peer or source,
                          peer_address=peer or source, stacklevel=3, **more)  # call site: our caller


def _peer_rows(conns: list[Connection], worker: int | None) -> Iterator[PeerRow]:
    """The rows of a snapshot of the connections, made as they are read (the status reply slices them)."""
    for conn in conns:
        if conn.sock.fileno() < 0:
            continue  # closed since the snapshot
        peer = conn.peer
        yield PeerRow(peer.name or conn.addr, peer.name, conn.addr, peer.state.value, conn.since,
                      peer.last_heard if peer.pings else None, peer.pings, peer.timeout, peer.interval, worker)
