"""The supervisor's table of worker processes: fork with the validated configuration, the pipes both
ways (the message pump), reaping, restarting and the hang check.

It knows nothing of the daemon it serves: the supervisor (hbd.workers) hands down what a forked child
runs (``child``), where a worker's log lines go (``to_file``) and how many workers are wanted now
(``wanted``), and reads the table back for its status and its reload verdict. With the peer registry
(``peers``, hbd.supervisor_registry) the workers' reports go to it, its orders go to the worker that
holds the connection, and a worker that exits takes its connections with it (``worker_died``).
"""

from __future__ import annotations

import functools
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Protocol, cast

from hbd.config import ServerConfig
from hbd.early import LOOP_SIGNALS
from hbd.errors import StartError
from hbd.logs import fields, log
from hbd.loop import EventLoop, Timer
from hbd.workers_codec import (
    PIPE_READ,
    REPORTS,
    Decoder,
    LogLine,
    Message,
    Numbers,
    PeerOrder,
    PeerReport,
    Ready,
    Reloaded,
    Status,
    encode,
)

READY_TIMEOUT = 10.0  # a worker that does not listen within this is a start-up failure
HANG_AFTER = 10.0  # a worker silent this long (it reports every second) is killed and restarted
STALL_GAP = 3.0  # hang checks (about one a second) this far apart: the supervisor itself stalled
RESTART_DELAY = 1.0
STOP_TIMEOUT = 5.0
MAX_OUTBUF = 1 << 20  # bytes queued for one worker past which the registry's orders to it are dropped
# Reports read in one loop turn, shared out among the workers' pipes (each read at most PIPE_READ, at
# least MIN_READ): with 24 workers a turn read 24 x 16 KB, about 4,000 reports, and the registry's
# work on them made one turn of 12 s on a loaded machine at 400,000 clients, so the status socket
# (three turns: accept, request, reply) took a minute to answer. What a turn leaves stays in the
# pipes (the workers queue it: workers_codec.MAX_PENDING) for the next turns. 64 KB was still about
# 800 reports, 30-55 ms of the registry's CPU a turn (40-50 us a greeting's first ping at 100,000 peers),
# and a turn of the 100,000-client reconnect storm took 0.4-1.3 s on the loaded 2-core machine
# (preempted ~10x as long as it ran): 16 KB was about 200 reports, 8-10 ms. Packed (hbd.workers_codec)
# a report is half as long (a greeting ~45 bytes, its first ping ~50): 8 KB is those 200 reports.
# In bench.scale's teardown (99,000 ends at once, the state store on: 30-38 us an end) that was 7-9 ms
# of CPU a turn, and the turns took 60-210 ms: 17 tasks runnable on 2 cores, the supervisor's wait in
# the run queue 8-23x the CPU it used (so the wall time of a turn grows with its CPU). 2 KB is ~56 ends
# or ~45 reports of a storm, ~2 ms; a turn's own cost (a select, a read per pipe) is a few percent of it.
TURN_READ = 2 * 1024
_REPORTS = frozenset(REPORTS)
MIN_READ = 256  # a few reports: with more than TURN_READ / MIN_READ workers (8) a turn reads more
# The registry's orders to the workers are written at most this often (one write per worker: a write
# wakes a worker waiting in select(), and a woken task may take the supervisor's core from it). With
# turns of TURN_READ 2 KB a storm's orders went out every ~2.5 ms, 4x as often as with 8 KB, and its
# phases took 1.2-1.6x as long (bench.mass_down); an order waits at most this long more.
FLUSH_GAP = 0.008
# The supervisor's signals (LOOP_SIGNALS) are blocked across fork() and in a new worker until its own loop
# handles them (Daemon.run unblocks them): until then the worker still has the supervisor's handlers, whose
# wakeup fd is the supervisor's (a SIGHUP meant for the worker would reload the supervisor). A signal sent
# meanwhile stays pending and reaches the worker's own handler.

# In the forked child: serve ``config`` as worker ``index`` over the pipe fds (up, down); the exit status.
Child = Callable[[ServerConfig, int, int, int], int]


class Peers(Protocol):
    """The supervisor's peer registry (hbd.supervisor_registry.SupervisorRegistry)."""

    def report(self, index: int, msg: PeerReport) -> None: ...
    def worker_died(self, index: int, reason: str = ...) -> None: ...


class Worker:
    __slots__ = (
        "clients",
        "decoder",
        "due",
        "index",
        "last_seen",
        "late",
        "numbers",
        "outbuf",
        "pid",
        "ready",
        "reload",
        "rfd",
        "wfd",
        "writing",
    )

    def __init__(self, index: int, pid: int, rfd: int, wfd: int, now: float) -> None:
        self.index = index
        self.pid = pid
        self.rfd = rfd  # its messages to us
        self.wfd = wfd  # ours to it (Reload)
        self.outbuf = bytearray()  # what the pipe to it did not take yet (appended in place: O(1) a frame)
        self.writing = False  # a writer callback is registered for wfd (set and dropped once, not per message)
        self.due = False  # its flush is due at the end of this loop turn (WorkerPool.send)
        self.decoder = Decoder()
        self.last_seen = now
        self.ready = False
        self.clients = 0
        self.late = 0
        self.numbers: dict = {}  # its latest counters, for the supervisor's metrics
        self.reload: str | None = None  # its latest reload outcome ("ok" or the reason it failed)


class WorkerPool:
    def __init__(
        self,
        loop: EventLoop,
        child: Child,
        to_file: Callable[[int, int, str], None],
        wanted: Callable[[], ServerConfig],
    ) -> None:
        self.loop = loop
        self._child = child
        self._to_file = to_file  # (worker index, level, message): a worker's log line for our file
        self._wanted = wanted  # the configuration in force: how many workers, and what a restart serves
        self.workers: dict[int, Worker] = {}  # by pid
        self.stopping = False
        self.peers: Peers | None = None  # the peer registry the workers report to
        self.orders_dropped = 0  # orders to a worker whose pipe was full (it is hung: it will be restarted)
        self._checked_at: float | None = None  # our own last hang check (its gap: how long we stalled)
        self._due: list[Worker] = []  # workers sent something this turn: flushed once, by one timer
        self._due_timer: Timer | None = None
        self._flushed_at = -FLUSH_GAP  # (loop time) the latest flush of the orders: the next one FLUSH_GAP later

    def by_index(self) -> list[Worker]:
        return sorted(self.workers.values(), key=lambda w: w.index)

    # -- start and stop -----------------------------------------------------------------------------
    def spawn(self, index: int, config: ServerConfig) -> None:
        """A worker serving the (validated) ``config``: it gets it from our memory, across the fork."""
        rfd, up = os.pipe()
        down, wfd = os.pipe()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(rfd)
            os.close(wfd)
            code = 70
            try:
                code = self._child(config, index, up, down)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(up)
        os.close(down)
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        worker = Worker(index, pid, rfd, wfd, self.loop.time())
        self.workers[pid] = worker
        self.loop.add_reader(rfd, lambda: self._on_pipe(worker))

    def wait_ready(self) -> None:
        """Start-up only (the loop is not running yet): block until every worker listens."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers.values()):
            left = deadline - time.monotonic()
            pending = [w for w in self.workers.values() if not w.ready]
            if left <= 0:
                self.stop()
                raise StartError(f"{len(pending)} worker(s) did not start within {READY_TIMEOUT:g} s")
            readable, _, _ = select.select([w.rfd for w in pending], [], [], left)
            for w in pending:
                if w.rfd in readable and not self._on_pipe(w):
                    _, status = os.waitpid(w.pid, 0)
                    self._forget(w)  # reaped: stop() must not wait for it
                    self.stop()
                    raise StartError(f"worker {w.index} exited during start-up (status {status})")

    def stop(self) -> None:
        """Stop every worker (the loop has stopped: this may wait, STOP_TIMEOUT at most, then kills)."""
        self.stopping = True
        for w in self.workers.values():
            kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            self.reap(quiet=True)
            if self.workers:
                time.sleep(0.02)  # shutdown only: the loop has stopped
        for w in list(self.workers.values()):
            log.error("worker %d (pid %d) did not stop within %g s; killing it", w.index, w.pid, STOP_TIMEOUT)
            kill(w.pid, signal.SIGKILL)
            os.waitpid(w.pid, 0)
            self._forget(w)

    def close_in_child(self) -> None:
        """In a newly forked worker: the other workers' pipes are not its business."""
        for w in self.workers.values():
            os.close(w.rfd)
            os.close(w.wfd)

    # -- the pipe ---------------------------------------------------------------------------------------
    def _on_pipe(self, w: Worker) -> bool:
        """Read what a worker sent; False at EOF (the worker is gone)."""
        try:
            data = os.read(w.rfd, self.read_size())
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.loop.forget(w.rfd)
            return False
        w.last_seen = self.loop.time()
        decoder = w.decoder
        for msg in decoder.feed(data):
            self._on_message(w, msg)
        if decoder.errors:  # a bug (the other end is ours): say so; the frames after them were good
            for error in decoder.take_errors():
                log.error("worker %d: %s", w.index, error)
        if decoder.broken is not None:  # where its next frame starts is lost: nothing more can be read
            log.error("worker %d (pid %d): %s; restarting it", w.index, w.pid, decoder.broken)
            self.loop.forget(w.rfd)
            kill(w.pid, signal.SIGKILL)  # reap() forgets it, its connections are gone, and it is restarted
        return True

    def read_size(self) -> int:
        """Bytes one pipe read takes: TURN_READ shared out among the workers (PIPE_READ at most)."""
        return max(MIN_READ, min(PIPE_READ, TURN_READ // max(1, len(self.workers))))

    def _on_message(self, w: Worker, msg: Message) -> None:
        if type(msg) in _REPORTS:  # first: a storm's turn hands the registry hundreds (one set lookup)
            if self.peers is not None:
                self.peers.report(w.index, cast(PeerReport, msg))
        elif isinstance(msg, Ready):
            w.ready = True
        elif isinstance(msg, Status):
            w.clients, w.late = msg.clients, msg.late
        elif isinstance(msg, Reloaded):
            w.reload = "ok" if msg.error is None else msg.error or "failed"
        elif isinstance(msg, Numbers):
            w.numbers = msg.values
        elif isinstance(msg, LogLine):
            self._to_file(w.index, msg.level, msg.message)

    def order(self, index: int, msg: PeerOrder) -> None:
        """The registry's order to the worker holding that connection; dropped (counted) if that
        worker's pipe holds MAX_OUTBUF already: it is not reading, and will be restarted."""
        for w in self.workers.values():
            if w.index == index:
                if len(w.outbuf) > MAX_OUTBUF:
                    self.orders_dropped += 1
                else:
                    self.send(w, msg)
                return

    def backlog(self) -> int:
        """Bytes waiting in the fullest pipe to a worker."""
        return max((len(w.outbuf) for w in self.workers.values()), default=0)

    def send(self, w: Worker, msg: Message) -> None:
        """To a worker, never blocking: queued, and written once this loop turn's callbacks are done
        (one write() of all that is queued for it, not one per order: a storm's turn sends hundreds;
        FLUSH_GAP after the last at the soonest); what its pipe does not take then is written when it can."""
        w.outbuf += encode(msg)
        if w.writing or w.due:  # the pipe is full (its writer callback flushes), or a flush is due
            return
        w.due = True
        self._due.append(w)
        if self._due_timer is None:  # one timer for every worker's flush: after this turn's I/O (FLUSH_GAP)
            self._due_timer = self.loop.call_at(max(self.loop.time(), self._flushed_at + FLUSH_GAP), self._flush_due)

    def _flush_due(self) -> None:
        due, self._due, self._due_timer, self._flushed_at = self._due, [], None, self.loop.time()
        workers = self.workers
        for w in due:
            w.due = False
            if workers.get(w.pid) is w:  # (one that exited meanwhile: its descriptor is closed, maybe reused)
                self._flush(w)

    def _flush(self, w: Worker) -> None:
        try:
            sent = os.write(w.wfd, w.outbuf) if w.outbuf else 0
        except BlockingIOError:
            sent = 0
        except OSError:  # it is gone: reap() forgets it
            sent = len(w.outbuf)
        del w.outbuf[:sent]
        if bool(w.outbuf) is w.writing:
            return
        w.writing = bool(w.outbuf)
        if w.writing:
            self.loop.add_writer(w.wfd, lambda: self._flush(w))
        else:
            self.loop.remove_writer(w.wfd)

    # -- children -----------------------------------------------------------------------------------------
    def reap(self, quiet: bool = False) -> None:
        """SIGCHLD: forget the workers that exited and restart the ones still wanted."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.get(pid)
            if w is None:
                continue
            self._forget(w)
            if self.stopping or quiet:
                continue
            wanted = self._wanted().workers
            if w.index > wanted:
                log.info("worker %d stopped (workers reduced to %d)", w.index, wanted)
                if self.peers is not None:
                    self.peers.worker_died(w.index, "worker stopped")
                continue
            log.error(
                "worker %d (pid %d) exited unexpectedly (%s); restarting it in %g s",
                w.index,
                pid,
                _describe(status),
                RESTART_DELAY,
                extra=fields(event="worker-died"),
            )
            if self.peers is not None:  # its clients reconnect to the other workers
                self.peers.worker_died(w.index)
            self.loop.call_later(RESTART_DELAY, functools.partial(self._restart, w.index))

    def _restart(self, index: int) -> None:
        if not self.stopping and all(w.index != index for w in self.workers.values()):
            self.spawn(index, self._wanted())

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.pid, None)
        for fd in (w.rfd, w.wfd):
            self.loop.forget(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def check_hung(self) -> None:
        """Kill a ready worker that stopped reporting for HANG_AFTER (reap() restarts it). Called about
        once a second; after a longer gap it is we who stalled, not reading the pipes meanwhile: the
        workers' silence is ours, so each gets HANG_AFTER afresh (as clients are forgiven our stall)."""
        now = self.loop.time()
        checked, self._checked_at = self._checked_at, now
        if checked is not None and now - checked > STALL_GAP:
            for w in self.workers.values():
                w.last_seen = max(w.last_seen, now)
            return
        for w in list(self.workers.values()):
            if w.ready and now - w.last_seen > HANG_AFTER:
                log.error(
                    "worker %d (pid %d) stopped reporting for %.0f s; killing it",
                    w.index,
                    w.pid,
                    now - w.last_seen,
                    extra=fields(event="worker-hung"),
                )
                w.last_seen = now
                kill(w.pid, signal.SIGKILL)


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
