"""State-change hooks: run the ``on_change`` command when a peer goes up, late or down.

Like keepalived's notify scripts, the command gets the event as arguments (``EVENT PEER ADDRESS
ROLE``) and as ``HBD_*`` environment variables. Hooks never hold up the event loop:

- a hook is a child process started with ``subprocess.Popen`` (fork + exec, then we move on) in
  its own session, with stdin from /dev/null and our stdout/stderr (the journal under systemd);
- children are reaped on SIGCHLD, delivered through the loop's wakeup fd, with ``waitpid(pid,
  WNOHANG)`` for our own children only (a supervisor's ``waitpid(-1)`` is never disturbed);
- a hook still running after ``hook_timeout`` is killed with its whole process group;
- at most ``hook_max_concurrent`` run at once, and at most START_RATE start per second; later
  events wait in a queue of at most ``hook_max_queued``. When it is full the oldest waiting event
  is dropped with a warning, so a flapping peer (or 19,000 clients reconnecting at once) costs a
  bounded number of processes, a bounded share of the loop and a bounded amount of memory.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence

from hbd.logs import PeerLog, fields, log
from hbd.loop import EventLoop, Timer

DROP_REPORT_INTERVAL = 10.0  # at most one "dropped" warning per this many seconds
# Starting a process costs the loop ~3 ms when hbd holds 19,000 sockets (fork copies the page and
# fd tables): however quickly hooks finish, at most this many start per second (~6% of the loop).
START_RATE = 20.0
RECHECK_AFTER_KILL = 1.0


class Job:
    """One hook run: what to run, and once started, its process and timeout timer."""

    __slots__ = ("address", "event", "extra", "killed", "peer", "proc", "started", "timer", "when")

    def __init__(self, event: str, peer: str, address: str, extra: dict[str, object]) -> None:
        self.event = event
        self.peer = peer
        self.address = address
        self.extra = extra
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
        self.queue: deque[Job] = deque()
        self.running: dict[int, Job] = {}  # by pid
        self.counts = {"ok": 0, "failed": 0, "timeout": 0, "error": 0, "dropped": 0}
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
        while len(self.queue) > max_queued:
            self._drop_oldest()
        self._pump()

    # -- events -------------------------------------------------------------------------------------
    def fire(self, event: str, peer: str, address: str, extra: Mapping[str, object] = ()) -> None:
        """Queue a run of the hook for this event (nothing happens without ``on_change``)."""
        if self.command is None or not self.enabled:
            return
        job = Job(event, peer, address, dict(extra))  # cheap: a storm mostly ends in the drop below
        if self.max_queued == 0 and (len(self.running) >= self.max_running or self._tokens() < 1):
            self._dropped(job)
            return
        if len(self.queue) >= max(self.max_queued, 1):
            self._drop_oldest()
        self.queue.append(job)
        self._pump()

    def _drop_oldest(self) -> None:
        self._dropped(self.queue.popleft())

    def _dropped(self, job: Job) -> None:
        self.counts["dropped"] += 1
        self._dropped_unreported += 1
        now = self.loop.time()
        if now - self._drop_reported_at >= DROP_REPORT_INTERVAL:
            log.warning(
                "hook queue full (%d running, %d waiting): dropped %d event%s, the last %s for %s",
                len(self.running), len(self.queue), self._dropped_unreported,
                "s" if self._dropped_unreported != 1 else "", job.event, job.peer,
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
            if self._tokens() < 1:
                if self._pump_timer is None:  # a start is due once the bucket has a token again
                    self._pump_timer = self.loop.call_later((1 - self._bucket) / START_RATE, self._pump_later)
                return
            self._bucket -= 1
            self._start(self.queue.popleft())

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
        env.update({
            "HBD_EVENT": job.event,
            "HBD_PEER": job.peer,
            "HBD_ADDRESS": job.address,
            "HBD_ROLE": self.role,
            "HBD_TIME": f"{job.when:.3f}",  # when it happened: a queued run starts later
        })
        for key, value in job.extra.items():
            env[f"HBD_{key.upper()}"] = "" if value is None else str(value)
        args = [*self.command, job.event, job.peer, job.address, self.role]
        try:
            proc = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            self.counts["error"] += 1
            self.peer_log.log(logging.ERROR, _source(job), "cannot run the on_change hook %s for %s %s: %s",
                              args[0], job.event, job.peer, getattr(exc, "strerror", None) or exc,
                              event="hook-failed", peer=job.peer, peer_address=job.address)
            return
        job.proc = proc
        job.started = self.loop.time()
        job.timer = self.loop.call_at(job.started + self.timeout, lambda: self._expire(job))
        self.running[proc.pid] = job
        log.debug("hook %s %s started (pid %d)", job.event, job.peer, proc.pid,
                  extra=fields(event="hook-started", peer=job.peer, peer_address=job.address))

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
        self.loop.cancel(job.timer)
        if job.killed:
            return  # already reported as timed out
        rc = job.proc.returncode
        took = self.loop.time() - job.started
        if rc == 0:
            self.counts["ok"] += 1
            log.debug("hook %s %s done in %.3f s", job.event, job.peer, took,
                      extra=fields(event="hook-done", peer=job.peer, peer_address=job.address))
            return
        self.counts["failed"] += 1
        how = f"killed by {_signame(-rc)}" if rc < 0 else f"exit status {rc}"
        self.peer_log.log(logging.WARNING, _source(job), "on_change hook for %s %s failed: %s after %.3f s",
                          job.event, job.peer, how, took, event="hook-failed", peer=job.peer,
                          peer_address=job.address)

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
            self.peer_log.log(logging.WARNING, _source(job),
                              "on_change hook for %s %s still running after %g s; killing it (pid %d)",
                              job.event, job.peer, self.loop.time() - job.started, proc.pid,
                              event="hook-timeout", peer=job.peer, peer_address=job.address)
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
