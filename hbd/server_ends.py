"""Ends closed but not yet reported: a mass disconnect must not hold back the survivors' pongs.

The server closes an ended connection in the turn that reads its end (unregister, close: the
cheap part) and queues its report (log line, registry ``gone``, hooks; a worker's ``PeerGone``:
40-70 us) here. A timer works them off after the turn's I/O, oldest first; anything that must
see them first (a greeting, a verdict) calls ``work_off()`` for all of them. At most one per
connection: bounded by max_clients.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hbd.connection import Connection
    from hbd.loop import EventLoop, Timer

# Reports per turn (40-70 us each): 256 when the loop has caught up, 16 while its select() returns
# full batches, so that the sockets ready behind them (survivors' pings) go first.
ENDS_PER_TURN = 256
ENDS_WHEN_BUSY = 16

End = tuple["Connection", Callable[..., None], tuple[object, ...]]


class EndQueue:
    def __init__(self, loop: EventLoop, reported: Callable[[Connection], None]) -> None:
        self.loop = loop
        self.reported = reported  # called after each report (a worker forgets the connection then)
        self.ends: collections.deque[End] = collections.deque()
        self.timer: Timer | None = None

    def __len__(self) -> int:
        return len(self.ends)

    def __iter__(self) -> Iterator[End]:
        return iter(self.ends)

    def push(self, conn: Connection, report: Callable[..., None], args: tuple[object, ...]) -> None:
        self.ends.append((conn, report, args))
        if self.timer is None:
            self.timer = self.loop.call_at(self.loop.clock(), self._turn)

    def _turn(self) -> None:
        """A turn's share (a timer: it runs after the turn's I/O)."""
        self.timer = None
        busy = getattr(self.loop.selector, "full", False)
        self.work_off(ENDS_WHEN_BUSY if busy else ENDS_PER_TURN)
        if self.ends:
            self.timer = self.loop.call_at(self.loop.clock(), self._turn)

    def work_off(self, budget: int | None = None) -> None:
        """Report queued ends, oldest first: all of them, or at most ``budget``."""
        ends = self.ends
        for _ in range(len(ends) if budget is None else min(budget, len(ends))):
            conn, report, args = ends.popleft()
            try:
                report(conn, *args)
            except Exception as exc:  # one bad report must not lose the others
                self.loop.report_error(None, report, exc)
            self.reported(conn)
