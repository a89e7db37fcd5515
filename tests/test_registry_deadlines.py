"""hbd.registry_deadlines on its own: one live entry per peer, stale ones skipped, a bounded heap."""

from __future__ import annotations

from hbd.registry_deadlines import Deadlines
from hbd.registry_types import Peer, PeerStatus


def peers(n: int) -> dict[str, Peer]:
    return {f"p{i}": Peer(f"p{i}", "", PeerStatus.NEW, 0.0, 10.0, True) for i in range(n)}


def pop_all(dl: Deadlines, now: float) -> list[str]:
    out = []
    while (peer := dl.pop(now)) is not None:
        out.append(peer.name)
    return out


def test_peers_come_due_in_order_each_once() -> None:
    table = peers(3)
    dl = Deadlines(table)
    for due, peer in zip((30.0, 10.0, 20.0), table.values(), strict=True):
        dl.file(peer, due)
    assert dl.next_due() == 10.0
    assert pop_all(dl, 25.0) == ["p1", "p2"]
    assert table["p1"].filed == float("inf")  # no longer filed: the caller files it again
    assert dl.next_due() == 30.0
    assert dl.pop(25.0) is None


def test_filing_sooner_leaves_a_stale_entry_and_later_is_ignored() -> None:
    table = peers(1)
    dl, p = Deadlines(table), table["p0"]
    dl.file(p, 50.0)
    dl.file(p, 80.0)  # later: found when the 50 entry comes
    dl.file(p, 20.0)  # sooner: the 50 entry is stale
    assert [e[0] for e in sorted(dl.heap)] == [20.0, 50.0]
    assert pop_all(dl, 100.0) == ["p0"]  # once


def test_a_forgotten_peer_is_never_due() -> None:
    table = peers(2)
    dl = Deadlines(table)
    dl.file(table["p0"], 5.0)
    dl.file(table["p1"], 6.0)
    del table["p0"]
    assert pop_all(dl, 10.0) == ["p1"]


def test_the_heap_is_compacted_when_stale_entries_pile_up() -> None:
    table = peers(10)
    dl = Deadlines(table)
    due = 1e9
    for _ in range(1000):  # each peer filed sooner and sooner: every older entry goes stale
        for p in table.values():
            dl.file(p, due)
        due -= 1.0
    assert len(dl.heap) <= 2 * len(table) + 65
    assert len(pop_all(dl, 2e9)) == 10
