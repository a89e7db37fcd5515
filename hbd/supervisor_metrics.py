"""The supervisor's metrics (``workers: K``): the same per-peer series as one process.

The supervisor's registry knows every peer's state, flags, labels, silence and accounting, but not
a connected peer's last ping (nothing goes up the pipe per ping). So, for a scrape, it asks each
worker over its private status socket (``pings``: one line ``["peer", last ping]`` per connected
peer, without blocking, one worker at a time) and takes everything else from its own registry.

Nothing holds the loop for long at 100,000 peers: the workers' lines are parsed as they arrive,
the registry's rows are read ROWS_PER_TURN per loop turn into one small tuple per peer, and the families
are written a chunk at a time as the scraper reads (hbd.metrics.exposition does the same for one
process). Nothing is spent between scrapes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Generator

from hbd import metrics
from hbd.control import Reply
from hbd.loop import EventLoop
from hbd.status import _Relay
from hbd.view import SupervisorView

MAX_PARTIAL = 1 << 16  # a worker's line longer than this is no line of ours: that worker's rest is dropped


def http_reply(
    view: SupervisorView, loop: EventLoop, control_path: str | None, request: bytes, wake: Callable[[], None]
) -> Reply:
    """metrics.http_reply, with the workers' last pings relayed for GET /metrics."""
    other, head_only = metrics.http_head(request)
    if other is not None:
        yield from other
        return
    yield metrics.STREAM_HEAD
    if not head_only:
        yield from exposition(view, loop, control_path, wake)


def exposition(view: SupervisorView, loop: EventLoop, control_path: str | None, wake: Callable[[], None]) -> Reply:
    yield metrics.collect(view, peers=False).render()
    if view.counts is None or (view.samples is None and view.everyone is None):
        return
    last = yield from last_pings(view, loop, control_path, wake)
    offset = time.time() - view.daemon.now  # monotonic -> wall clock
    samples: list[metrics.PeerSample] = []
    if view.samples is not None:  # straight from the registry: no row per peer
        for batch in view.samples(offset, last, metrics.ROWS_PER_TURN):
            samples += batch
            loop.call_later(0, wake)
            yield None
    elif view.everyone is not None:
        src = view.everyone
        for start in range(0, src.size, metrics.ROWS_PER_TURN):
            for i in range(start, min(start + metrics.ROWS_PER_TURN, src.size)):
                row = src.row(i)
                if row is not None:
                    samples.append(metrics.peer_sample(row, offset, last.get(row.peer)))
            loop.call_later(0, wake)
            yield None
    yield from metrics.peer_chunks(samples)


def last_pings(
    view: SupervisorView, loop: EventLoop, control_path: str | None, wake: Callable[[], None]
) -> Generator[None, None, dict[str, float]]:
    """Every worker's connected peers -> when each last pinged (wall clock), as the lines arrive."""
    out: dict[str, float] = {}
    for w in view.workers:
        rest = b""
        for chunk in _Relay(loop, f"{control_path}.{w.index}", wake, b"pings\n").chunks():
            if chunk is None:
                yield None
                continue
            data = rest + chunk
            end = data.rfind(b"\n")
            rest = data[end + 1 :]
            if len(rest) > MAX_PARTIAL:
                break
            if end >= 0:
                _take(data[:end], out)
    return out


def _take(lines: bytes, out: dict[str, float]) -> None:
    """Lines ``["peer", 1732650000.125]`` into ``out`` (one parse for the lot)."""
    try:
        pairs = json.loads(b"[" + lines.replace(b"\n", b",") + b"]")
    except ValueError:
        return  # a worker restarting mid-reply: its peers keep the registry's last ping
    for pair in pairs:
        if (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], int | float)
            and math.isfinite(pair[1])  # json.loads takes Infinity; hbd.metrics.peer_chunks writes repr
        ):
            out[pair[0]] = pair[1]
