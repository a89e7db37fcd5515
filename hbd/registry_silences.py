"""The registry's silences: peers (known or not) whose notices are logged at info without hooks
until a wall-clock time (an operator's "until 14:00").

Each silence is also filed in a heap at the monotonic time it is due (at most one live entry per
name, compacted when stale ones pile up), so ending silences costs nothing per event; a wall clock
set back is noticed then, and the silence filed again. Bounds: at most MAX_SILENCES silences,
reasons of at most MAX_REASON characters.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from hbd.registry_types import NAME_RE
from hbd.store_records import SilenceRecord

MAX_SILENCES = 100_000  # silences kept (names need not be known peers): bounds what `hbd silence` can cost
MAX_REASON = 256  # characters of an operator's silence reason kept


class Silences:
    """Maintenance silences by name (known peers or not), with their wall-clock ends: a heap of when
    to look (monotonic; at most one live entry per name, compacted), and what the store must write."""

    def __init__(self) -> None:
        self.by_name: dict[str, Silence] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._dirty: set[str] = set()

    def add(self, name: str, until: float, reason: str, now: float, wall: float) -> SilenceRecord | str:
        if not NAME_RE.match(name):
            return f"not a peer name: {name[:64]!r}"
        if until <= wall:
            return "the silence would already be over"
        if name not in self.by_name and len(self.by_name) >= MAX_SILENCES:
            return f"too many silences ({MAX_SILENCES})"
        reason = reason[:MAX_REASON]
        old = self.by_name.get(name)
        created = old.created if old is not None else wall
        self._put(name, Silence(until, reason, created, now + (until - wall)))
        self._dirty.add(name)
        return SilenceRecord(name, until, reason, created)

    def _put(self, name: str, silence: Silence) -> None:
        self.by_name[name] = silence
        self._seq += 1
        heapq.heappush(self._heap, (silence.due, self._seq, name))
        if len(self._heap) > 2 * len(self.by_name) + 64:
            live = self.by_name
            self._heap = [e for e in self._heap if e[2] in live and live[e[2]].due == e[0]]
            heapq.heapify(self._heap)

    def remove(self, name: str) -> bool:
        if self.by_name.pop(name, None) is None:
            return False
        self._dirty.add(name)
        return True

    def records(self) -> list[SilenceRecord]:
        return [SilenceRecord(n, s.until, s.reason, s.created) for n, s in self.by_name.items()]

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float, wall: float) -> list[str]:
        """The names whose silence ended by ``wall``."""
        ended = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, name = heapq.heappop(heap)
            silence = self.by_name.get(name)
            if silence is None or silence.due != when:
                continue
            if silence.until > wall:  # the wall clock was set back: look again then
                silence.due = now + (silence.until - wall)
                self._put(name, silence)
                continue
            del self.by_name[name]
            self._dirty.add(name)
            ended.append(name)
        return ended

    def take_dirty(self) -> tuple[list[SilenceRecord], list[str]]:
        """(silences to write, names whose silence is to be deleted) since the last call."""
        put = [SilenceRecord(n, s.until, s.reason, s.created) for n in self._dirty if (s := self.by_name.get(n))]
        dropped = [n for n in self._dirty if n not in self.by_name]
        self._dirty = set()
        return put, dropped

    def load(self, records: Iterable[SilenceRecord], now: float, wall: float) -> None:
        """Silences from the store that have not ended."""
        for s in records:
            if s.until > wall and NAME_RE.match(s.name) and len(self.by_name) < MAX_SILENCES:
                self._put(s.name, Silence(s.until, s.reason, s.created, now + (s.until - wall)))


class Silence:
    __slots__ = ("created", "due", "reason", "until")

    def __init__(self, until: float, reason: str, created: float, due: float) -> None:
        self.until = until  # wall clock
        self.reason = reason
        self.created = created  # wall clock
        self.due = due  # monotonic: when tick() looks at it
