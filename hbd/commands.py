"""The status socket's commands: ``status``, ``select`` (a server's status for a filter:
hbd.status_filter), ``peers`` (a worker's, for its supervisor), ``metrics``, ``reload`` and the
silences (``silence``, ``unsilence``, ``silences``). Answers are rendered from the daemon's view;
``reload`` and the silences act.

The big replies (a server's status or selection, the metrics) look at every peer: at most
``MAX_BIG`` of them are under way at once in a process; one more is refused ("busy") rather than
queued, so that idle or never-reading clients cannot pile up work or memory.

A request is one line: a word (``status``), or a JSON object whose ``request`` names the command and
whose other fields are its arguments (``{"request": "silence", "peer": "web1", "seconds": 7200,
"reason": "kernel update"}``). The request server bounds the line (1 KiB)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from hbd import metrics, ping_times, status, status_select, supervisor_metrics
from hbd.control import Bulk, Reply
from hbd.operated import Operated
from hbd.silencing import NO_SILENCES, Silencing, check_peer, check_reason, check_seconds
from hbd.status_filter import FilterError, StatusFilter
from hbd.view import ClientView, ServerView, SupervisorView

SILENCE_COMMANDS = ("silence", "unsilence", "silences")
SLICE = 250  # silences serialised per chunk
MAX_BIG = 4  # big replies (status, select, metrics) under way at once in one process


STALLED = 1.0  # a big reply not resumed for this long (its reader takes nothing) may be evicted


class _Slot:
    __slots__ = ("evicted", "reply", "resumed")

    def __init__(self, reply: Reply, now: float) -> None:
        self.reply = reply
        self.resumed = now
        self.evicted = False


class BigReplies:
    """How many big replies are under way in this process (a forked worker starts from none).

    When all ``limit`` slots are taken, a newcomer evicts the one whose reader has taken nothing
    for STALLED seconds (its reply ends there), so readers that never read cannot lock status and
    metrics out; only when every slot is making progress is the newcomer told "busy"."""

    def __init__(self, limit: int = MAX_BIG, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._pid = os.getpid()
        self._slots: list[_Slot] = []

    @property
    def running(self) -> int:
        if self._pid != os.getpid():  # forked while some were under way: those are the parent's
            self._pid, self._slots = os.getpid(), []
        return len(self._slots)

    def counted(self, reply: Reply, busy: Callable[[], Reply]) -> Reply:
        """``reply`` holding a slot while it runs (given back however it ends), or ``busy()``."""
        now = self.clock()
        if self.running >= self.limit:
            stalled = min(self._slots, key=lambda s: s.resumed)
            if now - stalled.resumed < STALLED:
                yield from busy()
                return
            self._evict(stalled)
        slot = _Slot(reply, now)
        self._slots.append(slot)
        try:
            for chunk in reply:
                if slot.evicted:
                    return
                yield chunk
                slot.resumed = self.clock()
        finally:
            if not slot.evicted:
                self._slots.remove(slot)
            close = getattr(reply, "close", None)
            if close is not None:
                close()

    def _evict(self, slot: _Slot) -> None:
        slot.evicted = True
        self._slots.remove(slot)
        close = getattr(slot.reply, "close", None)
        if close is not None:
            close()  # its relays and buffers go now; its reader gets what was sent, then EOF


BIG = BigReplies()


def _busy() -> Reply:
    return _error(f"busy: {BIG.limit} status or metrics replies are under way; try again in a moment")


def answer(
    daemon: Operated, control_path: str | None, request: bytes, wake: Callable[[], None], uid: int | None = None
) -> Reply:
    fields: dict[str, Any] = {}
    if request.lstrip().startswith(b"{"):
        try:
            doc = json.loads(request.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _error("not a JSON request")
        if not isinstance(doc, dict) or not isinstance(doc.get("request"), str):
            return _error('a JSON request is an object with "request": COMMAND')
        fields = doc
        words = [doc["request"]]
    else:
        words = request.decode("ascii", "replace").split()
    command = words[0].lower() if words else ""
    if command in SILENCE_COMMANDS:
        return _silences_reply(daemon.silencing, command, fields)
    if command in ("status", "select"):
        return _status(daemon, control_path, command, fields, wake)
    if command == "peers" and daemon.role == "server" and not daemon.supervises:
        view = daemon.view()
        if not isinstance(view, ServerView):
            return iter([])
        if not fields:  # the metrics' relay: every row, no trailer
            return Bulk(status.peers_fragment(view))
        try:
            flt = StatusFilter.from_request(fields)
        except FilterError as exc:
            return _error(str(exc))
        reply = status_select.worker_select(view, flt, daemon.loop, wake)
        return Bulk(reply) if flt.everything else reply  # a listing's rows: paced from the first (hbd.pacing)
    if command == "pings" and daemon.role == "server" and not daemon.supervises:
        view = daemon.view()
        return Bulk(_pings(view)) if isinstance(view, ServerView) else iter([])
    if command == "metrics":
        return Bulk(BIG.counted(_metrics(daemon, control_path, wake), _busy))
    if command == "reload" and daemon.worker_index is None:
        return _reload_reply(daemon, wake, uid)
    return _error(f"unknown command {command[:40]!r}; try: status, select, metrics, reload, silences")


def _status(
    daemon: Operated, control_path: str | None, command: str, fields: dict[str, Any], wake: Callable[[], None]
) -> Reply:
    """``status`` (everything) or ``select`` (a filter's rows, hbd.status_filter)."""
    flt = StatusFilter()
    if command == "select":
        try:
            flt = StatusFilter.from_request(fields)
        except FilterError as exc:
            return _error(str(exc))
    elif set(fields) - {"request"}:
        # a newer CLI's arguments: refused, not ignored (the filter is select's)
        return _error(f"status takes no arguments (got {sorted(fields)[0][:40]!r}); filters are select's")
    view = daemon.view()
    if isinstance(view, ClientView):
        if flt.states is not None or flt.peer is not None:
            return _error("select: a client's servers are not filtered; ask for its whole status")
        return status.client_document(view)  # a few servers: a limit leaves them all
    if isinstance(view, SupervisorView):
        reply = status_select.supervisor_select(view, flt, daemon.loop, control_path, wake)
    else:
        reply = status_select.server_select(view, flt, daemon.loop, wake)
    counted = BIG.counted(reply, _busy)
    return Bulk(counted) if flt.everything else counted


def _error(reason: str) -> Reply:
    return iter([_line({"error": reason})])


def _line(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode() + b"\n"


def _silences_reply(silencing: Silencing | None, command: str, fields: dict[str, Any]) -> Reply:
    """``silence`` / ``unsilence`` / ``silences``: checked here, decided by the daemon's Silencing."""
    if silencing is None:
        return _error(NO_SILENCES)
    try:
        if command == "silences":
            return _silence_list(silencing)
        peer = check_peer(fields.get("peer"))
        if command == "unsilence":
            return iter([_line({"unsilence": peer, "removed": bool(silencing.unsilence(peer))})])
        if "seconds" not in fields:
            raise ValueError('silence needs "seconds"')
        seconds = check_seconds(fields["seconds"])
        reason = check_reason(fields.get("reason"))
    except ValueError as exc:
        return _error(str(exc))
    result = silencing.silence(peer, seconds, reason)
    if isinstance(result, str):
        return _error(result)
    return iter([_line({"silence": result.to_json()})])


def _silence_list(silencing: Silencing) -> Iterator[bytes]:
    """``{"now": ..., "silences": [...]}``, a slice at a time (there may be one per peer)."""
    items = iter(silencing.silences())
    yield f'{{"now":{round(time.time(), 3)},"silences":['.encode()
    first = True
    while chunk := [json.dumps(s.to_json(), ensure_ascii=False) for s in islice(items, SLICE)]:
        yield (("" if first else ",") + ",".join(chunk)).encode()
        first = False
    yield b"]}\n"


def _metrics(daemon: Operated, control_path: str | None, wake: Callable[[], None]) -> Reply:
    view = daemon.view()
    if isinstance(view, SupervisorView):
        return supervisor_metrics.exposition(view, daemon.loop, control_path, wake)
    return metrics.exposition(view, _breathe(daemon, wake))


def _breathe(daemon: Operated, wake: Callable[[], None]) -> Callable[[], None]:
    """What a reply calls before it yields None to let the loop turn: wake it on the next turn."""

    def breathe() -> None:
        daemon.loop.call_later(0, wake)

    return breathe


def _pings(view: ServerView) -> Reply:
    """A worker's answer to its supervisor's scrape: its peers' last pings (hbd.ping_times records)."""
    if view.last_pings is not None:
        yield from ping_times.chunks(view.last_pings())


def http_metrics(daemon: Operated, control_path: str | None, request: bytes, wake: Callable[[], None]) -> Reply:
    """The metrics endpoint's answer (a supervisor's relays its workers' last pings first)."""
    if daemon.supervises:
        view = daemon.view()
        assert isinstance(view, SupervisorView)
        reply = supervisor_metrics.http_reply(view, daemon.loop, control_path, request, wake)
    else:
        reply = metrics.http_reply(daemon.view, request, _breathe(daemon, wake))
    return Bulk(BIG.counted(reply, metrics.busy))


RELOAD_KEEPALIVE = 5.0  # seconds between the spaces a reload's answer sends while it waits (IDLE_TIMEOUT: 10 s)


def _reload_reply(daemon: Operated, wake: Callable[[], None], uid: int | None) -> Reply:
    """``reload``: reload on the loop, answer once it is applied or rejected (JSON line)."""
    if uid not in (0, os.geteuid()):
        # Reading the status is for the socket's group; a reload only for root and the daemon's own
        # user (the units' ExecReload= runs as it).
        yield json.dumps({"error": "reload: permission denied (only root or the daemon's user)"}).encode() + b"\n"
        return
    verdict: list[list[str]] = []

    def done(errors: list[str]) -> None:
        verdict.append(errors)
        wake()

    daemon.request_reload(done)
    while not verdict:
        timer = daemon.loop.call_later(RELOAD_KEEPALIVE, wake)
        yield None  # the loop goes on; done() (or the timer) wakes this connection
        daemon.loop.cancel(timer)
        if not verdict:
            # a reload of a 100,000-entry peers_file can take longer than the socket's IDLE_TIMEOUT:
            # a space is progress, and JSON allows it before the document
            yield b" "
    errors = verdict[0]
    doc = {"reload": "ok"} if not errors else {"reload": "failed", "errors": errors}
    yield json.dumps(doc).encode() + b"\n"
