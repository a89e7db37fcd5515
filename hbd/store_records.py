"""What the state store keeps: its records (one row each) and what ``load`` returns. Plain values,
shared by the store's queues, its SQLite file and its callers; this module imports nothing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One peer the registry remembers. Times are wall clock (epoch seconds)."""

    name: str
    address: str
    state: str  # view.PEER_STATES
    since: float
    last_ping: float | None
    reason: str
    expected: bool
    timeout: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SilenceRecord:
    name: str
    until: float  # wall clock
    reason: str
    created: float  # wall clock


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One state change, for the history (issue 13)."""

    time: float  # wall clock
    peer: str
    old: str
    new: str
    reason: str
    side: str = "server"  # or "client": a client's server links


@dataclass(frozen=True, slots=True)
class Snapshot:
    peers: list[PeerRecord]
    silences: list[SilenceRecord]
