"""State-change hooks: run the ``on_change`` command when a peer goes up, late or down.

Like keepalived's notify scripts, the command gets the event as arguments (``EVENT PEER ADDRESS
ROLE``) and as ``HBD_*`` environment variables. Hooks never hold up the event loop:

- a hook is a child process started with ``subprocess.Popen`` (fork + exec, then we move on) in
  its own session, with stdin from /dev/null and our stdout/stderr (the journal under systemd);
- children are reaped on SIGCHLD, delivered through the loop's wakeup fd, with ``waitpid(pid,
  WNOHANG)`` for our own children only (a supervisor's ``waitpid(-1)`` is never disturbed);
- a hook still running after ``hook_timeout`` is killed with its whole process group;
- at most ``hook_max_concurrent`` run at once, and at most START_RATE (hbd.hook_queue) start per second; later
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

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from hbd.hook_queue import Change, HookQueue
from hbd.logs import PeerLog, fields, log
from hbd.loop import EventLoop, Timer

DROP_REPORT_INTERVAL = 10.0  # at most one "dropped" warning per this many seconds
RECHECK_AFTER_KILL = 1.0


class Run:
    """One started hook run: its change, process and timeout timer."""

    __slots__ = ("change", "killed", "proc", "started", "timer")

    def __init__(self, change: Change, proc: subprocess.Popen[bytes], started: float) -> None:
        self.change = change
        self.proc = proc
        self.started = started
        self.timer: Timer | None = None
        self.killed = False  # by us, at its timeout


class HookRunner:
    """Runs the hook's processes (spawn, reap on SIGCHLD, timeout kill) for the changes its
    ``HookQueue`` lets through, and says what happened (counts, rate-limited lines)."""

    def __init__(self, loop: EventLoop, role: str) -> None:
        self.loop = loop
        self.role = role
        self.command: tuple[str, ...] | None = None
        self.timeout = 10.0
        self.queue = HookQueue()
        self.running: dict[int, Run] = {}  # by pid
        self.counts = {"ok": 0, "failed": 0, "timeout": 0, "error": 0, "dropped": 0, "coalesced": 0}
        self.enabled = True  # off while the daemon stops: closing every peer is not news
        self._sigchld = False
        self._dropped_unreported = 0
        self._drop_reported_at = float("-inf")
        self._pump_timer: Timer | None = None
        # Failures are rate-limited like every line a peer can cause (a flapping peer fails the
        # hook on every flip); the daemon shares its own PeerLog here so one budget covers all.
        self.peer_log = PeerLog(loop.time)

    def configure(self, command: Sequence[str] | None, timeout: float, max_running: int, max_queued: int) -> None:
        """Apply (new) settings; runs already started keep the timeout they started with."""
        self.command = tuple(command) if command else None
        self.timeout = timeout
        if self.command is None:
            self.queue.clear()
        for victim in self.queue.configure(max_running, max_queued):
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
        change = Change(event, peer, address, dict(extra), standing)  # cheap: a storm mostly ends in a drop
        dropped = self.queue.offer(change, self.loop.time(), len(self.running))
        if change.coalesced:
            self.counts["coalesced"] += 1
            return
        if dropped is not None:
            self._dropped(dropped)
        if dropped is not change:
            self._pump()

    def _dropped(self, change: Change) -> None:
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
                change.event,
                change.peer,
                extra=fields(event="hook-dropped", peer=change.peer, peer_address=change.address),
            )
            self._drop_reported_at = now
            self._dropped_unreported = 0

    def _pump(self) -> None:
        while True:
            nxt = self.queue.take(self.loop.time(), len(self.running))
            if nxt is None:
                return  # slots full, nothing waiting, or each waits for its peer's run: _reap() pumps again
            if isinstance(nxt, float):
                if self._pump_timer is None:  # a start is due once the bucket has a token again
                    self._pump_timer = self.loop.call_later(nxt, self._pump_later)
                return
            self._start(nxt)

    def _pump_later(self) -> None:
        self._pump_timer = None
        self._pump()

    # -- processes ----------------------------------------------------------------------------------
    def _start(self, job: Change) -> None:
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
            self.queue.done(job)
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
        run = Run(job, proc, self.loop.time())
        run.timer = self.loop.call_at(run.started + self.timeout, lambda: self._expire(run))
        self.running[proc.pid] = run
        log.debug(
            "hook %s %s started (pid %d)",
            job.event,
            job.peer,
            proc.pid,
            extra=fields(event="hook-started", peer=job.peer, peer_address=job.address),
        )

    def _reap(self) -> None:
        """SIGCHLD: collect every hook that has finished."""
        for run in list(self.running.values()):
            if run.proc.poll() is not None:
                self._finished(run)
        self._pump()

    def _finished(self, run: Run) -> None:
        job = run.change
        del self.running[run.proc.pid]
        self.queue.done(job)
        self.loop.cancel(run.timer)
        if run.killed:
            return  # already reported as timed out
        rc = run.proc.returncode
        took = self.loop.time() - run.started
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

    def _expire(self, run: Run) -> None:
        """The hook outlived ``hook_timeout``: kill its process group (again, until it is gone)."""
        proc, job = run.proc, run.change
        if self.running.get(proc.pid) is not run:
            return
        if proc.poll() is not None:
            self._reap()
            return
        if not run.killed:
            run.killed = True
            self.counts["timeout"] += 1
            self.peer_log.log(
                logging.WARNING,
                _source(job),
                "on_change hook for %s %s still running after %g s; killing it (pid %d)",
                job.event,
                job.peer,
                self.loop.time() - run.started,
                proc.pid,
                event="hook-timeout",
                peer=job.peer,
                peer_address=job.address,
            )
        _killpg(proc.pid)
        # Normally reaped on its SIGCHLD; this re-check only guards against a lost signal.
        run.timer = self.loop.call_later(RECHECK_AFTER_KILL, lambda: self._expire(run))

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
        for run in self.running.values():
            self.loop.cancel(run.timer)


def _source(job: Change) -> str:
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
