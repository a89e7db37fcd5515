"""The server's reporting part: what happens to connections turned into log lines (rate-limited
per source address: a flood from one host must not flood the journal), events for the status
socket, metrics and on_change hooks, and the counters the status and metrics show.

It decides nothing and closes nothing: the server calls it with what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from hbd.access import AllowList
from hbd.config import ServerConfig
from hbd.connection import Connection
from hbd.logs import PeerLog, fields, log
from hbd.protocol import Hello, PeerState, StateChange

Event = Callable[..., None]  # Ops.event(event, peer, address, **fields)


class Peers(Protocol):
    """The peer registry's side (hbd.server_registry): with one, state changes and ends go there and
    its notices make the events; without one (``workers: K``), this reports them itself."""

    def changed(self, conn: Connection, change: StateChange) -> None: ...
    def gone(self, conn: Connection, reason: str) -> None: ...
    def quiet(self, conn: Connection) -> bool: ...  # silenced: its lines at info


class ServerReport:
    def __init__(self, peer_log: PeerLog, event: Event, clock: Callable[[], float]) -> None:
        self.peer_log = peer_log
        self.event = event
        self.clock = clock
        self.late = 0  # connections late now
        self.stats = {"accepted": 0, "refused": 0, "timeouts": 0, "rejected": 0, "denied": 0, "tls_failed": 0}
        self.closed_pings = 0  # pings of connections already closed (metrics add the open ones)
        self.peers: Peers | None = None
        self.before: Callable[[Connection], object] = lambda conn: None  # what the peers must hear first (ends)

    # -- admission ----------------------------------------------------------------------------------
    @staticmethod
    def listening(address: tuple, cfg: ServerConfig, max_clients: int, tls: bool, allow: AllowList | None) -> None:
        log.info(
            "listening on %s:%d (heartbeat_timeout %g s, max_clients %d%s%s)",
            *address,
            cfg.heartbeat_timeout,
            max_clients,
            ", TLS" + (" with client certificates" if cfg.tls and cfg.tls.require_client_cert else "") if tls else "",
            f", allow {len(allow.nets)} network{'s' if len(allow.nets) != 1 else ''}" if allow else "",
        )

    def no_longer_admitted(self, conn: Connection, why: str, event: str) -> None:
        """A reload's allow list or TLS requirement shuts it out (the server closes it next)."""
        log.warning("closing client %s: %s", conn.label, why, extra=fields(peer=conn.addr, event=event))
        self.down(conn, why)

    def denied(self, host: str, port: int) -> None:
        self.stats["denied"] += 1
        self._peer_log(
            logging.WARNING,
            host,
            "denied %s:%d: not in the allow list",
            host,
            port,
            event="denied",
            peer=f"{host}:{port}",
        )

    def refused(self, host: str, port: int, max_clients: int) -> None:
        self.stats["refused"] += 1
        self._peer_log(
            logging.WARNING, host, "refused %s:%d: max_clients (%d) reached", host, port, max_clients, event="refused"
        )

    def connected(self, conn: Connection, how: str) -> None:
        self._peer_log(
            logging.INFO, conn.source, "client %s connected%s", conn.addr, how, event="connected", peer=conn.addr
        )

    # -- what peers do --------------------------------------------------------------------------------
    def hello(self, conn: Connection, ev: Hello, cap: float) -> None:
        self.before(conn)
        self._peer_log(
            logging.INFO,
            conn.source,
            "client %s is %s%s%s",
            conn.addr,
            ev.name,
            f" (interval {ev.interval:g} s)" if ev.interval else "",
            f" (counted as max_interval {cap:g} s)" if ev.interval and ev.interval > cap else "",
            event="hello",
            peer=conn.addr,
            name=ev.name,
        )

    def changed(self, conn: Connection, change: StateChange) -> None:
        self.before(conn)
        peers = self.peers
        if change.old is PeerState.RISING and change.new is PeerState.UP:
            if peers is not None:  # not a change: a ping the registry counts while the peer rises
                peers.changed(conn, change)
            return
        if change.old is PeerState.LATE:
            self.late -= 1
        if change.new is PeerState.LATE:
            self.late += 1
        source = conn.source
        kw: dict[str, Any] = {
            "event": change.new.value.lower(),
            "peer": conn.addr,
            "name": conn.peer.name,
            "silent_ms": round(change.silent_for * 1000),
        }
        if change.old is PeerState.NEW and change.new is PeerState.DEAD:
            # Never pinged (a port scan, a client that is not hbd): not a peer we ever reported, so
            # its end is no warning, no state change and no hook; the line is rate-limited.
            self._peer_log(
                logging.INFO,
                source,
                "closing client %s: no ping within %g s",
                conn.label,
                conn.peer.timeout,
                **{**kw, "event": "no-ping"},
            )
            return
        warning = logging.INFO if peers is not None and peers.quiet(conn) else logging.WARNING
        if change.new is PeerState.DEAD:
            self._peer_log(
                warning,
                source,
                "client %s timed out: silent for %.3f s (heartbeat_timeout %g s); closing",
                conn.label,
                change.silent_for,
                conn.peer.timeout,
                **kw,
            )
        elif change.new is PeerState.LATE:
            self._peer_log(warning, source, "client %s is late: silent for %.3f s", conn.label, change.silent_for, **kw)
        elif change.old is PeerState.NEW:
            log.debug("client %s is up: first ping", conn.label, extra=fields(**kw, peer_address=conn.addr))
        else:
            self._peer_log(
                logging.INFO, source, "client %s is back: ping after %.3f s", conn.label, change.silent_for, **kw
            )
        if peers is not None:
            peers.changed(conn, change)
            return
        if change.new is PeerState.DEAD:
            event, reason = "down", "timeout"
        elif change.new is PeerState.LATE:
            event, reason = "late", "silent"
        else:
            event, reason = "up", "first ping" if change.old is PeerState.NEW else "ping"
        if conn.peer.pings:  # one that never pinged was never reported up, so its end is no news
            self._report(conn, event, change.old, reason, silent_ms=round(change.silent_for * 1000))

    # -- ends ------------------------------------------------------------------------------------------
    def rejected(self, conn: Connection, reason: str) -> None:
        """It broke the protocol."""
        self.stats["rejected"] += 1
        self.down(conn, "protocol error")
        self._peer_log(
            logging.WARNING,
            conn.source,
            "closing client %s: %s",
            conn.label,
            reason,
            event="protocol-error",
            peer=conn.addr,
        )

    def dropped(self, conn: Connection, reason: str, level: int) -> None:
        self._peer_log(
            level,
            conn.source,
            "client %s %s",
            conn.label,
            reason,
            event="disconnected",
            peer=conn.addr,
            name=conn.peer.name,
        )
        self.down(conn, reason)

    def tls_failed(self, conn: Connection, reason: str) -> None:
        self.stats["tls_failed"] += 1
        self.down(conn, f"TLS error: {reason}")  # the TLS layer failed on a link that was up
        self._peer_log(
            logging.WARNING,
            conn.source,
            "TLS handshake with %s failed: %s",
            conn.label,
            reason,
            event="tls-failed",
            peer=conn.addr,
        )

    def failed(self, conn: Connection) -> None:
        """An unexpected error while serving it (a bug, contained to that connection)."""
        self.stats["rejected"] += 1
        self.down(conn, "internal error")

    def down(self, conn: Connection, reason: str) -> None:
        if self.peers is not None:
            self.peers.gone(conn, reason)
        elif conn.peer.pings:  # one that never pinged was never reported up
            self._report(conn, "down", conn.peer.state, reason)

    def closed(self, conn: Connection) -> None:
        """It is closed now, for whatever reason: its counts leave the open ones."""
        self.closed_pings += conn.peer.pings
        if conn.peer.state is PeerState.LATE:
            self.late -= 1

    def _report(self, conn: Connection, event: str, old: PeerState, reason: str, **extra: object) -> None:
        """A state change for the status socket, metrics and on_change hooks."""
        self.event(
            event,
            conn.peer.name or conn.addr,
            conn.addr,
            name=conn.peer.name,
            previous=old.value.lower(),
            reason=reason,
            standing=self.clock() - conn.since,
            **extra,
        )

    def _peer_log(
        self,
        level: int,
        source: str,
        msg: str,
        *args: object,
        event: str,
        peer: str = "",
        name: str | None = None,
        **more: object,
    ) -> None:
        """A line a peer can cause: rate-limited per source address and kind, per kind, and in total."""
        self.peer_log.log(
            level,
            source,
            msg,
            *args,
            event=event,
            peer=name or peer or source,
            peer_address=peer or source,
            stacklevel=3,
            **more,
        )  # call site: our caller
