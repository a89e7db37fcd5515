"""A server's status document for a filter (``select``; ``status`` is the empty filter): the daemon
picks the rows, so a status of the few problems among 100,000 peers is a small reply.

Nothing here may stall the loop, however many peers there are: peers are looked at ``SCAN`` per
loop turn (the reply says "nothing yet" and wakes itself on the next turn), a row is made only for
a peer the filter keeps, and what is written goes out a slice at a time as the reader takes it.
With a ``limit``, the first rows in the table's order (DOWN, LATE, NEW, UP, then by name) are kept
in a list pruned back to ``limit`` as it grows, so memory is bounded by the limit, not the peers.

With ``workers: K`` the supervisor sends the filter to each worker (``{"request": "peers", ...}``
on its private socket); a worker answers with its matching rows, comma-separated, then a line
``{"matched": N}``. With a limit the supervisor merges the workers' first rows and its own; without
one it relays the rows as they come.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Callable, Iterator, Sequence

from hbd.control import Reply
from hbd.loop import EventLoop
from hbd.status import Clock, _dumps, _Relay, peer_doc, peer_json, server_head, supervisor_head
from hbd.status_filter import SortKey, StatusFilter, sort_key
from hbd.view import PeerRow, ServerView, Source, SupervisorView

SCAN = 2000  # peers looked at per loop turn (a few milliseconds)
ROWS = 50  # rows made and serialised per loop turn (about a millisecond: a paced listing's slice)
MAX_FRAGMENT = 16 << 20  # a worker's limited answer larger than this is a broken worker: dropped
MAX_TRAILER = 1024


# One encoder call per slice of rows, not one json.dumps (and a new encoder) per row: half the CPU.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _rows_text(batch: list[PeerRow], clock: Clock) -> str:
    """Rows as comma-separated JSON objects."""
    return ",".join([peer_json(row, clock) for row in batch])


class Tally:
    """What a scan found besides the rows: how many matched, and (for a server without a registry's
    counts) every peer by state."""

    def __init__(self) -> None:
        self.matched = 0
        self.states: dict[str, int] = {}


def scan(sources: Sequence[Source], flt: StatusFilter, tally: Tally) -> Iterator[list[PeerRow] | None]:
    """The rows ``flt`` keeps, in batches of at most ROWS; None after every SCAN peers looked at and
    after each batch (the caller lets the loop turn: pings are served between batches, so a
    listing delays a pong by about one batch). With a limit, the first ``limit`` in the table's
    order, sorted."""
    keep, limit, states = flt.keep, flt.limit, tally.states
    batch: list[PeerRow] = []
    best: list[tuple[SortKey, int, int, int]] = []  # (key, order seen, source, index): rows not made yet
    looked = 0
    for s, src in enumerate(sources):
        who, make = src.who, src.row
        for i in range(src.size):
            looked += 1
            if looked % SCAN == 0:
                if batch:
                    yield batch
                    batch = []
                if len(best) > 2 * limit:
                    best = heapq.nsmallest(limit, best)
                yield None
            shown = who(i)
            if shown is None:
                continue
            name, address, state = shown
            states[state] = states.get(state, 0) + 1
            if not keep(name or address, address, state):
                continue
            if limit:
                tally.matched += 1
                best.append((sort_key(name, address, state), looked, s, i))
                continue
            row = make(i)
            if row is None:
                continue
            tally.matched += 1
            batch.append(row)
            if len(batch) >= ROWS:
                yield batch
                yield None
                batch = []
    if limit:
        for _, _, s, i in heapq.nsmallest(limit, best):
            row = sources[s].row(i)
            if row is not None:
                batch.append(row)
                if len(batch) >= ROWS:
                    yield batch
                    yield None
                    batch = []
    if batch:
        yield batch


def _tail(flt: StatusFilter, tally: Tally, counts: bool, now: float | None) -> bytes:
    """What follows the rows: the filter, how many matched, and ``now``, taken when the last row has
    been read: a row is read when the scan reaches it, so a peer heard after the head was made
    shows a time after the head's; every time in the document is at or before this ``now``."""
    tail: dict[str, object] = {"filter": flt.to_json(), "matched": tally.matched, "registry": not counts, "now": now}
    if counts:  # no registry's counts in the head: the connections this scan saw, by state
        tail["counts"] = tally.states
    return b"]," + _dumps(tail)[1:].encode() + b"\n"


def _kept_rows(
    view: ServerView, flt: StatusFilter, loop: EventLoop, wake: Callable[[], None], clock: Clock, tally: Tally
) -> Iterator[bytes | None]:
    """The rows ``flt`` keeps, comma-separated, a scan's slice per loop turn (None: on the next one)."""
    first = True
    for batch in scan(view.sources, flt, tally):
        if batch is None:
            loop.call_later(0, wake)
            yield None
            continue
        text = _rows_text(batch, clock)
        yield (text if first else "," + text).encode()
        first = False


def server_select(view: ServerView, flt: StatusFilter, loop: EventLoop, wake: Callable[[], None]) -> Reply:
    """One process's document: its head, the rows ``flt`` keeps, then how many matched."""
    clock = Clock(view.daemon.now)
    head = server_head(view, clock)
    del head["now"]  # it ends the document (``_tail``)
    yield _dumps(head)[:-1].encode() + b',"peers":['
    tally = Tally()
    yield from _kept_rows(view, flt, loop, wake, clock, tally)
    yield _tail(flt, tally, "counts" not in head, clock.wall(loop.clock()))


def worker_select(view: ServerView, flt: StatusFilter, loop: EventLoop, wake: Callable[[], None]) -> Reply:
    """A worker's answer to its supervisor: the rows ``flt`` keeps, comma-separated, then a line
    ``{"matched": N}`` (a row never holds a raw newline: JSON escapes it)."""
    clock = Clock(view.daemon.now)
    tally = Tally()
    yield from _kept_rows(view, flt, loop, wake, clock, tally)
    yield b"\n" + _dumps({"matched": tally.matched}).encode() + b"\n"


def worker_request(flt: StatusFilter) -> bytes:
    return _dumps({**flt.to_request(), "request": "peers"}).encode() + b"\n"


def supervisor_select(
    view: SupervisorView,
    flt: StatusFilter,
    loop: EventLoop,
    control_path: str | None,
    wake: Callable[[], None],
) -> Reply:
    """The supervisor's document: every worker's rows for ``flt`` and its own (the peers no worker
    holds), one worker at a time, never waiting on one."""
    clock = Clock(view.daemon.now)
    doc = supervisor_head(view, clock)
    del doc["now"]  # it ends the document, after every worker's rows (``_tail``)
    yield _dumps(doc)[:-1].encode() + b',"peers":['
    tally = Tally()
    request = worker_request(flt)
    paths = [f"{control_path}.{w.index}" for w in view.workers]
    if flt.limit:
        yield from _merged(view, flt, loop, paths, request, wake, clock, tally)
    else:
        wrote = False
        for path in paths:
            first = True  # a worker's chunks continue one another; its first one follows the others'
            for chunk in _relayed(loop, path, request, wake, tally):
                if chunk is None:
                    yield None
                elif chunk:
                    yield b"," + chunk if first and wrote else chunk
                    first, wrote = False, True
        for batch in scan(view.sources, flt, tally):
            if batch is None:
                loop.call_later(0, wake)
                yield None
                continue
            text = _rows_text(batch, clock)
            yield ("," + text if wrote else text).encode()
            wrote = True
    yield _tail(flt, tally, "counts" not in doc, clock.wall(loop.clock()))


def _relayed(
    loop: EventLoop, path: str | _Relay, request: bytes, wake: Callable[[], None], tally: Tally
) -> Iterator[bytes | None]:
    """One worker's rows as they arrive (None: nothing yet); its ``matched`` goes to ``tally``.
    ``path`` may be a relay already asked (the workers of a limited select work at once)."""
    relay = path if isinstance(path, _Relay) else _Relay(loop, path, wake, request)
    trailer: bytes | None = None
    try:
        for chunk in relay.chunks():
            if chunk is None:
                yield None
                continue
            if trailer is not None:
                trailer += chunk
                if len(trailer) > MAX_TRAILER:
                    break
                continue
            end = chunk.find(b"\n")
            if end >= 0:
                trailer = chunk[end + 1 :]
                chunk = chunk[:end]
            if chunk:
                yield chunk
    finally:
        relay.close()  # ended or left early (its socket closed either way)
    tally.matched += _matched(trailer)


def _matched(trailer: bytes | None) -> int:
    try:
        doc = json.loads(trailer or b"")
    except ValueError:
        return 0  # that worker was restarting: its peers are missing from this reply
    n = doc.get("matched") if isinstance(doc, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else 0


def _merge_one(
    relay: _Relay,
    loop: EventLoop,
    request: bytes,
    wake: Callable[[], None],
    tally: Tally,
    best: list[tuple[SortKey, int, dict]],
    seen: Iterator[int],
) -> Reply:
    """One worker's first rows into ``best`` (``seen``: a tie-break, so rows never compare)."""
    parts: list[bytes] = []
    size = 0
    for chunk in _relayed(loop, relay, request, wake, tally):
        if chunk is None:
            yield None
            continue
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_FRAGMENT:
            parts = []
            break
    try:
        rows = json.loads(b"[" + b"".join(parts) + b"]")
    except ValueError:
        rows = []  # a worker restarting mid-reply: its peers are missing from this reply
    for row in rows:
        if isinstance(row, dict):
            key = sort_key(row.get("name"), str(row.get("address")), str(row.get("state")))
            best.append((key, next(seen), row))
    loop.call_later(0, wake)
    yield None  # parsing that worker's rows was this turn's work


def _merged(
    view: SupervisorView,
    flt: StatusFilter,
    loop: EventLoop,
    paths: list[str],
    request: bytes,
    wake: Callable[[], None],
    clock: Clock,
    tally: Tally,
) -> Reply:
    """With a limit: each worker's first rows and the supervisor's own, merged in the table's order."""
    best: list[tuple[SortKey, int, dict]] = []
    seen = itertools.count()
    # Every worker is asked at once (their scans run side by side), then read one after another;
    # each sends at most ``limit`` rows, and a relay stops reading at 1 MB until it is taken.
    relays = [_Relay(loop, path, wake, request) for path in paths]
    try:
        for relay in relays:
            yield from _merge_one(relay, loop, request, wake, tally, best, seen)
            best[:] = heapq.nsmallest(flt.limit, best)
    finally:
        for relay in relays:
            relay.close()
    for batch in scan(view.sources, flt, tally):
        if batch is None:
            loop.call_later(0, wake)
            yield None
            continue
        for r in batch:
            best.append((sort_key(r.name, r.address, r.state), next(seen), peer_doc(r, clock)))
    best = heapq.nsmallest(flt.limit, best)
    for start in range(0, len(best), ROWS):
        text = _ENCODE([row for _, _, row in best[start : start + ROWS]])[1:-1]
        yield ("," + text if start else text).encode()
        loop.call_later(0, wake)
        yield None
