"""The state store's queues: what the loop handed over and the SQLite file has not written yet.

Pure: no I/O, no clock, O(1) per record queued. Peers and silences are coalesced by name (the newest
record of a name replaces the queued one, ``None`` meaning "delete its row"; a name keeps its place in
the line), so their queues hold at most one entry per name, and at most ``max_names`` names (the
caller's bound, given with each put). Changes are capped at ``max_changes``: when full, the oldest is
dropped. Both kinds of drop are counted (``dropped_names``, ``dropped_changes``).

``take_batch(max_rows)`` takes the next batch to write, oldest first: silences first (few, and an
operator is waiting for them), then peers and changes share what is left, neither starving the other
during a mass disconnect.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import TypeVar

from hbd.store_records import ChangeRecord, PeerRecord, SilenceRecord

_R = TypeVar("_R", PeerRecord, SilenceRecord)


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows to write in one transaction; a record of None deletes its name's row."""

    silences: list[tuple[str, SilenceRecord | None]]
    peers: list[tuple[str, PeerRecord | None]]
    changes: list[ChangeRecord]

    def __len__(self) -> int:
        return len(self.silences) + len(self.peers) + len(self.changes)


class StoreQueues:
    """The three bounded queues and what they dropped; see the module docstring."""

    def __init__(self, max_changes: int) -> None:
        self.dropped_changes = 0  # oldest changes dropped because the queue was full
        self.dropped_names = 0  # peer/silence updates dropped because their queue was full
        # name -> record, or None to delete the row; dict order = first queued, first written
        self._peers: dict[str, PeerRecord | None] = {}
        self._silences: dict[str, SilenceRecord | None] = {}
        self._changes: collections.deque[ChangeRecord] = collections.deque(maxlen=max_changes)

    @property
    def max_changes(self) -> int:
        assert self._changes.maxlen is not None
        return self._changes.maxlen

    def put_peer(self, name: str, rec: PeerRecord | None, max_names: int) -> bool:
        """Queue ``rec`` (None: forget the peer); False if dropped (a new name, ``max_names`` queued)."""
        return self._put(self._peers, name, rec, max_names)

    def put_silence(self, name: str, rec: SilenceRecord | None, max_names: int) -> bool:
        """Queue ``rec`` (None: drop the silence); False if dropped (a new name, ``max_names`` queued)."""
        return self._put(self._silences, name, rec, max_names)

    def add_change(self, rec: ChangeRecord) -> bool:
        """Queue ``rec``; False if the oldest change was dropped to make room for it."""
        full = len(self._changes) == self._changes.maxlen
        if full:
            self.dropped_changes += 1  # the deque drops the oldest
        self._changes.append(rec)
        return not full

    def pending(self) -> int:
        return len(self._peers) + len(self._silences) + len(self._changes)

    def take_batch(self, max_rows: int) -> Batch:
        """At most ``max_rows`` (at least 1) of the oldest rows, removed from the queues."""
        budget = max(1, max_rows)
        silences = _take(self._silences, budget)
        budget -= len(silences)
        half = budget // 2 if self._peers and self._changes else budget
        changes_first = self._take_changes(half)
        peers = _take(self._peers, budget - len(changes_first))
        changes = changes_first + self._take_changes(budget - len(changes_first) - len(peers))
        return Batch(silences, peers, changes)

    def clear(self) -> None:
        self._peers.clear()
        self._silences.clear()
        self._changes.clear()

    def _put(self, queue: dict[str, _R | None], name: str, rec: _R | None, max_names: int) -> bool:
        if name not in queue and len(queue) >= max_names:
            self.dropped_names += 1
            return False
        queue[name] = rec
        return True

    def _take_changes(self, n: int) -> list[ChangeRecord]:
        return [self._changes.popleft() for _ in range(min(n, len(self._changes)))]


def _take(queue: dict[str, _R | None], n: int) -> list[tuple[str, _R | None]]:
    """The ``n`` oldest entries of a coalescing queue, removed from it."""
    if n <= 0 or not queue:
        return []
    batch = list(itertools.islice(queue.items(), n))
    for name, _ in batch:
        del queue[name]
    return batch
