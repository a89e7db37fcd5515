"""The operator's surface of one daemon: status socket, metrics endpoint and state-change hooks.

``Daemon`` owns one ``Ops``: it is started before the daemon's own ``start()``, prepared and
committed with every reload (a new socket path or metrics address is bound before the old one is
let go, so a reload that cannot bind changes nothing), and closed at shutdown. The daemons report
peer state changes through ``event()``; everything else is read from them when asked.

Roles: a plain server or client serves all three. With ``workers: K`` the supervisor serves the
status socket (relaying its workers') and the metrics, and each worker serves a private status
socket and runs the hooks of its own clients.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hbd import metrics, status
from hbd.control import BindError, Reply, RequestServer, UnixListener
from hbd.hooks import HookRunner
from hbd.logs import fields, log
from hbd.names import bind_tcp

RECENT = 50  # state changes kept for the status reply


class Ops:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.loop = daemon.loop
        self.role = "client" if daemon.identifier.startswith("hbd-client") else "server"
        self.hooks = HookRunner(self.loop, self.role)
        if hasattr(daemon, "peer_log"):
            self.hooks.peer_log = daemon.peer_log  # one budget for every line peers can cause
        self.events = {"up": 0, "late": 0, "down": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.stalls = 0
        self.started_wall = time.time()
        self.control_path: str | None = None
        self.control: RequestServer | None = None
        self._retired: list[RequestServer] = []  # moved-away status sockets finishing their requests
        self._listener: UnixListener | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.metrics: RequestServer | None = None
        self._pending: tuple[UnixListener | None, Any] = (None, None)

    # -- what this process serves ------------------------------------------------------------------
    @property
    def _worker_index(self) -> int | None:
        return getattr(getattr(self.daemon, "worker", None), "index", None)

    @property
    def _supervisor(self) -> bool:
        return isinstance(getattr(self.daemon, "workers", None), dict)

    def _control_path_for(self, cfg: Any) -> str | None:
        path = getattr(cfg, "control_socket", None)
        if path and self._worker_index is not None:
            return f"{path}.{self._worker_index}"
        return path

    def _metrics_for(self, cfg: Any) -> tuple[str, int] | None:
        return None if self._worker_index is not None else getattr(cfg, "metrics", None)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.daemon.config
        self.loop.stall_callbacks.append(self._stalled)
        path = self._control_path_for(cfg)
        listener = self._bind_control(path)
        try:
            msock = self._bind_metrics(self._metrics_for(cfg))
        except BindError:
            if listener is not None:
                listener.sock.close()
                listener.remove()
            raise
        self._install(path, listener, self._metrics_for(cfg), msock)
        self._configure_hooks(cfg)

    def prepare(self, new: Any) -> Callable[[], None]:
        """Bind what the new config needs (raises BindError, changing nothing); return the commit."""
        path, maddr = self._control_path_for(new), self._metrics_for(new)
        listener = self._bind_control(path) if path != self.control_path else None
        try:
            msock = self._bind_metrics(maddr) if maddr != self.metrics_address else None
        except BindError:
            if listener is not None:
                listener.sock.close()
                listener.remove()
            raise
        self._pending = (listener, msock)

        def commit() -> None:
            self._pending = (None, None)
            if path != self.control_path:
                self._close_control(retire=True)
                self._install_control(path, listener)
                if listener is not None:
                    log.info("status socket is now %s", path)
            if maddr != self.metrics_address:
                self._close_metrics()
                self._install_metrics(maddr, msock)
            self._configure_hooks(new)

        return commit

    def abort(self) -> None:
        """The reload failed elsewhere: let go of what prepare() bound."""
        listener, msock = self._pending
        self._pending = (None, None)
        if listener is not None:
            listener.sock.close()
            listener.remove()
        if msock is not None:
            msock.close()

    def stopping(self) -> None:
        """The daemon is stopping: closing every peer now is not a state change worth a hook."""
        self.hooks.enabled = False

    def close(self) -> None:
        self.hooks.close()
        self._close_control()
        self._close_metrics()

    def contain(self, fileobj: Any) -> bool:
        """A callback on ``fileobj`` raised: close it if it is one of our request connections."""
        return fileobj is not None and any(
            server is not None and server.contain(fileobj) for server in (self.control, self.metrics))

    def close_in_child(self) -> None:
        """After fork() in a worker: drop our descriptors without unlinking the parent's socket."""
        for server in (self.control, self.metrics):
            if server is not None:
                for conn in list(server.conns):
                    conn.sock.close()
                server.sock.close()
        self.control = self.metrics = None
        self._listener = None

    # -- binding -------------------------------------------------------------------------------------
    def _bind_control(self, path: str | None) -> UnixListener | None:
        if not path:
            return None
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            # /run/hbd comes from the unit's RuntimeDirectory=; run by hand, there is none. Expected
            # there, so an informational line on the terminal, not a warning for the error log.
            log.info("no status socket: the directory %s does not exist (set control_socket to a path in an "
                     "existing directory, or null)", directory, extra=fields(event="control-disabled"))
            return None
        return UnixListener(path, mode=0o600 if self._worker_index is not None else 0o660)

    def _bind_metrics(self, address: tuple[str, int] | None) -> Any:
        return bind_tcp(*address) if address else None

    def _install(self, path: str | None, listener: UnixListener | None, maddr: Any, msock: Any) -> None:
        self._install_control(path, listener)
        self._install_metrics(maddr, msock)

    def _install_control(self, path: str | None, listener: UnixListener | None) -> None:
        self.control_path = path
        self._listener = listener
        if listener is not None:
            server = RequestServer(self.loop, listener.sock,
                                   lambda req, wake: self._handle(req, wake, server.peer_uid), name="status socket")
            self.control = server
            log.info("status socket %s", path)

    def _install_metrics(self, address: tuple[str, int] | None, sock: Any) -> None:
        self.metrics_address = address
        if sock is not None:
            self.metrics = RequestServer(
                self.loop, sock, lambda req, wake: metrics.http_reply(self, req), terminator=b"\r\n\r\n",
                max_request=8192, too_long=metrics._http(431, "Request Header Fields Too Large", b""),
                name="metrics endpoint",
            )
            host, port = sock.getsockname()[:2]
            log.info("metrics on http://%s:%d/metrics", host, port)

    def _close_control(self, retire: bool = False) -> None:
        for old in self._retired:
            old.close()
        self._retired = []
        if self.control is not None:
            if retire:
                self.control.retire()  # e.g. the `hbd reload` that moved it still gets its answer
                self._retired.append(self.control)
            else:
                self.control.close()
            self.control = None
        if self._listener is not None:
            self._listener.remove()
            self._listener = None

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _configure_hooks(self, cfg: Any) -> None:
        self.hooks.configure(
            getattr(cfg, "on_change", None), getattr(cfg, "hook_timeout", 10.0),
            getattr(cfg, "hook_max_concurrent", 4), getattr(cfg, "hook_max_queued", 100),
        )

    # -- requests ------------------------------------------------------------------------------------
    def _handle(self, request: bytes, wake: Callable[[], None], uid: int | None = None) -> Reply:
        words = request.decode("ascii", "replace").split()
        command = words[0].lower() if words else ""
        if command == "status":
            if self.role == "client":
                return status.client_document(self)
            if self._supervisor:
                return status.supervisor_document(self, wake)
            return status.server_document(self)
        if command == "peers" and self.role == "server" and not self._supervisor:
            return status.peers_fragment(self)
        if command == "metrics":
            return iter([metrics.collect(self).render()])
        if command == "reload" and self._worker_index is None:
            return self._reload_reply(wake, uid)
        return iter([json.dumps({"error": f"unknown command {command!r}; try: status, metrics, reload"}).encode()
                     + b"\n"])

    def _reload_reply(self, wake: Callable[[], None], uid: int | None) -> Reply:
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

        self.daemon.request_reload(done)
        while not verdict:
            yield None  # the loop goes on; done() wakes this connection
        errors = verdict[0]
        doc = {"reload": "ok"} if not errors else {"reload": "failed", "errors": errors}
        yield json.dumps(doc).encode() + b"\n"

    # -- events --------------------------------------------------------------------------------------
    def event(self, event: str, peer: str, address: str, *, name: str | None = None,
              previous: str | None = None, reason: str = "", standing: float = 0.0, **extra: object) -> None:
        """A peer changed state (``up``, ``late``, ``down``): count it, remember it, run the hook.
        ``standing``: how established the peer was (see hbd.hooks: who waits when hooks pile up)."""
        self.events[event] += 1
        self.recent.append({"time": time.time(), "event": event, "peer": peer, "address": address,
                            "previous": previous, "reason": reason})
        self.hooks.fire(event, peer, address, {"name": name or "", "previous": previous or "",
                                                "reason": reason, **extra}, standing)

    def _stalled(self, planned: float, woke: float) -> None:
        self.stalls += 1
