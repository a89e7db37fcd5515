"""Status filters (hbd.status_filter, hbd.status_select): what a filter keeps, its bounds, and the
scan that applies it a slice of peers per loop turn, making rows only for the peers it keeps."""

import json

import pytest

from hbd.status_filter import MAX_GLOB, MAX_LIMIT, FilterError, StatusFilter, parse_states, sort_key
from hbd.status_select import SCAN, Tally, scan
from hbd.view import PeerRow, PeerSource


def test_states_glob_and_address_matching() -> None:
    f = StatusFilter(frozenset({"DOWN", "LATE"}), "web*")
    assert f.keep("web1", "10.0.0.1:5", "DOWN") and f.keep("web22", "x", "LATE")
    assert not f.keep("web1", "10.0.0.1:5", "UP")  # wrong state
    assert not f.keep("db1", "10.0.0.1:5", "DOWN")  # wrong name
    by_address = StatusFilter(peer="10.0.0.*")
    assert by_address.keep("db1", "10.0.0.7:4000", "UP") and not by_address.keep("db1", "10.1.0.7:4000", "UP")
    exact = StatusFilter(peer="web1")
    assert exact.keep("web1", "a", "UP") and not exact.keep("web10", "a", "UP")  # no glob: the name itself
    assert StatusFilter(peer="w?b[12]").keep("web2", "a", "NEW")
    assert StatusFilter().everything and not StatusFilter(limit=1).everything


def test_the_table_order_puts_problems_first() -> None:
    keys = sorted(
        [sort_key("b", "1", "UP"), sort_key(None, "9", "DOWN"), sort_key("a", "2", "DOWN"), sort_key("z", "3", "LATE")]
    )
    assert keys == [(0, "a", "2"), (0, "~", "9"), (1, "z", "3"), (3, "b", "1")]


def test_a_request_is_bounded_and_unknown_fields_are_refused() -> None:
    f = StatusFilter.from_request({"request": "select", "state": ["down", "Late"], "peer": "web*", "limit": 5})
    assert f == StatusFilter(frozenset({"DOWN", "LATE"}), "web*", 5)
    assert StatusFilter.from_request(f.to_request()) == f
    bad = [
        ({"label": "x"}, "unknown field 'label'"),  # a newer CLI's filter: refused, not ignored
        ({"state": ["GONE"]}, "state: expected some of"),
        ({"state": []}, "state: expected some of"),
        ({"state": ["UP"] * 5}, "state: a list of at most 4"),
        ({"state": "UP"}, "state: a list"),
        ({"peer": "x" * (MAX_GLOB + 1)}, "peer: a name or glob of 1 to"),
        ({"peer": ""}, "peer: a name or glob of 1 to"),
        ({"peer": 5}, "peer: expected a string"),
        ({"limit": MAX_LIMIT + 1}, "limit: a whole number"),
        ({"limit": -1}, "limit: a whole number"),
        ({"limit": True}, "limit: a whole number"),
        ({"limit": 1.5}, "limit: a whole number"),
    ]
    for fields, message in bad:
        with pytest.raises(FilterError, match=message):
            StatusFilter.from_request(fields)
    assert parse_states("down, late") == {"DOWN", "LATE"}
    with pytest.raises(FilterError):
        parse_states("down,sideways")


def test_a_pathological_glob_costs_microseconds() -> None:
    """fnmatch's translation does not backtrack catastrophically on many stars against a long name."""
    import time

    f = StatusFilter(peer="*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b")
    start = time.perf_counter()
    for _ in range(100):
        assert not f.keep("a" * 64, "a" * 40, "UP")
    assert time.perf_counter() - start < 1.0


# -- the scan ---------------------------------------------------------------------------------------------
def _source(peers: list[tuple[str | None, str, str]], made: list[int]) -> PeerSource:
    def row(i: int) -> PeerRow:
        made.append(i)
        name, address, state = peers[i]
        return PeerRow(name or address, name, address, state, None, None, 0, 1.0, None)

    return PeerSource(len(peers), lambda i: peers[i], row)


def _run(sources: list[PeerSource], flt: StatusFilter) -> tuple[list[PeerRow], int, Tally]:
    tally = Tally()
    rows: list[PeerRow] = []
    turns = 0
    for batch in scan(sources, flt, tally):
        if batch is None:
            turns += 1
        else:
            rows += batch
    return rows, turns, tally


def test_the_scan_makes_rows_only_for_kept_peers_and_lets_the_loop_turn() -> None:
    n = 5 * SCAN + 3
    peers = [(f"p{i:05d}", f"10.0.{i // 250}.{i % 250}:1", "DOWN" if i % 1000 == 7 else "UP") for i in range(n)]
    made: list[int] = []
    rows, turns, tally = _run([_source(peers, made)], StatusFilter(frozenset({"DOWN"})))
    assert [r.name for r in rows] == [f"p{i:05d}" for i in range(n) if i % 1000 == 7]
    assert len(made) == len(rows)  # no row for a peer the filter drops
    assert turns == n // SCAN  # a loop turn after each SCAN peers looked at
    assert tally.matched == len(rows) and tally.states == {"DOWN": len(rows), "UP": n - len(rows)}


def test_a_limit_keeps_the_first_in_the_table_order_across_sources_with_bounded_rows() -> None:
    a = [(f"web{i:05d}", f"a{i}", "UP") for i in range(3 * SCAN)]
    b = [(None, "10.0.0.9:5", "DOWN"), ("web99999", "b", "LATE"), ("db1", "c", "DOWN"), (None, "gone", "UP")]
    made: list[int] = []
    sources = [_source(a, made), _source(b, made)]
    sources[1] = PeerSource(4, sources[1].who, lambda i: None if i == 3 else sources_row(b, i, made))
    rows, _, tally = _run(sources, StatusFilter(limit=4))
    assert [(r.peer, r.state) for r in rows] == [
        ("db1", "DOWN"),
        ("10.0.0.9:5", "DOWN"),  # unnamed sorts after the names of its state
        ("web99999", "LATE"),
        ("web00000", "UP"),
    ]
    assert tally.matched == 3 * SCAN + 4 and len(made) == 4  # rows made for the four shown only
    rows, _, tally = _run([_source(a, [])], StatusFilter(peer="web0001*", limit=3))
    assert [r.peer for r in rows] == ["web00010", "web00011", "web00012"] and tally.matched == 10


def sources_row(peers: list, i: int, made: list[int]) -> PeerRow:
    made.append(i)
    name, address, state = peers[i]
    return PeerRow(name or address, name, address, state, None, None, 0, 1.0, None)


def test_the_filter_echo_is_json() -> None:
    f = StatusFilter(frozenset({"LATE", "DOWN"}), "web*", 10)
    assert json.loads(json.dumps(f.to_json())) == {"state": ["LATE", "DOWN"], "peer": "web*", "limit": 10}
