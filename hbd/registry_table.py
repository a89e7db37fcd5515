"""The registry's table of known peers: by name, by connection, counted by state, and which of them
the state store must write (changed) or delete (forgotten).

The pieces that change peers share these containers (handed down, not copied): a state change
moves a count in O(1), and the counts always sum to the number of known peers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hbd.registry_types import NEVER, Key, Peer, PeerStatus

if TYPE_CHECKING:
    from hbd.peer_uptime import Kept


class PeerTable:
    __slots__ = ("by_key", "counts", "dirty", "forgotten", "orphaned", "peers")

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self.by_key: dict[Key, Peer] = {}  # the connection each connected peer pinged on
        self.counts = dict.fromkeys(PeerStatus, 0)
        self.dirty: dict[str, None] = {}  # names to write, oldest first (an ordered set)
        self.forgotten: set[str] = set()  # names to delete from the store
        # The accounts (hbd.peer_uptime) of forgotten peers, by name: a peer of that name that comes
        # back has its outages counted on (swept by hbd.peer_uptime.Uptime, which shares this dict).
        self.orphaned: dict[str, Kept] = {}

    def __len__(self) -> int:
        return len(self.peers)

    def add(self, name: str, address: str, now: float, timeout: float, named: bool) -> Peer:
        """A peer not known yet, NEW."""
        peer = Peer(name, address, PeerStatus.NEW, now, timeout, named)
        if self.orphaned:
            peer.account = self.orphaned.pop(name, None)
        self.peers[name] = peer
        self.counts[PeerStatus.NEW] += 1
        return peer

    def move(self, peer: Peer, new: PeerStatus) -> None:
        counts = self.counts
        counts[peer.status] -= 1
        counts[new] += 1
        peer.status = new

    def forget(self, peer: Peer) -> bool:
        """Forget a peer (False: it is not this table's peer of that name); its deadline goes stale,
        and a named one is to be deleted from the store (a legacy client's address was never written)."""
        if self.peers.get(peer.name) is not peer:
            return False
        del self.peers[peer.name]
        if peer.account is not None:
            self.orphaned[peer.name] = peer.account
        self.counts[peer.status] -= 1
        if peer.key is not None:
            self.by_key.pop(peer.key, None)
        peer.filed = NEVER
        self.dirty.pop(peer.name, None)
        if peer.named:
            self.forgotten.add(peer.name)
        return True

    def by_state(self) -> dict[str, int]:
        return {s.value: n for s, n in self.counts.items()}
