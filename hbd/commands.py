"""The status socket's commands: ``status``, ``peers`` (a worker's, for its supervisor), ``metrics``,
``reload`` and the silences (``silence``, ``unsilence``, ``silences``). Answers are rendered from the
daemon's view; ``reload`` and the silences act.

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

from hbd import metrics, status, supervisor_metrics
from hbd.control import Reply
from hbd.operated import Operated
from hbd.silencing import NO_SILENCES, Silencing, check_peer, check_reason, check_seconds
from hbd.view import ClientView, ServerView, SupervisorView

SILENCE_COMMANDS = ("silence", "unsilence", "silences")
SLICE = 250  # silences serialised per chunk


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
    if command == "status":
        view = daemon.view()
        if isinstance(view, ClientView):
            return status.client_document(view)
        if isinstance(view, SupervisorView):
            return status.supervisor_document(view, daemon.loop, control_path, wake)
        return status.server_document(view)
    if command == "peers" and daemon.role == "server" and not daemon.supervises:
        view = daemon.view()
        return status.peers_fragment(view) if isinstance(view, ServerView) else iter([])
    if command == "metrics":
        return _metrics(daemon, control_path, wake)
    if command == "reload" and daemon.worker_index is None:
        return _reload_reply(daemon, wake, uid)
    return _error(f"unknown command {command[:40]!r}; try: status, metrics, reload, silences")


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
        view = yield from supervisor_metrics.with_workers_peers(view, daemon.loop, control_path, wake)
    yield metrics.collect(view).render()


def http_metrics(daemon: Operated, control_path: str | None, request: bytes, wake: Callable[[], None]) -> Reply:
    """The metrics endpoint's answer (a supervisor's relays its workers' peers first)."""
    if daemon.supervises:
        view = daemon.view()
        assert isinstance(view, SupervisorView)
        return supervisor_metrics.http_reply(view, daemon.loop, control_path, request, wake)
    return metrics.http_reply(daemon.view, request)


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
