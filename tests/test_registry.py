"""hbd.registry on its own: plain calls, fake times, the actions it returns."""

from __future__ import annotations

import ipaddress
import logging
import time

import pytest
from helpers import Exp

from hbd.registry import (
    Close,
    Log,
    Notice,
    PeerRecord,
    PeerStatus,
    Registry,
    RegistrySettings,
    SilenceRecord,
    Watch,
    registry_settings,
)
from hbd.view import PeerRow, source_rows

T0 = 1000.0
WALL = 1_700_000_000.0


def rows(reg: Registry) -> list[PeerRow]:
    """Every peer's row, as a status listing reads them (one producer: hbd.view.source_rows)."""
    return list(source_rows((reg.source(),)))


def settings(**kw: object) -> RegistrySettings:
    return RegistrySettings(**{"heartbeat_timeout": 10.0, **kw})  # type: ignore[arg-type]


def notices(actions: list) -> list[tuple[str, str, str, bool]]:
    return [(a.peer, a.event, a.reason, a.hook) for a in actions if isinstance(a, Notice)]


def closes(actions: list) -> list[tuple[object, str]]:
    return [(a.key, a.reason) for a in actions if isinstance(a, Close)]


def state(reg: Registry, name: str) -> str | None:
    peer = reg.peers.get(name)
    return peer.status.value if peer else None


def tick_until(reg: Registry, t: float, wall_offset: float = WALL - T0) -> list:
    """Every tick the registry asks for, up to t (as the server's timer would)."""
    out = []
    while (due := reg.next_deadline()) is not None and due <= t:
        out += reg.tick(due, due + wall_offset)
    out += reg.tick(t, t + wall_offset)
    return out


# -- identity ----------------------------------------------------------------------------------------
def test_a_named_peer_is_its_greeting_name() -> None:
    reg = Registry(settings())
    acts = reg.connected("c1", "web1", None, "10.0.0.5:4000", 6.0, T0)
    assert notices(acts) == [("web1", "up", "first ping", True)]
    assert state(reg, "web1") == "UP"
    [row] = rows(reg)
    assert (row.peer, row.name, row.address, row.state, row.since) == ("web1", "web1", "10.0.0.5:4000", "UP", T0)


def test_an_unnamed_legacy_client_is_its_address_and_is_forgotten_at_once() -> None:
    reg = Registry(settings())
    reg.connected("c1", None, None, "10.0.0.5:4000", 10.0, T0)
    assert state(reg, "10.0.0.5:4000") == "UP"
    [row] = rows(reg)
    assert row.name is None
    acts = reg.gone("c1", "timeout", T0 + 11)
    assert notices(acts) == [("10.0.0.5:4000", "down", "timeout", True)]
    assert reg.peers == {} and reg.counts()["DOWN"] == 0
    assert reg.take_dirty(T0 + 11, WALL).forgotten == []  # never written, so nothing to forget


def test_a_legacy_client_matched_by_address_is_that_expected_peer() -> None:
    exp = [Exp("db1", ipaddress.ip_network("10.0.0.7/32")), Exp("rack", ipaddress.ip_network("10.1.0.0/16"))]
    reg = Registry(settings(), exp, T0)
    reg.connected("c1", None, None, "10.0.0.7:5000", 10.0, T0 + 1)
    reg.connected("c2", None, None, "10.1.2.3:5000", 10.0, T0 + 1)
    reg.connected("c3", None, None, "10.2.0.1:5000", 10.0, T0 + 1)
    assert (state(reg, "db1"), state(reg, "rack"), state(reg, "10.2.0.1:5000")) == ("UP", "UP", "UP")
    # gone: the expected one is remembered as DOWN, not forgotten
    reg.gone("c1", "disconnected", T0 + 2)
    assert state(reg, "db1") == "DOWN"
    assert reg.peers["db1"].named


def test_an_ipv4_mapped_source_matches_too() -> None:
    reg = Registry(settings(), [Exp("db1", ipaddress.ip_network("10.0.0.7/32"))], T0)
    reg.connected("c1", None, None, "[::ffff:10.0.0.7]:5000", 10.0, T0)
    assert state(reg, "db1") == "UP"


def test_certificate_mode_refuses_another_greeting_name() -> None:
    reg = Registry(settings(name_from="certificate"))
    [close] = reg.hello("c1", "db1", "web1", "10.0.0.5:4000")
    assert isinstance(close, Close) and close.reason.startswith("name mismatch")
    assert reg.hello("c2", "web1", "web1", "10.0.0.5:4001") == []
    acts = reg.connected("c2", None, "web1", "10.0.0.5:4001", 10.0, T0)  # no greeting: the certificate names it
    assert notices(acts) == [("web1", "up", "first ping", True)]
    assert closes(reg.connected("c3", "db1", "web1", "10.0.0.5:4002", 10.0, T0))[0][1].startswith("name mismatch")
    assert closes(reg.connected("c4", "db1", None, "10.0.0.5:4003", 10.0, T0))  # no certificate: refused
    assert set(reg.peers) == {"web1"}


# -- duplicate names ---------------------------------------------------------------------------------------
def test_a_second_connection_with_a_name_takes_over() -> None:
    reg = Registry(settings())
    reg.connected("old", "web1", None, "10.0.0.5:4000", 10.0, T0)
    acts = reg.connected("new", "web1", None, "10.0.0.9:4100", 10.0, T0 + 1)
    [(key, reason)] = closes(acts)
    assert key == "old" and "10.0.0.9:4100" in reason and "10.0.0.5:4000" in reason
    assert notices(acts) == []  # it was up and is up
    assert reg.gone("old", "disconnected", T0 + 1) == []  # the replaced connection's end is no news
    assert state(reg, "web1") == "UP"
    assert len(list(rows(reg))) == 1
    assert notices(reg.gone("new", "timeout", T0 + 20)) == [("web1", "down", "timeout", True)]


def test_a_takeover_of_a_late_peer_reports_it_up() -> None:
    reg = Registry(settings())
    reg.connected("old", "web1", None, "a:1", 10.0, T0)
    assert notices(reg.late("old", T0 + 6)) == [("web1", "late", "silent", True)]
    acts = reg.connected("new", "web1", None, "a:2", 10.0, T0 + 7)
    assert notices(acts) == [("web1", "up", "ping", True)] and closes(acts)


# -- memory ------------------------------------------------------------------------------------------------
def test_a_named_peer_that_goes_down_is_remembered_until_forget_after() -> None:
    reg = Registry(settings(forget_after=100.0))
    reg.connected("c1", "web1", None, "a:1", 10.0, T0)
    reg.gone("c1", "timeout", T0 + 11, last_ping=T0 + 0.5)
    [row] = rows(reg)
    assert (row.state, row.since, row.last_ping, row.reason) == ("DOWN", T0 + 11, T0 + 0.5, "timeout")
    assert tick_until(reg, T0 + 110) == []
    assert state(reg, "web1") == "DOWN"
    acts = tick_until(reg, T0 + 111)
    assert state(reg, "web1") is None and any(isinstance(a, Log) for a in acts)
    assert reg.take_dirty(T0 + 111, WALL).forgotten == ["web1"]
    assert reg.counts() == {"NEW": 0, "UP": 0, "LATE": 0, "DOWN": 0}


def test_it_is_up_again_when_it_comes_back() -> None:
    reg = Registry(settings(forget_after=100.0))
    reg.connected("c1", "web1", None, "a:1", 10.0, T0)
    reg.gone("c1", "timeout", T0 + 11)
    assert notices(reg.connected("c2", "web1", None, "a:2", 10.0, T0 + 50)) == [("web1", "up", "ping", True)]
    assert tick_until(reg, T0 + 200) == []  # not forgotten while up
    assert state(reg, "web1") == "UP"


# -- expected peers ---------------------------------------------------------------------------------------
def test_an_expected_peer_is_new_then_down_never_connected_once_at_its_grace() -> None:
    reg = Registry(settings(), [Exp("db1", timeout=30.0, labels=(("rack", "r1"),))], T0)
    assert state(reg, "db1") == "NEW" and reg.counts()["NEW"] == 1
    assert reg.next_deadline() == T0 + 30
    assert tick_until(reg, T0 + 29.9) == []
    acts = tick_until(reg, T0 + 1000)
    assert notices(acts) == [("db1", "down", "never connected", True)]
    [n] = [a for a in acts if isinstance(a, Notice)]
    assert n.expected and n.labels == (("rack", "r1"),) and n.old == "NEW"
    assert tick_until(reg, T0 + 10**8) == []  # never forgotten while listed, and no second notice
    assert state(reg, "db1") == "DOWN"


def test_startup_grace_overrides_the_timeout() -> None:
    reg = Registry(settings(startup_grace=120.0), [Exp("db1")], T0)
    assert reg.next_deadline() == T0 + 120


def test_an_expected_peer_that_pings_in_its_grace_is_up_without_down() -> None:
    reg = Registry(settings(), [Exp("db1")], T0)
    assert notices(reg.connected("c", "db1", None, "a:1", 10.0, T0 + 5)) == [("db1", "up", "first ping", True)]
    assert tick_until(reg, T0 + 100) == []


def test_a_reload_that_removes_one_makes_it_forgettable_and_one_that_adds_one_starts_its_grace() -> None:
    reg = Registry(settings(forget_after=50.0), [Exp("db1"), Exp("db2")], T0)
    tick_until(reg, T0 + 20)  # both DOWN, never connected
    reg.configure(settings(forget_after=50.0), [Exp("db2"), Exp("db3")], T0 + 100)
    assert not reg.peers["db1"].expected and reg.peers["db2"].expected
    assert state(reg, "db3") == "NEW"
    assert notices(tick_until(reg, T0 + 109)) == []
    assert notices(tick_until(reg, T0 + 111)) == [("db3", "down", "never connected", True)]
    assert state(reg, "db1") is None  # down since T0+10, forget_after 50: forgotten at the first look
    assert state(reg, "db2") == "DOWN"


def test_a_reload_that_removes_a_never_seen_one_drops_it() -> None:
    reg = Registry(settings(), [Exp("db1")], T0)
    reg.configure(settings(), [], T0 + 1)
    assert reg.peers == {} and reg.counts()["NEW"] == 0


# -- unexpected names and max_peers --------------------------------------------------------------------------
def test_unexpected_reject_warn_allow() -> None:
    reg = Registry(settings(unexpected="reject"), [Exp("db1")], T0)
    assert closes(reg.hello("c", "x", None, "a:1"))
    assert closes(reg.connected("c", None, None, "a:1", 10.0, T0))  # a legacy client is unexpected too
    assert not closes(reg.connected("d", "db1", None, "a:2", 10.0, T0))
    reg = Registry(settings(unexpected="warn"), [Exp("db1")], T0)
    acts = reg.connected("c", "x", None, "a:1", 10.0, T0)
    assert [a.level for a in acts if isinstance(a, Log)] == [logging.WARNING] and state(reg, "x") == "UP"
    reg = Registry(settings(), [Exp("db1")], T0)
    acts = reg.connected("c", "x", None, "a:1", 10.0, T0)
    assert not [a for a in acts if isinstance(a, Log | Close)]


def test_max_peers_refuses_new_names_beyond_it() -> None:
    reg = Registry(settings(max_peers=2), [Exp("db1")], T0)
    reg.connected("c1", "a", None, "x:1", 10.0, T0)
    [(key, reason)] = closes(reg.connected("c2", "b", None, "x:2", 10.0, T0))
    assert key == "c2" and "max_peers (2)" in reason
    assert closes(reg.hello("c2", "b", None, "x:2"))
    assert closes(reg.connected("c3", "a", None, "x:3", 10.0, T0)) == [
        ("c1", "a: replaced by a newer connection from x:3 (this one is from x:1)")
    ]  # a known name: a takeover, not a new one
    assert not closes(reg.connected("c4", "db1", None, "x:4", 10.0, T0))  # expected names always fit
    assert set(reg.peers) == {"a", "db1"}


# -- rise -----------------------------------------------------------------------------------------------------
def test_rise_a_down_peer_is_up_after_n_on_time_pings() -> None:
    reg = Registry(settings(rise=3))
    reg.connected("c1", "web1", None, "a:1", 10.0, T0)  # never down: up at once
    assert state(reg, "web1") == "UP"
    reg.gone("c1", "timeout", T0 + 11)
    acts = reg.connected("c2", "web1", None, "a:2", 10.0, T0 + 20)
    assert acts == [Watch("c2", True)] and state(reg, "web1") == "DOWN"
    assert reg.pinged("c2", 2.0, T0 + 22) == []
    assert reg.peers["web1"].reason == "rising: 2 of 3 pings"
    assert reg.pinged("c2", 6.0, T0 + 28) == []  # late (more than half its timeout): counts from 1 again
    assert reg.pinged("c2", 2.0, T0 + 30) == []
    acts = reg.pinged("c2", 2.0, T0 + 32)
    assert Watch("c2", False) in acts and notices(acts) == [("web1", "up", "3 pings on time", True)]
    assert state(reg, "web1") == "UP"


def test_rise_a_rising_peer_that_goes_again_stays_down_without_a_notice() -> None:
    reg = Registry(settings(rise=2))
    reg.connected("c1", "web1", None, "a:1", 10.0, T0)
    reg.gone("c1", "timeout", T0 + 11)
    reg.connected("c2", "web1", None, "a:2", 10.0, T0 + 20)
    assert reg.rising("c2")
    acts = reg.gone("c2", "disconnected", T0 + 21)
    assert notices(acts) == [] and Watch("c2", False) in acts
    assert state(reg, "web1") == "DOWN" and reg.peers["web1"].reason == "disconnected"


def test_rise_does_not_apply_to_new_peers() -> None:
    reg = Registry(settings(rise=5), [Exp("db1")], T0)
    assert notices(reg.connected("c1", "db1", None, "a:1", 10.0, T0)) == [("db1", "up", "first ping", True)]


# -- flapping -------------------------------------------------------------------------------------------------
def flap(reg: Registry, n: int, t: float, step: float = 1.0) -> tuple[list, float]:
    """n state changes of web1 (up, down, up, ...), one every step seconds."""
    acts = []
    for _ in range(n):
        if state(reg, "web1") in (None, "DOWN"):
            acts += reg.connected(f"c{t}", "web1", None, "a:1", 10.0, t)
        else:
            acts += reg.gone(f"c{t - step}", "disconnected", t)
        t += step
    return acts, t


def test_flapping_one_notice_then_hooks_suppressed_then_one_stable() -> None:
    reg = Registry(settings(flap_threshold=3, flap_window=60.0))
    acts, t = flap(reg, 4, T0)  # up, down, up, down: 4 changes > 3
    ns = notices(acts)
    assert [e for _, e, _, _ in ns] == ["up", "down", "up", "down", "flapping"]
    assert [h for _, _, _, h in ns] == [True, True, True, False, True]
    assert reg.peers["web1"].flapping
    [row] = rows(reg)
    assert "flapping" in row.flags
    acts, t = flap(reg, 6, t)
    assert [h for _, _, _, h in notices(acts)] == [False] * 6  # no second flapping notice, no hooks
    assert len(reg.peers["web1"].changes or ()) == 4  # bounded: flap_threshold + 1
    last = t - 1
    assert notices(tick_until(reg, last + 59)) == []
    acts = tick_until(reg, last + 61)
    [n] = [a for a in acts if isinstance(a, Notice)]
    assert (n.event, n.old, n.new, n.hook) == ("stable", "DOWN", "DOWN", True)
    assert not reg.peers["web1"].flapping


def test_changes_spread_wider_than_the_window_are_no_flapping() -> None:
    reg = Registry(settings(flap_threshold=3, flap_window=60.0))
    acts, _ = flap(reg, 20, T0, step=25.0)
    assert "flapping" not in [e for _, e, _, _ in notices(acts)]


# -- silences --------------------------------------------------------------------------------------------------
def test_a_silenced_peer_is_logged_at_info_without_hooks_until_the_silence_ends() -> None:
    reg = Registry(settings())
    rec = reg.silence("web1", WALL + 60, "maintenance", T0, WALL)  # unknown yet: allowed and kept
    assert rec == SilenceRecord("web1", WALL + 60, "maintenance", WALL)
    reg.connected("c1", "web1", None, "a:1", 10.0, T0 + 1)
    [row] = rows(reg)
    assert row.silenced_until == WALL + 60
    [n] = [a for a in reg.gone("c1", "timeout", T0 + 12) if isinstance(a, Notice)]
    assert (n.silenced, n.hook, n.level) == (True, False, logging.INFO)
    acts = tick_until(reg, T0 + 61)
    assert [a.message for a in acts if isinstance(a, Log)] == ["the silence on web1 ended"]
    assert reg.silences() == []
    [n] = [a for a in reg.connected("c2", "web1", None, "a:2", 10.0, T0 + 70) if isinstance(a, Notice)]
    assert n.hook and not n.silenced


def test_silence_errors_and_unsilence() -> None:
    reg = Registry(settings())
    assert isinstance(reg.silence("bad name!", WALL + 60, "", T0, WALL), str)
    assert isinstance(reg.silence("web1", WALL - 1, "", T0, WALL), str)
    reg.silence("web1", WALL + 60, "x" * 1000, T0, WALL)
    assert len(reg.silences()[0].reason) == 256
    assert reg.unsilence("web1") and not reg.unsilence("web1")
    dirty = reg.take_dirty(T0, WALL)
    assert dirty.unsilenced == ["web1"] and dirty.silences == []


def test_a_silence_follows_wall_clock_expiry() -> None:
    reg = Registry(settings())
    reg.silence("web1", WALL + 60, "", T0, WALL)
    # the wall clock was set back by an hour: the silence lasts until its wall-clock end
    assert reg.tick(T0 + 61, WALL + 61 - 3600) == []
    assert reg.silences()
    assert reg.next_deadline() == pytest.approx(T0 + 61 + 3599)


# -- restart continuity --------------------------------------------------------------------------------------------
def test_take_dirty_and_restore_round_trip() -> None:
    reg = Registry(settings(forget_after=1000.0), [Exp("db1", labels=(("k", "v"),))], T0)
    reg.connected("c1", "web1", None, "a:1", 6.0, T0 + 1)
    reg.connected("c2", "web2", None, "a:2", 6.0, T0 + 1)
    reg.gone("c2", "timeout", T0 + 8, last_ping=T0 + 1.5)
    reg.silence("web2", WALL + 500, "fix", T0 + 8, WALL + 8)
    dirty = reg.take_dirty(T0 + 9, WALL + 9)
    by = {r.name: r for r in dirty.peers}
    assert set(by) == {"db1", "web1", "web2"}
    assert by["web2"] == PeerRecord("web2", "a:2", "DOWN", WALL + 8, WALL + 1.5, "timeout", False, 6.0, ())
    assert by["db1"].expected and by["db1"].labels == (("k", "v"),)
    assert reg.take_dirty(T0 + 9, WALL + 9) == ([], [], [], [])  # taken

    # a new process, other monotonic base, 100 s later
    now, wall = 50.0, WALL + 109
    new = Registry(settings(forget_after=1000.0), [Exp("db1", labels=(("k", "v"),))], now)
    new.restore(dirty.peers, dirty.silences, now, wall)
    assert (state(new, "web1"), state(new, "web2"), state(new, "db1")) == ("NEW", "DOWN", "NEW")
    assert new.peers["web2"].since == pytest.approx(now - 101)
    assert new.peers["web2"].reason == "timeout"
    assert new.silences()[0].name == "web2"
    # web1 reconnects within its grace (its timeout, 6 s): no down notice
    assert notices(new.connected("k1", "web1", None, "a:9", 6.0, now + 3)) == [("web1", "up", "first ping", True)]
    assert notices(tick_until(new, now + 100, wall - now)) == [("db1", "down", "never connected", True)]


def test_a_remembered_peer_that_does_not_come_back_is_down_after_its_timeout() -> None:
    rec = PeerRecord("web1", "a:1", "UP", WALL - 50, WALL - 1, "ping", False, 6.0, ())
    reg = Registry(settings())
    reg.restore([rec], [], T0, WALL)
    assert state(reg, "web1") == "NEW"
    assert notices(tick_until(reg, T0 + 5.9)) == []
    assert notices(tick_until(reg, T0 + 6.1)) == [("web1", "down", "not back after a restart", True)]


def test_restore_under_unexpected_reject_keeps_only_expected_peers() -> None:
    recs = [PeerRecord(n, "", "DOWN", WALL, None, "", n == "db1", 5.0, ()) for n in ("db1", "web1")]
    reg = Registry(settings(unexpected="reject"), [Exp("db1")], T0)
    reg.restore(recs, [], T0, WALL)
    assert set(reg.peers) == {"db1"} and state(reg, "db1") == "DOWN"


def test_restore_ignores_bad_names_and_respects_max_peers() -> None:
    recs = [PeerRecord(f"p{i}", "", "DOWN", WALL, None, "", False, 5.0, ()) for i in range(5)]
    reg = Registry(settings(max_peers=3))
    reg.restore([PeerRecord("bad name", "", "DOWN", WALL, None, "", False, 5.0, ()), *recs], [], T0, WALL)
    assert len(reg) == 3


# -- counts, rows, bounds -----------------------------------------------------------------------------------------
def test_a_tick_does_a_bounded_amount_of_work() -> None:
    reg = Registry(settings(), [Exp(f"db{i}") for i in range(1200)], T0)
    first = reg.tick(T0 + 11, WALL + 11, budget=500)
    assert len(first) == 500 and reg.next_deadline() == T0 + 10  # more are due: call again
    rest = reg.tick(T0 + 11, WALL + 11, budget=500) + reg.tick(T0 + 11, WALL + 11, budget=500)
    assert len(rest) == 700 and reg.next_deadline() is None
    assert {n.peer for n in first + rest if isinstance(n, Notice)} == {f"db{i}" for i in range(1200)}


def test_a_hand_over_to_the_store_is_a_small_step_by_default() -> None:
    """A teardown's DOWNs: the loop hands the store at most DIRTY_BATCH peers a turn (500 were 2-3.5 ms
    of the supervisor's CPU in that turn, beside its reports), the rest on the next turns."""
    from hbd.registry import DIRTY_BATCH

    reg = Registry(settings(max_peers=2000))
    for i in range(1200):
        reg.connected(i, f"p{i}", None, "a:1", 10.0, T0)
    taken = [len(reg.take_dirty(T0, WALL).peers) for _ in range(20)]
    assert max(taken) == DIRTY_BATCH <= 150 and sum(taken) == 1200 and reg.dirty() == 0


def test_take_dirty_is_a_bounded_step() -> None:
    reg = Registry(settings(max_peers=2000))
    for i in range(1200):
        reg.connected(i, f"p{i}", None, "a:1", 10.0, T0)
    first = reg.take_dirty(T0, WALL, limit=500)
    assert [r.name for r in first.peers] == [f"p{i}" for i in range(500)] and reg.dirty() == 700
    reg.late(0, T0 + 6)  # changed again: written again, after those waiting
    rest = reg.take_dirty(T0, WALL, limit=500).peers + reg.take_dirty(T0, WALL, limit=500).peers
    assert len(rest) == 701 and rest[-1].name == "p0" and rest[-1].state == "LATE" and reg.dirty() == 0


def test_counts_follow_every_change() -> None:
    reg = Registry(settings(), [Exp("db1"), Exp("db2")], T0)
    reg.connected("c1", "web1", None, "a:1", 10.0, T0)
    reg.late("c1", T0 + 6)
    assert reg.counts() == {"NEW": 2, "UP": 0, "LATE": 1, "DOWN": 0}
    reg.back("c1", T0 + 7)
    tick_until(reg, T0 + 11)
    assert reg.counts() == {"NEW": 0, "UP": 1, "LATE": 0, "DOWN": 2}
    assert sum(reg.counts().values()) == len(list(rows(reg)))


def test_the_deadline_heap_stays_bounded() -> None:
    """Many changes of few peers (each re-filing a deadline) do not pile up heap entries."""
    reg = Registry(settings(forget_after=5.0, flap_threshold=2, flap_window=1000.0))
    t = T0
    for i in range(5000):
        reg.connected(i, f"p{i % 10}", None, "a:1", 10.0, t)
        reg.gone(i, "x", t + 0.001)
        t += 0.002
    assert len(reg._heap) <= 2 * len(reg.peers) + 65


def test_events_cost_does_not_grow_with_the_number_of_peers() -> None:
    def per_event(n: int) -> float:
        reg = Registry(settings(), [Exp(f"e{i}") for i in range(n)], T0)
        for i in range(n):
            reg.connected(i, f"e{i}", None, "a:1", 10.0, T0)
        start = time.thread_time()  # this thread's CPU: time it was preempted on a loaded machine is not its cost
        for i in range(1000):
            reg.late(i, T0 + 6)
            reg.back(i, T0 + 7)
        return time.thread_time() - start

    small, large = min(per_event(1000) for _ in range(3)), min(per_event(20000) for _ in range(3))
    assert large < small * 3  # generous: O(1) per event, whatever the machine's load


def test_registry_settings_come_from_the_server_config() -> None:
    from hbd.config import ServerConfig

    s = registry_settings(ServerConfig(heartbeat_timeout=4.0, rise=3, unexpected="warn"))
    assert (s.heartbeat_timeout, s.rise, s.forget_after, s.unexpected) == (4.0, 3, 604800.0, "warn")
    assert (s.startup_grace, s.max_peers, s.name_from) == (None, 10000, "greeting")


def test_status_enum_values_are_the_views() -> None:
    from hbd.view import PEER_STATES

    assert tuple(s.value for s in PeerStatus) == PEER_STATES


# -- a reload applied in slices (Registry.begin / apply_some) ----------------------------------------------
def _reload(reg: Registry, expected: list, now: float, **kw: object) -> None:
    """Commit a reload; its peers' changes wait for apply_some()."""
    new = settings(**kw) if kw else reg.settings
    reg.begin(new, reg.plan(new, expected), now)


def test_a_reload_applies_a_slice_at_a_time_and_unchanged_peers_cost_nothing() -> None:
    names = [f"p{i}" for i in range(10)]
    reg = Registry(settings(), [Exp(n) for n in names], T0)
    _reload(reg, [Exp(n, labels=(("k", "v"),)) if i % 2 else Exp(n) for i, n in enumerate(names)], T0 + 1)
    assert reg.applying() == 5  # the odd ones
    reg.apply_some(2)
    assert reg.applying() == 3 and [reg.peers[n].labels != () for n in ("p1", "p3", "p5")] == [True, True, False]
    reg.apply_some(None)
    assert reg.applying() == 0 and all(reg.peers[n].labels == (("k", "v"),) for n in names[1::2])


def test_an_event_about_a_peer_mid_reload_applies_its_change_first() -> None:
    reg = Registry(settings(), [Exp("a"), Exp("b")], T0)
    reg.connected("ca", "a", None, "x:1", 10.0, T0)
    reg.connected("cb", "b", None, "x:2", 10.0, T0)
    _reload(reg, [Exp("b"), Exp("z"), Exp("a", labels=(("site", "new"),))], T0 + 1)
    assert reg.peers["a"].labels == ()  # not applied yet: shown as before
    [down] = [a for a in reg.gone("ca", "timeout", T0 + 2) if isinstance(a, Notice)]
    assert down.labels == (("site", "new"),) and down.expected
    _reload(reg, [Exp("z")], T0 + 3)  # the first one is finished first; b is no longer expected
    [gone] = [a for a in reg.gone("cb", "disconnected", T0 + 4) if isinstance(a, Notice)]
    assert not gone.expected


def test_a_newly_expected_peer_is_admitted_at_the_commit_and_expected_from_its_first_ping() -> None:
    reg = Registry(settings(unexpected="reject"), [Exp(f"p{i}") for i in range(5)], T0)
    _reload(reg, [*(Exp(f"p{i}") for i in range(5)), Exp("new1"), Exp("new2")], T0 + 1, unexpected="reject")
    assert "new2" not in reg.peers
    assert not closes(reg.hello("c", "new2", None, "x:1"))
    acts = reg.connected("c", "new2", None, "x:1", 10.0, T0 + 2)
    assert not closes(acts) and [(n.peer, n.event, n.expected) for n in acts if isinstance(n, Notice)] == [
        ("new2", "up", True)
    ]
    reg.apply_some(None)
    assert state(reg, "new2") == "UP" and reg.peers["new2"].expected and state(reg, "new1") == "NEW"


def test_a_removed_never_seen_peer_whose_grace_ends_mid_reload_is_forgotten_not_down() -> None:
    reg = Registry(settings(), [Exp(f"p{i}") for i in range(5)], T0)
    _reload(reg, [], T0 + 1)
    reg.apply_some(1)
    assert notices(tick_until(reg, T0 + 11)) == []  # their graces ended: the reload's change came first
    assert reg.peers == {} and reg.applying() == 0


def test_max_peers_counts_the_peers_a_reload_has_yet_to_add() -> None:
    reg = Registry(settings(max_peers=4), [Exp("a")], T0)
    _reload(reg, [Exp("a"), Exp("b"), Exp("c")], T0 + 1, max_peers=4)
    assert not closes(reg.connected("c1", "x", None, "x:1", 10.0, T0 + 1))  # 1 + 2 to add + x = 4
    assert closes(reg.connected("c2", "y", None, "x:2", 10.0, T0 + 1))  # the fifth, once all are added
    reg.apply_some(None)
    assert set(reg.peers) == {"a", "b", "c", "x"}
