"""What a reload changes in the registry's expected peers, worked out off the loop (pure).

The expected peers in force are an immutable snapshot: the registry replaces its dict of them on
each reload and never changes it in place, so the new list can be compared with it a slice per loop
turn (``plan_in_slices``, run once a reload's loader has given its configuration) while the loop goes
on serving. The
plan holds everything the commit needs that costs O(peers): the new dict by name, the address book
(hbd.registry_identity) and the changes, in the order they are to be applied (the peers no longer
expected, then the newly expected ones and the ones expected differently: another address, timeout
or labels, or the default timeout they use). Unchanged peers are not in it: they cost nothing on the
loop. The registry applies the changes a slice per loop turn (hbd.registry.Registry.apply_some).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from itertools import islice
from typing import NamedTuple

from hbd.registry_identity import AddressBook
from hbd.registry_types import Expected


class Change(NamedTuple):
    """One peer's change: ``entry`` None means it is no longer expected; ``added``: newly expected."""

    name: str
    entry: Expected | None
    added: bool


class ExpectedPlan:
    """A reload's new expected peers and how they differ from ``base``. Handed over to the registry,
    which consumes ``changes`` (a slice at a time) and ``pending`` (as it applies them)."""

    __slots__ = ("added", "addresses", "base", "base_timeout", "changed", "changes", "expected", "pending", "removed")

    def __init__(
        self,
        base: Mapping[str, Expected],
        base_timeout: float,
        expected: dict[str, Expected],
        addresses: AddressBook,
        changes: list[Change],
        pending: dict[str, Change] | None = None,
    ) -> None:
        self.base = base  # the expected peers it was worked out from (checked at commit: by identity)
        self.base_timeout = base_timeout  # and the default timeout then in force
        self.expected = expected
        self.addresses = addresses
        self.changes = changes
        self.pending = {c.name: c for c in changes} if pending is None else pending  # not applied yet
        self.added = sum(1 for c in changes if c.added)
        self.removed = sum(1 for c in changes if c.entry is None)
        self.changed = len(changes) - self.added - self.removed


def plan_expected(
    base: Mapping[str, Expected], base_timeout: float, new: Iterable[Expected], new_timeout: float
) -> ExpectedPlan:
    """The plan that takes the registry from the expected peers ``base`` (with the default timeout
    ``base_timeout``) to ``new`` (``new_timeout``). For a name listed twice the last entry counts."""
    entries = list(new)
    steps = plan_in_slices(base, base_timeout, entries, new_timeout, max(1, len(entries), len(base)))
    while True:  # one slice holds everything: the same plan, made in one go
        try:
            next(steps)
        except StopIteration as done:
            plan: ExpectedPlan = done.value
            return plan


PLAN_SLICE = 2000  # entries compared per step of plan_in_slices (about a µs each)


def plan_in_slices(
    base: Mapping[str, Expected],
    base_timeout: float,
    new: Sequence[Expected],
    new_timeout: float,
    slice_: int = PLAN_SLICE,
) -> Generator[None, None, ExpectedPlan]:
    """plan_expected() a slice of entries per step (``yield``: the loop serves meanwhile), for a reload
    whose new peers come to the loop (hbd.reload_process). ``base`` is a snapshot nobody changes."""
    expected: dict[str, Expected] = {}
    for i in range(0, len(new), slice_):
        for e in new[i : i + slice_]:
            expected[e.name] = e
        yield
    removed: list[Change] = []
    names = iter(base)
    while chunk := list(islice(names, slice_)):
        removed += [Change(name, None, False) for name in chunk if name not in expected]
        yield
    changes: list[Change] = []
    addresses = AddressBook()
    default_changed = new_timeout != base_timeout
    items = iter(expected.items())
    while chunk_items := list(islice(items, slice_)):
        for name, e in chunk_items:
            addresses.add(e)
            old = base.get(name)
            if old is None:
                changes.append(Change(name, e, True))
            elif (
                old.labels != e.labels
                or old.timeout != e.timeout
                or old.address != e.address
                or (default_changed and e.timeout is None)
            ):
                changes.append(Change(name, e, False))
        yield
    changes[:0] = removed  # (the peers no longer expected first, as plan_expected has them)
    pending: dict[str, Change] = {}
    for i in range(0, len(changes), slice_ * 5):
        pending.update((c.name, c) for c in changes[i : i + slice_ * 5])
        yield
    return ExpectedPlan(base, base_timeout, expected, addresses, changes, pending)
