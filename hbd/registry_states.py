"""The peers' state machine (sans-I/O): what their connections report (first ping, late, back,
gone, the pings of a rising peer) and what their deadlines find (a startup grace over, a peer to
forget, a flapping one stable again), each turned into actions.

A connection joins its peer at its first ping (a greeting alone holds nothing); a second live
connection with the same name takes over and the older one is closed, so a name is never shown
twice and never reported ``down`` while it is connected. Each event costs O(1).
"""

from __future__ import annotations

import logging
from collections.abc import Container

from hbd.registry_deadlines import Deadlines
from hbd.registry_flapping import FlapDetector
from hbd.registry_identity import Admission
from hbd.registry_table import PeerTable
from hbd.registry_types import NEVER, Action, Close, Key, Log, Peer, PeerStatus, RegistrySettings, Watch, notice


class PeerStates:
    def __init__(
        self,
        settings: RegistrySettings,
        table: PeerTable,
        admission: Admission,
        silenced: Container[str],
        deadlines: Deadlines,
    ) -> None:
        self.table = table
        self.peers = table.peers  # the table's own containers, held here: one lookup less per event
        self.by_key = table.by_key
        self.counts = table.counts
        self.dirty = table.dirty
        self.admission = admission
        self.silenced = silenced  # the names under a silence (hbd.registry_silences)
        self.deadlines = deadlines
        self.configure(settings)

    def configure(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.flaps = FlapDetector(settings.flap_threshold, settings.flap_window)

    # -- what connections report -------------------------------------------------------------------------
    def connected(
        self, key: Key, name: str | None, certificate: str | None, address: str, timeout: float, now: float
    ) -> list[Action]:
        """The connection's first ping: it is this peer's connection from now on."""
        who = self.admission.identify(name, certificate, address)
        if isinstance(who, str):
            return [Close(key, who, name or address)]
        identity, named = who
        refused = self.admission.admit(identity, key)
        if refused is not None:
            return [refused]
        actions: list[Action] = []
        peer = self.peers.get(identity)
        known = peer is not None
        if peer is None:
            if self.settings.unexpected == "warn":
                actions.append(Log(logging.WARNING, identity, address, f"{identity} is not an expected peer"))
            peer = self.table.add(identity, address, now, timeout, named)
        old_key = peer.key
        if old_key is not None and old_key != key:
            self.by_key.pop(old_key, None)
            actions.append(
                Close(
                    old_key,
                    f"{identity}: replaced by a newer connection from {address} (this one is from {peer.address})",
                    identity,
                )
            )
        peer.key = key
        self.by_key[key] = peer
        if known:
            peer.address = address  # (a new peer has it: it is packed once, hbd.peer_address)
        peer.timeout = timeout
        peer.last_ping = now
        peer.grace = NEVER
        self.dirty[identity] = None
        if peer.status is PeerStatus.DOWN and self.settings.rise > 1:
            peer.rising = 1
            peer.reason = f"rising: 1 of {self.settings.rise} pings"
            actions.append(Watch(key, True))
            return actions
        peer.rising = 0
        if peer.status is not PeerStatus.UP:
            reason = "first ping" if peer.status is PeerStatus.NEW else "ping"
            self.change(peer, PeerStatus.UP, reason, now, actions)
        return actions

    def pinged(self, key: Key, silent_for: float, now: float) -> list[Action]:
        """A ping on a watched connection (its peer is rising from DOWN)."""
        peer = self.by_key.get(key)
        if peer is None or not peer.rising:
            return [Watch(key, False)]
        peer.last_ping = now
        rise = self.settings.rise
        if silent_for > peer.timeout / 2:
            peer.rising = 1  # late: the count starts again with this ping
        else:
            peer.rising += 1
        if peer.rising < rise:
            peer.reason = f"rising: {peer.rising} of {rise} pings"
            return []
        peer.rising = 0
        actions: list[Action] = [Watch(key, False)]
        self.change(peer, PeerStatus.UP, f"{rise} pings on time", now, actions)
        return actions

    def late(self, key: Key, now: float) -> list[Action]:
        """Its connection is silent for more than half its timeout."""
        peer = self.by_key.get(key)
        actions: list[Action] = []
        if peer is None:
            return actions
        if peer.rising:
            return actions  # still DOWN; the late ping that ends this starts the count again
        self.change(peer, PeerStatus.LATE, "silent", now, actions)
        return actions

    def back(self, key: Key, now: float) -> list[Action]:
        """A ping after it was late."""
        peer = self.by_key.get(key)
        actions: list[Action] = []
        if peer is None:
            return actions
        peer.last_ping = now
        if peer.rising:
            peer.rising = 1  # a late ping: the count starts again
            return actions
        self.change(peer, PeerStatus.UP, "ping", now, actions)
        return actions

    def gone(self, key: Key, reason: str, now: float, last_ping: float | None = None) -> list[Action]:
        """Its connection ended (timed out, disconnected, broke the protocol...). Nothing happens for
        a connection that never pinged or that a newer one replaced."""
        peer = self.by_key.pop(key, None)
        actions: list[Action] = []
        if peer is None or peer.key != key:
            return actions
        peer.key = None
        if last_ping is not None:
            peer.last_ping = last_ping
        if peer.rising:
            peer.rising = 0
            peer.reason = reason
            actions.append(Watch(key, False))
        self.change(peer, PeerStatus.DOWN, reason, now, actions)
        self.dirty[peer.name] = None
        if not peer.named and not peer.expected:
            self.table.forget(peer)  # an unnamed legacy client: its address will not come back
        else:
            self.schedule(peer)
        return actions

    def rising(self, key: Key) -> bool:
        peer = self.by_key.get(key)
        return peer is not None and peer.rising > 0

    # -- state changes -----------------------------------------------------------------------------------
    def change(self, peer: Peer, new: PeerStatus, reason: str, now: float, actions: list[Action]) -> None:
        old = peer.status
        if old is new:
            return
        counts = self.counts
        counts[old] -= 1
        counts[new] += 1
        peer.status = new
        peer.since = now
        peer.reason = reason
        self.dirty[peer.name] = None
        silenced = peer.name in self.silenced
        flapping_now = self.flaps.record(peer, now)
        quiet = silenced or peer.flapping
        level = logging.INFO if quiet or new is PeerStatus.UP else logging.WARNING
        name = new._value_  # the plain attribute: Enum's .value is a property, slower on every change
        actions.append(notice(peer, name.lower(), old._value_, name, reason, silenced, level, not quiet, now))
        if flapping_now:
            n, window = self.flaps.threshold, self.flaps.window
            why = f"more than {n} changes within {window:g} s; its hooks wait until it is stable"
            level = logging.INFO if silenced else logging.WARNING
            actions.append(notice(peer, "flapping", name, name, why, silenced, level, not silenced, now))
        self.schedule(peer)

    # -- deadlines -------------------------------------------------------------------------------------
    def due(self, peer: Peer) -> float:
        """When the registry's tick() must next look at this peer."""
        due = peer.grace if peer.status is PeerStatus.NEW and peer.key is None else NEVER
        if peer.status is PeerStatus.DOWN and peer.key is None and not peer.expected:
            due = min(due, peer.since + self.settings.forget_after)
        if peer.flapping:
            due = min(due, self.flaps.stable_at(peer))
        return due

    def schedule(self, peer: Peer) -> None:
        due = self.due(peer)
        if due < peer.filed:  # else nothing to file (Deadlines.file would find the same)
            self.deadlines.file(peer, due)

    def due_now(self, peer: Peer, now: float, actions: list[Action]) -> None:
        """What a peer's deadline finds: its grace over, forgetting it, or it stable again."""
        if peer.status is PeerStatus.NEW and peer.key is None and peer.grace <= now:
            peer.grace = NEVER
            reason = "never connected" if peer.last_ping is None else "not back after a restart"
            self.change(peer, PeerStatus.DOWN, reason, now, actions)
            if not peer.expected and not peer.named:
                self.table.forget(peer)
                return
        if (
            peer.status is PeerStatus.DOWN
            and peer.key is None
            and not peer.expected
            and now >= peer.since + self.settings.forget_after
        ):
            self.table.forget(peer)
            actions.append(Log(logging.INFO, peer.name, peer.address, f"forgetting {peer.name}: down since long"))
            return
        if self.flaps.settle(peer, now):
            self.dirty[peer.name] = None
            silenced = peer.name in self.silenced
            state = peer.status.value
            why = f"no change for {self.flaps.window:g} s: {state}"
            actions.append(notice(peer, "stable", state, state, why, silenced, logging.INFO, not silenced, now))
