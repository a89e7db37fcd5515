"""Test helpers shared by several test modules (test modules never import each other): the
reliability report, a stand-in for systemd's notify socket, waiting for an in-process reload. Daemon
processes: daemons.py; certificates: certs.py; virtual time: virtual_time.py; the client fleet: fleet.py."""

from __future__ import annotations

import json
import os
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hbd.access import Network
from hbd.control import query

T = TypeVar("T")


def bytes_each(items: Iterable[T], action: Callable[[T], object]) -> float:
    """What ``action`` keeps allocated per item, by tracemalloc (Python's own allocations)."""
    todo = list(items)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for item in todo:
            action(item)
        return (tracemalloc.get_traced_memory()[0] - before) / len(todo)
    finally:
        tracemalloc.stop()


def close_pairs(loop: Any, pairs: Iterable[tuple[socket.socket, socket.socket]]) -> None:
    """Forget each pair's first socket in ``loop``, close both, then the loop."""
    for a, b in pairs:
        loop.forget(a)
        a.close()
        b.close()
    loop.close()


def report(title: str, lines: list[str]) -> None:
    text = "\n".join([f"== {title}", *lines, ""])
    print("\n" + text)
    path = os.environ.get("HBD_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


class NotifySocket:
    """Plays systemd's side of sd_notify: a unix datagram socket that collects messages."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, needle: str, timeout: float = 5.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        for t, m in self.messages:
            if needle in m:
                return t, m
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                m = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), m))
            if needle in m:
                return self.messages[-1]
        raise AssertionError(f"no notify message with {needle!r}; got {[m for _, m in self.messages]}")

    def collect(self, needle: str, seconds: float) -> list[float]:
        """Arrival times of messages containing ``needle`` over the next ``seconds``."""
        times = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                m = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            if needle in m:
                times.append(time.monotonic())
        return times

    def close(self) -> None:
        self.sock.close()


def run_reload(loop, reloads, timeout: float = 10.0) -> None:
    """Turn ``loop`` until ``reloads`` (a daemon's hbd.reloading.Reloader) has nothing under way or
    asked for. A reload's load runs in a real loader process: the loop is turned without waiting, so
    a virtual clock does not move meanwhile (and no load timeout fires)."""
    deadline = time.monotonic() + timeout
    while not reloads.idle:
        assert time.monotonic() < deadline, "the reload did not finish"
        loop.run_once(0)
        time.sleep(0.001)


def status_of(path: Path) -> dict:
    """A daemon's ``hbd status --json`` document, from its status socket."""
    return json.loads(query(str(path), "status"))


def peers_of(path: Path) -> dict[str, dict]:
    """A server's peers by how they are shown (name, else address)."""
    return {p["peer"]: p for p in status_of(path)["peers"]}


def wait_until(predicate: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll ``predicate`` until it returns something true (returned), else fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def drain(loop, sock: socket.socket, step: float, clock: Callable[[], float], limit: float = 60.0) -> bytes:
    """Turn ``loop`` (``run_once(step)``) and read a non-blocking ``sock`` until its end of file or
    ``limit`` on ``clock``; what was read."""
    t0 = clock()
    data = b""
    while clock() - t0 < limit:
        loop.run_once(step)
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return data


@dataclass(frozen=True)
class Exp:
    """An expected peer as the registry reads one from the configuration (hbd.peers_config.ExpectedPeer's shape)."""

    name: str
    address: Network | None = None
    timeout: float | None = None
    labels: tuple[tuple[str, str], ...] = ()


class _StillLoop:
    """What a status document needs of a loop when nothing runs: its clock, and wake-ups never taken."""

    def __init__(self, now: float) -> None:
        self.now = now

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> None:
        pass


def status_document(view: Any, loop: Any = None) -> dict[str, Any]:
    """The document a server answers ``status`` with (hbd.status_select, the empty filter), whole;
    ``loop``: the daemon's, else one standing still at the view's time. A view made of rows alone
    (a test's) gets them as its source, as a daemon's view has them."""
    from dataclasses import replace

    from hbd import status_select
    from hbd.status_filter import StatusFilter
    from hbd.view import PeerSource, SupervisorView

    if not view.sources:
        rows = list(view.peers)
        source = PeerSource(len(rows), lambda i: (rows[i].name, rows[i].address, rows[i].state), rows.__getitem__)
        view = replace(view, peers=rows, sources=(source,))
    loop = loop or _StillLoop(view.daemon.now)
    if isinstance(view, SupervisorView):
        reply = status_select.supervisor_select(view, StatusFilter(), loop, None, lambda: None)
    else:
        reply = status_select.server_select(view, StatusFilter(), loop, lambda: None)
    return json.loads(b"".join(chunk for chunk in reply if chunk))
