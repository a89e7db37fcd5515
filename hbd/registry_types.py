"""The peer registry's data: peer states, settings, the actions it returns and the per-peer state
(hbd.registry and its pieces share these; nothing here does anything).

Times are monotonic except silences and the records written to the state store (wall clock).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from hbd.access import Network
from hbd.config import ServerConfig
from hbd.peer_address import Packed, pack, unpack
from hbd.protocol import NAME_PATTERN
from hbd.store_records import PeerRecord, SilenceRecord

if TYPE_CHECKING:
    from hbd.peer_uptime import Held

NAME_RE = re.compile(NAME_PATTERN)

Key = Hashable  # a connection, as the server identifies it


class PeerStatus(Enum):
    NEW = "NEW"  # expected (or remembered across a restart) and not seen yet: waiting for its first ping
    UP = "UP"
    LATE = "LATE"
    DOWN = "DOWN"


class Expected(Protocol):
    """An expected peer from the config (hbd.config's ExpectedPeer has these attributes)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> Network | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    heartbeat_timeout: float = 10.0  # the timeout of a peer that announced none
    forget_after: float = 604800.0
    startup_grace: float | None = None  # None: each peer's timeout
    unexpected: str = "allow"  # allow | warn | reject
    rise: int = 1
    flap_threshold: int = 5
    flap_window: float = 300.0
    max_peers: int = 10000
    name_from: str = "greeting"  # greeting | certificate


def registry_settings(cfg: ServerConfig) -> RegistrySettings:
    """The registry's settings from a server's configuration."""
    return RegistrySettings(
        heartbeat_timeout=cfg.heartbeat_timeout,
        forget_after=cfg.forget_after,
        startup_grace=cfg.startup_grace,
        unexpected=cfg.unexpected,
        rise=cfg.rise,
        flap_threshold=cfg.flap_threshold,
        flap_window=cfg.flap_window,
        max_peers=cfg.max_peers,
        name_from=cfg.tls.name_from if cfg.tls is not None else "greeting",
    )


def expected_peers(cfg: ServerConfig) -> tuple[Expected, ...]:
    return cfg.peers


class Dirty(NamedTuple):
    """What changed since the last take_dirty(): what the state store must write."""

    peers: list[PeerRecord]
    forgotten: list[str]
    silences: list[SilenceRecord]
    unsilenced: list[str]


# -- actions ----------------------------------------------------------------------------------------
class Close(NamedTuple):
    """Close this connection (a refused name, or the older of two connections with one name)."""

    key: Key
    reason: str
    peer: str
    level: int = logging.WARNING


class Notice(NamedTuple):
    """A peer's state changed (``up``, ``late``, ``down``) or its flapping did (``flapping``,
    ``stable``): log it (``level``), count it, and run the hooks when ``hook``."""

    peer: str
    event: str
    old: str
    new: str
    reason: str
    silenced: bool
    level: int
    hook: bool
    address: str
    expected: bool
    since: float  # monotonic: when it happened
    labels: tuple[tuple[str, str], ...]
    named: bool  # False for an unnamed legacy client (its identity is its address)


class Log(NamedTuple):
    """A line worth logging that is no state change (unexpected peers, forgetting, silences)."""

    level: int
    peer: str
    address: str
    message: str


class Watch(NamedTuple):
    """Report this connection's every ping (``pinged``) while ``on``: its peer is rising."""

    key: Key
    on: bool


Action = Close | Notice | Log | Watch


class Live(NamedTuple):
    """What the server knows of a connected peer's connection, for its row."""

    connected: float  # monotonic
    last_ping: float | None
    pings: int
    timeout: float
    interval: float | None


# "Never" (a deadline not set): one float object for every peer; float("inf") makes a new one
# (24 B) each time, and a peer keeps two.
NEVER = math.inf


# Peer._bits: named and expected (bits 0-1), and above them how many on-time pings it counted while
# rising. Small ints (up to 256) are shared objects: nothing per peer.
_NAMED, _EXPECTED, _RISING = 1, 2, 4


class Peer:
    """One known peer. Slotted, and as few slots as it needs (8 B each, for each of 100,000 peers):
    its flags named and expected and its rising count share one int (``_bits``); its grace and its
    connection's first ping one float (``_when``: never both at once); its address is kept packed
    (hbd.peer_address). Each reads and sets as a plain attribute. The state machine's own fields
    (status, flapping: read several times on every event) stay plain slots, as a property costs
    a Python call on each read."""

    __slots__ = (
        "_address",
        "_bits",
        "_when",
        "account",
        "changes",
        "filed",
        "flapping",
        "key",
        "labels",
        "last_ping",
        "name",
        "reason",
        "since",
        "status",
        "timeout",
        "told",
    )

    def __init__(self, name: str, address: str, status: PeerStatus, now: float, timeout: float, named: bool) -> None:
        self.name = name
        self._bits = _NAMED if named else 0
        self._address: Packed = pack(address)
        self.status = status
        self.since = now
        self.last_ping: float | None = None
        self.reason = ""
        self.labels: tuple[tuple[str, str], ...] = ()
        self.timeout = timeout
        self.key: Key | None = None  # its connection, once it pinged on one
        self.flapping = False
        # recent state changes (flap detection): the one time alone, else a tuple (hbd.registry_flapping)
        self.changes: float | tuple[float, ...] | None = None
        self._when = NEVER  # grace until it first connects, then first_ping
        self.filed = NEVER  # when its live entry in the deadline heap is due
        # with workers: a hash of the mark its worker was last sent (hbd.supervisor_registry), as a float
        self.told = 0.0
        # This process's accounting of it (hbd.peer_uptime: outages, down time, 24 h uptime), kept here
        # rather than in a table by name (~150 B less per peer); None until its first change.
        self.account: Held = None

    @property
    def grace(self) -> float:
        """NEW and never connected: DOWN "never connected" at this time. A peer that had a connection
        never is NEW again, so its grace is over for good once it has one (NEVER while it has)."""
        return self._when if self.key is None else NEVER

    @grace.setter
    def grace(self, when: float) -> None:
        if self.key is None:
            self._when = when

    @property
    def first_ping(self) -> float:
        """With workers: when its connection first pinged (a hook's standing); NEVER without one."""
        return self._when if self.key is not None else NEVER

    @first_ping.setter
    def first_ping(self, when: float) -> None:
        self._when = when

    @property
    def address(self) -> str:
        """Its last connection's address ("ip:port"), or an expected peer's until it connects."""
        return unpack(self._address)

    @address.setter
    def address(self, address: str) -> None:
        self._address = pack(address)

    @property
    def named(self) -> bool:
        """False: an unnamed legacy client, known by its address."""
        return bool(self._bits & _NAMED)

    @property
    def expected(self) -> bool:
        return bool(self._bits & _EXPECTED)

    @expected.setter
    def expected(self, on: bool) -> None:
        self._bits = self._bits | _EXPECTED if on else self._bits & ~_EXPECTED

    @property
    def rising(self) -> int:
        """On-time pings counted while it rises from DOWN (0: not rising)."""
        return self._bits // _RISING

    @rising.setter
    def rising(self, count: int) -> None:
        self._bits = self._bits % _RISING + count * _RISING


def notice(
    peer: Peer,
    event: str,
    old: str,
    new: str,
    reason: str,
    silenced: bool,
    level: int,
    hook: bool,
    now: float,
) -> Notice:
    """A Notice about this peer (its address, expected, labels and named as they are now)."""
    bits = peer._bits  # Peer's own int (this module's): two property calls less on every change
    return Notice(
        peer.name,
        event,
        old,
        new,
        reason,
        silenced,
        level,
        hook,
        unpack(peer._address),
        bits & _EXPECTED != 0,
        now,
        peer.labels,
        bits & _NAMED != 0,
    )
