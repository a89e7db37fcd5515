"""hbd.registry_states on its own, wired to the real pieces: reports in, actions and state out."""

from __future__ import annotations

import logging

from hbd.registry_deadlines import Deadlines
from hbd.registry_identity import Admission
from hbd.registry_states import PeerStates
from hbd.registry_table import PeerTable
from hbd.registry_types import Close, Log, Notice, PeerStatus, RegistrySettings, Watch

T0 = 1000.0


def states(silenced: frozenset[str] = frozenset(), **kw: object) -> PeerStates:
    settings = RegistrySettings(**kw)  # type: ignore[arg-type]
    table = PeerTable()
    return PeerStates(settings, table, Admission(table.peers, settings), silenced, Deadlines(table.peers))


def events(actions: list) -> list[str]:
    return [a.event for a in actions if isinstance(a, Notice)]


def test_a_connection_lifecycle_moves_counts_and_marks_the_store() -> None:
    st = states()
    assert events(st.connected("c1", "web1", None, "a:1", 10.0, T0)) == ["up"]
    assert st.table.by_key["c1"].name == "web1" and list(st.table.dirty) == ["web1"]
    assert events(st.late("c1", T0 + 6)) == ["late"]
    assert events(st.back("c1", T0 + 7)) == ["up"]
    [n] = st.gone("c1", "timeout", T0 + 20, last_ping=T0 + 7)
    assert isinstance(n, Notice) and (n.event, n.level, n.hook, n.since) == ("down", logging.WARNING, True, T0 + 20)
    peer = st.table.peers["web1"]
    assert peer.key is None and st.table.by_key == {} and peer.last_ping == T0 + 7
    assert st.table.by_state() == {"NEW": 0, "UP": 0, "LATE": 0, "DOWN": 1}
    assert st.gone("c1", "again", T0 + 21) == []  # reported once


def test_a_takeover_unbinds_the_older_connection() -> None:
    st = states()
    st.connected("old", "web1", None, "a:1", 10.0, T0)
    acts = st.connected("new", "web1", None, "a:2", 10.0, T0 + 1)
    assert [(a.key, a.reason) for a in acts if isinstance(a, Close)] == [
        ("old", "web1: replaced by a newer connection from a:2 (this one is from a:1)")
    ]
    assert set(st.table.by_key) == {"new"}
    assert st.gone("old", "disconnected", T0 + 1) == []


def test_a_refused_connection_binds_nothing() -> None:
    st = states(unexpected="reject")
    [close] = st.connected("c1", "web1", None, "a:1", 10.0, T0)
    assert isinstance(close, Close) and st.table.peers == {} and st.table.by_key == {}


def test_an_unnamed_legacy_client_is_forgotten_when_gone() -> None:
    st = states()
    st.connected("c1", None, None, "10.0.0.5:4000", 10.0, T0)
    assert st.table.peers["10.0.0.5:4000"].named is False
    assert events(st.gone("c1", "timeout", T0 + 20)) == ["down"]
    assert st.table.peers == {} and st.table.forgotten == set() and not st.table.dirty


def test_a_silenced_peer_is_logged_at_info_without_hooks() -> None:
    st = states(silenced=frozenset({"web1"}))
    st.connected("c1", "web1", None, "a:1", 10.0, T0)
    [n] = st.gone("c1", "timeout", T0 + 20)
    assert isinstance(n, Notice) and (n.silenced, n.level, n.hook) == (True, logging.INFO, False)


def test_rise_watches_the_connection_until_it_is_up() -> None:
    st = states(rise=2)
    st.connected("c1", "web1", None, "a:1", 10.0, T0)
    st.gone("c1", "timeout", T0 + 11)
    assert st.connected("c2", "web1", None, "a:2", 10.0, T0 + 20) == [Watch("c2", True)]
    assert st.rising("c2") and st.table.peers["web1"].status is PeerStatus.DOWN
    acts = st.pinged("c2", 1.0, T0 + 21)
    assert acts[0] == Watch("c2", False) and events(acts) == ["up"] and not st.rising("c2")
    assert st.pinged("c2", 1.0, T0 + 22) == [Watch("c2", False)]  # not rising: stop watching


def test_flapping_quiets_hooks_and_its_deadline_is_the_stable_time() -> None:
    st = states(flap_threshold=2, flap_window=60.0)
    acts: list = []
    for i in range(3):  # up, down, up: 3 changes > 2
        if i % 2 == 0:
            acts += st.connected(f"c{i}", "web1", None, "a:1", 10.0, T0 + i)
        else:
            acts += st.gone(f"c{i - 1}", "disconnected", T0 + i)
    assert events(acts) == ["up", "down", "up", "flapping"]
    assert [a.hook for a in acts if isinstance(a, Notice)] == [True, True, False, True]
    peer = st.table.peers["web1"]
    assert st.due(peer) == T0 + 2 + 60 and st.deadlines.next_due() == T0 + 2 + 60
    out: list = []
    st.due_now(peer, T0 + 62, out)
    assert events(out) == ["stable"] and not peer.flapping and st.due(peer) == float("inf")


def test_a_reconfigure_changes_the_flap_rules() -> None:
    st = states(flap_threshold=100)
    st.configure(RegistrySettings(flap_threshold=1, flap_window=60.0))
    acts = st.connected("c1", "web1", None, "a:1", 10.0, T0) + st.gone("c1", "x", T0 + 1)
    assert events(acts) == ["up", "down", "flapping"]


def test_what_a_deadline_finds() -> None:
    st = states(forget_after=100.0, startup_grace=30.0)
    new = st.table.add("db1", "", T0, 10.0, True)
    new.expected, new.grace = True, T0 + 30
    assert st.due(new) == T0 + 30
    out: list = []
    st.due_now(new, T0 + 30, out)
    assert [(a.event, a.reason) for a in out if isinstance(a, Notice)] == [("down", "never connected")]
    assert st.due(new) == float("inf")  # expected: never forgotten

    st.connected("c1", "web1", None, "a:1", 10.0, T0)
    st.gone("c1", "timeout", T0 + 11)
    web = st.table.peers["web1"]
    assert st.due(web) == T0 + 111
    out = []
    st.due_now(web, T0 + 111, out)
    assert [a.message for a in out if isinstance(a, Log)] == ["forgetting web1: down since long"]
    assert "web1" not in st.table.peers and st.table.forgotten == {"web1"}
