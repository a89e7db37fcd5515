"""The peer registry: who the server's peers are and what state each one is in (sans-I/O).

One registry per server owns every known peer's identity, state, timestamps, reason, flap history
and silence; status, metrics and hooks read it and nothing else. Like hbd.protocol it touches no
socket, no clock and no logger: connections report what happened (with ``now``), and the registry
returns what to do (``Close`` a connection, a ``Notice`` to log / count / hook, a ``Log`` line,
``Watch`` a connection's pings). Connections are opaque hashable keys.

Identity: the greeting name; with ``name_from: certificate`` the certificate's name (a greeting
naming someone else is refused); an unnamed legacy client is its address ("ip:port") unless its
source address matches an expected peer's ``address:``, then it is that peer. A connection joins
its peer at its first ping (a greeting alone holds nothing); a second live connection with the
same name takes over and the older one is closed, so a name is never shown twice and never
reported ``down`` while it is connected.

Times are monotonic except silences (wall clock: an operator's "until 14:00") and the records
written to the state store (wall clock: they outlive the process).

Bounds: per-peer state is a __slots__ object; each event costs O(1) (dicts, a heap of deadlines
with at most one live entry per peer, compacted when stale ones pile up); the flap history of a
peer holds at most flap_threshold + 1 times.

``Registry`` is the public face; each job is a piece it hands its dependencies down to (none
imports this module): registry_types (states, settings, actions, the per-peer ``Peer``),
registry_table (peers by name and connection, counts, what the store must write), registry_identity
(identity, address matching, admission), registry_states (the peers' state machine),
registry_flapping (flap detection), registry_deadlines (the deadline heap), registry_silences
(silences) and registry_records (the state store's side). The names callers use are re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from hbd.registry_deadlines import Deadlines
from hbd.registry_identity import AddressBook, Admission
from hbd.registry_plan import ExpectedPlan, plan_expected
from hbd.registry_records import DIRTY_BATCH, Records
from hbd.registry_reload import ReloadApply
from hbd.registry_silences import MAX_REASON, MAX_SILENCES, Silence, Silences
from hbd.registry_states import PeerStates
from hbd.registry_table import PeerTable
from hbd.registry_types import (
    Action,
    Close,
    Dirty,
    Expected,
    Key,
    Live,
    Log,
    Notice,
    Peer,
    PeerStatus,
    RegistrySettings,
    Watch,
    expected_peers,
    registry_settings,
)
from hbd.store_records import PeerRecord, SilenceRecord
from hbd.view import PeerRow, PeerSource, Who

__all__ = [
    "APPLY_SLICE",
    "DIRTY_BATCH",
    "MAX_REASON",
    "MAX_SILENCES",
    "TICK_BUDGET",
    "Action",
    "AddressBook",
    "Close",
    "Dirty",
    "Expected",
    "ExpectedPlan",
    "Key",
    "Live",
    "Log",
    "Notice",
    "Peer",
    "PeerRecord",
    "PeerStatus",
    "Registry",
    "RegistrySettings",
    "Silence",
    "SilenceRecord",
    "Silences",
    "Watch",
    "expected_peers",
    "plan_expected",
    "registry_settings",
]

TICK_BUDGET = 500  # peers tick() looks at per call (each may make a notice: a log line, an event, a hook)
APPLY_SLICE = 1000  # a reload's changes apply_some() applies per call (2-12 us each: a few ms per loop turn)

_FLAGS = {  # a row's flags by (flapping, rising): made once, not per row
    (f, r): frozenset(name for name, on in (("flapping", f), ("rising", r)) if on)
    for f in (False, True)
    for r in (False, True)
}


class Registry:
    """The registry's public face: it hands each report to the piece whose job it is (hbd.registry_*)."""

    def __init__(
        self, settings: RegistrySettings, expected: Iterable[Expected] = (), now: float = 0.0, wall: float = 0.0
    ) -> None:
        self.settings = settings
        self._table = PeerTable()
        self.peers = self._table.peers
        self.by_key = self._table.by_key
        self.orphaned = self._table.orphaned  # forgotten peers' accounts (hbd.peer_uptime)
        self.silences_ = Silences()
        self.silenced = self.silences_.by_name  # name -> Silence (read by the server's log levels)
        self._admission = Admission(self.peers, settings)
        self._deadlines = Deadlines(self.peers)
        self._states = PeerStates(settings, self._table, self._admission, self.silenced, self._deadlines)
        self._records = Records(self._table, self.silences_)
        self._reload = ReloadApply(self._table, self._admission, self._states)
        self.configure(settings, expected, now)

    @property
    def expected(self) -> dict[str, Expected]:
        return self._admission.expected

    @property
    def addresses(self) -> AddressBook:
        return self._admission.addresses

    @property
    def _heap(self) -> list[tuple[float, int, Peer]]:
        return self._deadlines.heap

    # -- configuration -------------------------------------------------------------------------------
    def configure(self, settings: RegistrySettings, expected: Iterable[Expected], now: float) -> list[Action]:
        """New settings and expected peers, applied at once (start-up, tests): see begin()."""
        self.begin(settings, self.plan(settings, expected), now)
        self.apply_some(None)
        return []

    def plan(self, settings: RegistrySettings, expected: Iterable[Expected]) -> ExpectedPlan:
        """The plan from the expected peers in force to these (O(peers): a reload makes it off the
        loop from a snapshot, ``plan_expected(reg.expected, reg.settings.heartbeat_timeout, ...)``)."""
        return plan_expected(self.expected, self.settings.heartbeat_timeout, expected, settings.heartbeat_timeout)

    def begin(self, settings: RegistrySettings, plan: ExpectedPlan, now: float) -> None:
        """Commit a reload: the settings, who is expected and the address book take effect now (O(1));
        the peers' own changes wait in ``plan`` for apply_some(), a slice per loop turn. A newly
        expected peer is NEW with its grace starting ``now``; one no longer listed becomes forgettable.

        Until a peer's change is applied it is shown as before (status, metrics: as if read just before
        the reload), but any event about it applies its change first (hbd.registry_reload), so that what it
        does from then on (its notices and hooks, expected and labels, forgetting) follows the new
        configuration. Meanwhile admission counts every peer still to be added towards max_peers (an
        upper bound: it may refuse an unexpected name at the limit, never admit one past it)."""
        self._reload.apply_some(None)  # the previous one first (reloads are serialised: it is done already)
        if plan.base is not self.expected or plan.base_timeout != self.settings.heartbeat_timeout:
            plan = self.plan(settings, plan.expected.values())  # made against another base: redone here
        self.settings = settings
        self._admission.configure(settings, plan.expected, plan.addresses)
        self._states.configure(settings)
        self._reload.begin(plan, now)

    def applying(self) -> int:
        """Changes of the last reload still to be applied."""
        return self._reload.pending()

    def apply_some(self, budget: int | None = APPLY_SLICE) -> None:
        """Apply the next ``budget`` changes of the reload (None: all of them)."""
        self._reload.apply_some(budget)

    def take_reconfigured(self) -> list[Peer]:
        """Connected peers whose expected flag or labels a reload may have changed since last asked
        (their connections' marks follow, hbd.supervisor_registry). Kept from the first call on."""
        return self._reload.take_reconfigured()

    # -- identity (hbd.registry_identity) ------------------------------------------------------------
    def identify(self, name: str | None, certificate: str | None, address: str) -> tuple[str, bool] | str:
        """(identity, named) for a connection, or why it is refused."""
        return self._admission.identify(name, certificate, address)

    def hello(self, key: Key, name: str, certificate: str | None, address: str) -> list[Action]:
        """A connection greeted: refuse it now if its name is not acceptable (nothing is bound yet)."""
        return self._admission.hello(key, name, certificate, address)

    # -- what connections report (hbd.registry_states) -----------------------------------------------------
    def connected(
        self, key: Key, name: str | None, certificate: str | None, address: str, timeout: float, now: float
    ) -> list[Action]:
        """The connection's first ping: it is this peer's connection from now on."""
        if self._reload.plan is not None:
            who = self._admission.identify(name, certificate, address)
            if not isinstance(who, str):
                self._reload.touch(who[0])
        return self._states.connected(key, name, certificate, address, timeout, now)

    def pinged(self, key: Key, silent_for: float, now: float) -> list[Action]:
        """A ping on a watched connection (its peer is rising from DOWN)."""
        if self._reload.plan is not None:
            self._reload.touch_key(key)
        return self._states.pinged(key, silent_for, now)

    def late(self, key: Key, now: float) -> list[Action]:
        """Its connection is silent for more than half its timeout."""
        if self._reload.plan is not None:
            self._reload.touch_key(key)
        return self._states.late(key, now)

    def back(self, key: Key, now: float) -> list[Action]:
        """A ping after it was late."""
        if self._reload.plan is not None:
            self._reload.touch_key(key)
        return self._states.back(key, now)

    def gone(self, key: Key, reason: str, now: float, last_ping: float | None = None) -> list[Action]:
        """Its connection ended (timed out, disconnected, broke the protocol...). Nothing happens for
        a connection that never pinged or that a newer one replaced."""
        if self._reload.plan is not None:
            self._reload.touch_key(key)
        return self._states.gone(key, reason, now, last_ping)

    def rising(self, key: Key) -> bool:
        return self._states.rising(key)

    # -- deadlines -------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When tick() has something to do (monotonic; it may find nothing then)."""
        due = self._deadlines.next_due()
        sdue = self.silences_.next_due()
        return sdue if sdue is not None and (due is None or sdue < due) else due

    def tick(self, now: float, wall: float, budget: int = TICK_BUDGET) -> list[Action]:
        """Apply what is due: grace ends (DOWN "never connected"), forgetting, flapping ends
        (``stable``), silences ending. At most ``budget`` peers per call: when more are due (10,000
        expected peers whose grace ends at once), next_deadline() stays due and the caller calls
        again on its next turn, so that no turn of the loop works through them all."""
        actions: list[Action] = []
        states, deadlines = self._states, self._deadlines
        while budget > 0 and (peer := deadlines.pop(now)) is not None:
            budget -= 1
            if self._reload.plan is not None:
                self._reload.touch(peer.name)  # a reload's change first: it may forget the peer, or file it anew
                if self.peers.get(peer.name) is not peer:
                    continue
            states.due_now(peer, now, actions)
            if self.peers.get(peer.name) is peer:
                states.schedule(peer)
        for name in self.silences_.expire(now, wall):
            known = self.peers.get(name)
            actions.append(Log(logging.INFO, name, known.address if known else "", f"the silence on {name} ended"))
        return actions

    # -- silences (hbd.registry_silences: they need not name a known peer) -----------------------------
    def silence(self, name: str, until: float, reason: str, now: float, wall: float) -> SilenceRecord | str:
        """Silence a peer (known or not) until ``until`` (wall clock); an error string if refused."""
        return self.silences_.add(name, until, reason, now, wall)

    def unsilence(self, name: str) -> bool:
        return self.silences_.remove(name)

    def silences(self) -> list[SilenceRecord]:
        return self.silences_.records()

    # -- what status and metrics read ----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return self._table.by_state()

    def __len__(self) -> int:
        return len(self.peers)

    def source(
        self,
        live: Callable[[Key], Live | None] | None = None,
        worker: int | None = None,
        account: Callable[[PeerRow], PeerRow] | None = None,
        unconnected: bool = False,
    ) -> PeerSource:
        """The peers (only those without a connection if ``unconnected``) for a filtered status:
        a snapshot, each row made only if the filter keeps it."""
        peers = [p for p in self.peers.values() if p.key is None] if unconnected else list(self.peers.values())

        def who(i: int) -> Who:
            peer = peers[i]
            return (peer.name if peer.named else None, peer.address, peer.status.value)

        def row(i: int) -> PeerRow:
            made = self.row(peers[i], live, worker)
            return account(made) if account is not None else made

        return PeerSource(len(peers), who, row)

    def row(self, peer: Peer, live: Callable[[Key], Live | None] | None, worker: int | None) -> PeerRow:
        info = live(peer.key) if live is not None and peer.key is not None else None
        silence = self.silenced.get(peer.name)
        return PeerRow(
            peer.name,
            peer.name if peer.named else None,
            peer.address,
            peer.status.value,
            info.connected if info is not None else None,
            info.last_ping if info is not None and info.last_ping is not None else peer.last_ping,
            info.pings if info is not None else 0,
            info.timeout if info is not None else peer.timeout,
            info.interval if info is not None else None,
            worker,
            since=peer.since,
            reason=peer.reason,
            expected=peer.expected,
            silenced_until=silence.until if silence is not None else None,
            flags=_FLAGS[peer.flapping, peer.rising > 0],
            labels=peer.labels,
        )

    # -- the state store (hbd.registry_records) ------------------------------------------------------------
    def take_dirty(
        self, now: float, wall: float, live: Callable[[Key], Live | None] | None = None, limit: int = DIRTY_BATCH
    ) -> Dirty:
        """What changed since it was last taken, as wall-clock records: at most ``limit`` peers (the
        oldest changes first; ``dirty()`` says how many wait), so that taking them is one bounded step."""
        return self._records.take_dirty(now, wall, live, limit)

    def dirty(self) -> int:
        """Peers waiting to be taken by take_dirty()."""
        return len(self._table.dirty)

    def mark_connected_dirty(self) -> None:
        """Every connected peer is to be written (at shutdown: their last pings)."""
        self._records.mark_connected_dirty()

    def restore(
        self, peers: Iterable[PeerRecord], silences: Iterable[SilenceRecord], now: float, wall: float
    ) -> list[Action]:
        """After a restart: remembered peers come back as NEW with a grace of their timeout (DOWN
        ones stay DOWN, since when and why); silences that have not ended come back."""
        self.apply_some(None)  # (at start-up: no reload is under way)
        self._records.restore(peers, now, wall, self.settings, self._states.schedule)
        self.silences_.load(silences, now, wall)
        return []
