"""hbd.heap: young garbage cycles are still collected, what lives on is frozen once per interval, and
a connection's whole life leaves no reference cycle behind (so freezing its objects leaks nothing)."""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from inprocess import run_until, virtual
from virtual_time import FakeClock
from virtual_time import run_until as run_to

from hbd import heap
from hbd.config import ServerConfig
from hbd.connection import Connection
from hbd.heap import FREEZE_INTERVAL, Heap
from hbd.loop import EventLoop
from hbd.protocol import ServerPeer
from hbd.registry_types import Peer
from hbd.server import Server


class Node:
    def __init__(self) -> None:
        self.me: object = None


def walked(obj: object) -> bool:
    """Whether the collector would walk ``obj`` (it is in one of its generations, not frozen)."""
    return any(o is obj for g in range(3) for o in gc.get_objects(g))


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's objects go back to the collector afterwards."""
    yield
    gc.unfreeze()
    heap.frozen = False


def test_garbage_cycles_are_collected_and_what_lives_is_frozen_every_interval(
    vloop: EventLoop, vclock: FakeClock, unfrozen: None
) -> None:
    live = Node()
    dead = Node()
    dead.me = dead  # a cycle that is garbage: collected, not frozen with the rest
    gone = weakref.ref(dead)
    del dead
    h = Heap(vloop).start()
    assert heap.frozen and h.freezes == 1
    assert gone() is None
    assert not walked(live) and gc.is_tracked(live)  # frozen, not untracked: freed by its last reference
    later = Node()
    assert walked(later)
    run_to(vloop, vclock, vclock.now + FREEZE_INTERVAL + 0.01)
    assert h.freezes == 2 and not walked(later)
    h.close()
    assert not heap.frozen and walked(live)  # back to the collector
    run_to(vloop, vclock, vclock.now + 3 * FREEZE_INTERVAL)
    assert h.freezes == 2


def test_malloc_gives_its_free_pages_back_every_trim_every_freezes(
    vloop: EventLoop, vclock: FakeClock, unfrozen: None
) -> None:
    """Every ``trim_every`` freezes malloc_trim(0) returns what malloc holds free (what a ramp freed
    stays in RSS otherwise); it stops with the heap's timer."""
    calls: list[int] = []
    h = Heap(vloop, trim=calls.append, trim_every=3).start()
    run_to(vloop, vclock, vclock.now + 6 * FREEZE_INTERVAL + 0.01)
    assert h.freezes == 7 and calls == [0, 0] and h.trims == 2
    h.close()
    run_to(vloop, vclock, vclock.now + 10 * FREEZE_INTERVAL)
    assert calls == [0, 0]
    trim = heap.malloc_trim()  # glibc's, on Linux
    assert trim is not None and trim(0) in (0, 1)


def test_a_connections_whole_life_leaves_no_reference_cycle(tmp_path: Path) -> None:
    """Named peers with the registry and the state store; ended every way a connection ends (the client
    closes, garbage, silence, a second connection taking its name over): the collector then finds
    no connection, protocol peer or registry record among the garbage."""
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        heartbeat_timeout=1.0,
        log_file=None,
        control_socket=None,
        state_dir=str(tmp_path),
        forget_after=1.0,
    )
    srv, clock, _ = virtual(Server, cfg)
    loop = srv.loop
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        clients = [socket.create_connection(srv.address) for _ in range(80)]
        loop.run_once(0)
        for i, c in enumerate(clients):
            c.sendall(f"hello host{i % 60}\nping".encode())  # 60..79 take 0..19's names over
        for _ in range(5):
            loop.run_once(0)
        for c in clients[20:40]:
            c.close()  # disconnected
        for c in clients[40:50]:
            c.sendall(b"garbage!")  # rejected
        run_until(loop, clock, clock.now - 1000.0 + 5.0)  # the rest fall silent: closed at their timeout
        assert not srv.conns
        for c in clients:
            c.close()
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, (Connection, ServerPeer, Peer))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        srv.ops.close()
        srv.shutdown()
        loop.close()
    assert srv.report.stats["accepted"] == 80
    assert leaked == []
