"""Ends not yet closed or reported: a mass disconnect must not hold back the survivors' pongs.

An end costs in three parts. Its hang-up (epoll's ``EPOLLRDHUP``: the peer closed or shut down its
side) is seen without a read: in that turn the connection is only taken off epoll (``hung_up``,
1-2 us), so that epoll does not return it again and the sockets ready behind it (survivors'
pings) come next. Its close (the data it sent before its end, answered as before, then the read
of its end, shutdown, close: 15-20 us) and its report (log line, registry ``gone``, hooks; a
worker's ``PeerGone``: 40-70 us) are queued here and worked off by a timer after each turn's I/O,
oldest first, a bounded share a turn. An end read the usual way (a connection without the
hang-up watch: TLS; a reset) is closed in its turn and only its report is queued. Anything that
must see the ends first (a greeting, a verdict) calls ``before(conn)``: the queued ends of the
peer that connection may be are closed and reported then, out of turn: those of its greeting name
and those without one (their identity may be an address or a certificate: anyone's); when it has no
greeting name itself, all of them, in order. At most one of each per connection: bounded by max_clients.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from hbd.selector import busy

if TYPE_CHECKING:
    from hbd.connection import Connection
    from hbd.loop import EventLoop, FileLike, HangUp, Timer

# Closes and reports per turn (15-20 and 40-70 us each): 64 when the loop has caught up, 16 while
# its select() returns full batches, so that the sockets ready behind them (survivors' pings) go first.
# (256 were 42-44 ms of CPU a turn in a 100,000-client teardown on the loaded machine, the largest
# turn of its workers; the same work in more turns.)
ENDS_PER_TURN = 64
ENDS_WHEN_BUSY = 16
# Reads of a hung-up connection's last data at its close (connection.RECV_SIZE each): a peer that sent more before its
# end is then read the usual way, from the loop.
READS_AT_END = 16

# A queued report: [connection, report, its arguments]; the connection is None once reported (out of
# turn: by before()), and the entry is skipped when its turn comes.
End = list


class EndQueue:
    def __init__(self, loop: EventLoop, reported: Callable[[Connection], None], conns: dict[int, Connection]) -> None:
        self.loop = loop
        self.reported = reported  # called after each report (a worker forgets the connection then)
        self.conns = conns  # the server's open connections by descriptor
        self.hung: collections.deque[Connection] = collections.deque()  # off epoll, still open
        self.ends: collections.deque[End] = collections.deque()  # closed, not reported
        # Queued entries (a hung-up Connection or an End) by greeting name, for before(); entries done
        # meanwhile stay until both queues are empty. Entries without a name, by id() until done (in
        # turn or out of turn): a greeting works off these too, not every queued end.
        self.by_name: dict[str, list[Connection | End]] = {}
        self.nameless: dict[int, Connection | End] = {}
        self.timer: Timer | None = None
        self.on_hangup: HangUp = self.hung_up  # one bound method for every connection's registration

    def __len__(self) -> int:  # reports still to make (for the tests: it walks the queue)
        return sum(e[0] is not None for e in self.ends)

    def __iter__(self) -> Iterator[End]:
        return (e for e in self.ends if e[0] is not None)

    def push(self, conn: Connection, report: Callable[..., None], args: tuple[object, ...]) -> None:
        entry: End = [conn, report, args]
        self.ends.append(entry)
        self._index(conn, entry)

    def hung_up(self, sock: FileLike) -> None:
        """The loop's hang-up callback of a connection (hbd.connection): its peer ended. Only what keeps
        epoll from returning it again now; its close comes in a later turn's share."""
        conn = self.conns.get(sock if isinstance(sock, int) else sock.fileno())
        self.loop.forget(sock)
        if conn is None:  # not one of ours (cannot happen: a connection's socket is forgotten at its close)
            return
        self.hung.append(conn)
        self._index(conn, conn)

    @property
    def unnamed(self) -> int:  # queued entries without a greeting name
        return len(self.nameless)

    def _index(self, conn: Connection, entry: Connection | End) -> None:
        name = conn.peer.name
        if name is None:
            self.nameless[id(entry)] = entry
        else:
            self.by_name.setdefault(name, []).append(entry)
        if self.timer is None:
            self.timer = self.loop.call_at(self.loop.clock(), self._turn)

    def _turn(self) -> None:
        """A turn's share (a timer: it runs after the turn's I/O)."""
        budget = ENDS_WHEN_BUSY if busy(self.loop.selector) else ENDS_PER_TURN
        self.close_hung(budget)  # (self.timer is still set: the ends these push arm no timer of their own)
        self.work_off(budget)
        self.timer = self.loop.call_at(self.loop.clock(), self._turn) if self.ends or self.hung else None

    def before(self, conn: Connection) -> None:
        """What the peers must hear before this connection's greeting or state change: the ends of the
        peer it may be (a reconnect sees its old end first), or all of them when that cannot be told."""
        if not self.hung and not self.ends:
            return
        name = conn.peer.name
        if name is None:
            self.work_off()
            return
        # Its name's and the nameless, until none is left: a close pushes its report (under its name, or
        # nameless again), and reads what it sent before its end (a greeting: then under that name).
        # Not every queued end: after a partition of 16,000 a worker's first greeting with one nameless
        # end queued (its greeting not read before its hang-up) made one turn of all of them (390 ms of CPU).
        nameless = self.nameless
        while (entries := self.by_name.pop(name, None)) or (entries := [e for e in nameless.values() if e is not conn]):
            for entry in entries:
                if isinstance(entry, list):
                    nameless.pop(id(entry), None)
                    if entry[0] is not None:
                        self._report(entry)
                elif entry is not conn:  # (its own last data is being read: the greeting comes from there)
                    nameless.pop(id(entry), None)
                    self._close(entry)

    def close_hung(self, budget: int | None = None) -> None:
        """Close hung-up connections, oldest first: all of them, or at most ``budget``."""
        hung = self.hung
        done = 0
        while hung and (budget is None or done < budget):  # not a range(): a report in between may work off all
            conn = hung.popleft()
            done += 1
            self.nameless.pop(id(conn), None)
            self._close(conn)
        self._forget_names()

    def _close(self, conn: Connection) -> None:
        """Its end is read as any end is (the server closes it and pushes its report), after the data it
        sent before it: a last ping is answered, a greeting heard, as when nothing was deferred."""
        conns, fd = self.conns, conn.sock.fileno()
        try:
            for _ in range(READS_AT_END):
                if conns.get(fd) is not conn:  # closed (in its turn, out of turn, or by a verdict)
                    return
                conn.on_read()
            if conns.get(fd) is conn:  # it sent more than that before its end: the usual way
                self.loop.add_reader(conn.sock, conn.on_read)
                if conn.outbuf:  # (forgotten with the rest at the hang-up)
                    self.loop.add_writer(conn.sock, conn.on_write)
        except Exception as exc:  # the server closes that one (Server.contain) and the others go on
            self.loop.report_error(conn.sock, conn.on_read, exc)

    def work_off(self, budget: int | None = None) -> None:
        """Close the hung-up connections and report queued ends, oldest first: all of them (what must see
        them first), or at most ``budget`` reports."""
        if budget is None:
            self.close_hung()
        ends = self.ends
        done = 0
        while ends and (budget is None or done < budget):  # not a range(): a report may work off all
            entry = ends.popleft()
            conn = entry[0]
            if conn is None:  # reported out of turn
                continue
            done += 1
            self.nameless.pop(id(entry), None)
            self._report(entry)
        self._forget_names()

    def _report(self, entry: End) -> None:
        conn, report, args = entry
        entry[0] = None
        try:
            report(conn, *args)
        except Exception as exc:  # one bad report must not lose the others
            self.loop.report_error(None, report, exc)
        self.reported(conn)

    def _forget_names(self) -> None:
        if not self.hung and not self.ends:
            self.by_name.clear()
