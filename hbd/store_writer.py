"""A daemon's side of its state store: opening it at start-up, and a loop timer that hands it what to
write. Both daemons use it: the server for its registry (peers, silences) and the history of its
peers, the client for the history of its server links (``ChangeRecord.side`` "client").

``open_store`` (blocking, before the loop runs) opens ``<state_dir>/<file>`` and reads what it
remembers; the store is written by a thread of its own (hbd.store_thread), so the loop only hands rows
over. ``StoreWriter`` is the loop's side: each state change is queued as it happens (``change``,
O(1)); every FLUSH_INTERVAL it hands over the registry's changed peers (a bounded batch; again on the
next turn while more wait) and wakes the writer; it marks the daemon's run alive every ALIVE_INTERVAL
and once more at close (``hbd history`` counts the time the daemon was down as unknown), and every
PRUNE_INTERVAL asks the store to prune what is older than ``history_days``. It stops for good if the
store fails (said once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hbd.logs import fields, log
from hbd.state_store import DB_NAME, ChangeRecord, PeerRecord, SilenceRecord, StoreError
from hbd.store_thread import StoreThread

if TYPE_CHECKING:
    from hbd.loop import EventLoop, Timer
    from hbd.registry import Live, Registry

FLUSH_INTERVAL = 0.5  # seconds between hand-overs to the state store (kill -9 loses about this much)
ALIVE_INTERVAL = 1.0  # seconds between the run's signs of life (`hbd history`: after a crash, unknown from there)
PRUNE_INTERVAL = 60.0  # seconds between asking the store to prune the history past history_days
DAY = 86400.0


class Store(Protocol):
    """What this needs of the state store (hbd.store_thread.StoreThread, or a StateStore written on
    the loop's thread): queueing is O(1) and ``flush`` is one bounded step (or just a wake-up)."""

    @property
    def failed(self) -> str | None: ...

    def put_peer(self, rec: PeerRecord) -> None: ...
    def forget_peer(self, name: str) -> None: ...
    def put_silence(self, rec: SilenceRecord) -> None: ...
    def drop_silence(self, name: str) -> None: ...
    def add_change(self, rec: ChangeRecord) -> None: ...
    def start_run(self, now: float) -> None: ...
    def alive(self, now: float) -> None: ...
    def prune_changes(self, before: float) -> None: ...
    def flush(self) -> bool: ...
    def take_messages(self) -> list[str]: ...
    def close(self) -> None: ...


class StoreWriter:
    """The loop's side of the state store; see the module docstring. ``registry``: the server's
    (its changed peers and silences are written too); a client has none."""

    def __init__(
        self,
        loop: EventLoop,
        store: Store,
        wall: Callable[[], float],
        history_days: int = 30,
        *,
        registry: Registry | None = None,
        live: Callable[[object], Live | None] | None = None,
        side: str = "server",
    ) -> None:
        self.loop = loop
        self.registry = registry
        self.store = store
        self.wall = wall
        self.live = live
        self.side = side
        self.history_days = history_days
        # The loop's share of the store: the hand-overs (the timer's callback: the registry's changed
        # peers, then waking the writer), how many and the longest (perf counter seconds), logged at
        # close (docs/performance.md, bench/mass_down.py).
        self.flushes = 0
        self.longest_flush = 0.0
        self.longest_flush_cpu = 0.0  # the longest one's CPU time: the rest waited for a core (or the GIL)
        self._messages()
        now = loop.clock()
        store.start_run(wall())
        store.flush()  # before the loop runs: the run is on file before the daemon listens, so a reader
        # right after a restart does not take the killed run's recent sign of life for this one's
        self._alive_at = now + ALIVE_INTERVAL
        self._prune_at = now  # the first flush prunes what went stale while the daemon was stopped
        self._timer: Timer | None = loop.call_later(FLUSH_INTERVAL, self._flush)

    def change(self, peer: str, old: str, new: str, reason: str) -> None:
        """A state change (UP, LATE, DOWN) for the history: queued, written by a later flush."""
        self.store.add_change(ChangeRecord(self.wall(), peer, old, new, reason, self.side))

    def _flush(self) -> None:
        started, cpu = time.perf_counter(), time.thread_time()
        store = self.store
        now = self.loop.clock()
        if now >= self._alive_at:
            self._alive_at = now + ALIVE_INTERVAL
            store.alive(self.wall())
        if now >= self._prune_at:
            self._prune_at = now + PRUNE_INTERVAL
            store.prune_changes(self.wall() - self.history_days * DAY)
        self._queue()
        more = store.flush()
        self.flushes += 1
        took = time.perf_counter() - started
        if took > self.longest_flush:
            self.longest_flush, self.longest_flush_cpu = took, time.thread_time() - cpu
        more = more or (self.registry is not None and self.registry.dirty() > 0)
        self._messages()
        if store.failed is not None:
            self._timer = None  # it said why, once; the daemon runs on without it
            return
        self._timer = self.loop.call_later(0 if more else FLUSH_INTERVAL, self._flush)

    def _queue(self) -> None:
        if self.registry is None:
            return
        store = self.store
        dirty = self.registry.take_dirty(self.loop.clock(), self.wall(), self.live)
        for rec in dirty.peers:
            store.put_peer(rec)
        for name in dirty.forgotten:
            store.forget_peer(name)
        for sil in dirty.silences:
            store.put_silence(sil)
        for name in dirty.unsilenced:
            store.drop_silence(name)

    def _messages(self) -> None:
        for message in self.store.take_messages():
            log.warning("%s", message, extra=fields(event="state-store"))

    def close(self) -> None:
        """At shutdown: connected peers are written with their last pings (after a restart they get
        their grace), then everything still queued (blocking: after the loop)."""
        self.loop.cancel(self._timer)
        self._timer = None
        wait = getattr(self.store, "longest_wait", 0.0)  # a StateStore's (a test's fake has none)
        log.info(
            "state store: %d flushes from the loop, the longest %.1f ms (CPU %.1f ms);"
            " the longest wait for the writer %.2f ms",
            self.flushes,
            self.longest_flush * 1000,
            self.longest_flush_cpu * 1000,
            wait * 1000,
            extra=fields(event="state-store"),
        )
        if self.store.failed is None:
            self.store.alive(self.wall())
            if self.registry is not None:
                self.registry.mark_connected_dirty()
                while True:
                    self._queue()
                    if not self.registry.dirty():
                        break
        self.store.close()
        self._messages()


def open_store(
    state_dir: str | None, file: str = DB_NAME, what: str = "peers and silences"
) -> tuple[StoreThread | None, list[PeerRecord], list[SilenceRecord]]:
    """The state store ``<state_dir>/<file>`` and what it remembers; without one (none configured, or
    it cannot be opened: said once) the daemon runs on memory alone (``what`` will not outlive it).
    Blocking: before the loop."""
    if state_dir is None:
        return None, [], []
    if not os.path.isdir(state_dir):
        # /var/lib/hbd comes from the unit's StateDirectory=; run by hand there is none (as for the
        # status socket's directory: an informational line, not a warning)
        log.info(
            "no state store: the directory %s does not exist (set state_dir to an existing directory, or null)",
            state_dir,
            extra=fields(event="state-store"),
        )
        return None, [], []
    try:
        store = StoreThread.open(state_dir, file=file)
    except StoreError as exc:
        log.warning(
            "no state store, %s will not outlive this process: %s",
            what,
            exc,
            extra=fields(event="state-store"),
        )
        return None, [], []
    snapshot = store.load()  # on this thread: the writer starts with the first flush
    return store, snapshot.peers, snapshot.silences
