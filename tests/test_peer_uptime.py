"""hbd.peer_uptime: each peer's outages, down time and 24 h uptime, in made-up monotonic times."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from hbd.peer_uptime import MAX_SPANS, WINDOW, Account, Held, Uptime, parts

H = 3600.0


def test_outages_and_down_seconds_count_the_current_outage_too() -> None:
    u = Uptime()
    u.change("web1", "UP", 0.0)
    u.change("web1", "DOWN", 100.0)
    u.change("web1", "UP", 160.0)
    u.change("web1", "DOWN", 200.0)
    acc = u.account("web1")
    assert acc is not None
    assert acc.outages == 2
    assert acc.down_seconds(230.0) == 60.0 + 30.0
    u.change("web1", "DOWN", 240.0)  # the same state again: nothing new
    assert acc.outages == 2 and acc.down_seconds(250.0) == 110.0


def test_uptime_is_up_or_late_over_known_time_new_is_unknown() -> None:
    u = Uptime()
    assert u.uptime("web1", 0.0) is None
    u.change("web1", "NEW", 0.0)
    assert u.uptime("web1", 10.0) is None  # nothing known yet
    u.change("web1", "UP", 10.0)
    u.change("web1", "LATE", 70.0)
    u.change("web1", "DOWN", 80.0)
    u.change("web1", "UP", 110.0)
    # known 10..130: UP 60 + LATE 10 + DOWN 30 + UP 20
    assert u.uptime("web1", 130.0) == pytest.approx(100.0 * 90 / 120)


def test_only_the_last_24_hours_count() -> None:
    u = Uptime()
    u.change("web1", "DOWN", 0.0)
    u.change("web1", "UP", 2 * H)
    assert u.uptime("web1", 2 * H + WINDOW - H) == pytest.approx(100.0 * 23 / 24)  # 1 h of the DOWN left
    assert u.uptime("web1", 2 * H + WINDOW) == 100.0
    assert (acc := u.account("web1")) is not None and acc.outages == 1 and acc.down_seconds(3 * WINDOW) == 2 * H


def test_the_states_kept_per_peer_are_bounded() -> None:
    u = Uptime()
    for i in range(10 * MAX_SPANS):
        u.change("flappy", "UP" if i % 2 == 0 else "DOWN", float(i))
    acc = u.account("flappy")
    assert acc is not None
    assert len(acc.spans) == MAX_SPANS and acc.outages == 5 * MAX_SPANS
    assert acc.down_seconds(10.0 * MAX_SPANS) == 5 * MAX_SPANS  # the counters keep everything
    assert u.uptime("flappy", 10.0 * MAX_SPANS) == pytest.approx(50.0)


def test_forgotten_peers_are_swept_once_they_outnumber_the_known() -> None:
    u = Uptime()
    for i in range(300):
        u.change(f"gone{i}", "UP", 0.0)
        u.sweep({"web1"}, 1)
    assert len(u.orphans) <= 1 + 100 + 1
    u.change("web1", "UP", 1.0)
    u.sweep({"web1"}, 1)
    assert "web1" in u.orphans


def test_an_account_copied_to_another_process_reads_the_same() -> None:
    """A worker shows the supervisor's accounting of a peer it holds (hbd.registry_remote): the copy
    goes over a pipe as JSON, and reads the same at any later time."""
    u = Uptime()
    u.change("web1", "UP", 0.0)
    u.change("web1", "DOWN", 2 * H)
    u.change("web1", "UP", 3 * H)
    acc = u.account("web1")
    assert acc is not None
    copy = Account.of(*json.loads(json.dumps(acc.copy())))
    for now in (3 * H, 10 * H, WINDOW + 2.5 * H, 2 * WINDOW):
        assert copy.uptime(now) == acc.uptime(now) and copy.down_seconds(now) == acc.down_seconds(now)
    assert copy.outages == 1
    assert Account.of(0, 0.0, [[1.0, "UP"], ["x", "UP"], [2.0], [3.0, 4]]).spans == [(1.0, "UP")]


def test_an_account_costs_little_memory() -> None:
    """An Account per peer (supervisor) and per connection (its worker's copy): at 100,000 peers each
    byte counts. One span measured ~900 B with a deque(maxlen=MAX_SPANS); a list is ~250 B."""
    n = 20000
    names = [f"peer{i:06d}" for i in range(n)]  # made first: the registry holds the names anyway
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        u = Uptime()
        for name in names:
            u.change(name, "UP", 1.0)
        copies = [Account.of(*parts(u.held(name))) for name in names]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(copies) == n
    assert used / n < 2 * 450, f"{used / n:.0f} B per peer for an account and its copy"


class _Peer:
    __slots__ = ("account",)

    def __init__(self) -> None:
        self.account: Held = None


def test_a_peers_account_is_kept_in_the_peer_and_a_fresh_ones_is_its_one_span() -> None:
    """The registry's Peer keeps its account (no table by name); a peer UP since its first change
    keeps the time alone (its since: nothing more; an Account, its list and span, in a table's entry,
    were ~200 B), one in another single state the span (~56 B)."""
    n = 20000
    peers = {f"peer{i:06d}": _Peer() for i in range(n)}
    u = Uptime(peers)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name in peers:
            u.change(name, "UP", 1.0)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert not u.orphans and peers["peer000001"].account == 1.0
    assert used / n < 8, f"{used / n:.0f} B per peer for its account"
    u.change("peer000001", "LATE", 5.0)
    u.change("peer000001", "DOWN", 10.0)
    acc = u.account("peer000001")
    assert isinstance(peers["peer000001"].account, Account) and acc is peers["peer000001"].account
    assert acc.outages == 1 and acc.down_seconds(12.0) == 2.0
    assert acc.uptime(12.0) == pytest.approx(100.0 * 9 / 11)
    peers["fresh"] = _Peer()
    u.change("fresh", "DOWN", 1.0)  # a first state DOWN is an outage: an Account at once
    assert parts(peers["fresh"].account) == (1, 0.0, [(1.0, "DOWN")])
    peers["late"] = _Peer()
    u.change("late", "LATE", 2.0)
    assert peers["late"].account == (2.0, "LATE") and u.uptime("late", 4.0) == 100.0
    assert u.uptime("peer000003", 5.0) == 100.0 and u.uptime("nobody", 5.0) is None
