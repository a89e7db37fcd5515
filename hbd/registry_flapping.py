"""Flap detection for the peer registry (pure): a peer flaps when it changes state more than
``flap_threshold`` times within ``flap_window`` seconds, and is stable again after a whole window
without a change. The change times live on the peer (at most flap_threshold + 1 of them), as a
tuple: a deque costs about 760 bytes per peer (its first block), more than the rest of the peer; and
a peer's only change as its time alone (a tuple of one is 48 B more, on every connected peer)."""

from __future__ import annotations

from hbd.registry_types import NEVER, Peer


class FlapDetector:
    __slots__ = ("threshold", "window")

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = threshold
        self.window = window

    def record(self, peer: Peer, now: float) -> bool:
        """Record a change; True when it makes the peer flapping."""
        n = self.threshold
        prev = _times(peer.changes)
        changes = (*prev[max(0, len(prev) - n) :], now)  # on a state change, never per ping
        peer.changes = changes if len(changes) > 1 else now
        if peer.flapping or len(changes) <= n or now - changes[0] > self.window:
            return False
        peer.flapping = True
        return True

    def stable_at(self, peer: Peer) -> float:
        """When a flapping peer is stable if nothing changes until then (inf: it is not flapping)."""
        if peer.flapping and (times := _times(peer.changes)):
            return times[-1] + self.window
        return NEVER

    def settle(self, peer: Peer, now: float) -> bool:
        """True when a flapping peer is stable at ``now`` (it is no longer flapping then)."""
        if peer.flapping and (times := _times(peer.changes)) and now >= times[-1] + self.window:
            peer.flapping = False
            peer.changes = ()
            return True
        return False


def _times(changes: float | tuple[float, ...] | None) -> tuple[float, ...]:
    """A peer's change times as a tuple (kept as None, one time alone, or a tuple)."""
    if changes is None:
        return ()
    return changes if isinstance(changes, tuple) else (changes,)
