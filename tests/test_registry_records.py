"""hbd.registry_records on its own: what the state store must write, and restoring after a restart."""

from __future__ import annotations

from hbd.registry_records import Records
from hbd.registry_silences import Silences
from hbd.registry_table import PeerTable
from hbd.registry_types import Live, Peer, PeerStatus, RegistrySettings
from hbd.store_records import PeerRecord, SilenceRecord

T0 = 1000.0
WALL = 1_700_000_000.0


def records() -> tuple[Records, PeerTable, Silences]:
    table, silences = PeerTable(), Silences()
    return Records(table, silences), table, silences


def test_take_dirty_writes_named_and_expected_peers_in_wall_clock_once() -> None:
    rec, table, silences = records()
    web = table.add("web1", "a:1", T0, 6.0, True)
    web.last_ping = T0 - 2
    legacy = table.add("10.0.0.5:4000", "10.0.0.5:4000", T0, 6.0, False)
    table.dirty.update(dict.fromkeys((web.name, legacy.name, "gone-already")))
    silences.add("web1", WALL + 60, "fix", T0, WALL)
    dirty = rec.take_dirty(T0 + 10, WALL + 10)
    assert dirty.peers == [PeerRecord("web1", "a:1", "NEW", WALL, WALL - 2, "", False, 6.0, ())]
    assert dirty.silences == [SilenceRecord("web1", WALL + 60, "fix", WALL)] and dirty.unsilenced == []
    assert rec.take_dirty(T0 + 10, WALL + 10) == ([], [], [], [])


def test_take_dirty_takes_at_most_limit_oldest_first() -> None:
    rec, table, _ = records()
    for i in range(5):
        table.add(f"p{i}", "a:1", T0, 6.0, True)
    table.dirty.update(dict.fromkeys(f"p{i}" for i in (3, 1, 4, 0, 2)))
    assert [r.name for r in rec.take_dirty(T0, WALL, limit=2).peers] == ["p3", "p1"]
    assert list(table.dirty) == ["p4", "p0", "p2"]


def test_a_connected_peer_writes_its_connection_s_last_ping() -> None:
    rec, table, _ = records()
    web = table.add("web1", "a:1", T0, 6.0, True)
    web.key = "conn"
    table.by_key["conn"] = web
    rec.mark_connected_dirty()
    [r] = rec.take_dirty(T0, WALL, lambda key: Live(T0, T0 - 1, 5, 6.0, 2.0) if key == "conn" else None).peers
    assert r.last_ping == WALL - 1


def test_forgotten_peers_are_deleted_unless_never_written() -> None:
    rec, table, _ = records()
    named = table.add("web1", "a:1", T0, 6.0, True)
    legacy = table.add("a:2", "a:2", T0, 6.0, False)
    table.dirty.update(dict.fromkeys(("web1", "a:2")))
    table.forget(named)
    table.forget(legacy)
    dirty = rec.take_dirty(T0, WALL)
    assert dirty.peers == [] and dirty.forgotten == ["web1"]
    assert rec.take_dirty(T0, WALL).forgotten == []


def test_restore_brings_back_remembered_peers_within_max_peers() -> None:
    rec, table, _ = records()
    scheduled: list[Peer] = []
    connected = table.add("web3", "b:1", T0, 6.0, True)
    connected.key = "conn"
    recs = [
        PeerRecord("web1", "a:1", "UP", WALL - 50, WALL - 1, "ping", False, 6.0, ()),
        PeerRecord("web2", "a:2", "DOWN", WALL - 50, WALL - 40, "timeout", False, 6.0, ()),
        PeerRecord("web3", "a:3", "DOWN", WALL - 50, None, "timeout", False, 6.0, ()),  # connected again
        PeerRecord("db1", "", "NEW", WALL - 50, None, "not seen yet", True, 6.0, ()),  # no longer listed
        PeerRecord("bad name", "", "DOWN", WALL, None, "", False, 5.0, ()),
        PeerRecord("web4", "a:4", "DOWN", WALL, None, "", False, 5.0, ()),  # beyond max_peers
    ]
    rec.restore(recs, T0, WALL, RegistrySettings(max_peers=3), scheduled.append)
    assert set(table.peers) == {"web1", "web2", "web3"} and [p.name for p in scheduled] == ["web1", "web2"]
    web1, web2 = table.peers["web1"], table.peers["web2"]
    assert (web1.status, web1.last_ping, web1.reason, web1.grace) == (
        PeerStatus.NEW,
        T0 - 1,
        "waiting for it after a restart",
        T0 + 6.0,
    )
    assert (web2.status, web2.since, web2.reason, web2.grace) == (PeerStatus.DOWN, T0 - 50, "timeout", float("inf"))
    assert table.peers["web3"].address == "b:1" and table.by_state() == {"NEW": 2, "UP": 0, "LATE": 0, "DOWN": 1}


def test_restore_refuses_new_names_under_unexpected_reject() -> None:
    rec, table, _ = records()
    recs = [PeerRecord("web1", "a:1", "DOWN", WALL - 50, None, "timeout", False, 6.0, ())]
    rec.restore(recs, T0, WALL, RegistrySettings(unexpected="reject"), lambda p: None)
    assert table.peers == {}
