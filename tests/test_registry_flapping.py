"""hbd.registry_flapping on its own: change times in the window, the threshold, the stable deadline."""

from __future__ import annotations

import sys

from hbd.registry_flapping import FlapDetector
from hbd.registry_types import Peer, PeerStatus


def peer() -> Peer:
    return Peer("web1", "a:1", PeerStatus.UP, 0.0, 10.0, True)


def test_more_than_threshold_changes_within_the_window_is_flapping_once() -> None:
    flaps, p = FlapDetector(3, 60.0), peer()
    assert [flaps.record(p, t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert flaps.record(p, 3.0) and p.flapping  # the 4th change within 60 s
    assert not flaps.record(p, 4.0)  # already flapping: reported once
    assert p.flapping


def test_changes_spread_wider_than_the_window_are_no_flapping() -> None:
    flaps, p = FlapDetector(3, 60.0), peer()
    assert not any(flaps.record(p, t * 25.0) for t in range(50))
    assert not p.flapping


def test_the_history_holds_at_most_threshold_plus_one_times() -> None:
    flaps, p = FlapDetector(2, 1000.0), peer()
    for t in range(100):
        flaps.record(p, float(t))
    assert list(p.changes or ()) == [97.0, 98.0, 99.0]


def test_a_new_threshold_resizes_the_history_keeping_the_latest() -> None:
    p = peer()
    old = FlapDetector(5, 60.0)
    for t in range(4):
        old.record(p, float(t))
    assert FlapDetector(2, 60.0).record(p, 4.0)  # 2, 3 kept, then 4: 3 changes within 60 s > 2
    assert list(p.changes or ()) == [2.0, 3.0, 4.0]


def test_stable_after_a_whole_window_without_a_change() -> None:
    flaps, p = FlapDetector(1, 60.0), peer()
    assert flaps.stable_at(p) == float("inf")  # not flapping
    flaps.record(p, 0.0)
    flaps.record(p, 5.0)
    assert p.flapping and flaps.stable_at(p) == 65.0
    assert not flaps.settle(p, 64.9) and p.flapping
    assert flaps.settle(p, 65.0)
    assert not p.flapping and not p.changes and flaps.stable_at(p) == float("inf")
    assert not flaps.settle(p, 1000.0)  # once


def test_the_history_costs_little_memory_per_peer() -> None:
    """Every peer records its first change (NEW -> UP): at 100,000 peers a deque (a 64-slot block,
    about 760 bytes with its first entry) was more than half of the registry's memory. The first change
    is kept as its time alone (the float is the peer's since: nothing more), a tuple from the second."""
    flaps, p = FlapDetector(5, 60.0), peer()
    now = 1.0
    flaps.record(p, now)
    assert p.changes is now
    flaps.record(p, 1.5)
    assert p.changes == (1.0, 1.5) and flaps.stable_at(p) == float("inf")
    for t in range(2, 10):
        flaps.record(p, float(t))
    assert sys.getsizeof(p.changes) < 150  # at most threshold + 1 times
