"""A daemon's reloads: load the new configuration off the loop, then on the loop validate the rest and
commit it or keep the old one; and the ``hbd reload`` requests waiting for a verdict.

Loading (reading and parsing the files: seconds of CPU for a 100,000-entry peers_file) is pure, so it
runs in a short-lived helper thread while the loop goes on serving; only its outcome comes back, through
``call_soon_threadsafe``. Everything else (log file, sockets, the daemon's part) is prepared and
committed on the loop as before. Reloads are serialised: one at a time, from the load to the verdict;
SIGHUPs that arrive meanwhile make one more reload afterwards, requests share the next one. A load that
does not come back within LOAD_TIMEOUT (a file on a hung NFS mount) fails the reload; its thread is left
behind, and at most MAX_UNFINISHED such threads are, so a stuck filesystem cannot pile them up.

The daemon hands down what is its own (``ReloadHost``). The outcome counters live here, read by the
status view and the STATUS= line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast

from hbd.errors import HbdError, StartError
from hbd.logs import log
from hbd.loop import EventLoop, Timer

Done = Callable[[list[str]], None]  # a reload's answer: [] = applied, else one line per error
Commit = Callable[[], None]
T = TypeVar("T")
# How a load is run off the loop: offload(load, deliver) calls deliver(result, None) or
# deliver(None, exception) once, from any thread.
Deliver = Callable[[object, Exception | None], None]
Offload = Callable[[Callable[[], object], Deliver], None]

LOAD_TIMEOUT = 60.0  # seconds a load may take (seconds of CPU at most, unless a file hangs)
MAX_UNFINISHED = 3  # loads given up on whose thread still runs: more and a reload fails at once


class ReloadHost(Protocol[T]):
    """What a reload needs from its daemon; everything here is called on the loop."""

    def reload_job(self) -> tuple[str, Callable[[], T]]:
        """The file to reload and the pure load of it (run in a helper thread: it may only read
        files and build the new configuration, raising HbdError when it is invalid)."""
        ...

    def prepare_reload(self, new: T) -> Commit:
        """All the rest that can fail, changing nothing when it raises; returns the commit."""
        ...

    def reload_began(self) -> None: ...

    def reload_ended(self, errors: list[str]) -> None: ...

    def reload_verdict(self, errors: list[str], finished: Done) -> None:
        """Call ``finished(errors)`` once the reload's answer is known (a supervisor asks its workers)."""
        ...

    def reload_stopping(self) -> bool: ...


def in_thread(load: Callable[[], object], deliver: Deliver) -> None:
    """Run ``load`` in a short-lived daemon thread (one stuck in a hung file read must not keep the
    process from exiting)."""

    def work() -> None:
        try:
            result = load()
        except Exception as exc:
            deliver(None, exc)
            return
        deliver(result, None)

    threading.Thread(target=work, name="hbd reload", daemon=True).start()


class Reloader(Generic[T]):
    def __init__(
        self, loop: EventLoop, host: ReloadHost[T], offload: Offload = in_thread, timeout: float = LOAD_TIMEOUT
    ) -> None:
        self.loop = loop
        self.host = host
        self.offload = offload
        self.timeout = timeout
        self.ok = 0
        self.failed = 0
        self.last_error: str | None = None
        self.last_errors: list[str] = []
        self.busy = False  # a reload started and its verdict is not known yet
        self._again = False  # a SIGHUP (or a worker's Reload) asked for one more
        self._waiters: list[Done] = []  # asked over the control socket, not yet started
        self._queued = False  # a start is scheduled on the loop
        self._load: object | None = None  # the load whose outcome is awaited
        self._timer: Timer | None = None
        self.unfinished = 0  # loads handed to a thread that have not come back (hung ones included)

    @property
    def idle(self) -> bool:
        """No reload under way or asked for."""
        return not self.busy and not self._queued

    def hup(self) -> None:
        """SIGHUP: a reload soon, or one more after the one under way (several coalesce into one)."""
        self._again = True
        self._kick()

    def request(self, done: Done) -> None:
        """``hbd reload``: reload from the loop, then call ``done(errors)`` ([] = applied). Requests that
        arrive while one is under way share the next reload, so a flood of them costs one at a time."""
        self._waiters.append(done)
        self._kick()

    def _kick(self) -> None:
        if not self.busy and not self._queued:
            self._queued = True
            self.loop.call_later(0, self._start)

    def _start(self) -> None:
        self._queued = False
        if self.busy or not (self._again or self._waiters):
            return
        waiters, self._waiters, self._again = self._waiters, [], False
        if self.host.reload_stopping():
            for done in waiters:
                done(["the daemon is stopping"])
            return
        self.busy = True
        token = self._load = object()
        path = "the configuration"
        try:
            path, load = self.host.reload_job()
            self.host.reload_began()
            log.info("reloading %s", path)
            if self.unfinished >= MAX_UNFINISHED:
                raise StartError(
                    f"{path}: {self.unfinished} earlier loads have not finished (a file on a hung filesystem?); "
                    "not starting another"
                )
            self._timer = self.loop.call_later(self.timeout, lambda: self._timed_out(token, path, waiters))

            def deliver(result: object, error: Exception | None) -> None:  # in the helper thread
                self.loop.call_soon_threadsafe(lambda: self._delivered(token, path, waiters, result, error))

            self.offload(load, deliver)
            self.unfinished += 1
        except Exception as exc:  # no thread could be started, say
            self._loaded(token, path, waiters, None, exc)

    def _delivered(
        self, token: object, path: str, waiters: list[Done], result: object, error: Exception | None
    ) -> None:
        self.unfinished -= 1
        if token is not self._load:
            log.info("a load of %s given up on has finished after all; its result is not used", path)
            return
        self._loaded(token, path, waiters, result, error)

    def _timed_out(self, token: object, path: str, waiters: list[Done]) -> None:
        error = StartError(
            f"{path}: loading took more than {self.timeout:g} s (a file on a hung filesystem?); gave up on it"
        )
        self._loaded(token, path, waiters, None, error)

    def _loaded(self, token: object, path: str, waiters: list[Done], result: object, error: Exception | None) -> None:
        """The load's outcome, on the loop: prepare and commit (or keep the old configuration), then
        the verdict; the next reload starts once it is known."""
        if token is not self._load:
            return
        self._load = None
        self.loop.cancel(self._timer)
        self._timer = None
        answered = False

        def finished(errors: list[str]) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            self.busy = False
            for done in waiters:
                done(errors)
            if self._again or self._waiters:  # asked again meanwhile: that needs a reload of its own
                self._kick()

        errors = ["an unexpected error while applying the new configuration (see the log)"]
        try:
            errors = self.apply(path, result, error)
            self.host.reload_ended(errors)
            self.host.reload_verdict(errors, finished)
        except Exception:
            finished(errors)  # a bug (a commit that raised, say) must not wedge the reloads after it
            raise

    def apply(self, path: str, new: object, error: Exception | None) -> list[str]:
        """Prepare ``new`` (or report ``error``, the load's) and commit it; whatever fails, the running
        configuration stays. Returns the errors ([] = applied)."""
        try:
            if error is not None:
                raise error
            commit = self.host.prepare_reload(cast(T, new))  # what reload_job's load returned
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
            return errors
        commit()
        self.ok += 1
        self.last_error = None
        self.last_errors = []
        log.info("reloaded %s", path, extra={"fields": {"EVENT": "reloaded"}})
        return []
