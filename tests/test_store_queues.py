"""The state store's queues on their own, without a file: coalescing by name, the bounds and what they
drop (counted), and how a batch is shared out (silences first, then peers and changes half and half)."""

from __future__ import annotations

import ast
from pathlib import Path

from hbd.store_queues import Batch, StoreQueues
from hbd.store_records import ChangeRecord, PeerRecord, SilenceRecord

NOW = 1_790_000_000.0


def peer(name: str, state: str = "UP") -> PeerRecord:
    return PeerRecord(name, "192.0.2.7:40000", state, NOW, None, "", False, 10.0)


def silence(name: str, until: float = NOW + 60) -> SilenceRecord:
    return SilenceRecord(name, until, "", NOW)


def change(i: int) -> ChangeRecord:
    return ChangeRecord(NOW + i, "web1", "UP", "DOWN", f"change {i}")


def test_the_newest_record_of_a_name_replaces_the_queued_one_in_its_place() -> None:
    q = StoreQueues(max_changes=10)
    for name, state in (("a", "UP"), ("b", "UP"), ("a", "DOWN")):
        assert q.put_peer(name, peer(name, state), max_names=10)
    assert q.put_peer("b", None, max_names=10)  # forget b: a delete replaces the put
    assert q.pending() == 2
    batch = q.take_batch(10)
    assert batch.peers == [("a", peer("a", "DOWN")), ("b", None)]
    assert q.pending() == 0 and q.take_batch(10) == Batch([], [], [])


def test_new_names_beyond_the_bound_are_dropped_and_counted_known_names_still_update() -> None:
    q = StoreQueues(max_changes=10)
    results = [q.put_peer(f"web{i}", peer(f"web{i}"), max_names=3) for i in range(5)]
    assert results == [True, True, True, False, False] and q.dropped_names == 2
    assert q.put_peer("web1", peer("web1", "DOWN"), max_names=3)  # already queued: not a new name
    assert not q.put_silence("s1", silence("s1"), max_names=0)  # silences count into the same counter
    assert q.dropped_names == 3 and q.pending() == 3
    assert dict(q.take_batch(10).peers)["web1"] == peer("web1", "DOWN")


def test_a_full_change_queue_drops_the_oldest_and_counts_it() -> None:
    q = StoreQueues(max_changes=4)
    assert q.max_changes == 4
    results = [q.add_change(change(i)) for i in range(7)]
    assert results == [True] * 4 + [False] * 3 and q.dropped_changes == 3
    assert q.take_batch(100).changes == [change(i) for i in range(3, 7)]  # the newest, in order


def test_a_batch_takes_silences_first_then_shares_the_rest_between_peers_and_changes() -> None:
    q = StoreQueues(max_changes=1000)
    for i in range(100):
        q.put_peer(f"web{i}", peer(f"web{i}"), max_names=1000)
        q.add_change(change(i))
    q.put_silence("web1", silence("web1"), max_names=1000)
    q.put_silence("web2", None, max_names=1000)
    batch = q.take_batch(12)
    assert batch.silences == [("web1", silence("web1")), ("web2", None)]
    assert len(batch.peers) == 5 and len(batch.changes) == 5 and len(batch) == 12
    assert [n for n, _ in batch.peers] == [f"web{i}" for i in range(5)]  # oldest first
    assert q.pending() == 190


def test_one_kind_alone_gets_the_whole_batch_and_a_batch_is_never_empty_while_rows_wait() -> None:
    q = StoreQueues(max_changes=1000)
    for i in range(30):
        q.add_change(change(i))
    assert len(q.take_batch(20).changes) == 20
    q.put_peer("web1", peer("web1"), max_names=10)
    batch = q.take_batch(20)  # 10 changes and 1 peer left: the changes take what the peer leaves
    assert len(batch.peers) == 1 and len(batch.changes) == 10
    q.add_change(change(99))
    assert len(q.take_batch(0)) == 1  # max_rows below 1 still makes progress


def test_clear_empties_every_queue_and_keeps_the_counters() -> None:
    q = StoreQueues(max_changes=1)
    q.add_change(change(1))
    q.add_change(change(2))
    q.put_peer("a", peer("a"), max_names=5)
    q.put_silence("a", silence("a"), max_names=5)
    q.clear()
    assert q.pending() == 0 and q.dropped_changes == 1


def test_the_queues_module_does_no_io() -> None:
    """Pure: it imports no file, socket, time or SQLite module, and from hbd only the records."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "hbd" / "store_queues.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules == {"__future__", "collections", "itertools", "dataclasses", "typing", "hbd.store_records"}
