"""A worker's side of the one peer registry (``workers: K``): the registry lives in the supervisor
(hbd.supervisor_registry); this stands in for it in each worker.

What the worker's connections report (greeting, first ping, late, back, end; the pings of a rising
peer) goes up the pipe as a small message keyed by the worker's own number for that connection
(a counter, never reused). Nothing is decided here and nothing goes up per ping: the supervisor's
registry answers asynchronously with orders — close a connection (a refused name, the older of two
connections with one name, on this or another worker), watch a rising peer's pings — and a mark
per connection (its peer's name, state, since, reason, flags, labels, silence) whenever that
changes, which this worker's status rows show. Hooks and the registry's own log lines are the
supervisor's; the connection's own lines (timed out, late, back) are logged here as in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from hbd import tls
from hbd.connection import Connection
from hbd.logs import PeerLog
from hbd.protocol import Hello, PeerState, StateChange
from hbd.server_registry import PENDING, log_refused
from hbd.view import PeerRow, PeerSource, Who
from hbd.worker_marks import MAX_SHARED as MAX_SHARED  # re-exported: where the tests import them from
from hbd.worker_marks import Mark as Mark
from hbd.worker_marks import Said as Said
from hbd.workers_codec import (
    MAX_REASON,
    Message,
    PeerBack,
    PeerClose,
    PeerConnected,
    PeerGone,
    PeerHello,
    PeerKnown,
    PeerLate,
    PeerMark,
    PeerOrder,
    PeerPinged,
    PeerWatch,
)


class RemotePeers:
    """The worker's registry stand-in (hbd.server_report's ``Peers``, plus ``hello``, ``closed``,
    ``order`` and ``rows``). Its tables hold open connections only (``closed`` drops them)."""

    def __init__(
        self,
        send: Callable[[Message], None],
        close: Callable[[Connection], None],
        is_open: Callable[[Connection], bool],
        peer_log: PeerLog,
        name_from: Callable[[], str] = lambda: "greeting",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.close_conn = close
        self.is_open = is_open
        self.peer_log = peer_log
        self.name_from = name_from  # the setting tls.name_from, as configured now
        self.clock = clock  # the loop's (monotonic: the supervisor's times in the marks are on it too)
        self._next = 0
        # Our number for a connection and the registry's mark of its peer (with its accounting) are
        # the connection's own (``conn.cid``, ``conn.mark``): not two more tables keyed by it.
        self.conns: dict[int, Connection] = {}
        # Numbered connections the registry has not been told of (greeted, no ping yet) or has let
        # go: the few, rather than a set of all the others (~40 B a connection).
        self.unreported: set[int] = set()
        self.shared: dict[object, object] = {}  # what the marks say (hbd.worker_marks.Said), one copy of each
        self.watched: set[int] = set()
        self.known: set[int] = set()  # greeted as a known peer, not pinged yet: the registry's row shows it

    def _id(self, conn: Connection) -> int:
        cid = conn.cid
        if not cid:
            self._next += 1
            cid = conn.cid = self._next
            self.conns[cid] = conn
            self.unreported.add(cid)
        return cid

    def _told(self, cid: int) -> None:
        """``cid`` is no longer one the registry was not told of (told now, or forgotten)."""
        unreported = self.unreported
        unreported.discard(cid)
        if not unreported:  # a set keeps its table when emptied: a ramp's greeted peers would stay in it
            self.unreported = set()

    def certificate(self, conn: Connection) -> str | None:
        """The certificate's name, when that is the peer's identity (``tls.name_from: certificate``)."""
        if self.name_from() != "certificate" or not hasattr(conn, "context"):
            return None
        return tls.certificate_name(conn.sock)  # type: ignore[arg-type]  # a TLS connection's SSLSocket

    # -- what the worker's connections report (hbd.server_report.Peers) ---------------------------------
    def hello(self, conn: Connection, ev: Hello) -> None:
        self.send(PeerHello(self._id(conn), ev.name, self.certificate(conn), conn.addr))

    def changed(self, conn: Connection, change: StateChange) -> None:
        new, cid = change.new, self._id(conn)
        if new is PeerState.UP:
            if change.old is PeerState.NEW:
                peer = conn.peer
                self._told(cid)
                self.send(PeerConnected(cid, peer.name, self.certificate(conn), conn.addr, peer.timeout))
            elif change.old is PeerState.RISING:
                self.send(PeerPinged(cid, change.silent_for))
            else:
                self.send(PeerBack(cid))
            if cid in self.watched and self.is_open(conn):
                conn.peer.state = PeerState.RISING  # its next ping reports a change again
        elif new is PeerState.LATE:
            self.send(PeerLate(cid))
        elif new is PeerState.DEAD:
            self.gone(conn, "timeout")

    def gone(self, conn: Connection, reason: str) -> None:
        cid = conn.cid
        if not cid or cid in self.unreported:
            return  # it never pinged: the registry never heard of it
        self.unreported.add(cid)
        peer = conn.peer
        self.send(PeerGone(cid, reason[:MAX_REASON], peer.last_heard if peer.pings else None))

    def quiet(self, conn: Connection) -> bool:
        """Its lines are logged at info (a silenced peer, as the supervisor's mark says)."""
        mark = conn.mark
        return mark is not None and mark.said.silenced_until is not None

    def closed(self, conn: Connection) -> None:
        """The worker closed it (whatever the reason): forget it."""
        cid = conn.cid
        if cid:
            conn.cid = 0
            conn.mark = None
            del self.conns[cid]
            self._told(cid)
            self.watched.discard(cid)
            self.known.discard(cid)

    # -- the supervisor's orders ---------------------------------------------------------------------------
    def order(self, msg: PeerOrder) -> None:
        conn = self.conns.get(msg.conn)
        if conn is None or not self.is_open(conn):
            return  # closed meanwhile
        if isinstance(msg, PeerMark):
            peer = getattr(conn, "peer", None)
            conn.mark = Mark(msg, peer.name if peer is not None else None, self.shared)
        elif isinstance(msg, PeerKnown):
            self.known.add(msg.conn)
        elif isinstance(msg, PeerWatch):
            if msg.on:
                self.watched.add(msg.conn)
                conn.peer.state = PeerState.RISING
            else:
                self.watched.discard(msg.conn)
                if conn.peer.state is PeerState.RISING:
                    conn.peer.state = PeerState.UP
        elif isinstance(msg, PeerClose):
            self.unreported.add(msg.conn)  # the registry has let it go already
            log_refused(self.peer_log, msg.level, conn, msg.reason, peer_address=conn.addr)
            self.close_conn(conn)

    # -- status rows ---------------------------------------------------------------------------------------
    def source(self, conns: list[Connection], worker: int | None) -> PeerSource:
        """Rows of a snapshot of connections, each made only when read, and for a filtered status only
        if kept (how each is shown is read first): a connection whose peer the registry knows carries
        the registry's view of it (the mark); the others are no peer yet."""

        def who(i: int) -> Who | None:
            conn = conns[i]
            if conn.sock.fileno() < 0:
                return None
            mark = conn.mark
            if mark is not None:
                return (mark.peer if mark.said.named else None, conn.addr, mark.state)
            peer = conn.peer
            if conn.cid in self.known and not peer.pings:
                return None
            return (peer.name, conn.addr, peer.state.value if peer.state is not PeerState.RISING else "UP")

        return PeerSource(len(conns), who, lambda i: self.row(conns[i], worker))

    def last_pings(self, conns: list[Connection]) -> Iterator[tuple[int, float]]:
        """(our number for it, last ping, monotonic) of each connection of a snapshot that is a peer
        (the supervisor has marked it) and has pinged: the supervisor knows the peer by that number."""
        for conn in conns:
            if conn.mark is not None and conn.peer.pings and conn.sock.fileno() >= 0:
                yield conn.cid, conn.peer.last_heard

    def row(self, conn: Connection, worker: int | None) -> PeerRow | None:
        """A connection's row (None: closed since the snapshot, or shown by the supervisor)."""
        if conn.sock.fileno() < 0:
            return None  # closed since the snapshot
        peer = conn.peer
        mark = conn.mark
        last_ping = peer.last_heard if peer.pings else None
        if mark is None:
            if conn.cid in self.known and not peer.pings:
                return None  # the supervisor shows the peer it claims to be
            state = peer.state.value if peer.state is not PeerState.RISING else "UP"
            return PeerRow(
                peer.name or conn.addr,
                peer.name,
                conn.addr,
                state,
                conn.since,
                last_ping,
                peer.pings,
                peer.timeout,
                peer.interval,
                worker,
                flags=PENDING,  # no peer yet: shown, no series of its own (as in one process)
            )
        acc = mark.accounted()
        now = self.clock()
        said = mark.said
        return PeerRow(
            mark.peer,
            mark.peer if said.named else None,
            conn.addr,
            mark.state,
            conn.since,
            last_ping,
            peer.pings,
            peer.timeout,
            peer.interval,
            worker,
            since=mark.since,
            reason=said.reason,
            expected=said.expected,
            silenced_until=said.silenced_until,
            flags=said.flags,
            labels=said.labels,
            uptime_24h=acc.uptime(now),
            outages=acc.outages,
            down_seconds=acc.down_seconds(now),
        )
