"""The server's liveness part: the deadline wheel that files every connection and the verdicts
(late, dead, forgiven after our own stall) when a deadline comes.

Each connection is filed once at its peer's next deadline and re-filed lazily when that comes, so
a ping costs no timer operation at all and the loop's heap holds one timer for all connections.
What a verdict means (log lines, events, closing a dead peer) is the owner's: ``on_verdict``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

from hbd.connection import Connection
from hbd.logs import fields, log
from hbd.loop import EventLoop, Timer
from hbd.protocol import PeerState, ServerPeer, StateChange, peer_timeout
from hbd.wheel import DeadlineWheel

WHEEL_RESOLUTION = 0.01  # verdicts come at most this late; the issue allows 100 ms, benchmarks 50
AFTER_NOW = 1e-6  # "later than now" for the wheel: far above the clock's float resolution, far below a slot
STALLS_KEPT = 256  # recent stalls of our own loop remembered for forgiveness; older ones are forgotten
# Silence checks (verdicts: log lines, registry, closing) per loop turn; the rest of the due
# connections wait for the next turn, after its I/O. Peers that all pinged in the same burst are
# due in the same slot: 19,000 verdicts in one turn took about a second. Re-filing a connection
# that pinged since (about a microsecond) is not counted.
WHEEL_CHECKS = 256
_ceil = math.ceil


def timeout_for(peer: ServerPeer, heartbeat_timeout: float, max_interval: float) -> float:
    """heartbeat_timeout until the first ping, whatever the greeting announced (a greeting alone
    must not hold a slot); then 3 intervals, the interval capped by max_interval."""
    if not peer.pings or peer.interval is None:
        return heartbeat_timeout
    return peer_timeout(heartbeat_timeout, min(peer.interval, max_interval))


class Liveness:
    """``on_verdict(conn, change)`` hears every state change a deadline decides; after a DEAD one
    the connection is no longer filed (the owner closes it). ``is_open(conn)``: still held."""

    def __init__(
        self,
        loop: EventLoop,
        on_verdict: Callable[[Connection, StateChange], None],
        is_open: Callable[[Connection], bool],
    ) -> None:
        self.loop = loop
        self.clock = loop.clock
        self.on_verdict = on_verdict
        self.is_open = is_open
        self.wheel: DeadlineWheel[Connection] = DeadlineWheel(WHEEL_RESOLUTION)
        self._timer: Timer | None = None
        self._in_wheel = False
        self._backlog: deque[tuple[int, list[Connection]]] = deque()  # due slots not checked yet (in order)
        self._stalls: deque[tuple[float, float]] = deque(maxlen=STALLS_KEPT)  # (from, to) we did not run

    def arm(self, conn: Connection, forgiven: float = 0.0) -> None:
        """(Re)file the connection under its next deadline. A connection stays filed once: if its
        filing is due no later than the new deadline it stays (the wheel re-files it lazily then, as
        after a ping), else it is moved; so no sequence of messages can pile up entries."""
        # Never at or before now: the rules are strict (silent for MORE than the timeout), so a
        # check exactly at the deadline changes nothing and must not be re-filed for the same instant.
        # Just after now is enough: its slot is the first that ends after now (now + a whole slot
        # would make a verdict that was just short of its deadline up to two slots late).
        when = max(conn.next_deadline() + forgiven, self.clock() + AFTER_NOW)
        if conn.slot != -1:
            if self.wheel.tick(when) >= conn.slot:
                return
            self.wheel.discard(conn.slot, conn)
        conn.slot = self.file(conn, when)

    def retime(self, conns: Iterable[Connection], heartbeat_timeout: float, max_interval: float) -> None:
        """New timeouts (a reload) apply to connected peers too."""
        for conn in conns:
            conn.peer.timeout = timeout_for(conn.peer, heartbeat_timeout, max_interval)
            if conn.slot != -1:  # not still in a TLS handshake
                conn.arm()

    def file(self, conn: Connection, when: float) -> int:
        slot = self.wheel.add(when, conn)
        timer = self._timer
        if self._in_wheel:
            return slot  # _on_wheel arms the timer for the earliest slot when it is done
        if timer is None or timer.when > slot * WHEEL_RESOLUTION:
            self.loop.cancel(timer)
            self._timer = self.loop.call_at(slot * WHEEL_RESOLUTION, self._on_wheel)
        return slot

    def _on_wheel(self) -> None:
        self._timer = None
        self._in_wheel = True
        now = self.clock()
        wheel = self.wheel
        add, slots, per = wheel.add, wheel.slots, wheel.per_second
        backlog = self._backlog
        backlog.extend(wheel.pop_due(now))  # after the slots left from an earlier turn: earliest first
        checks = WHEEL_CHECKS
        soon = now + AFTER_NOW  # (once a turn, not once a connection)
        # The last re-filing's deadline, slot and list: peers that pinged in the same turn have the same
        # deadline and sit next to each other in a slot (filed together), so most re-filings reuse it
        last_when, last_tick = -1.0, 0  # (no deadline is negative)
        last_filed: list[Connection] = []
        try:
            while backlog and checks:
                slot, conns = backlog.popleft()
                for conn in conns:  # (no enumerate(): where it stopped is looked up when it stops)
                    if conn.slot != slot:
                        continue  # closed since
                    # conn.next_deadline() inlined (once a ping: a Python call costs as much as the rest):
                    # an UP peer's next verdict is LATE at half its timeout, any other's at its timeout
                    when = conn.last_heard + conn.due_in
                    if when == last_when:
                        last_filed.append(conn)
                        conn.slot = last_tick
                        continue
                    # it pinged since it was filed (the usual case): just re-file, about once a ping:
                    # wheel.add() inlined for a slot already in use (most are). Not within AFTER_NOW
                    # of now: a deadline a float's last bit after its slot's end goes to check(),
                    # which re-files it through arm(), never into a slot that is due already
                    if when > soon:
                        tick = _ceil(when * per)
                        filed = slots.get(tick)
                        if filed is None:
                            tick = conn.slot = add(when, conn)
                            filed = slots[tick]
                        else:
                            filed.append(conn)
                            conn.slot = tick
                        last_when, last_tick, last_filed = when, tick, filed
                        continue
                    if not checks:  # this turn's share is done: the rest of the slot comes next turn
                        backlog.appendleft((slot, conns[conns.index(conn) :]))  # (a connection is filed once)
                        break
                    checks -= 1
                    conn.slot = -1
                    last_when = -1.0  # a verdict may close connections and so empty (drop) that slot's list
                    try:
                        self.check(conn)
                    except Exception as exc:  # that connection only: the others are still due
                        self.loop.report_error(conn.sock, self.check, exc)
        finally:
            self._in_wheel = False
        due = now if backlog else self.wheel.next_time()
        if due is not None:
            self._timer = self.loop.call_at(due, self._on_wheel)

    def check(self, conn: Connection) -> None:
        """The connection's deadline came: apply the silence rule."""
        now = self.clock()
        peer = conn.peer
        if now - peer.last_heard > peer.timeout / 2:
            # Last look before a verdict: pings may be waiting in our buffer if this very turn of
            # the loop was delayed (we were stopped or starved between select() and now). A look of
            # its own: what it finds was there by now, not by the turn's select() (loop.woke).
            self.loop.woke = now
            conn.on_read()
            if not self.is_open(conn):
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
            self.on_verdict(conn, change)
            if change.new is PeerState.DEAD:
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
        """The loop woke late (a stall callback): deadlines that fell in the stall are forgiven."""
        self._stalls.append((planned, woke))
        log.warning(
            "event loop stalled for %.3f s; extending client deadlines by that much",
            woke - planned,
            extra=fields(event="stall", lag_ms=round((woke - planned) * 1000)),
        )
