"""The registry's side of the state store: the peers changed since the last write (as wall-clock
records, a bounded batch per call), the ones forgotten, and bringing the remembered ones back after
a restart."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

from hbd.registry_silences import Silences
from hbd.registry_table import PeerTable
from hbd.registry_types import NAME_RE, NEVER, Dirty, Key, Live, Peer, PeerStatus, RegistrySettings
from hbd.store_records import PeerRecord

# Peer records take_dirty() returns per call (the store's writer takes 500 rows a transaction): the
# hand-over runs in the loop, every turn while more wait; 500 were 2-3.5 ms of the supervisor's CPU in a
# teardown turn, 128 are under 1 ms (hbd.worker_pool.TURN_READ: why a turn's CPU is kept to ~2 ms).
DIRTY_BATCH = 128


class Records:
    __slots__ = ("silences", "table")

    def __init__(self, table: PeerTable, silences: Silences) -> None:
        self.table = table
        self.silences = silences

    def take_dirty(
        self, now: float, wall: float, live: Callable[[Key], Live | None] | None = None, limit: int = DIRTY_BATCH
    ) -> Dirty:
        """What changed since it was last taken, as wall-clock records: at most ``limit`` peers (the
        oldest changes first; ``table.dirty`` holds those that wait), so that taking them is one bounded step."""
        offset = wall - now
        records = []
        dirty = self.table.dirty
        peers = self.table.peers
        names = list(islice(dirty, limit))
        for name in names:
            del dirty[name]
            peer = peers.get(name)
            if peer is None or not (peer.named or peer.expected):
                continue
            last = peer.last_ping
            if live is not None and peer.key is not None:
                info = live(peer.key)
                if info is not None and info.last_ping is not None:
                    last = info.last_ping
            records.append(
                PeerRecord(
                    name,
                    peer.address,
                    peer.status.value,
                    peer.since + offset,
                    None if last is None else last + offset,
                    peer.reason,
                    peer.expected,
                    peer.timeout,
                    peer.labels,
                )
            )
        silences, gone = self.silences.take_dirty()
        taken = Dirty(records, sorted(self.table.forgotten), silences, gone)
        self.table.forgotten = set()
        return taken

    def mark_connected_dirty(self) -> None:
        """Every connected peer is to be written (at shutdown: their last pings)."""
        self.table.dirty.update((p.name, None) for p in self.table.by_key.values())

    def restore(
        self,
        peers: Iterable[PeerRecord],
        now: float,
        wall: float,
        settings: RegistrySettings,
        schedule: Callable[[Peer], None],
    ) -> None:
        """After a restart: remembered peers come back as NEW with a grace of their timeout (DOWN
        ones stay DOWN, since when and why); ``schedule`` files each one's next deadline."""
        offset = now - wall  # wall -> monotonic
        table = self.table
        for rec in peers:
            if not NAME_RE.match(rec.name):
                continue
            peer = table.peers.get(rec.name)
            if peer is None:
                if len(table) >= settings.max_peers or settings.unexpected == "reject":
                    continue  # no room, or a name that would be refused now
                if rec.state == PeerStatus.NEW.value:
                    continue  # expected once, never seen, no longer listed
                peer = table.add(rec.name, rec.address, now, rec.timeout, True)
            elif peer.key is not None:
                continue  # already connected again
            peer.address = rec.address or peer.address
            peer.last_ping = None if rec.last_ping is None else min(rec.last_ping + offset, now)
            if rec.state == PeerStatus.DOWN.value:
                table.move(peer, PeerStatus.DOWN)
                peer.since = min(rec.since + offset, now)
                peer.reason = rec.reason
                peer.grace = NEVER
            else:
                if not peer.expected:
                    peer.timeout = rec.timeout
                if rec.last_ping is not None or not peer.expected:  # else its startup grace runs
                    peer.since = now
                    peer.reason = "waiting for it after a restart"
                    peer.grace = now + peer.timeout
            schedule(peer)
