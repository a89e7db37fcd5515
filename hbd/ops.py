"""The operator's surface of one daemon: status socket, metrics endpoint and state-change hooks.

``Daemon`` owns one ``Ops``: it is started before the daemon's own ``start()``, prepared and
committed with every reload (a new socket path or metrics address is bound before the old one is
let go, so a reload that cannot bind changes nothing), and closed at shutdown. The daemons report
peer state changes through ``event()``; everything else is read from their ``view()`` (hbd.view)
when asked, through the ``Operated`` interface (hbd.operated).

Roles: a plain server or client serves all three. With ``workers: K`` the supervisor serves the
status socket (relaying its workers') and the metrics, and each worker serves a private status
socket and runs the hooks of its own clients.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from socket import socket

from hbd import commands, metrics
from hbd.control import BindError, RequestServer, UnixListener
from hbd.hooks import HookRunner
from hbd.logs import fields, log
from hbd.names import bind_tcp
from hbd.operated import Operated, OpsConfig
from hbd.view import EVENTS, LoopNumbers, RecentEvent, Turns

RECENT = 50  # state changes kept for the status reply


class Ops:
    def __init__(self, daemon: Operated) -> None:
        self.daemon = daemon
        self.loop = daemon.loop
        self.role = daemon.role
        self.hooks = HookRunner(self.loop, self.role)
        self.hooks.peer_log = daemon.peer_log  # one budget for every line peers can cause
        self.events = dict.fromkeys(EVENTS, 0)
        self.recent: deque[RecentEvent] = deque(maxlen=RECENT)
        self.stalls = 0
        self.started_wall = time.time()
        self.control_path: str | None = None
        self.control: RequestServer | None = None
        self._retired: list[RequestServer] = []  # moved-away status sockets finishing their requests
        self._listener: UnixListener | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.metrics: RequestServer | None = None
        self._pending: tuple[UnixListener | None, socket | None] = (None, None)

    # -- what this process serves ------------------------------------------------------------------
    @property
    def _worker_index(self) -> int | None:
        return self.daemon.worker_index

    def _control_path_for(self, cfg: OpsConfig) -> str | None:
        path = cfg.control_socket
        if path and self._worker_index is not None:
            return f"{path}.{self._worker_index}"
        return path

    def _metrics_for(self, cfg: OpsConfig) -> tuple[str, int] | None:
        return None if self._worker_index is not None else cfg.metrics

    def numbers(self) -> tuple[dict[str, int], dict[str, int], LoopNumbers]:
        """Events, hooks and loop numbers of this process, for its view."""
        hooks = self.hooks
        loop = self.loop
        return (
            dict(self.events),
            {**hooks.counts, "running": len(hooks.running), "queued": len(hooks.queue)},
            LoopNumbers(
                loop.last_lag,
                loop.max_lag,
                self.stalls,
                Turns(counts=tuple(loop.turn_counts), sum=loop.turn_sum, max=loop.turn_max),
            ),
        )

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

    def prepare(self, new: OpsConfig) -> Callable[[], None]:
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

    def contain(self, fileobj: object) -> bool:
        """A callback on ``fileobj`` raised: close it if it is one of our request connections."""
        return fileobj is not None and any(
            server is not None and server.contain(fileobj) for server in (self.control, self.metrics)
        )

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
            log.info(
                "no status socket: the directory %s does not exist (set control_socket to a path in an "
                "existing directory, or null)",
                directory,
                extra=fields(event="control-disabled"),
            )
            return None
        return UnixListener(path, mode=0o600 if self._worker_index is not None else 0o660)

    def _bind_metrics(self, address: tuple[str, int] | None) -> socket | None:
        return bind_tcp(*address) if address else None

    def _install(
        self, path: str | None, listener: UnixListener | None, maddr: tuple[str, int] | None, msock: socket | None
    ) -> None:
        self._install_control(path, listener)
        self._install_metrics(maddr, msock)

    def _install_control(self, path: str | None, listener: UnixListener | None) -> None:
        self.control_path = path
        self._listener = listener
        if listener is not None:
            server = RequestServer(
                self.loop,
                listener.sock,
                lambda req, wake: commands.answer(self.daemon, self.control_path, req, wake, server.peer_uid),
                name="status socket",
            )
            self.control = server
            log.info("status socket %s", path)

    def _install_metrics(self, address: tuple[str, int] | None, sock: socket | None) -> None:
        self.metrics_address = address
        if sock is not None:
            self.metrics = RequestServer(
                self.loop,
                sock,
                lambda req, wake: commands.http_metrics(self.daemon, self.control_path, req, wake),
                terminator=b"\r\n\r\n",
                max_request=8192,
                too_long=metrics._http(431, "Request Header Fields Too Large", b""),
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

    def _configure_hooks(self, cfg: OpsConfig) -> None:
        self.hooks.configure(cfg.on_change, cfg.hook_timeout, cfg.hook_max_concurrent, cfg.hook_max_queued)

    # -- events --------------------------------------------------------------------------------------
    def event(
        self,
        event: str,
        peer: str,
        address: str,
        *,
        name: str | None = None,
        previous: str | None = None,
        reason: str = "",
        standing: float = 0.0,
        **extra: object,
    ) -> None:
        """A peer changed state (``up``, ``late``, ``down``; with the registry also ``flapping`` and
        ``stable``): count it, remember it, run the hook.
        ``standing``: how established the peer was (see hbd.hooks: who waits when hooks pile up)."""
        self.count(event, peer, address, previous, reason)
        self.hooks.fire(
            event, peer, address, {"name": name or "", "previous": previous or "", "reason": reason, **extra}, standing
        )

    def count(self, event: str, peer: str, address: str, previous: str | None, reason: str) -> None:
        """A change counted and remembered without a hook (the registry's silenced or flapping peers)."""
        self.events[event] += 1
        self.recent.append(RecentEvent(time.time(), event, peer, address, previous, reason))

    def _stalled(self, planned: float, woke: float) -> None:
        self.stalls += 1
