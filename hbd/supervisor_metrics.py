"""The supervisor's metrics (``workers: K``): the same per-peer series as one process.

The supervisor's registry knows every peer's state, flags, labels, silence and accounting, but not
a connected peer's last ping (nothing goes up the pipe per ping). So, for a scrape, it asks each
worker over its private status socket (``pings``: a 16-byte record per connected peer, its
connection's number and last ping, hbd.ping_times; without blocking, one worker at a time) and
takes everything else from its own registry, which knows each peer's connection by that number.

Nothing holds the loop for long at 100,000 peers: the workers' records are read as they arrive,
the registry's rows are read ROWS_PER_TURN per loop turn into one small tuple per peer, and the families
are written a chunk at a time as the scraper reads (hbd.metrics.exposition does the same for one
process). Nothing is spent between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

from hbd import metrics, ping_times
from hbd.control import Reply
from hbd.loop import EventLoop
from hbd.status import _Relay
from hbd.supervisor_registry import WORKER_BITS, Key
from hbd.view import SupervisorView


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
    if view.counts is None or view.samples is None:
        return
    last = yield from last_pings(view, loop, control_path, wake)
    offset = time.time() - view.daemon.now  # monotonic -> wall clock
    samples: list[metrics.PeerSample] = []
    for batch in view.samples(offset, last, metrics.ROWS_PER_TURN):  # straight from the registry: no row per peer
        samples += batch
        loop.call_later(0, wake)
        yield None
    yield from metrics.peer_chunks(samples)


def last_pings(
    view: SupervisorView, loop: EventLoop, control_path: str | None, wake: Callable[[], None]
) -> Generator[None, None, dict[Key, float]]:
    """Every worker's connected peers -> when each last pinged (monotonic), by the registry's key of
    the connection, as the records arrive."""
    out: dict[Key, float] = {}
    for w in view.workers:
        reader, index = ping_times.Reader(), w.index
        for chunk in _Relay(loop, f"{control_path}.{w.index}", wake, b"pings\n").chunks():
            if chunk is None:
                yield None
                continue
            out.update({conn << WORKER_BITS | index: last for conn, last in reader.feed(chunk)})
    return out
