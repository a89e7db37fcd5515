"""When the registry must next look at each peer: a heap of (due, seq, peer).

A peer has at most one live entry (``peer.filed``): filing it sooner adds an entry and leaves the
later one stale; a stale entry is skipped when it comes up, and the heap is compacted (O(N), after
N stale entries) when they pile up, so that it stays under 2 N + 64 entries.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from hbd.registry_types import NEVER, Peer


class Deadlines:
    __slots__ = ("_seq", "heap", "peers")

    def __init__(self, peers: Mapping[str, Peer]) -> None:
        self.peers = peers  # the registry's known peers: an entry of a forgotten one is stale
        self.heap: list[tuple[float, int, Peer]] = []
        self._seq = 0

    def file(self, peer: Peer, due: float) -> None:
        if due < peer.filed:  # a later due time is found when the earlier entry comes (and re-filed)
            peer.filed = due
            self._seq += 1
            heapq.heappush(self.heap, (due, self._seq, peer))
            if len(self.heap) > 2 * len(self.peers) + 64:
                self._compact()

    def _compact(self) -> None:
        """Drop stale entries (peers forgotten, or filed again sooner): O(N), after N stale ones."""
        self.heap = [e for e in self.heap if e[2].filed == e[0] and self.peers.get(e[2].name) is e[2]]
        heapq.heapify(self.heap)

    def next_due(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def pop(self, now: float) -> Peer | None:
        """The next peer due by ``now``, no longer filed (the caller files it again), or None."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            when, _, peer = heapq.heappop(heap)
            if peer.filed != when or self.peers.get(peer.name) is not peer:
                continue  # stale
            peer.filed = NEVER
            return peer
        return None
