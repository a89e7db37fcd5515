"""State-change hooks: run the ``on_change`` command when a peer goes up, late or down.

Like keepalived's notify scripts, the command gets the event as arguments (``EVENT PEER ADDRESS
ROLE``) and as ``HBD_*`` environment variables. Hooks never hold up the event loop:

- a hook is a child process started with ``subprocess.Popen`` (fork + exec, then we move on) in
  its own session, with stdin from /dev/null and our stdout/stderr (the journal under systemd);
- children are reaped on SIGCHLD, delivered through the loop's wakeup fd, with ``waitpid(pid,
  WNOHANG)`` for our own children only (a supervisor's ``waitpid(-1)`` is never disturbed);
- a hook still running after ``hook_timeout`` is killed with its whole process group;
- at most ``hook_max_concurrent`` run at once, and at most START_RATE start per second; later
  events wait, so a flapping peer (or 19,000 clients reconnecting at once) costs a bounded number
  of processes, a bounded share of the loop and a bounded amount of memory.

Waiting is fair per peer (a peer is its name or address together with its address, as the hook
sees them): each peer has at most one waiting run, its latest change. A change that comes while
the previous one still waits replaces it, keeps its place in line and counts it (``HBD_COALESCED``),
so a flapping peer only loses its own intermediate flips. The hooks of one peer run one after the
other, in the order of its changes, never two at once. At most ``hook_max_queued`` peers wait; when
one more comes, the change of the least established peer is dropped (``standing``: how long the
peer had held its previous state or connection; ties: the one waiting longest), with a warning. A
stranger that connects and leaves at once, from however many addresses, only pushes out the likes
of itself; a peer that was up for a while keeps its place unless more than ``hook_max_queued``
such peers change at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import signal
import subprocess
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from hbd.logs import PeerLog, fields, log
from hbd.loop import EventLoop, Timer

DROP_REPORT_INTERVAL = 10.0  # at most one "dropped" warning per this many seconds
# Starting a process costs the loop ~3 ms when hbd holds 19,000 sockets (fork copies the page and
# fd tables): however quickly hooks finish, at most this many start per second (~6% of the loop).
START_RATE = 20.0
RECHECK_AFTER_KILL = 1.0


class Job:
    """One hook run: what to run, and once started, its process and timeout timer."""

    __slots__ = (
        "address",
        "coalesced",
        "event",
        "extra",
        "key",
        "killed",
        "peer",
        "proc",
        "seq",
        "standing",
        "started",
        "timer",
        "when",
    )

    def __init__(self, event: str, peer: str, address: str, extra: dict[str, object], standing: float = 0.0) -> None:
        self.event = event
        self.peer = peer
        self.address = address
        self.extra = extra
        self.key = f"{peer} {address}"
        self.standing = standing
        self.coalesced = 0  # earlier changes of this peer that this run replaces
        self.seq = 0
        self.when = time.time()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.timer: Timer | None = None
        self.killed = False  # by us, at its timeout


class HookRunner:
    def __init__(self, loop: EventLoop, role: str) -> None:
        self.loop = loop
        self.role = role
        self.command: tuple[str, ...] | None = None
        self.timeout = 10.0
        self.max_running = 4
        self.max_queued = 100
        self.queue: OrderedDict[str, Job] = OrderedDict()  # by peer key: its latest waiting change
        self.running: dict[int, Job] = {}  # by pid
        self.counts = {"ok": 0, "failed": 0, "timeout": 0, "error": 0, "dropped": 0, "coalesced": 0}
        self._busy: set[str] = set()  # peers with a run going: their next one waits for its end
        self._order: list[tuple[float, int, str]] = []  # heap (standing, seq, key): who is dropped first
        self._seq = itertools.count()
        self.enabled = True  # off while the daemon stops: closing every peer is not news
        self._sigchld = False
        self._dropped_unreported = 0
        self._drop_reported_at = float("-inf")
        self._bucket = 0.0
        self._bucket_at = float("-inf")  # full at the first use
        self._pump_timer: Timer | None = None
        # Failures are rate-limited like every line a peer can cause (a flapping peer fails the
        # hook on every flip); the daemon shares its own PeerLog here so one budget covers all.
        self.peer_log = PeerLog(loop.time)

    def configure(self, command: Sequence[str] | None, timeout: float, max_running: int, max_queued: int) -> None:
        """Apply (new) settings; runs already started keep the timeout they started with."""
        self.command = tuple(command) if command else None
        self.timeout = timeout
        self.max_running = max_running
        self.max_queued = max_queued
        if self.command is None:
            self.queue.clear()
            self._order.clear()
        while len(self.queue) > max_queued:
            victim = self._least_established()
            assert victim is not None
            del self.queue[victim.key]
            self._dropped(victim)
        self._pump()

    # -- events -------------------------------------------------------------------------------------
    def fire(
        self,
        event: str,
        peer: str,
        address: str,
        extra: Mapping[str, object] = MappingProxyType({}),
        standing: float = 0.0,
    ) -> None:
        """Queue a run of the hook for this event (nothing happens without ``on_change``).

        ``standing``: how long the peer had held its previous state (or its connection), seconds;
        when too many peers wait, the least established one's change is dropped first."""
        if self.command is None or not self.enabled:
            return
        job = Job(event, peer, address, dict(extra), standing)  # cheap: a storm mostly ends in a drop
        waiting = self.queue.get(job.key)
        if waiting is not None:  # its previous change has not run yet: replaced, in the same place in line
            job.coalesced = waiting.coalesced + 1
            self.counts["coalesced"] += 1
            self.queue[job.key] = job
            self._rank(job)
            return
        if self.max_queued == 0 and (
            len(self.running) >= self.max_running or self._tokens() < 1 or job.key in self._busy
        ):
            self._dropped(job)
            return
        if len(self.queue) >= max(self.max_queued, 1):
            victim = self._least_established()
            if victim is None or job.standing < victim.standing:
                self._dropped(job)  # the newcomer is the least established of all
                return
            del self.queue[victim.key]
            self._dropped(victim)
        self.queue[job.key] = job
        self._rank(job)
        self._pump()

    def _rank(self, job: Job) -> None:
        job.seq = next(self._seq)
        heapq.heappush(self._order, (job.standing, job.seq, job.key))
        if len(self._order) > 2 * len(self.queue) + 64:  # entries of started or replaced runs pile up
            self._order = [(j.standing, j.seq, j.key) for j in self.queue.values()]
            heapq.heapify(self._order)

    def _least_established(self) -> Job | None:
        order = self._order
        while order:
            _, seq, key = order[0]
            job = self.queue.get(key)
            if job is not None and job.seq == seq:
                return job
            heapq.heappop(order)  # started or replaced since
        return None

    def _dropped(self, job: Job) -> None:
        self.counts["dropped"] += 1
        self._dropped_unreported += 1
        now = self.loop.time()
        if now - self._drop_reported_at >= DROP_REPORT_INTERVAL:
            log.warning(
                "hook queue full (%d running, %d waiting): dropped %d event%s, the last %s for %s",
                len(self.running),
                len(self.queue),
                self._dropped_unreported,
                "s" if self._dropped_unreported != 1 else "",
                job.event,
                job.peer,
                extra=fields(event="hook-dropped", peer=job.peer, peer_address=job.address),
            )
            self._drop_reported_at = now
            self._dropped_unreported = 0

    def _tokens(self) -> float:
        """Process starts allowed right now: a bucket of ``max_running``, refilled START_RATE a second."""
        now = self.loop.time()
        self._bucket = min(float(self.max_running), self._bucket + (now - self._bucket_at) * START_RATE)
        self._bucket_at = now
        return self._bucket

    def _pump(self) -> None:
        while self.queue and len(self.running) < self.max_running:
            # The first in line whose peer has no run going (at most max_running are skipped).
            job = next((j for j in self.queue.values() if j.key not in self._busy), None)
            if job is None:
                return  # each waits for its peer's run to end; _reap() pumps again
            if self._tokens() < 1:
                if self._pump_timer is None:  # a start is due once the bucket has a token again
                    self._pump_timer = self.loop.call_later((1 - self._bucket) / START_RATE, self._pump_later)
                return
            self._bucket -= 1
            del self.queue[job.key]
            self._start(job)

    def _pump_later(self) -> None:
        self._pump_timer = None
        self._pump()

    # -- processes ----------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        if not self._sigchld:  # registered on first use: a process that never runs hooks keeps its own
            self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
            self._sigchld = True
        assert self.command is not None
        env = dict(os.environ)
        env.update(
            {
                "HBD_EVENT": job.event,
                "HBD_PEER": job.peer,
                "HBD_ADDRESS": job.address,
                "HBD_ROLE": self.role,
                "HBD_TIME": f"{job.when:.3f}",  # when it happened: a queued run starts later
                "HBD_COALESCED": str(job.coalesced),  # changes of this peer replaced by this one, never run
            }
        )
        for key, value in job.extra.items():
            env[f"HBD_{key.upper()}"] = "" if value is None else str(value)
        args = [*self.command, job.event, job.peer, job.address, self.role]
        try:
            proc = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self.counts["error"] += 1
            self.peer_log.log(
                logging.ERROR,
                _source(job),
                "cannot run the on_change hook %s for %s %s: %s",
                args[0],
                job.event,
                job.peer,
                getattr(exc, "strerror", None) or exc,
                event="hook-failed",
                peer=job.peer,
                peer_address=job.address,
            )
            return
        job.proc = proc
        job.started = self.loop.time()
        job.timer = self.loop.call_at(job.started + self.timeout, lambda: self._expire(job))
        self.running[proc.pid] = job
        self._busy.add(job.key)
        log.debug(
            "hook %s %s started (pid %d)",
            job.event,
            job.peer,
            proc.pid,
            extra=fields(event="hook-started", peer=job.peer, peer_address=job.address),
        )

    def _reap(self) -> None:
        """SIGCHLD: collect every hook that has finished."""
        for job in list(self.running.values()):
            assert job.proc is not None
            if job.proc.poll() is not None:
                self._finished(job)
        self._pump()

    def _finished(self, job: Job) -> None:
        assert job.proc is not None
        del self.running[job.proc.pid]
        self._busy.discard(job.key)
        self.loop.cancel(job.timer)
        if job.killed:
            return  # already reported as timed out
        rc = job.proc.returncode
        took = self.loop.time() - job.started
        if rc == 0:
            self.counts["ok"] += 1
            log.debug(
                "hook %s %s done in %.3f s",
                job.event,
                job.peer,
                took,
                extra=fields(event="hook-done", peer=job.peer, peer_address=job.address),
            )
            return
        self.counts["failed"] += 1
        how = f"killed by {_signame(-rc)}" if rc < 0 else f"exit status {rc}"
        self.peer_log.log(
            logging.WARNING,
            _source(job),
            "on_change hook for %s %s failed: %s after %.3f s",
            job.event,
            job.peer,
            how,
            took,
            event="hook-failed",
            peer=job.peer,
            peer_address=job.address,
        )

    def _expire(self, job: Job) -> None:
        """The hook outlived ``hook_timeout``: kill its process group (again, until it is gone)."""
        proc = job.proc
        assert proc is not None
        if self.running.get(proc.pid) is not job:
            return
        if proc.poll() is not None:
            self._reap()
            return
        if not job.killed:
            job.killed = True
            self.counts["timeout"] += 1
            self.peer_log.log(
                logging.WARNING,
                _source(job),
                "on_change hook for %s %s still running after %g s; killing it (pid %d)",
                job.event,
                job.peer,
                self.loop.time() - job.started,
                proc.pid,
                event="hook-timeout",
                peer=job.peer,
                peer_address=job.address,
            )
        _killpg(proc.pid)
        # Normally reaped on its SIGCHLD; this re-check only guards against a lost signal.
        job.timer = self.loop.call_later(RECHECK_AFTER_KILL, lambda: self._expire(job))

    @property
    def busy(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.queue)

    def close(self) -> None:
        """Stop queueing; hooks already running finish on their own (they are in their own session)."""
        self.enabled = False
        self.queue.clear()
        self._order.clear()
        self.loop.cancel(self._pump_timer)
        self._pump_timer = None
        for job in self.running.values():
            self.loop.cancel(job.timer)


def _source(job: Job) -> str:
    """The rate limit's source: the peer's host, without the port that changes with each connection."""
    return job.address.rsplit(":", 1)[0] if ":" in job.address else job.address


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the hook and anything it started
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
