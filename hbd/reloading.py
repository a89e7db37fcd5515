"""A daemon's reloads: load the new configuration off the loop, then on the loop validate the rest and
commit it or keep the old one; and the ``hbd reload`` requests waiting for a verdict.

Loading (reading, parsing and validating the files: seconds of CPU for a 100,000-entry peers_file)
runs in a loader process (hbd.reload_process) while the loop goes on serving; its outcome comes back
through the loop's selector. Everything else (log file, sockets, the daemon's part) is prepared and
committed on the loop as before. Reloads are serialised: one at a time, from the load to the verdict;
SIGHUPs that arrive meanwhile make one more reload afterwards (so the newest file wins), requests share
the next one. A load that does not come back within LOAD_TIMEOUT (a file on a hung NFS mount, a loader
that hangs) is cancelled (its process killed) and fails the reload; so is the one under way at shutdown.

The daemon hands down what is its own (``ReloadHost``). The outcome counters live here, read by the
status view and the STATUS= line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, cast

from hbd.errors import HbdError, StartError
from hbd.logs import log
from hbd.loop import EventLoop, Timer

Done = Callable[[list[str]], None]  # a reload's answer: [] = applied, else one line per error
Commit = Callable[[], None]
T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
# A load's outcome, called once, on the loop: deliver(result, None) or deliver(None, exception)
Deliver = Callable[[object, Exception | None], None]

LOAD_TIMEOUT = 60.0  # seconds a load may take (seconds of CPU at most, unless a file hangs)


class Load(Protocol):
    """Loading a configuration off the loop (hbd.reload_process.ChildLoad; ``Given`` for one at hand)."""

    def start(self, loop: EventLoop, deliver: Deliver) -> None:
        """Begin; ``deliver`` is called on the loop once, later. Raises if it cannot begin."""
        ...

    def cancel(self) -> None:
        """Stop (kill its process); ``deliver`` is not called any more."""
        ...


class Given:
    """A load with nothing to do off the loop: ``make()`` is called on the loop, in a turn of its own
    (a worker's configuration, validated by its supervisor)."""

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make
        self._timer: Timer | None = None
        self._loop: EventLoop | None = None

    def start(self, loop: EventLoop, deliver: Deliver) -> None:
        def run() -> None:
            try:
                result = self.make()
            except Exception as exc:
                deliver(None, exc)
                return
            deliver(result, None)

        self._loop, self._timer = loop, loop.call_later(0, run)

    def cancel(self) -> None:
        if self._loop is not None:
            self._loop.cancel(self._timer)


class ReloadHost(Protocol[T_contra]):
    """What a reload needs from its daemon; everything here is called on the loop."""

    def reload_job(self) -> tuple[str, Load]:
        """The file to reload and the load of it (its result is the new configuration; an HbdError when
        it is invalid)."""
        ...

    def prepare_reload(self, new: T_contra) -> Commit:
        """All the rest that can fail, changing nothing when it raises; returns the commit."""
        ...

    def reload_began(self) -> None: ...

    def reload_ended(self, errors: list[str]) -> None: ...

    def reload_verdict(self, errors: list[str], finished: Done) -> None:
        """Call ``finished(errors)`` once the reload's answer is known (a supervisor asks its workers)."""
        ...

    def reload_stopping(self) -> bool: ...


class Reloader(Generic[T]):
    def __init__(self, loop: EventLoop, host: ReloadHost[T], timeout: float = LOAD_TIMEOUT) -> None:
        self.loop = loop
        self.host = host
        self.timeout = timeout
        self.ok = 0
        self.failed = 0
        self.last_error: str | None = None
        self.last_errors: list[str] = []
        self.busy = False  # a reload started and its verdict is not known yet
        self._again = False  # a SIGHUP (or a worker's Reload) asked for one more
        self._waiters: list[Done] = []  # asked over the control socket, not yet started
        self._queued = False  # a start is scheduled on the loop
        self._load: Load | None = None  # the load whose outcome is awaited
        self._answering: list[Done] = []  # and the requests it answers
        self._timer: Timer | None = None

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
        path = "the configuration"
        try:
            path, load = self.host.reload_job()
            self.host.reload_began()
            log.info("reloading %s", path)
            self._load, self._answering = load, waiters
            self._timer = self.loop.call_later(self.timeout, lambda: self._timed_out(load, path, waiters))
            load.start(self.loop, lambda result, error: self._loaded(load, path, waiters, result, error))
        except Exception as exc:  # no process could be started, say
            self._loaded(self._load, path, waiters, None, exc)

    def _timed_out(self, load: Load, path: str, waiters: list[Done]) -> None:
        load.cancel()
        error = StartError(
            f"{path}: loading took more than {self.timeout:g} s (a file on a hung filesystem?); its loader was killed"
        )
        self._loaded(load, path, waiters, None, error)

    def close(self) -> None:
        """At shutdown: the load under way is cancelled (its process killed); its requests are told."""
        load, self._load = self._load, None
        waiters, self._waiters = self._waiters, []
        if load is not None:
            load.cancel()
            self.loop.cancel(self._timer)
            self._timer = None
            self.busy = False
            waiters += self._answering
        for done in waiters:
            done(["the daemon is stopping"])

    def _loaded(
        self, load: Load | None, path: str, waiters: list[Done], result: object, error: Exception | None
    ) -> None:
        """The load's outcome, on the loop: prepare and commit (or keep the old configuration), then
        the verdict; the next reload starts once it is known."""
        if load is not self._load:
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
