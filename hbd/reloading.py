"""A daemon's reloads: validate the whole new configuration, then commit it or keep the old one, and
the ``hbd reload`` requests waiting for a verdict.

The daemon hands down what is its own: ``attempt`` runs one reload (SIGHUP's path: everything that
can fail first, then the commit) and ``verdict`` says when a reload's answer is known (a supervisor
waits for its workers); ``stopping`` says the daemon is on its way out. The outcome counters live
here, read by the status view and the STATUS= line.
"""

from __future__ import annotations

from collections.abc import Callable

from hbd.errors import HbdError
from hbd.logs import log
from hbd.loop import EventLoop

Done = Callable[[list[str]], None]  # a reload's answer: [] = applied, else one line per error
Commit = Callable[[], None]


class Reloader:
    def __init__(
        self,
        loop: EventLoop,
        attempt: Callable[[], bool],
        verdict: Callable[[list[str], Done], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.loop = loop
        self._attempt = attempt
        self._verdict = verdict
        self._stopping = stopping
        self.ok = 0
        self.failed = 0
        self.last_error: str | None = None
        self.last_errors: list[str] = []
        self._waiters: list[Done] = []  # asked, not yet started
        self._running = False  # started; its verdict not yet known (workers still answering)

    def run(self, path: str, prepare: Callable[[], Commit]) -> bool:
        """One reload of ``path``: ``prepare()`` does all that can fail (changing nothing when it
        raises) and returns the commit. Whatever it raises, the running configuration stays."""
        log.info("reloading %s", path)
        try:
            commit = prepare()
        except Exception as exc:
            if not isinstance(exc, HbdError):
                log.error("reload failed: unexpected error", exc_info=True)  # a bug: one traceback
            errors = exc.errors if isinstance(exc, HbdError) else [str(exc) or type(exc).__name__]
            for line in errors:
                log.error("reload failed: %s", line, extra={"fields": {"EVENT": "reload-failed"}})
            log.error("reload failed: still running with the previous configuration of %s", path)
            self.failed += 1
            self.last_error = errors[0]
            self.last_errors = errors
            return False
        commit()
        self.ok += 1
        self.last_error = None
        self.last_errors = []
        log.info("reloaded %s", path, extra={"fields": {"EVENT": "reloaded"}})
        return True

    # -- asked for over the control socket (``hbd reload``, the units' ExecReload=) ---------------------
    def request(self, done: Done) -> None:
        """Reload from the loop, then call ``done(errors)`` ([] = applied). Requests that arrive while
        one is pending share the next reload, so a flood of them costs one reload at a time."""
        self._waiters.append(done)
        if not self._running and len(self._waiters) == 1:
            self.loop.call_later(0, self._run_requested)

    def _run_requested(self) -> None:
        waiters, self._waiters = self._waiters, []
        if not waiters or self._stopping():
            for done in waiters:
                done(["the daemon is stopping"])
            return
        self._running = True

        def finished(errors: list[str]) -> None:
            self._running = False
            for done in waiters:
                done(errors)
            if self._waiters:  # asked again meanwhile: that needs a reload of its own
                self.loop.call_later(0, self._run_requested)

        ok = self._attempt()
        self._verdict(list(self.last_errors) if not ok else [], finished)
