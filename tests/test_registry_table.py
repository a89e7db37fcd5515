"""hbd.registry_table on its own: peers by name and connection, counts by state, what to write."""

from __future__ import annotations

from hbd.registry_table import PeerTable
from hbd.registry_types import PeerStatus


def test_counts_follow_add_move_forget() -> None:
    table = PeerTable()
    a = table.add("a", "x:1", 5.0, 10.0, True)
    b = table.add("b", "x:2", 5.0, 10.0, False)
    assert (a.status, a.since, a.timeout, b.named) == (PeerStatus.NEW, 5.0, 10.0, False)
    assert table.by_state() == {"NEW": 2, "UP": 0, "LATE": 0, "DOWN": 0} and len(table) == 2
    table.move(a, PeerStatus.UP)
    table.move(b, PeerStatus.DOWN)
    assert a.status is PeerStatus.UP and table.by_state() == {"NEW": 0, "UP": 1, "LATE": 0, "DOWN": 1}
    a.key, a.filed = "conn", 50.0
    table.by_key["conn"] = a
    assert table.forget(a)
    assert table.peers == {"b": b} and table.by_key == {} and table.counts[PeerStatus.UP] == 0
    assert a.filed == float("inf")  # its deadline entry is stale now


def test_forgetting_marks_a_named_peer_for_deletion_and_drops_its_pending_write() -> None:
    table = PeerTable()
    named, legacy = table.add("web1", "a:1", 0.0, 10.0, True), table.add("a:2", "a:2", 0.0, 10.0, False)
    table.dirty.update({"web1": None, "a:2": None, "web2": None})
    assert table.forget(named) and table.forget(legacy)
    assert list(table.dirty) == ["web2"] and table.forgotten == {"web1"}  # a legacy address was never written


def test_forget_ignores_a_peer_the_table_does_not_hold() -> None:
    table = PeerTable()
    old = table.add("a", "x:1", 0.0, 10.0, True)
    assert table.forget(old)
    new = table.add("a", "x:2", 1.0, 10.0, True)
    assert not table.forget(old)  # an old object of the same name: the new one stays
    assert table.peers == {"a": new} and table.counts[PeerStatus.NEW] == 1


def test_a_forgotten_peers_account_comes_back_with_its_name() -> None:
    """A peer's account (hbd.peer_uptime) is kept in its Peer: forgetting it keeps the account by name
    (its outages are Prometheus counters: they count on if it comes back), and a new peer of that
    name has it again."""
    t = PeerTable()
    peer = t.add("web1", "10.0.0.1:1", 0.0, 10.0, True)
    peer.account = (1.0, "UP")
    assert t.forget(peer) and t.orphaned == {"web1": (1.0, "UP")}
    again = t.add("web1", "10.0.0.1:2", 5.0, 10.0, True)
    assert again.account == (1.0, "UP") and not t.orphaned
    assert t.add("web2", "10.0.0.2:1", 5.0, 10.0, True).account is None
