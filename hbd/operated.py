"""What the operator's surface (``hbd.ops``) needs from a daemon: a small typed interface.

``hbd.daemon.Daemon`` provides it; Ops, the status socket's commands and the metrics endpoint read
everything else from the daemon's ``view()`` (``hbd.view``), never from its internals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from hbd.logs import PeerLog
from hbd.loop import EventLoop
from hbd.silencing import Silencing
from hbd.view import DaemonViews


class OpsConfig(Protocol):
    """The settings Ops reads (both daemons' configs have them)."""

    @property
    def control_socket(self) -> str | None: ...
    @property
    def metrics(self) -> tuple[str, int] | None: ...
    @property
    def on_change(self) -> tuple[str, ...] | None: ...
    @property
    def hook_timeout(self) -> float: ...
    @property
    def hook_max_concurrent(self) -> int: ...
    @property
    def hook_max_queued(self) -> int: ...


class DaemonConfig(OpsConfig, Protocol):
    """What hbd.daemon.Daemon itself reads from its configuration (server and client configs have it)."""

    @property
    def path(self) -> str: ...
    @property
    def log_level(self) -> str: ...
    @property
    def log_file(self) -> str | None: ...
    @property
    def cpu_slice_us(self) -> int: ...


class Operated(Protocol):
    """What Ops needs from its daemon (``hbd.daemon.Daemon``): everything else it reads from ``view()``."""

    role: str  # "server" or "client"
    supervises: bool  # a supervisor relays its workers' status
    worker_index: int | None  # one of several workers: a private status socket, no metrics

    @property
    def loop(self) -> EventLoop: ...
    @property
    def peer_log(self) -> PeerLog: ...
    @property
    def config(self) -> OpsConfig: ...
    @property
    def silencing(self) -> Silencing | None:
        """The daemon's silences (the server's registry), or None if it keeps none."""
        ...

    def request_reload(self, done: Callable[[list[str]], None]) -> None: ...
    def view(self) -> DaemonViews: ...
