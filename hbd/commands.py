"""The status socket's commands: ``status``, ``peers`` (a worker's, for its supervisor), ``metrics``
and ``reload``. Answers are rendered from the daemon's view; only ``reload`` acts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from hbd import metrics, status
from hbd.control import Reply
from hbd.operated import Operated
from hbd.view import ClientView, ServerView, SupervisorView


def answer(
    daemon: Operated, control_path: str | None, request: bytes, wake: Callable[[], None], uid: int | None = None
) -> Reply:
    words = request.decode("ascii", "replace").split()
    command = words[0].lower() if words else ""
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
        return iter([metrics.collect(daemon.view()).render()])
    if command == "reload" and daemon.worker_index is None:
        return _reload_reply(daemon, wake, uid)
    return iter([json.dumps({"error": f"unknown command {command!r}; try: status, metrics, reload"}).encode() + b"\n"])


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
        yield None  # the loop goes on; done() wakes this connection
    errors = verdict[0]
    doc = {"reload": "ok"} if not errors else {"reload": "failed", "errors": errors}
    yield json.dumps(doc).encode() + b"\n"
