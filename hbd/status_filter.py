"""Which peers a status request wants: ``hbd status --state DOWN,LATE 'web*' --limit 100``.

The filter travels in the request (``{"request": "select", "state": ["DOWN", "LATE"], "peer": "web*",
"limit": 100}``) and the daemon applies it, so that a status of a few problems among 100,000 peers
is a small reply. ``select`` is a command of its own rather than arguments to ``status``: a daemon
from before filters answers it with "unknown command" instead of the whole listing, and this one
refuses fields it does not know (a newer CLI's filter) instead of ignoring them.

Every part of a request is bounded (a glob's length, the states, the limit): a request cannot make
the daemon do more than one pass over its peers. Pure code: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from hbd.errors import HbdError

STATES = ("NEW", "UP", "LATE", "DOWN")  # the registry's states (view.PEER_STATES)
ORDER = {"DEAD": 0, "DOWN": 0, "LATE": 1, "NEW": 2, "UP": 3}  # problems first, as the table shows them
DEFAULT_LIMIT = 100  # rows ``hbd status`` shows unless told otherwise (0: all)
MAX_LIMIT = 5000  # more than this: ask for all (--all), which is streamed, not sorted
MAX_GLOB = 128  # characters of a peer name or glob (names are at most 64)
FIELDS = ("request", "state", "peer", "limit")


class FilterError(HbdError, ValueError):
    """A filter the daemon will not run; the message says why."""


SortKey = tuple[int, str, str]


def sort_key(peer_name: str | None, address: str, state: str) -> SortKey:
    """The table's order: DOWN, LATE, NEW, UP; then by name (unnamed last), then address."""
    return (ORDER.get(state, 9), peer_name or "~", address)


@dataclass(frozen=True, slots=True)
class StatusFilter:
    states: frozenset[str] | None = None  # None: every state
    peer: str | None = None  # a name, address or fnmatch glob (None: every peer)
    limit: int = 0  # at most this many rows, the first in the table's order (0: all, unsorted)
    _match: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.states is not None:
            unknown = sorted(self.states - set(STATES))
            if unknown or not self.states:
                raise FilterError(f"state: expected some of {', '.join(STATES)}, got {', '.join(unknown) or 'none'}")
        if self.peer is not None and not 0 < len(self.peer) <= MAX_GLOB:
            raise FilterError(f"peer: a name or glob of 1 to {MAX_GLOB} characters")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 0 <= self.limit <= MAX_LIMIT:
            raise FilterError(f"limit: a whole number from 0 (all) to {MAX_LIMIT}")
        object.__setattr__(self, "_match", None if self.peer is None else _compile(self.peer))

    @property
    def everything(self) -> bool:
        return self.states is None and self.peer is None and self.limit == 0

    def keep(self, peer: str, address: str, state: str) -> bool:
        """Does a peer shown as ``peer`` (its name, else its address) at ``address`` pass?"""
        if self.states is not None and state not in self.states:
            return False
        match = self._match
        return match is None or match.match(peer) is not None or match.match(address) is not None

    def to_request(self) -> dict[str, object]:
        doc: dict[str, object] = {"request": "select", "limit": self.limit}
        if self.states is not None:
            doc["state"] = sorted(self.states, key=STATES.index)
        if self.peer is not None:
            doc["peer"] = self.peer
        return doc

    def to_json(self) -> dict[str, object]:
        """As the reply echoes it."""
        return {
            "state": None if self.states is None else sorted(self.states, key=STATES.index),
            "peer": self.peer,
            "limit": self.limit,
        }

    @classmethod
    def from_request(cls, fields: Mapping[str, object]) -> StatusFilter:
        """A ``select`` request's fields -> a filter; FilterError names what is wrong."""
        unknown = sorted(str(k)[:40] for k in fields if k not in FIELDS)
        if unknown:
            raise FilterError(f"select: unknown field {unknown[0]!r} (this daemon knows: state, peer, limit)")
        raw_states = fields.get("state")
        states: frozenset[str] | None = None
        if raw_states is not None:
            if (
                not isinstance(raw_states, list)
                or len(raw_states) > len(STATES)
                or not all(isinstance(s, str) for s in raw_states)
            ):
                raise FilterError(f"state: a list of at most {len(STATES)} of {', '.join(STATES)}")
            states = frozenset(s.upper() for s in raw_states)
        peer = fields.get("peer")
        if peer is not None and not isinstance(peer, str):
            raise FilterError("peer: expected a string")
        limit = fields.get("limit", 0)
        if not isinstance(limit, int):
            raise FilterError(f"limit: a whole number from 0 (all) to {MAX_LIMIT}")
        return cls(states, peer, limit)


def parse_states(text: str) -> frozenset[str]:
    """``--state DOWN,late`` -> {"DOWN", "LATE"}; FilterError for anything else."""
    states = frozenset(s.strip().upper() for s in text.split(",") if s.strip())
    StatusFilter(states)  # checks them
    return states


def _compile(glob: str) -> re.Pattern[str]:
    # fnmatch's translation of "*" cannot backtrack catastrophically (CPython 3.9+), and names and
    # addresses are short: one match is microseconds whatever the glob.
    return re.compile(fnmatch.translate(glob))
