"""hbd-client: keeps one link per server, pings it, detects a dead link, reconnects with backoff.

A ``Link`` owns one socket at a time and walks WAITING -> CONNECTING -> UP -> WAITING ... (hbd.link.Lifecycle
decides); the ping schedule, pong parsing and pong-timeout rule live in ``protocol.ClientLink``. Nothing here
blocks: connects are non-blocking with a timeout, and host names are resolved off the loop.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hbd import tls
from hbd.client_session import Session, close_socket
from hbd.config import ClientConfig
from hbd.daemon import EXIT_GAVE_UP, Daemon, StartError
from hbd.early import start_quiet
from hbd.link import GaveUp, HealthChange, Lifecycle, LinkState, Retry
from hbd.logs import fields, log
from hbd.loop import EventLoop, Timer
from hbd.metrics import LinkStats
from hbd.protocol import ClientLink
from hbd.reload_process import ChildLoad
from hbd.reloading import Load
from hbd.state_store import CLIENT_DB_NAME
from hbd.store_writer import StoreWriter, open_store
from hbd.view import ClientSettings, ClientView, LinkRow


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    name: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.address})" if self.name else self.address

    @property
    def peer(self) -> str:
        """How logs (PEER=), hooks (HBD_PEER) and metrics name it: its name, else its address."""
        return self.name or self.address


def resolve(loop: EventLoop, host: str, port: int, done: Callable[[list[tuple], str | None], None]) -> None:
    """getaddrinfo without blocking the loop: literals directly, names on a short-lived thread.
    ``done`` always comes, with addresses or with a reason (never an exception, whatever the name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        try:
            infos, err = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST), None
        except (OSError, ValueError) as exc:  # e.g. an IPv6 zone naming no interface
            infos, err = [], f"cannot use the address {host}: {_why(exc)}"
        done(infos, err)
        return

    def work() -> None:
        try:
            infos, err = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), None
        except Exception as exc:  # UnicodeError for a name the IDNA codec refuses is a ValueError
            infos, err = [], f"cannot resolve {host}: {_why(exc)}"
        loop.call_soon_threadsafe(lambda: done(infos, err))

    start_quiet(threading.Thread(target=work, name=f"resolve {host}", daemon=True))  # signals are the loop's


def _why(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


class Dialer:
    """One connection attempt of a link: the name lookup (off the loop, one in flight at most), a
    non-blocking connect and the TLS handshake; the link's one timer (``set_timer``) bounds each step.
    It ends in ``up(sock)`` or ``failed(reason, event)``; ``abandon()`` drops an attempt under way."""

    def __init__(
        self,
        loop: EventLoop,
        target: Target,
        set_timer: Callable[[float, Callable[[], None]], None],
        up: Callable[[socket.socket], None],
        failed: Callable[[str, str], None],
    ) -> None:
        self.loop, self.target, self._set_timer, self._up, self._failed = loop, target, set_timer, up, failed
        self.sock: socket.socket | None = None
        self.handshake: tls.Handshake | None = None
        self.resolving = False
        self._generation = 0  # invalidates callbacks (e.g. a DNS answer) of an abandoned attempt
        self._lookup_pending = False
        self._timeout = 0.0
        self._tls: tuple[ssl.SSLContext, str, float] | None = None  # context, server name, handshake timeout

    def start(self, cfg: ClientConfig, context: ssl.SSLContext | None) -> None:
        self._generation += 1
        gen = self._generation
        self._timeout = cfg.receive_timeout
        self._tls = (
            None
            if context is None or cfg.tls is None
            else (context, cfg.tls.server_hostname or self.target.host, cfg.tls.handshake_timeout)
        )
        self.resolving = True
        self._set_timer(self.loop.time() + self._timeout, self._timed_out)
        if self._lookup_pending:  # a DNS server that does not answer: one lookup thread per link at most
            return
        self._lookup_pending = True
        resolve(self.loop, self.target.host, self.target.port, lambda infos, err: self._resolved(gen, infos, err))

    def _timed_out(self) -> None:
        what = f"resolving {self.target.host}" if self.resolving else "connect"
        self._failed(
            f"{what} timed out after {self._timeout:g} s", "resolve-failed" if self.resolving else "connect-failed"
        )

    def _resolved(self, gen: int, infos: list[tuple], err: str | None) -> None:
        self._lookup_pending = False
        if gen != self._generation:  # the attempt was abandoned meanwhile
            return
        self.resolving = False
        if err or not infos:
            self._failed(err or f"no address for {self.target.host}", "resolve-failed")
            return
        family, stype, proto, _, addr = infos[0]
        sock = socket.socket(family, stype, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        rc = sock.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._failed(f"cannot connect: {errno.errorcode.get(rc, rc)} {_strerror(rc)}", "connect-failed")
            return
        self.loop.add_writer(sock, self._on_connect)

    def _on_connect(self) -> None:
        assert self.sock is not None
        self.loop.remove_writer(self.sock)
        rc = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            self._failed(f"cannot connect: {_strerror(rc)}", "connect-failed")
        elif self._tls is not None:
            self._start_tls(*self._tls)
        else:
            self._done()

    def _start_tls(self, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        assert self.sock is not None
        self.loop.forget(self.sock)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname, do_handshake_on_connect=False)
        self._set_timer(
            self.loop.time() + timeout,
            lambda: self._failed(f"TLS handshake not completed within {timeout:g} s", "connect-failed"),
        )
        self.handshake = tls.Handshake(
            self.loop,
            self.sock,
            self._done,
            lambda reason: self._failed(f"TLS handshake failed: {reason}", "connect-failed"),
        )
        self.handshake.step()

    def _done(self) -> None:
        sock, self.sock, self.handshake = self.sock, None, None
        assert sock is not None
        self._up(sock)

    def abandon(self) -> None:
        self._generation += 1
        self.handshake = None
        close_socket(self.loop, self.sock)
        self.sock = None


class Link:
    """One server's link across its connections: dials (``Dialer``), hands a connection that is up to
    a ``Session``, retries, and logs and reports what happens. What state it is in and what comes next
    is decided by ``hbd.link.Lifecycle`` (``self.life``)."""

    def __init__(self, client: Client, target: Target) -> None:
        self.client = client
        self.loop = client.loop
        self.target = target
        self.address = target.address
        cfg = client.config
        self.life = Lifecycle(
            self.loop.time(),
            reconnect_delay=cfg.reconnect_delay,
            reconnect_max_delay=cfg.reconnect_max_delay,
            reconnect_attempts=cfg.reconnect_attempts,
            pong_timeout=cfg.pong_timeout,
        )
        self.backoff = self.life.backoff
        self.session: Session | None = None  # once connected (the dialer holds the socket until then)
        self.timer: Timer | None = None  # the dialer's steps and the retry; a session has its own
        self.dialer = Dialer(self.loop, target, self._set_timer, self._up, self._failed)
        self.stats = LinkStats()

    # What status and metrics read: the lifecycle's view.
    state = property(lambda self: self.life.state)
    health = property(lambda self: self.life.health)
    health_since = property(lambda self: self.life.health_since)
    retries = property(lambda self: self.life.retries)

    @property
    def proto(self) -> ClientLink | None:
        return self.session.proto if self.session is not None else None

    @property
    def cfg(self) -> ClientConfig:
        return self.client.config

    def _set_timer(self, when: float, cb: Callable[[], None]) -> None:
        self.loop.cancel(self.timer)
        self.timer = self.loop.call_at(when, cb)

    # -- connecting -----------------------------------------------------------------------------------
    def connect(self) -> None:
        self.life.attempt(self.loop.time())
        self.stats.connects += 1
        self.dialer.start(self.cfg, self.client.tls_context)

    def _up(self, sock: socket.socket) -> None:
        self.loop.cancel(self.timer)  # the dialer's step timeout: the session keeps its own timer
        self.timer = None
        now = self.loop.time()
        self.life.connected(now)
        self.session = Session(self.loop, now, sock, self.cfg, self.stats, self, self.client.tls_context is not None)
        log.info(
            "connected to %s",
            self.target.label,
            extra=fields(peer=self.target.peer, peer_address=self.address, event="connected"),
        )
        self.session.start(self.cfg)

    def _failed(self, reason: str, event: str = "connect-failed") -> None:
        """A connection attempt did not work out."""
        if event == "resolve-failed":  # rate-limited: a name that does not resolve fails on every retry
            self.client.peer_log.log(
                logging.WARNING,
                self.address,
                "%s: %s",
                self.target.label,
                reason,
                event=event,
                peer=self.target.peer,
                peer_address=self.address,
            )
        else:
            self.client.log_link(self, logging.WARNING, reason, event=event)
        self._down(reason)

    # -- what the session reports (hbd.client_session.Owner) ------------------------------------------
    def pongs(self, rtts: list[float], now: float, back: bool, answering: bool) -> None:
        if back:
            log.info(
                "%s answers again (pong after %.3f s)",
                self.target.label,
                max(rtts),
                extra=fields(peer=self.target.peer, peer_address=self.address, event="back"),
            )
        if log.isEnabledFor(self.client.pong_level):  # else skip building lines nobody sees
            for rtt in rtts:
                self.client.log_pong(self, rtt)
        self._report(self.life.pong(now, answering), rtt_ms=f"{rtts[-1] * 1000:.3f}")

    def late(self, waited: float, pong_timeout: float, now: float) -> None:
        self.client.log_link(
            self,
            logging.WARNING,
            f"{self.target.label} is late: ping unanswered for {waited:.3f} s (pong_timeout {pong_timeout:g} s)",
            event="late",
        )
        self._report(self.life.late(now), silent_ms=round(waited * 1000))

    def lost(self, reason: str, peer_caused: bool = False) -> None:
        """A link that was up went down. ``peer_caused``: the server broke the protocol, a line it
        could make us write on every reconnect, so it goes through the peer-line rate limit."""
        was = self.target.label
        if peer_caused:
            self.client.peer_log.log(
                logging.WARNING,
                self.address,
                "link to %s lost: %s",
                was,
                reason,
                event="protocol-error",
                peer=self.target.peer,
                peer_address=self.address,
            )
        else:
            self.client.log_link(self, logging.WARNING, f"link to {was} lost: {reason}", event="down")
        self._down(reason)

    # -- down, retry, close ---------------------------------------------------------------------------
    def _down(self, reason: str) -> None:
        self._teardown()
        change, nxt = self.life.down(self.loop.time(), reason)
        self._report(change)
        if isinstance(nxt, GaveUp):
            self.client.link_gave_up(self, nxt)
            return
        self.client.log_retry(self, nxt)
        self._set_timer(nxt.at, self.connect)

    def _report(self, change: HealthChange | None, **extra: object) -> None:
        """Report a state change of this server (status socket, metrics, on_change hooks, the history)."""
        if change is not None:
            writer = self.client.writer
            if writer is not None:  # the history's states are the server's (UP, LATE, DOWN; NEW before any)
                old = change.old.upper() if change.old is not None else "NEW"
                writer.change(self.target.peer, old, change.new.upper(), change.reason)
            self.client.ops.event(
                change.new,
                self.target.peer,
                self.address,
                name=self.target.name,
                previous=change.old,
                reason=change.reason,
                standing=change.standing,
                **extra,
            )

    def _teardown(self) -> None:
        self.dialer.abandon()
        self.loop.cancel(self.timer)
        self.timer = None
        if self.session is not None:
            self.session.close()
            self.session = None

    def close(self) -> None:
        self._teardown()
        self.life.close()

    def owns(self, fileobj: object, callback: object) -> bool:
        """Does a failing callback belong to this link (its sockets, or its timers)?"""
        if self.session is not None and self.session.owns(fileobj, callback):
            return True
        return (fileobj is not None and fileobj is self.dialer.sock) or (
            fileobj is None and self.timer is not None and self.timer.callback is callback
        )

    def internal_error(self, exc: Exception) -> None:
        """A bug hit while serving this link: drop the connection and reconnect as after any loss."""
        if self.state is LinkState.GAVE_UP:
            return
        try:
            self.lost(f"internal error: {exc!r}")
        except Exception:  # the link's state is too broken to report: start over regardless
            self._teardown()
            self._set_timer(self.life.restart(self.loop.time()).at, self.connect)

    def apply(self, cfg: ClientConfig) -> None:
        """New settings for a link that stays (SIGHUP; ``self.cfg`` is still the old config)."""
        old = self.cfg
        self.life.retime(
            reconnect_delay=cfg.reconnect_delay,
            reconnect_max_delay=cfg.reconnect_max_delay,
            reconnect_attempts=cfg.reconnect_attempts,
            pong_timeout=cfg.pong_timeout,
        )
        if self.session is None:
            return  # not connected: the next connection greets with the new settings
        if cfg.client_name != old.client_name:
            # A connection keeps the name it greeted with: reconnect under the new one, once the
            # reload is done (connect() reads the config). Not a failure: the health stays as it is.
            log.info(
                "client_name is now %s: reconnecting to %s",
                cfg.client_name,
                self.target.label,
                extra=fields(peer=self.target.peer, peer_address=self.address, event="rename"),
            )
            self._teardown()
            self._set_timer(self.life.redial(self.loop.time()), self.connect)
            return
        self.session.apply(cfg, old)

    def status(self) -> str:
        """This link in the STATUS= line: up with its RTT, or DOWN with why and what happens next."""
        st = self.stats
        fresh = self.life.up_since is not None and st.last_pong is not None and st.last_pong >= self.life.up_since
        return self.life.status(self.target.label, self.loop.time(), st.rtt_last if fresh else None)


class Client(Daemon[ClientConfig]):
    identifier = "hbd-client"
    role = "client"

    def __init__(self, config: ClientConfig, **kwargs: object) -> None:
        super().__init__(config, **kwargs)  # type: ignore[arg-type]
        self.links: list[Link] = []
        # One line per pong reads well on a terminal but is ~43k journal lines a day per link:
        # under journald pongs are debug lines (connects, losses and retries stay info/warning).
        self.pong_level = logging.DEBUG if self.logs.journald else logging.INFO
        self.tls_context: ssl.SSLContext | None = None
        self.writer: StoreWriter | None = None  # the links' history (state_dir), when there is a store

    @staticmethod
    def targets(cfg: ClientConfig) -> list[Target]:
        """The servers to keep a link with: the ``servers`` list, or the single host/port."""
        if cfg.servers:
            return [Target(s.host, s.port or cfg.port, s.name) for s in cfg.servers]
        return [Target(cfg.host, cfg.port)]

    def loader(self) -> Load:
        return ChildLoad("client", self.config.path, self.overrides)

    @staticmethod
    def _context(cfg: ClientConfig) -> ssl.SSLContext | None:
        if cfg.tls is None:
            return None
        try:
            return tls.client_context(cfg.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise StartError(f"tls: cannot load the certificate files: {exc}") from None

    def start(self) -> None:
        cfg = self.config
        self.tls_context = self._context(cfg)
        self.loop.stall_callbacks.append(self.on_stall)
        store, _, _ = open_store(cfg.state_dir, CLIENT_DB_NAME, "the server links' history")
        if store is not None:
            self.writer = StoreWriter(self.loop, store, time.time, cfg.history_days, side="client")
        self.links = [Link(self, t) for t in self.targets(self.config)]
        for link in self.links:
            link.connect()
        self.start_status_updates()

    def prepare(self, new: ClientConfig) -> Callable[[], None]:
        context = self._context(new)  # certificates are re-read on every reload
        tls_changed = new.tls != self.config.tls

        def commit() -> None:
            self.tls_context = context
            if self.writer is not None:
                self.writer.history_days = new.history_days
            if new.state_dir != self.config.state_dir:
                log.info("state_dir: the new directory is used from the next start")
            # Links to servers still listed carry on undisturbed; removed ones close, new ones start
            # (all of them when the TLS settings changed).
            old = {} if tls_changed else {link.target: link for link in self.links}
            if tls_changed:
                for link in self.links:
                    link.close()
            links = []
            for target in self.targets(new):
                kept = old.pop(target, None)
                if kept is not None:
                    link = kept
                else:
                    link = Link(self, target)
                    if not tls_changed:
                        log.info("now also pinging %s", target.label)
                    # After the reload, with the new settings; a link's one timer, so that closing
                    # it (another reload in this turn) cancels the connect too.
                    link._set_timer(self.loop.time(), link.connect)
                links.append(link)
                link.apply(new)
            for link in old.values():
                log.info("no longer pinging %s", link.target.label)
                link.close()
            self.links = links

        return commit

    def shutdown(self) -> None:
        for link in self.links:
            link.close()
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()  # what is queued, and the run's last sign of life (blocking: after the loop)

    def on_stall(self, planned: float, woke: float) -> None:
        """Our own loop did not run (SIGSTOP, starvation): pongs could not have been read, so that
        time does not count as waiting for them, as the server does for its clients."""
        log.warning(
            "event loop stalled for %.3f s; extending pong deadlines by that much",
            woke - planned,
            extra=fields(event="stall", lag_ms=round((woke - planned) * 1000)),
        )
        for link in self.links:
            if link.proto is not None:
                link.proto.extend(planned, woke)

    def status_text(self) -> str:
        return "; ".join(link.status() for link in self.links)

    def view(self) -> ClientView:
        cfg = self.config
        return ClientView(
            self.daemon_view(),
            cfg.client_name,
            ClientSettings(cfg.heartbeat_interval, cfg.pong_timeout, cfg.reconnect_attempts),
            tuple(_link_row(link) for link in self.links),
        )

    def contain(self, fileobj: object, callback: object, exc: Exception) -> str | None:
        """An unexpected error while serving one link: that link reconnects, the others go on."""
        for link in self.links:
            if link.owns(fileobj, callback):
                link.internal_error(exc)
                return f"the link to {link.target.label} (reconnecting)"
        return super().contain(fileobj, callback, exc)

    def log_link(self, link: Link, level: int, message: str, *, event: str) -> None:
        log.log(
            level,
            message if link.target.label in message else f"{link.target.label}: {message}",
            extra=fields(peer=link.target.peer, peer_address=link.address, event=event),
        )

    def log_pong(self, link: Link, rtt: float) -> None:
        log.log(
            self.pong_level,
            "pong from %s in %.1f ms",
            link.target.label,
            rtt * 1000,
            extra=fields(peer=link.target.peer, peer_address=link.address, event="pong", rtt_ms=f"{rtt * 1000:.3f}"),
        )

    def log_retry(self, link: Link, nxt: Retry) -> None:
        log.info(
            "reconnecting to %s in %.2f s (attempt %d%s)",
            link.target.label,
            nxt.delay,
            nxt.attempt,
            f" of {nxt.limit}" if nxt.limit else "",
            extra=fields(peer=link.target.peer, peer_address=link.address, event="retry"),
        )

    def link_gave_up(self, link: Link, gave_up: GaveUp) -> None:
        log.error(
            "giving up on %s after %d failed reconnect attempt%s",
            link.target.label,
            gave_up.attempts,
            "s" if gave_up.attempts != 1 else "",
            extra=fields(peer=link.target.peer, peer_address=link.address, event="gave-up"),
        )
        if all(lk.state is LinkState.GAVE_UP for lk in self.links):
            log.error("no server left to try; exiting (status %d)", EXIT_GAVE_UP)
            self.stop(EXIT_GAVE_UP)


def _strerror(rc: int) -> str:
    return os.strerror(rc)


def _link_row(link: Link) -> LinkRow:
    st, proto, timer = link.stats, link.proto, link.timer
    return LinkRow(
        link.target.peer,
        link.target.name,
        link.address,
        link.health.upper() if link.health else "NEW",
        link.health_since,
        str(link.state),
        st.last_pong,
        st.rtt_view(),
        st.pings,
        st.timeouts,
        st.connects,
        link.retries,
        proto.outstanding if proto is not None else 0,
        timer.when if link.state is LinkState.WAITING and timer is not None else None,
    )
