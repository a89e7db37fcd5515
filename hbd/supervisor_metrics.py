"""The supervisor's metrics (``workers: K``): the same per-peer series as one process.

The supervisor's registry knows every peer's state, flags, labels and silence, but not a connected
peer's last ping (nothing goes up the pipe per ping). So, for a scrape, it asks each worker for its
status rows over the workers' private status sockets (as ``hbd status`` does: without blocking, one
worker at a time), which carry the registry's mark and the connection's live numbers, and adds its
own rows for the peers no worker holds. A scrape costs what a status request costs, and nothing is
spent between scrapes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Generator

from hbd import metrics
from hbd.control import Reply
from hbd.loop import EventLoop
from hbd.status import relay_peers
from hbd.view import PeerRow, SupervisorView


def http_reply(
    view: SupervisorView, loop: EventLoop, control_path: str | None, request: bytes, wake: Callable[[], None]
) -> Reply:
    """metrics.http_reply, with the workers' connected peers relayed first for GET /metrics."""
    if request.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"/metrics"]:
        view = yield from with_workers_peers(view, loop, control_path, wake)
    yield from metrics.http_reply(lambda: view, request)


def with_workers_peers(
    view: SupervisorView, loop: EventLoop, control_path: str | None, wake: Callable[[], None]
) -> Generator[None, None, SupervisorView]:
    """The view with every peer's row: the workers' (relayed) and the supervisor's own."""
    parts = []
    for chunk in relay_peers(view, loop, control_path, wake):
        if chunk is None:
            yield None
        else:
            parts.append(chunk)
    try:
        docs = json.loads(b"[" + b"".join(parts) + b"]")
    except ValueError:
        docs = []  # a worker restarting mid-reply: its peers are missing from this scrape
    offset = time.time() - view.daemon.now  # wall clock -> monotonic, as the rows carry it
    rows = [row for doc in docs if isinstance(doc, dict) and (row := _row(doc, offset)) is not None]
    if view.account is not None:  # the supervisor's registry keeps the accounting, not the workers
        rows = [view.account(row) for row in rows]
    return dataclasses.replace(view, peers=[*rows, *view.peers])


def _row(doc: dict, offset: float) -> PeerRow | None:
    """A worker's status row back into a PeerRow (None: a connection that is no peer yet)."""
    if doc.get("since") is None:
        return None

    def mono(key: str) -> float | None:
        value = doc.get(key)
        return value - offset if isinstance(value, int | float) else None

    try:
        return PeerRow(
            str(doc["peer"]),
            doc.get("name"),
            str(doc["address"]),
            str(doc["state"]),
            mono("connected"),
            mono("last_ping"),
            int(doc.get("pings") or 0),
            float(doc["timeout"]),
            doc.get("interval"),
            doc.get("worker"),
            since=mono("since"),
            reason=doc.get("reason"),
            expected=bool(doc.get("expected")),
            silenced_until=doc.get("silenced_until"),
            flags=frozenset(["flapping"] if doc.get("flapping") else []),
            labels=tuple((str(k), str(v)) for k, v in (doc.get("labels") or {}).items()),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
