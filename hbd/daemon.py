"""What the server and the client daemons share: start-up, signals, reload, watchdog, shutdown.

A subclass provides ``loader()`` (the pure parse + validate of its config, run off the loop on
reload), ``start()``, ``prepare(new)`` (do everything else that can fail for a reload and return a
commit function) and ``shutdown()``. The reload machinery itself (loading off the loop, outcomes,
``hbd reload`` requests and their verdicts) is hbd.reloading's.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Generic, TypeVar

from hbd import cpu_slice
from hbd.early import LOOP_SIGNALS, STRAY_SIGNALS, take_hup
from hbd.errors import HbdError
from hbd.errors import StartError as StartError  # re-exported: where callers import it from
from hbd.heap import Heap
from hbd.logs import Logging, PeerLog, log
from hbd.loop import EventLoop
from hbd.notify import Notifier
from hbd.operated import DaemonConfig
from hbd.ops import Ops
from hbd.reloading import Commit, Load, Reloader
from hbd.silencing import Silencing
from hbd.view import DaemonView, DaemonViews

STATUS_INTERVAL = 1.0
# Exit statuses of permanent failures, which the units do not restart (RestartPreventExitStatus=).
EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): the configuration is invalid
EXIT_GAVE_UP = 79  # the client gave up on every server after reconnect_attempts
# Tracebacks of unexpected errors: at most this many per window, then one summary line.
ERROR_BURST = 5
ERROR_WINDOW = 60.0

C = TypeVar("C", bound=DaemonConfig)


class TracebackBudget:
    """At most ERROR_BURST tracebacks per ERROR_WINDOW seconds: a peer that can trigger a bug must not
    flood the log. ``take(now)``: None when over budget (one more held back), else how many were held."""

    def __init__(self) -> None:
        self._logged: list[float] = []  # when the recent tracebacks were logged
        self._held = 0  # tracebacks left out since the last one logged

    def take(self, now: float) -> int | None:
        recent = self._logged = [t for t in self._logged if now - t < ERROR_WINDOW]
        if len(recent) >= ERROR_BURST:
            self._held += 1
            return None
        recent.append(now)
        held, self._held = self._held, 0
        return held


class Daemon(Generic[C]):
    identifier = "hbd"
    role = "server"  # what the operator's surface shows: "server" or "client"
    supervises = False  # relays its workers' status (hbd.workers.Supervisor)
    worker_index: int | None = None  # set in each of several workers
    silencing: Silencing | None = None  # the registry's silences (hbd.silencing), where there is one

    def __init__(
        self,
        config: C,
        *,
        loop: EventLoop | None = None,
        notifier: Notifier | None = None,
        logs: Logging | None = None,
        overrides: dict[str, object] | None = None,
    ) -> None:
        self.config = config
        self.overrides = overrides or {}  # command-line settings that outlive reloads
        self.loop = loop if loop is not None else EventLoop()
        self.notifier = notifier if notifier is not None else Notifier()
        self.logs = logs if logs is not None else Logging(self.identifier)
        self.exit_code = 0
        self._stopping = False
        self.reloads: Reloader[C] = Reloader(self.loop, self)
        self.peer_log = PeerLog(self.loop.clock)  # lines peers can cause, rate-limited all together
        self.ops = Ops(self)  # status socket, metrics, on_change hooks
        self.internal_errors = 0
        self._tracebacks = TracebackBudget()
        self.loop.on_error = self.callback_failed

    # -- subclass hooks ---------------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def prepare(self, new: C) -> Callable[[], None]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def status_text(self) -> str:
        return ""

    def view(self) -> DaemonViews:
        """A read-only snapshot for the status socket and the metrics."""
        raise NotImplementedError

    def daemon_view(self) -> DaemonView:
        """The part of ``view()`` every daemon shares."""
        events, hooks, loop = self.ops.numbers()
        return DaemonView(
            role=self.role,
            now=self.loop.time(),
            started=self.ops.started_wall,
            status=self.status_text(),
            reloads_ok=self.reloads_ok,
            reloads_failed=self.reloads_failed,
            last_reload_error=self.last_reload_error,
            loop=loop,
            hooks=hooks,
            events=events,
            recent=tuple(self.ops.recent),
        )

    def contain(self, fileobj: object, callback: object, exc: Exception) -> str | None:
        """A callback raised ``exc``: close the connection it served (``fileobj`` for I/O, None
        for a timer) and say which one, or return None when it belongs to none."""
        if self.ops.contain(fileobj):
            return "a status or metrics request"
        return None

    # -- unexpected errors ------------------------------------------------------------------------
    def callback_failed(self, fileobj: object, callback: object, exc: Exception) -> None:
        """The loop's error handler: close what the failing callback served, log one traceback
        (rate-limited: a peer that can trigger a bug must not flood the log) and go on serving."""
        self.internal_errors += 1
        try:
            what = self.contain(fileobj, callback, exc)
        except Exception as again:  # never let the handler itself take the process down
            what = f"(closing it failed too: {again!r})"
        held = self._tracebacks.take(self.loop.time())
        if held is None:
            return
        log.error(
            "internal error in %s%s%s; carrying on",
            getattr(callback, "__qualname__", "a callback"),
            f" serving {what}" if what else "",
            f" ({held} more since the last one logged)" if held else "",
            exc_info=exc,
            extra={"fields": {"EVENT": "internal-error"}},
        )

    def on_status_tick(self) -> None:
        """Called every STATUS_INTERVAL seconds from the loop."""

    # -- lifecycle ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        loop = self.loop
        # Handlers first: a SIGHUP during start-up must queue a reload, not kill the process.
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.log_status)
        loop.add_signal_handler(signal.SIGUSR2, self.reopen_logs)
        for signum in STRAY_SIGNALS:  # by default they would kill us; they mean nothing here
            if signum not in (signal.SIGUSR1, signal.SIGUSR2):
                loop.add_signal_handler(signum, _ignore)
        # A new worker starts with these blocked (hbd/workers.py): what arrived meanwhile is delivered now, here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LOOP_SIGNALS)
        if take_hup():  # a SIGHUP came during start-up, before the loop could take it: reload once running
            loop.call_later(0, self.reload)
        try:
            self.logs.configure(self.config.log_level, self.config.log_file)
            cpu_slice.ask(self.config.cpu_slice_us)  # before any thread or worker starts: they inherit it
            self.ops.start()
            self.start()
        except HbdError as exc:
            log.error("cannot start: %s", exc)
            self.ops.close()
            self.logs.close()
            loop.close()
            return 1
        if self.notifier.watchdog_interval:
            self._pet_watchdog()
        self._update_status()
        self.notifier.ready(self.status_text())
        heap = Heap(loop).start()  # from now on, long-lived objects are not walked by the collector again
        try:
            loop.run()
        finally:
            heap.close()
            self.reloads.close()  # a loader process under way is killed
            self.notifier.stopping()
            self.ops.stopping()
            self.shutdown()
            self.ops.close()
            log.info("%s stopped", self.identifier)
            loop.close()
            self.notifier.close()
            self.logs.close()
        return self.exit_code

    def stop(self, exit_code: int = 0) -> None:
        if not self._stopping:
            self._stopping = True
            self.exit_code = exit_code
            self.notifier.stopping()
            self.loop.stop()

    def reload(self) -> None:
        """SIGHUP: reload soon, loading off the loop (hbd.reloading); if anything fails the old config stays."""
        self.reloads.hup()

    def loader(self) -> Load:
        """On the loop: the load of the new config (read files, parse, validate: hbd.reload_process)."""
        raise NotImplementedError

    # -- hbd.reloading.ReloadHost: called by the Reloader, on the loop --------------------------------
    def reload_job(self) -> tuple[str, Load]:
        return self.config.path, self.loader()

    def reload_began(self) -> None:
        self.notifier.reloading()

    def reload_ended(self, errors: list[str]) -> None:
        self._update_status()
        self.notifier.ready()
        self.on_reloaded(errors)

    def reload_stopping(self) -> bool:
        return self._stopping

    def prepare_reload(self, new: C) -> Commit:
        """Everything a reload does on the loop that can fail (log file, sockets, the subclass's
        part), changing nothing; the commit applies it all."""
        handler = self.logs.prepare(new.log_file)
        try:
            ops_commit = self.ops.prepare(new)
            try:
                commit = self.prepare(new)
            except BaseException:
                self.ops.abort()
                raise
        except Exception:
            self.logs.discard(handler)
            raise

        def commit_all() -> None:
            self.logs.commit(new.log_level, new.log_file, handler)
            commit()
            ops_commit()
            cpu_slice.ask(new.cpu_slice_us, self.config.cpu_slice_us)
            self.config = new

        return commit_all

    def on_reloaded(self, errors: list[str]) -> None:
        """After every reload, however asked for (a worker reports it to its supervisor)."""

    def request_reload(self, done: Callable[[list[str]], None]) -> None:  # ``hbd reload``: Reloader.request
        self.reloads.request(done)

    def reload_verdict(self, errors: list[str], finished: Callable[[list[str]], None]) -> None:
        """The answer for a reload; the supervisor overrides it to wait for its workers."""
        finished(errors)

    # What the status view and tests read: the reloads' outcomes.
    reloads_ok = property(lambda self: self.reloads.ok)
    reloads_failed = property(lambda self: self.reloads.failed)
    last_reload_error = property(lambda self: self.reloads.last_error)
    last_reload_errors = property(lambda self: self.reloads.last_errors)

    def log_status(self) -> None:
        """SIGUSR1: one line saying how the daemon is doing."""
        text = self.status_text() or "running"
        reloads = f"{self.reloads_ok} reloads ok, {self.reloads_failed} failed"
        if self.last_reload_error:
            reloads += f" (last: {self.last_reload_error})"
        lag = self.loop.max_lag * 1000
        log.info("status: %s; %s; loop lag max %.1f ms", text, reloads, lag, extra={"fields": {"EVENT": "status"}})

    def reopen_logs(self) -> None:
        """SIGUSR2: reopen the log file (after logrotate moved it away)."""
        self.logs.reopen()
        log.info("log file reopened", extra={"fields": {"EVENT": "log-reopened"}})

    def _pet_watchdog(self) -> None:
        # Petted from the loop itself, never a helper thread: a hung loop must starve the watchdog.
        self.notifier.watchdog()
        assert self.notifier.watchdog_interval
        self.loop.call_later(self.notifier.watchdog_interval / 2, self._pet_watchdog)

    def _update_status(self) -> None:
        text = self.status_text()
        if self.last_reload_error:
            text += f"; last reload failed: {self.last_reload_error}"
        self.notifier.status(text)

    def start_status_updates(self) -> None:
        def tick() -> None:
            self.peer_log.flush()
            self.on_status_tick()
            self._update_status()
            self.loop.call_later(STATUS_INTERVAL, tick)

        self.loop.call_later(STATUS_INTERVAL, tick)


def _ignore() -> None:
    """A signal that means nothing to hbd: caught (so it cannot kill us) and dropped."""
