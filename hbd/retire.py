"""Letting go of big containers a slice per loop turn.

Dropping the last reference to a dict of 100,000 expected peers frees them all in one C call: tens
of ms (more on a loaded machine) in which the loop serves nobody. What a reload replaces (the
expected peers in force until then, its own list of changes) is handed here instead and emptied
RETIRE_SLICE items per turn. A container handed over must be nobody else's to change: it is emptied.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hbd.loop import EventLoop, Timer

RETIRE_SLICE = 5000  # items freed per loop turn (about a ms)


class Retirer:
    def __init__(self, loop: EventLoop, slice_: int = RETIRE_SLICE) -> None:
        self.loop = loop
        self.slice = slice_
        self._queue: deque[list[Any] | dict[Any, Any]] = deque()
        self._timer: Timer | None = None

    def __len__(self) -> int:
        """Items still to free."""
        return sum(len(c) for c in self._queue)

    def retire(self, container: list[Any] | dict[Any, Any]) -> None:
        if not container:
            return
        self._queue.append(container)
        if self._timer is None:
            self._timer = self.loop.call_later(0, self._step)

    def _step(self) -> None:
        self._timer = None
        budget = self.slice
        queue = self._queue
        while budget > 0 and queue:
            container = queue[0]
            n = min(budget, len(container))
            if isinstance(container, dict):
                for _ in range(n):
                    container.popitem()
            else:
                del container[-n:]
            budget -= n
            if not container:
                queue.popleft()
        if queue:
            self._timer = self.loop.call_later(0, self._step)

    def close(self) -> None:
        """At shutdown: all at once."""
        self.loop.cancel(self._timer)
        self._timer = None
        self._queue.clear()
