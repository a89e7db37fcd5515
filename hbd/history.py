"""Uptime arithmetic over recorded state changes (issue 13): pure functions, no I/O, no clock.

Inputs are wall-clock epoch seconds: one peer's state changes (any ``Change``: the store's
``ChangeRecord`` is one), the server's run intervals ``(started, last_alive)`` and ``now``. While no
run covers a moment, nobody was watching: the peer's state then is *unknown*.

The rules (docs/operations.md, "hbd history", says the same for operators):

- A peer exists from its first recorded change ("first seen"); time before it counts nowhere.
- Within a run the peer is in the ``new`` state of its latest change. A run that starts after a gap
  (a server restart) does not inherit what the old one knew: until the peer's first change in the new
  run its state is that change's ``old`` (what the restarted registry restored it as, normally NEW);
  with no change at all in the new run, the last recorded state carries on.
- UP and LATE count as up, DOWN as down; NEW (not decided yet), any state this module does not know
  and any time outside a run are unknown. Uptime = up / (up + down): unknown time is left out of it
  and reported apart.
- An outage is a maximal DOWN stretch. It ends at the change that ends it, at a server gap (what
  happened next is unknown; if the peer is DOWN again after the restart, that is a new outage) or,
  still open, at ``now``. The numbers for a window clip outages to the window.
- The timeline cuts the last 24 h into cells aligned on multiples of the cell length since the epoch
  (half-hour cells start at :00 and :30 local time in every zone whose offset is a whole half hour);
  each cell shows the worst state in it: DOWN, then LATE, then unknown, then UP, then "not seen
  yet". Cells are epoch arithmetic only: midnight or a DST change moves the labels (local time),
  never the cells.
"""

from __future__ import annotations

import functools
import math
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

UP, LATE, DOWN, UNKNOWN = "UP", "LATE", "DOWN", "UNKNOWN"
NOT_SEEN = ""  # a timeline cell before the peer's first change
_COUNTED = {UP: UP, LATE: LATE, DOWN: DOWN}  # every other recorded state (NEW, ...) is unknown
_RANK = {NOT_SEEN: 0, UP: 1, UNKNOWN: 2, LATE: 3, DOWN: 4}  # a timeline cell shows its worst

DAY = 86400.0
WINDOWS = {"24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY}
BLOCKS = {NOT_SEEN: " ", UP: "\u2588", LATE: "\u2586", UNKNOWN: "\u2591", DOWN: "\u2581"}  # █ ▆ ░ ▁
ASCII = {NOT_SEEN: " ", UP: "#", LATE: "+", UNKNOWN: "?", DOWN: "_"}  # for terminals without them

Run = tuple[float, float]  # (started, last alive)


class Change(Protocol):
    """One recorded state change (the store's ChangeRecord has these fields)."""

    @property
    def time(self) -> float: ...
    @property
    def peer(self) -> str: ...
    @property
    def old(self) -> str | None: ...
    @property
    def new(self) -> str: ...
    @property
    def reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of one peer's history in one state: UP, LATE, DOWN or UNKNOWN."""

    start: float
    end: float
    state: str


@dataclass(frozen=True, slots=True)
class Summary:
    """One peer over one window [start, end] (seconds; ``up`` includes ``late``)."""

    start: float
    end: float
    up: float
    late: float
    down: float  # the outages' total
    unknown: float  # the server was not running (or the peer was NEW); not in the uptime
    outages: int
    longest: float
    open_since: float | None  # the outage still going on at ``end``, since when

    @property
    def known(self) -> float:
        return self.up + self.down

    @property
    def uptime(self) -> float | None:
        """Percent of the known time that was UP or LATE; None when nothing is known."""
        return min(100.0, 100.0 * (self.up / self.known)) if self.known > 0 else None


def clean_runs(runs: Iterable[Run], now: float) -> list[Run]:
    """Runs sorted, clipped to [started, now] and made disjoint: a run that started before another
    ended cuts that one short (its daemon is gone; it just had not said so yet)."""
    out: list[Run] = []
    for started, alive in sorted(r for r in runs if r[0] <= now):
        if out and out[-1][1] > started:
            out[-1] = (out[-1][0], started)
        out.append((started, min(max(alive, started), now)))
    return out


def spans(changes: Iterable[Change], runs: Iterable[Run], now: float) -> list[Span]:
    """One peer's history as consecutive spans from its first change up to ``now`` (adjacent spans
    in one state merged, so each DOWN span is one outage). Changes after ``now`` are left out."""
    ordered = sorted((c for c in changes if c.time <= now), key=lambda c: c.time)  # stable: ties keep order
    if not ordered:
        return []
    first = ordered[0].time
    runs_ = [r for r in clean_runs(runs, now) if r[1] > first]  # the others end before the peer existed
    change_times = [c.time for c in ordered]
    # The recorded state as breakpoints (time, order, state): each change sets its ``new``; each
    # restart sets the ``old`` of the first change of its run (order 0: before a change at that time).
    points: list[tuple[float, int, str]] = [(c.time, 1, c.new) for c in ordered]
    for i, (started, _) in enumerate(runs_):
        if started <= first:
            continue
        j = bisect_left(change_times, started)  # the first change at or after the start
        next_start = runs_[i + 1][0] if i + 1 < len(runs_) else math.inf
        restored = ordered[j].old if j < len(ordered) and ordered[j].time < next_start else None
        if restored is not None:
            points.append((started, 0, restored))
    points.sort(key=lambda p: (p[0], p[1]))
    bounds = sorted({first, now, *(p[0] for p in points), *(t for r in runs_ for t in r)})
    out: list[Span] = []
    recorded, p, r = "", 0, 0  # the state at a, the next point, the first run not ended by a
    for a, b in pairwise(bounds):
        while p < len(points) and points[p][0] <= a:  # the last of them (ties: a restart, then changes)
            recorded = points[p][2]
            p += 1
        while r < len(runs_) and runs_[r][1] <= a:
            r += 1
        if a < first or b > now:
            continue
        covered = r < len(runs_) and runs_[r][0] <= a  # runs are disjoint and sorted: ends in order too
        state = _COUNTED.get(recorded, UNKNOWN) if covered else UNKNOWN
        if out and out[-1].state == state:
            out[-1] = Span(out[-1].start, b, state)
        else:
            out.append(Span(a, b, state))
    return out


def summarize(history: Sequence[Span], start: float, end: float) -> Summary:
    """The numbers of one peer over the window [start, end]."""
    totals = {UP: 0.0, LATE: 0.0, DOWN: 0.0, UNKNOWN: 0.0}
    outages, longest, open_since = 0, 0.0, None
    for s in reversed(history):  # spans are in time order: stop at the first that ends before the window
        if s.end <= start:
            break
        a = s.start if s.start > start else start
        b = s.end if s.end < end else end
        if b <= a:
            continue
        totals[s.state] += b - a
        if s.state == DOWN:
            outages += 1
            if b - a > longest:
                longest = b - a
    last = history[-1] if history else None
    if last is not None and last.state == DOWN and last.end >= end > last.start:
        open_since = last.start
    return Summary(
        start=start,
        end=end,
        up=totals[UP] + totals[LATE],
        late=totals[LATE],
        down=totals[DOWN],
        unknown=totals[UNKNOWN],
        outages=outages,
        longest=longest,
        open_since=open_since,
    )


def outages(history: Sequence[Span], start: float, end: float) -> list[Span]:
    """The DOWN spans that reach into [start, end], clipped to it."""
    return [
        Span(max(s.start, start), min(s.end, end), DOWN)
        for s in history
        if s.state == DOWN and min(s.end, end) > max(s.start, start)
    ]


def last_seen(history: Sequence[Span]) -> float | None:
    """When the peer was last known UP or LATE (the end of its last such span), or None."""
    return next((s.end for s in reversed(history) if s.state in (UP, LATE)), None)


def current(history: Sequence[Span]) -> str:
    """The state at the end of the history (UNKNOWN for none)."""
    return history[-1].state if history else UNKNOWN


@functools.lru_cache(maxsize=4)  # one grid for every peer of a report
def cells(now: float, count: int = 48, length: float = DAY) -> tuple[tuple[float, float], ...]:
    """The timeline's cells: ``count`` cells of ``length / count`` seconds aligned on multiples of
    that since the epoch, the last one holding ``now`` (and cut at it)."""
    size = length / count
    end = math.ceil(now / size) * size
    return tuple((a, min(a + size, now)) for a in (end - length + i * size for i in range(count)))


def timeline(history: Sequence[Span], now: float, count: int = 48, length: float = DAY) -> list[str]:
    """The worst state in each cell (NOT_SEEN where the peer had no history yet)."""
    grid = cells(now, count, length)
    out = []
    i = bisect_right([s.end for s in history], grid[0][0])  # skip what ended before the first cell
    for a, b in grid:
        while i < len(history) and history[i].end <= a:
            i += 1
        worst = NOT_SEEN
        j = i
        while j < len(history) and history[j].start < b:
            if history[j].end > a and _RANK[history[j].state] > _RANK[worst]:
                worst = history[j].state
            j += 1
        out.append(worst)
    return out


def draw(states: Sequence[str], chars: dict[str, str] = BLOCKS) -> str:
    return "".join(chars[s] for s in states)


def labels(now: float, count: int = 48, length: float = DAY, every_hours: int = 6) -> str:
    """A line under (or over) the timeline with the local time ("HH:MM") written from each cell where
    a new hour divisible by ``every_hours`` begins: local time, so midnight and DST show as they were.
    The last label may run up to four columns past the timeline's end."""
    line = [" "] * (count + 4)
    previous_hour = None
    free = 0  # the first column a label may use (labels keep a space between them)
    for i, (a, _) in enumerate(cells(now, count, length)):
        t = time.localtime(a)
        if t.tm_hour != previous_hour and t.tm_hour % every_hours == 0 and i >= free:
            text = f"{t.tm_hour:02d}:{t.tm_min:02d}"
            line[i : i + len(text)] = text
            free = i + len(text) + 1
        previous_hour = t.tm_hour
    return "".join(line).rstrip()
