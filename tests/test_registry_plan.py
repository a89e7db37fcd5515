"""hbd.registry_plan: what a reload changes in the expected peers, worked out as a pure function; and
that applying it in slices, whatever their size, ends where a registry built from scratch starts."""

from __future__ import annotations

import ipaddress

from helpers import Exp
from hypothesis import given
from hypothesis import strategies as st

from hbd.registry import PeerStatus, Registry, RegistrySettings, plan_expected

T0 = 1000.0


def by_name(*peers: Exp) -> dict[str, Exp]:
    return {e.name: e for e in peers}


def test_unchanged_peers_are_not_in_the_plan() -> None:
    base = by_name(Exp("a"), Exp("b", timeout=5.0), Exp("c", labels=(("site", "x"),)))
    plan = plan_expected(base, 10.0, [Exp("a"), Exp("b", timeout=5.0), Exp("c", labels=(("site", "x"),))], 10.0)
    assert plan.changes == [] and plan.expected == base and (plan.added, plan.removed, plan.changed) == (0, 0, 0)


def test_removed_then_added_and_changed_in_the_new_order() -> None:
    net = ipaddress.ip_network("10.0.0.1/32")
    base = by_name(Exp("a"), Exp("b"), Exp("c"), Exp("d"), Exp("e"))
    new = [Exp("f"), Exp("e", address=net), Exp("c", labels=(("k", "v"),)), Exp("a", timeout=3.0), Exp("b")]
    plan = plan_expected(base, 10.0, new, 10.0)
    assert [(c.name, c.entry is None, c.added) for c in plan.changes] == [
        ("d", True, False),
        ("f", False, True),
        ("e", False, False),
        ("c", False, False),
        ("a", False, False),
    ]
    assert (plan.added, plan.removed, plan.changed) == (1, 1, 3)
    assert list(plan.pending) == [c.name for c in plan.changes]
    assert plan.addresses.match("10.0.0.1:4000") == "e"


def test_a_new_default_timeout_changes_the_peers_that_use_it_only() -> None:
    base = by_name(Exp("a"), Exp("b", timeout=5.0))
    plan = plan_expected(base, 10.0, list(base.values()), 20.0)
    assert [c.name for c in plan.changes] == ["a"]


def test_the_last_of_a_name_listed_twice_counts() -> None:
    plan = plan_expected({}, 10.0, [Exp("a"), Exp("a", timeout=2.0)], 10.0)
    assert plan.expected == {"a": Exp("a", timeout=2.0)} and len(plan.changes) == 1


# -- properties: a plan is the exact difference, and its sliced apply ends as a fresh build -----------------
NAMES = [f"p{i}" for i in range(12)]
entries = st.builds(
    Exp,
    name=st.sampled_from(NAMES),
    address=st.sampled_from([None, *(ipaddress.ip_network(f"10.0.0.{i}/32") for i in range(1, 4))]),
    timeout=st.sampled_from([None, 3.0, 7.0]),
    labels=st.sampled_from([(), (("site", "a"),), (("site", "b"),)]),
)


def unique(items: list[Exp]) -> list[Exp]:
    """One entry per name and per address (as the config's parser makes sure)."""
    names: set[str] = set()
    nets: set[object] = set()
    out = []
    for e in items:
        if e.name in names or (e.address is not None and e.address in nets):
            continue
        names.add(e.name)
        if e.address is not None:
            nets.add(e.address)
        out.append(e)
    return out


lists = st.lists(entries, max_size=12).map(unique)
timeouts = st.sampled_from([10.0, 20.0])


@given(lists, timeouts, lists, timeouts)
def test_the_plan_is_exactly_what_differs(old: list[Exp], t0: float, new: list[Exp], t1: float) -> None:
    base = by_name(*old)
    plan = plan_expected(base, t0, new, t1)
    want = {e.name for e in old} ^ {e.name for e in new}
    for e in new:
        b = base.get(e.name)
        if b is not None and (b != e or (e.timeout is None and t0 != t1)):
            want.add(e.name)
    assert {c.name for c in plan.changes} == want
    assert len(plan.changes) == len(want)  # once each
    assert all((c.entry is None) == (c.name not in plan.expected) for c in plan.changes)
    assert all(c.added == (c.name not in base) for c in plan.changes)
    assert plan.expected == by_name(*new)


FIELDS = ("status", "expected", "labels", "timeout", "address", "since", "reason", "grace", "named", "key", "filed")


def snapshot(reg: Registry) -> dict[str, tuple]:
    return {p.name: tuple(getattr(p, f) for f in FIELDS) for p in reg.peers.values()}


@given(lists, timeouts, lists, timeouts, st.integers(min_value=1, max_value=5))
def test_a_sliced_reload_ends_where_a_fresh_registry_starts(
    old: list[Exp], t0: float, new: list[Exp], t1: float, budget: int
) -> None:
    """No events: after a reload at T0, in slices of ``budget``, the registry is the one built with
    the new configuration at T0 (a startup_grace fixes each NEW peer's grace whatever its timeout)."""
    reg = Registry(RegistrySettings(heartbeat_timeout=t0, startup_grace=30.0), old, T0)
    fresh = Registry(RegistrySettings(heartbeat_timeout=t1, startup_grace=30.0), new, T0)
    settings = fresh.settings
    reg.begin(settings, plan_expected(reg.expected, reg.settings.heartbeat_timeout, new, t1), T0)
    turns = 0
    while reg.applying():
        before = reg.applying()
        reg.apply_some(budget)
        assert before - reg.applying() <= budget
        turns += 1
    assert snapshot(reg) == snapshot(fresh)
    assert reg.counts() == fresh.counts() and reg.expected == fresh.expected


def test_a_peer_seen_and_still_expected_keeps_its_state_through_a_reload() -> None:
    reg = Registry(RegistrySettings(), [Exp("a"), Exp("b")], T0)
    reg.connected("c1", "a", None, "x:1", 10.0, T0 + 1)
    reg.begin(reg.settings, reg.plan(reg.settings, [Exp("a", labels=(("k", "v"),)), Exp("b")]), T0 + 2)
    reg.apply_some(None)
    a = reg.peers["a"]
    assert (a.status, a.since, a.labels, a.key) == (PeerStatus.UP, T0 + 1, (("k", "v"),), "c1")
