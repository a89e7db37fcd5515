"""hbd.liveness on its own, in virtual time: a connection, a stub owner, and the verdicts it hands
to on_verdict (no Server involved: the liveness part needs only what it is given)."""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from virtual_time import FakeClock, VirtualSelector

from hbd import liveness
from hbd.connection import Connection
from hbd.liveness import WHEEL_RESOLUTION, Liveness
from hbd.loop import EventLoop
from hbd.protocol import PeerState, StateChange


class Owner:
    """The smallest hbd.connection.Owner: arms through the liveness part, records the rest."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.clock = loop.clock
        self.verdicts: list[tuple[float, PeerState]] = []
        self.closed: list[Connection] = []
        self.liveness = Liveness(loop, self.on_verdict, lambda conn: conn not in self.closed)
        self.ending = SimpleNamespace(on_hangup=None)  # no hang-up callback: its end is read

    def on_verdict(self, conn: Connection, change: StateChange) -> None:
        self.verdicts.append((round(self.clock() - 1000.0, 3), change.new))
        if change.new is PeerState.DEAD:
            self.closed.append(conn)

    def arm(self, conn: Connection, forgiven: float = 0.0) -> None:
        self.liveness.arm(conn, forgiven)

    def is_open(self, conn: Connection) -> bool:
        return conn not in self.closed

    def on_events(self, conn: Connection) -> None:
        conn.peer.events = None
        conn.arm()  # as the server does after the first ping: LATE comes sooner for a peer that is up

    def connected(self, conn: Connection, how: str) -> None:
        pass

    def drop(self, conn: Connection, reason: str, level: int) -> None:
        self.closed.append(conn)

    reject = tls_failed = lambda self, conn, reason: self.closed.append(conn)


def run_until(loop: EventLoop, clock: FakeClock, t: float) -> None:
    while clock.now - 1000.0 < t:
        loop.run_once(max_wait=t - (clock.now - 1000.0))


@contextlib.contextmanager
def pinged_connection(start: float = 1000.0) -> Iterator[tuple[FakeClock, EventLoop, Owner, socket.socket]]:
    """A connection (4 s timeout) on virtual time whose peer has just pinged once; the peer's end too."""
    clock = FakeClock(start)
    loop = EventLoop(clock, VirtualSelector(clock))
    owner = Owner(loop)
    a, b = socket.socketpair()
    try:
        conn = Connection(owner, a, "127.0.0.1:1", clock(), 4.0)
        a.setblocking(False)
        conn.start()
        b.sendall(b"ping")
        loop.run_once(0)
        yield clock, loop, owner, b
    finally:
        a.close()
        b.close()
        loop.close()


def test_verdicts_come_at_the_deadline_through_on_verdict() -> None:
    with pinged_connection() as (clock, loop, owner, b):
        assert b.recv(4) == b"pong"
        run_until(loop, clock, 10.0)
        assert [v[1] for v in owner.verdicts] == [PeerState.LATE, PeerState.DEAD]
        (late, _), (dead, _) = owner.verdicts
        assert 2.0 <= late <= 2.0 + WHEEL_RESOLUTION + 1e-9  # more than half the timeout: late
        assert 4.0 <= dead <= 4.0 + WHEEL_RESOLUTION + 1e-9
        assert len(owner.liveness.wheel) == 0  # a dead connection is no longer filed


def test_a_stall_of_our_own_is_forgiven() -> None:
    with pinged_connection() as (clock, loop, owner, _peer):
        clock.advance(5.0)  # we were stopped past its whole timeout
        owner.liveness.on_stall(1000.0, clock())
        loop.run_once(0)
        assert PeerState.DEAD not in [v[1] for v in owner.verdicts]  # not killed for our own stall
        run_until(loop, clock, 20.0)
        assert (
            owner.verdicts[-1][1] is PeerState.DEAD
            and 5.0 + 4.0 <= owner.verdicts[-1][0] <= 9.0 + WHEEL_RESOLUTION + 1e-9
        )


def test_a_turn_takes_at_most_wheel_checks_verdicts_the_rest_come_next_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers that pinged in the same burst are due in the same slot: their verdicts are spread over
    turns of WHEEL_CHECKS each (with the I/O of every turn in between), all at their deadline's time."""
    monkeypatch.setattr(liveness, "WHEEL_CHECKS", 4)
    clock = FakeClock()
    loop = EventLoop(clock, VirtualSelector(clock))
    owner = Owner(loop)
    pairs = [socket.socketpair() for _ in range(10)]
    try:
        for i, (a, b) in enumerate(pairs):
            a.setblocking(False)
            Connection(owner, a, f"127.0.0.1:{i + 1}", clock(), 4.0).start()
            b.sendall(b"ping")
        loop.run_once(0)
        per_turn: list[int] = []
        while len(owner.verdicts) < 20 and len(per_turn) < 1000:
            before = len(owner.verdicts)
            loop.run_once(10.0)
            per_turn.append(len(owner.verdicts) - before)
        busy = [n for n in per_turn if n]
        assert busy == [4, 4, 2, 4, 4, 2]  # 10 LATE, then 10 DEAD: never more than 4 in a turn
        assert [v[1] for v in owner.verdicts] == [PeerState.LATE] * 10 + [PeerState.DEAD] * 10
        assert all(2.0 <= t <= 2.0 + WHEEL_RESOLUTION + 1e-9 for t, _ in owner.verdicts[:10])  # no later for it
        assert all(4.0 <= t <= 4.0 + WHEEL_RESOLUTION + 1e-9 for t, _ in owner.verdicts[10:])
        assert len(owner.liveness.wheel) == 0
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        loop.close()


def test_a_deadline_a_float_bit_after_its_slots_end_neither_spins_nor_comes_early() -> None:
    """1310.8400000000001 is one float bit after the end of slot 131084 (1310.84): the slot the wheel's
    multiply-and-ceil files it under ends before the deadline. The check at 1310.84 finds the peer not
    yet late; it must be filed again later, not into the slot that is due (a spin in virtual time)."""
    start = 1308.8400000000001  # pings here: LATE after 2 s (half its 4 s timeout)
    deadline = start + 2.0
    assert math.ceil(deadline / WHEEL_RESOLUTION) * WHEEL_RESOLUTION < deadline  # the case itself
    with pinged_connection(start) as (clock, loop, owner, _):
        (conn,) = loop.selector.handlers.values()
        assert isinstance(conn, Connection) and conn.state is PeerState.UP
        turns = 0
        while not owner.verdicts and turns < 1000:
            loop.run_once(max_wait=5.0)
            turns += 1
        assert turns < 50, "the wheel spun on a slot that ended before the deadline"
        assert owner.verdicts and owner.verdicts[0][1] is PeerState.LATE
        assert deadline < clock.now <= deadline + 2 * WHEEL_RESOLUTION


def test_a_ping_has_the_time_its_socket_was_found_ready_and_a_last_look_its_own() -> None:
    """A read stamps a ping with the turn's select() time (loop.woke), not a clock reading of its
    own; the last look before a verdict, outside the I/O phase, stamps what it finds with its time."""
    with pinged_connection() as (clock, loop, owner, b):
        (conn,) = [c for c in loop.selector.handlers.values() if isinstance(c, Connection)]
        assert conn.last_heard == loop.woke == 1000.0
        b.sendall(b"ping")
        clock.advance(0.5)
        loop.run_once(0)  # the turn's select() found it at 1000.5
        assert conn.last_heard == loop.woke == 1000.5
        b.sendall(b"ping")  # arrives, but the loop is starved: no turn looks at it ...
        clock.advance(2.5)  # ... until its LATE deadline (2 s after 1000.5) has passed
        owner.liveness.check(conn)
        assert conn.last_heard == 1003.0 and owner.verdicts == []  # found by the last look: not late
