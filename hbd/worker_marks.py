"""What a worker keeps of the supervisor's mark of each connection's peer (hbd.registry_remote): the
registry's view that its status rows show, one small object per connection (100,000 of them), kept
on the connection itself (``Connection.mark``)."""

from __future__ import annotations

import sys
from typing import NamedTuple, TypeVar

from hbd.peer_uptime import Account
from hbd.workers_codec import PeerMark


class Said(NamedTuple):
    """What a mark says of a peer besides its name, state and since: the same for most peers (no
    flags, no labels, "first ping"), so equal ones are one object (``_shared``)."""

    named: bool
    reason: str
    expected: bool
    silenced_until: float | None
    flags: frozenset[str]
    labels: tuple[tuple[str, str], ...]


class Mark:
    """What a worker keeps of a PeerMark: what its rows show, and the peer's account. One per
    connection (100,000 of them), 5 slots (80 B; 112 B with a slot for each of ``Said``'s): what
    most marks say alike is shared between equal marks, the name with the connection's own when they
    are equal, and the message's lists are not kept."""

    __slots__ = ("account", "peer", "said", "since", "state")

    def __init__(self, msg: PeerMark, name: str | None, shared: dict[object, object]) -> None:
        self.peer = name if name == msg.peer and name is not None else msg.peer
        self.state = sys.intern(msg.state)
        self.since = msg.since
        labels = tuple((k, v) for k, v in msg.labels)
        said = Said(msg.named, msg.reason, msg.expected, msg.silenced_until, frozenset(msg.flags), labels)
        self.said: Said = _shared(shared, said)
        spans = msg.spans
        if msg.outages == 0 and msg.down == 0 and len(spans) == 1 and list(spans[0]) == [msg.since, msg.state]:
            self.account: Account | None = None  # nothing but its state since then: made when a row is
        else:
            self.account = Account.of(msg.outages, msg.down, spans)

    def accounted(self) -> Account:
        """The peer's account (one the mark itself tells is made here, ~200 B not kept per connection)."""
        if self.account is not None:
            return self.account
        return Account.of(0, 0.0, [(self.since, self.state)])


_T = TypeVar("_T")
MAX_SHARED = 4096  # distinct things marks say (Said) kept for sharing: few (the config's flags and labels, reasons)


def _shared(shared: dict[object, object], value: _T) -> _T:
    """The one copy of ``value`` kept (equal marks' flags and labels are one object)."""
    kept = shared.get(value)
    if kept is not None:
        return kept  # type: ignore[return-value]  # equal values are of one type here
    if len(shared) >= MAX_SHARED:
        shared.clear()
    shared[value] = value
    return value
