"""What ``hbd history`` prints: per-peer numbers from the stored changes (hbd/history.py does the
arithmetic), as a table or as a JSON document. No I/O here: the reader hands the rows in, the CLI
prints what comes out; ``now`` and the time zone (for the labels) are the caller's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hbd import history as h
from hbd.history import ASCII as ASCII
from hbd.history import BLOCKS as BLOCKS
from hbd.state_store import ChangeRecord
from hbd.status import age

CELLS = 48  # half-hour cells in the 24 h timeline
LEGEND = {h.UP: "up", h.LATE: "late", h.DOWN: "down", h.UNKNOWN: "unknown (server not running, or peer NEW)"}
# A client's store (hbd history -c client.yaml): its peers are its server links.
CLIENT_LEGEND = {**LEGEND, h.UNKNOWN: "unknown (client not running, or link NEW)"}


@dataclass(frozen=True, slots=True)
class PeerHistory:
    peer: str
    state: str  # at now: UP, LATE, DOWN or UNKNOWN
    first_seen: float | None
    last_seen: float | None
    windows: dict[str, h.Summary]  # "24h", "7d", "30d" and "since"
    timeline: list[str]  # CELLS states (h.NOT_SEEN before the first change)
    outages: list[h.Span] = field(default_factory=list)
    changes: list[ChangeRecord] = field(default_factory=list)  # within the --since window (for one peer)


@dataclass(frozen=True, slots=True)
class Report:
    path: str
    now: float
    since: float  # seconds back from now
    runs_recorded: bool
    peers: list[PeerHistory]
    detail: bool = False  # one peer asked for: its outages and changes too
    daemon: str = "server"  # whose store: "client" shows its server links


def build(
    path: str,
    histories: Iterable[tuple[str, list[ChangeRecord]]],
    runs: list[h.Run] | None,
    last_pings: Mapping[str, float | None],
    first_seen: Mapping[str, float],
    now: float,
    since: float,
    detail: bool = False,
    daemon: str = "server",
) -> Report:
    """The numbers of every peer (with ``detail``: its outages and changes too) from what the reader
    gives: each peer's changes (in name order, one peer at a time), the server's runs (None: the
    store records none), the registry's peers with their last ping, each peer's first change."""
    runs_recorded = runs is not None
    if runs is None:  # an older store: take the server as running from the first change on
        runs = [(min(first_seen.values(), default=now), now)]
    runs = h.clean_runs(runs, now)
    peers = {
        name: _peer(name, changes, runs, last_pings.get(name), first_seen, now, since, detail)
        for name, changes in histories
    }
    for name, ping in last_pings.items():  # remembered, but no change recorded (pruned, or none yet)
        if name not in peers:
            peers[name] = _peer(name, [], runs, ping, first_seen, now, since, detail)
    return Report(path, now, since, runs_recorded, [peers[name] for name in sorted(peers)], detail, daemon)


def _peer(
    name: str,
    changes: list[ChangeRecord],
    runs: list[h.Run],
    ping: float | None,
    first_seen: Mapping[str, float],
    now: float,
    since: float,
    detail: bool,
) -> PeerHistory:
    spans = h.spans(changes, runs, now)
    windows = {label: h.summarize(spans, now - seconds, now) for label, seconds in h.WINDOWS.items()}
    windows["since"] = h.summarize(spans, now - since, now)
    state = h.current(spans)
    # Up now: now. Else its last ping as the registry stored it (a DOWN verdict comes a timeout
    # after it), else the end of its last UP or LATE span.
    seen = h.last_seen(spans) if state in (h.UP, h.LATE) or ping is None else ping
    return PeerHistory(
        peer=name,
        state=state,
        first_seen=first_seen.get(name),
        last_seen=seen,
        windows=windows,
        timeline=h.timeline(spans, now, CELLS),
        outages=h.outages(spans, now - since, now) if detail else [],
        changes=[c for c in changes if c.time >= now - since] if detail else [],
    )


# -- the table -----------------------------------------------------------------------------------------
_ORDER = {h.DOWN: 0, h.LATE: 1, h.UNKNOWN: 2, h.UP: 3}


def duration(seconds: float) -> str:
    """``108000`` -> ``1d 6h``: the two largest units, for the --since phrase."""
    s = max(round(seconds), 0)
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), 3)
    return " ".join(f"{n}{u}" for i, (n, u) in enumerate(parts[first : first + 2]) if n or i == 0)


def percent(value: float | None) -> str:
    """Rounded down: 99.999 is not 100%."""
    if value is None:
        return "-"
    if value >= 100:
        return "100%"
    return f"{math.floor(value * 100) / 100:.2f}%"


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def render(report: Report, chars: Mapping[str, str] = h.BLOCKS) -> str:
    now, since = report.now, duration(report.since)
    lines = [
        f"history from {report.path} at {when(now)} {time.strftime('%Z', time.localtime(now))}; "
        f"outages, down and unknown time over the last {since}"
    ]
    if not report.runs_recorded:
        who = report.daemon
        lines.append(f"(this store records no {who} runs: time while the {who} was down counts as watched)")
    if not report.peers:
        lines.append("")
        lines.append("(no server links recorded)" if report.daemon == "client" else "(no peers recorded)")
        return "\n".join(lines) + "\n"
    header = [
        "SERVER" if report.daemon == "client" else "PEER",
        "STATE",
        "UPTIME 24h",
        "7d",
        "30d",
        "OUTAGES",
        "DOWN",
        "LONGEST",
        "UNKNOWN",
        "LAST SEEN",
        "LAST 24 H",
    ]
    rows = [["", "", "", "", "", "", "", "", "", "", h.labels(now, CELLS)]]
    peers = sorted(report.peers, key=lambda p: (_ORDER[p.state], p.windows["24h"].uptime or 0.0, p.peer))
    for p in peers:
        w = p.windows["since"]
        if p.state in (h.UP, h.LATE):
            seen = "now"
        else:
            seen = f"{age(now - p.last_seen)} ago" if p.last_seen is not None else "never"
        rows.append(
            [
                p.peer,
                p.state if p.state != h.UNKNOWN else "?",
                *(percent(p.windows[k].uptime) for k in h.WINDOWS),
                str(w.outages),
                age(w.down) if w.outages else "-",
                age(w.longest) if w.outages else "-",
                age(w.unknown) if w.unknown else "-",
                seen,
                h.draw(p.timeline, dict(chars)),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip())
    legend = "  ".join(
        f"{chars[s]} {word}" for s, word in (CLIENT_LEGEND if report.daemon == "client" else LEGEND).items()
    )
    lines.append("")
    lines.append(f"timeline: {CELLS} cells of {duration(h.DAY / CELLS)} (local time), each its worst state: {legend}")
    if report.detail:
        for p in peers:
            lines.extend(_detail(p, now, report.since))
    return "\n".join(lines) + "\n"


def _detail(p: PeerHistory, now: float, since: float) -> list[str]:
    out = ["", f"outages of {p.peer} in the last {duration(since)}:"]
    for o in p.outages:
        still = " (still down)" if o.end >= now and p.state == h.DOWN else ""
        out.append(f"  {when(o.start)} .. {when(o.end)}  {age(o.end - o.start)}{still}")
    if not p.outages:
        out.append("  (none)")
    out.append("")
    out.append(f"changes of {p.peer} in the last {duration(since)}:")
    for c in p.changes:
        why = f"  {c.reason}" if c.reason else ""
        out.append(f"  {when(c.time)}  {c.old or '-':>4} -> {c.new:<4}{why}".rstrip())
    if not p.changes:
        out.append("  (none)")
    return out


# -- the JSON document -----------------------------------------------------------------------------------
def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _summary(s: h.Summary) -> dict[str, object]:
    return {
        "uptime_percent": None if s.uptime is None else round(s.uptime, 4),
        "up_seconds": _r(s.up),
        "late_seconds": _r(s.late),
        "down_seconds": _r(s.down),
        "unknown_seconds": _r(s.unknown),
        "outages": s.outages,
        "longest_outage_seconds": _r(s.longest),
        "down_since": _r(s.open_since),
    }


TIMELINE_LETTERS = {h.NOT_SEEN: ".", h.UP: "U", h.LATE: "L", h.DOWN: "D", h.UNKNOWN: "?"}


def peer_document(p: PeerHistory, detail: bool) -> dict[str, object]:
    doc: dict[str, object] = {
        "peer": p.peer,
        "state": p.state,
        "first_seen": _r(p.first_seen),
        "last_seen": _r(p.last_seen),
        "windows": {k: _summary(s) for k, s in p.windows.items()},
        "timeline": "".join(TIMELINE_LETTERS[s] for s in p.timeline),
    }
    if detail:
        doc["outages"] = [{"start": _r(o.start), "end": _r(o.end), "seconds": _r(o.end - o.start)} for o in p.outages]
        doc["changes"] = [{"time": _r(c.time), "old": c.old, "new": c.new, "reason": c.reason} for c in p.changes]
    return doc


def chunks(report: Report) -> Iterator[str]:
    """The JSON document a piece at a time: the head, then one line per peer (about 1 KB each: 19,000
    peers are 18 MB of text, never one string)."""
    cells = h.cells(report.now, CELLS)
    head = {
        "store": report.path,
        "now": _r(report.now),
        "since_seconds": _r(report.since),
        "daemon": report.daemon,
        "runs_recorded": report.runs_recorded,
        "timeline": {
            "start": _r(cells[0][0]),
            "cell_seconds": _r(h.DAY / CELLS),
            "cells": CELLS,
            "letters": {v: (k or "not seen yet") for k, v in TIMELINE_LETTERS.items()},
        },
    }
    text = json.dumps(head, indent=2, allow_nan=False)
    yield text[:-2] + ',\n  "peers": ['
    for i, p in enumerate(report.peers):
        line = json.dumps(peer_document(p, report.detail), allow_nan=False, separators=(",", ":"))
        yield ("\n    " if i == 0 else ",\n    ") + line
    yield "\n  ]\n}\n" if report.peers else "]\n}\n"


def needs_ascii(encoding: str | None, chars: Sequence[str] = tuple(h.BLOCKS.values())) -> bool:
    """Whether the output's encoding cannot show the block characters."""
    try:
        "".join(chars).encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return True
    return False
