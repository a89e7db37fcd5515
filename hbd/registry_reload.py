"""A reload's changes to the expected peers, applied a slice at a time (the registry's piece for
hbd.registry_plan's plans).

The commit (hbd.registry.Registry.begin) switches who is expected at once; each peer's own change
(expected flag, labels, timeout; a newly expected one added NEW, one no longer listed forgettable)
waits here for ``apply_some``, a slice per loop turn, or for the first event about that peer
(``touch``: applied before the event, so that what it causes follows the new configuration).
While changes wait, admission counts the peers still to add towards max_peers (``to_add``).
"""

from __future__ import annotations

from hbd.registry_identity import Admission, show_address
from hbd.registry_plan import Change, ExpectedPlan
from hbd.registry_states import PeerStates
from hbd.registry_table import PeerTable
from hbd.registry_types import Key, Peer, PeerStatus


class ReloadApply:
    __slots__ = ("admission", "at", "next", "plan", "reconfigured", "states", "table")

    def __init__(self, table: PeerTable, admission: Admission, states: PeerStates) -> None:
        self.table = table
        self.admission = admission
        self.states = states  # their settings are the reload's from its commit on
        self.plan: ExpectedPlan | None = None  # the last reload's changes, while some wait
        self.at = 0.0  # when that reload was committed: a newly expected peer's grace starts then
        self.next = 0  # the index in its changes apply_some() goes on from
        self.reconfigured: list[Peer] | None = None  # see take_reconfigured(); None: nobody asks

    def begin(self, plan: ExpectedPlan, now: float) -> None:
        self.plan, self.at, self.next = (plan, now, 0) if plan.changes else (None, now, 0)
        self.admission.to_add = plan.added

    def pending(self) -> int:
        return len(self.plan.pending) if self.plan is not None else 0

    def apply_some(self, budget: int | None) -> None:
        """Apply the next ``budget`` changes (None: all of them)."""
        plan = self.plan
        if plan is None:
            return
        changes, pending, at = plan.changes, plan.pending, self.next
        end = len(changes) if budget is None else min(len(changes), at + budget)
        for change in changes[at:end]:
            if pending.pop(change.name, None) is not None:  # else an event applied it already
                self._apply(change)
        self.next = end
        if end >= len(changes):
            self.plan = None
            self.admission.to_add = 0

    def touch(self, name: str) -> None:
        """An event about ``name`` while changes wait: its own first."""
        plan = self.plan
        if plan is not None and (change := plan.pending.pop(name, None)) is not None:
            self._apply(change)

    def touch_key(self, key: Key) -> None:
        peer = self.table.by_key.get(key)
        if peer is not None:
            self.touch(peer.name)

    def _apply(self, change: Change) -> None:
        """One peer's change (what a reload did to each listed peer before it was sliced)."""
        name, e = change.name, change.entry
        table, now, settings = self.table, self.at, self.states.settings
        if change.added:
            self.admission.to_add -= 1
        peer = table.peers.get(name)
        if e is None:
            if peer is None:
                return
            peer.expected = False
            table.dirty[name] = None
            if peer.key is None and peer.status is PeerStatus.NEW:
                table.forget(peer)  # never seen: nothing to remember
                return
        else:
            timeout = e.timeout if e.timeout is not None else settings.heartbeat_timeout
            if peer is None:
                peer = table.add(name, show_address(e.address), now, timeout, True)
                peer.reason = "not seen yet"
                grace = settings.startup_grace
                peer.grace = now + (timeout if grace is None else grace)
            elif peer.key is None:
                peer.timeout = timeout
                if peer.status is PeerStatus.NEW and peer.last_ping is None:  # never seen: shown as listed
                    peer.address = show_address(e.address)
            table.dirty[name] = None  # (only peers whose entry changed get here)
            peer.expected = True
            peer.labels = e.labels
        self.states.schedule(peer)
        if peer.key is not None and self.reconfigured is not None:
            self.reconfigured.append(peer)

    def take_reconfigured(self) -> list[Peer]:
        peers, self.reconfigured = self.reconfigured or [], []
        return peers
