"""The uptime arithmetic of ``hbd history`` (hbd/history.py), in made-up wall-clock times."""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hbd.history import (
    ASCII,
    DAY,
    DOWN,
    LATE,
    NOT_SEEN,
    UNKNOWN,
    UP,
    Span,
    cells,
    clean_runs,
    current,
    draw,
    labels,
    last_seen,
    outages,
    spans,
    summarize,
    timeline,
)

H = 3600.0
NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC; a multiple of 1800


@dataclass(frozen=True)
class C:
    time: float
    old: str | None
    new: str
    reason: str = ""
    peer: str = "web1"


@pytest.fixture
def tz() -> Iterator[None]:
    """Europe/Berlin for the labels (restored after the test)."""
    old = time.tzname
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    mp.undo()
    time.tzset()
    assert time.tzname == old


def states(history: list[Span]) -> list[tuple[float, float, str]]:
    return [(s.start, s.end, s.state) for s in history]


def test_late_counts_as_up() -> None:
    h = spans([C(0, None, "UP"), C(100, "UP", "LATE"), C(150, "LATE", "UP")], [(0, 200)], 200)
    assert states(h) == [(0, 100, UP), (100, 150, LATE), (150, 200, UP)]
    s = summarize(h, 0, 200)
    assert (s.up, s.late, s.down, s.unknown, s.uptime, s.outages) == (200, 50, 0, 0, 100.0, 0)
    assert last_seen(h) == 200 and current(h) == UP


def test_a_server_gap_is_unknown_and_out_of_the_uptime() -> None:
    """UP before the server stopped; back 1000 s later, the peer reconnects 10 s after the restart:
    the gap and the 10 s the restarted registry held it as NEW are unknown, the rest is up."""
    changes = [C(0, None, "UP"), C(2010, "NEW", "UP")]
    h = spans(changes, [(0, 1000), (2000, 3000)], 3000)
    assert states(h) == [(0, 1000, UP), (1000, 2010, UNKNOWN), (2010, 3000, UP)]
    s = summarize(h, 0, 3000)
    assert (s.up, s.down, s.unknown, s.uptime) == (1990, 0, 1010, 100.0)


def test_a_peer_that_does_not_come_back_after_a_restart() -> None:
    changes = [C(0, None, "UP"), C(2030, "NEW", "DOWN", "never connected")]
    h = spans(changes, [(0, 1000), (2000, 4000)], 4000)
    assert states(h) == [(0, 1000, UP), (1000, 2030, UNKNOWN), (2030, 4000, DOWN)]
    s = summarize(h, 0, 4000)
    assert (s.up, s.down, s.unknown, s.outages, s.longest, s.open_since) == (1000, 1970, 1030, 1, 1970, 2030)
    assert s.uptime == pytest.approx(100 * 1000 / 2970)
    assert last_seen(h) == 1000  # when the server stopped watching it up


def test_an_outage_cut_by_a_server_gap_ends_at_the_gap() -> None:
    """DOWN when the server stopped; restored as DOWN after the restart, UP later: two outages (what
    happened in between is unknown)."""
    changes = [C(0, None, "UP"), C(500, "UP", "DOWN", "timeout"), C(2100, "DOWN", "UP")]
    h = spans(changes, [(0, 1000), (2000, 3000)], 3000)
    assert states(h) == [(0, 500, UP), (500, 1000, DOWN), (1000, 2000, UNKNOWN), (2000, 2100, DOWN), (2100, 3000, UP)]
    s = summarize(h, 0, 3000)
    assert (s.outages, s.down, s.longest, s.open_since) == (2, 600, 500, None)
    assert [(o.start, o.end) for o in outages(h, 0, 3000)] == [(500, 1000), (2000, 2100)]


def test_a_restart_without_a_change_carries_the_state_on() -> None:
    h = spans([C(0, None, "DOWN")], [(0, 100), (200, 300)], 300)
    assert states(h) == [(0, 100, DOWN), (100, 200, UNKNOWN), (200, 300, DOWN)]


def test_a_peer_first_seen_mid_window() -> None:
    """Time before the first change counts nowhere: not as down, not as unknown."""
    h = spans([C(NOW - H, None, "UP"), C(NOW - 0.5 * H, "UP", "DOWN")], [(NOW - 40 * DAY, NOW)], NOW)
    for window in (DAY, 7 * DAY, 30 * DAY):
        s = summarize(h, NOW - window, NOW)
        assert (s.up, s.down, s.unknown, s.uptime) == (0.5 * H, 0.5 * H, 0, 50.0)
    cells_ = timeline(h, NOW)
    assert cells_ == [NOT_SEEN] * 46 + [UP, DOWN]


def test_an_open_outage_counts_up_to_now() -> None:
    h = spans([C(NOW - 2 * DAY, None, "UP"), C(NOW - 600, "UP", "DOWN", "timeout")], [(NOW - 3 * DAY, NOW)], NOW)
    s = summarize(h, NOW - DAY, NOW)
    assert (s.outages, s.down, s.longest, s.open_since) == (1, 600, 600, NOW - 600)
    assert s.uptime == pytest.approx(100 * (DAY - 600) / DAY)
    assert current(h) == DOWN and last_seen(h) == NOW - 600


def test_an_outage_that_began_before_the_window_is_clipped_to_it() -> None:
    h = spans([C(NOW - 3 * DAY, None, "DOWN"), C(NOW - 12 * H, "DOWN", "UP")], [(NOW - 4 * DAY, NOW)], NOW)
    day = summarize(h, NOW - DAY, NOW)
    week = summarize(h, NOW - 7 * DAY, NOW)
    assert (day.outages, day.down, day.longest) == (1, 12 * H, 12 * H)
    assert (week.outages, week.down, week.longest) == (1, 60 * H, 60 * H)


def test_new_and_unknown_states_are_unknown() -> None:
    """An expected peer is NEW until its grace runs out: not up, not down."""
    h = spans([C(0, None, "NEW"), C(30, "NEW", "DOWN", "never connected")], [(0, 100)], 100)
    assert states(h) == [(0, 30, UNKNOWN), (30, 100, DOWN)]
    h = spans([C(0, None, "UP"), C(10, "UP", "SOMETHING")], [(0, 20)], 20)
    assert states(h) == [(0, 10, UP), (10, 20, UNKNOWN)]


def test_a_down_with_a_new_reason_is_still_one_outage() -> None:
    changes = [C(0, None, "UP"), C(10, "UP", "DOWN", "timeout"), C(20, "DOWN", "DOWN", "refused"), C(30, "DOWN", "UP")]
    s = summarize(spans(changes, [(0, 40)], 40), 0, 40)
    assert (s.outages, s.down, s.longest) == (1, 20, 20)


def test_empty_history() -> None:
    h = spans([], [(0, NOW)], NOW)
    assert h == [] and last_seen(h) is None and current(h) == UNKNOWN
    s = summarize(h, NOW - DAY, NOW)
    assert (s.uptime, s.outages, s.down, s.unknown, s.open_since) == (None, 0, 0, 0, None)
    assert timeline(h, NOW) == [NOT_SEEN] * 48 and draw(timeline(h, NOW)) == " " * 48


def test_no_runs_at_all_means_nothing_is_known() -> None:
    s = summarize(spans([C(0, None, "UP")], [], 100), 0, 100)
    assert (s.unknown, s.uptime) == (100, None)


def test_changes_after_now_are_left_out() -> None:
    """A wall clock stepped back: what is 'in the future' does not stretch anything."""
    assert states(spans([C(0, None, "UP"), C(500, "UP", "DOWN")], [(0, 500)], 100)) == [(0, 100, UP)]
    assert spans([C(500, None, "UP")], [(0, 500)], 100) == []


def test_clean_runs() -> None:
    """Sorted, clipped to now, an overlapped run cut at the next start, alive < started fixed."""
    assert clean_runs([(50, 60), (0, 80), (70, 200), (300, 400), (90, 85)], 150) == [
        (0, 50),
        (50, 60),
        (70, 90),
        (90, 90),  # alive before it started: it never was
    ]


def test_cells_are_aligned_and_the_last_one_holds_now() -> None:
    c = cells(NOW + 100)
    assert len(c) == 48 and c[-1] == (NOW, NOW + 100)
    assert c[0] == (NOW + 1800 - DAY, NOW + 3600 - DAY)
    assert all(a % 1800 == 0 for a, _ in c)
    assert cells(NOW)[-1] == (NOW - 1800, NOW)


def test_each_cell_shows_its_worst_state() -> None:
    start = NOW - DAY
    changes = [
        C(start, None, "UP"),
        C(start + 1800 + 60, "UP", "LATE"),  # cell 1: UP and LATE -> LATE
        C(start + 1800 + 70, "LATE", "UP"),
        C(start + 3600 + 60, "UP", "DOWN"),  # cell 2: a short DOWN -> DOWN
        C(start + 3600 + 70, "DOWN", "UP"),
    ]
    runs = [(start, start + 3 * 1800 + 60), (start + 3 * 1800 + 120, NOW)]  # cell 3: a restart -> unknown
    got = timeline(spans(changes, runs, NOW), NOW)
    assert got[:5] == [UP, LATE, DOWN, UNKNOWN, UP]
    assert draw(got[:5]) == "\u2588\u2586\u2581\u2591\u2588" and draw(got[:5], ASCII) == "#+_?#"


def test_a_timeline_across_midnight(tz: None) -> None:
    """01:10 local time (Berlin, winter: UTC+1): the timeline runs from 01:30 yesterday; the peer was
    down from 23:40 to 00:20, which shows in the 23:30 and 00:00 cells, under the 00:00 label."""
    now = calendar.timegm((2026, 11, 26, 0, 10, 0)) + 0.0  # 01:10 local
    midnight = now - 70 * 60
    changes = [C(now - 2 * DAY, None, "UP"), C(midnight - 20 * 60, "UP", "DOWN"), C(midnight + 20 * 60, "DOWN", "UP")]
    got = timeline(spans(changes, [(now - 3 * DAY, now)], now), now)
    first = cells(now)[0][0]
    assert time.strftime("%H:%M", time.localtime(first)) == "01:30"
    at = int((midnight - first) // 1800)  # the 00:00 cell
    assert got[at - 1 : at + 1] == [DOWN, DOWN] and got.count(DOWN) == 2
    line = labels(now)
    assert line.index("00:00") == at
    assert line.index("06:00") == at - 36 and line.index("18:00") == at - 12  # yesterday's, to the left
    assert line.index("12:00") == at - 24


def test_the_cells_do_not_care_about_dst(tz: None) -> None:
    """Berlin springs forward on 2026-03-29 at 02:00: 00:00 and 06:00 local are five real hours
    (ten cells) apart; the timeline stays 48 half-hours of real time."""
    now = calendar.timegm((2026, 3, 29, 10, 0, 0)) + 0.0  # 12:00 local (CEST)
    c = cells(now)
    assert len(c) == 48 and c[-1][1] - c[0][0] == DAY
    line = labels(now)
    assert line == "  12:00       18:00       00:00     06:00"
    assert line.index("06:00") - line.index("00:00") == 10


@given(
    steps=st.lists(
        st.tuples(st.floats(0, 5000), st.sampled_from(["NEW", "UP", "LATE", "DOWN"])), min_size=0, max_size=12
    ),
    gaps=st.lists(st.tuples(st.floats(0, 20000), st.floats(0, 5000)), max_size=4),
    window=st.floats(1, 30000),
)
def test_the_numbers_add_up(steps: list[tuple[float, str]], gaps: list[tuple[float, float]], window: float) -> None:
    """Whatever the history: spans are contiguous from the first change to now, and a window's up,
    down and unknown time add up to the part of it after the first change."""
    now = 20000.0
    changes = [C(t, None, s) for t, s in sorted(steps)]
    runs = [(a, a + d) for a, d in gaps]
    h = spans(changes, runs, now)
    if not changes:
        assert h == []
        return
    assert h[0].start == changes[0].time and h[-1].end == now
    assert all(a.end == b.start and a.state != b.state for a, b in pairwise(h))
    s = summarize(h, now - window, now)
    seen = now - max(now - window, changes[0].time)
    assert s.up + s.down + s.unknown == pytest.approx(max(seen, 0.0), abs=1e-6)
    assert s.uptime is None or 0 <= s.uptime <= 100
    assert s.outages == len(outages(h, now - window, now))
    assert len(timeline(h, now)) == 48


def _state_at(t: float, changes: list[C], runs: list[tuple[float, float]], now: float) -> str:
    """The rules of hbd/history.py's docstring, written out naively for one moment."""
    clean = clean_runs(runs, now)
    run = next((i for i, (a, b) in enumerate(clean) if a <= t < b), None)
    if run is None:
        return UNKNOWN
    started = clean[run][0]
    next_start = clean[run + 1][0] if run + 1 < len(clean) else float("inf")
    before = [c for c in changes if c.time <= t]
    in_run = [c for c in before if c.time >= started]
    if in_run:
        state = in_run[-1].new
    else:
        later = [c for c in changes if started <= c.time < next_start]
        restarted = started > changes[0].time and later and later[0].old is not None
        state = later[0].old if restarted else before[-1].new
    return state if state in (UP, LATE, DOWN) else UNKNOWN


@given(
    steps=st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["NEW", "UP", "LATE", "DOWN"])), max_size=10),
    gaps=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=4),
    olds=st.lists(st.sampled_from([None, "NEW", "UP", "DOWN"]), min_size=10, max_size=10),
)
def test_each_moment_is_in_the_state_the_rules_say(
    steps: list[tuple[int, str]], gaps: list[tuple[int, int]], olds: list[str | None]
) -> None:
    """Against a naive reading of the rules at every half second (times on a grid of whole seconds)."""
    now = 100.0
    changes = [C(float(t), old, new) for (t, new), old in zip(sorted(steps), olds, strict=False)]
    runs = [(float(a), float(a + d)) for a, d in gaps]
    h = spans(changes, runs, now)
    for span in h:
        t = span.start
        while t < span.end:
            if t >= changes[0].time:
                assert span.state == _state_at(t, changes, runs, now), (t, h)
            t += 0.5
