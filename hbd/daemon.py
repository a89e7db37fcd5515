"""What the server and the client daemons share: start-up, signals, reload, watchdog, shutdown.

A subclass provides ``load()`` (parse + validate its config), ``start()``, ``prepare(new)`` (do
everything that can fail for a reload and return a commit function) and ``shutdown()``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from hbd.early import STRAY_SIGNALS, take_hup
from hbd.errors import HbdError
from hbd.errors import StartError as StartError  # re-exported: where callers import it from
from hbd.logs import Logging, PeerLog, log
from hbd.loop import EventLoop
from hbd.notify import Notifier
from hbd.ops import Ops
from hbd.silencing import Silencing
from hbd.view import DaemonView, DaemonViews

STATUS_INTERVAL = 1.0
# Every signal a daemon's loop handles. The supervisor blocks them across fork() (hbd/workers.py) and the
# worker keeps them blocked until run() has installed its own handlers.
LOOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, *STRAY_SIGNALS})
# Exit statuses of permanent failures, which the units do not restart (RestartPreventExitStatus=).
EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): the configuration is invalid
EXIT_GAVE_UP = 79  # the client gave up on every server after reconnect_attempts
# Tracebacks of unexpected errors: at most this many per window, then one summary line.
ERROR_BURST = 5
ERROR_WINDOW = 60.0


class Daemon:
    identifier = "hbd"
    role = "server"  # what the operator's surface shows: "server" or "client"
    supervises = False  # relays its workers' status (hbd.workers.Supervisor)
    worker_index: int | None = None  # set in each of several workers
    silencing: Silencing | None = None  # the registry's silences (hbd.silencing), where there is one

    def __init__(
        self,
        config: Any,
        *,
        loop: EventLoop | None = None,
        notifier: Notifier | None = None,
        logs: Logging | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.overrides = overrides or {}  # command-line settings that outlive reloads
        self.loop = loop if loop is not None else EventLoop()
        self.notifier = notifier if notifier is not None else Notifier()
        self.logs = logs if logs is not None else Logging(self.identifier)
        self.exit_code = 0
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_error: str | None = None
        self.last_reload_errors: list[str] = []
        self._reload_waiters: list[Callable[[list[str]], None]] = []  # asked, not yet started
        self._reload_running = False  # started; its verdict not yet known (workers still answering)
        self._stopping = False
        self.peer_log = PeerLog(self.loop.clock)  # lines peers can cause, rate-limited all together
        self.ops = Ops(self)  # status socket, metrics, on_change hooks
        self.internal_errors = 0
        self._errors_logged: list[float] = []  # when the recent tracebacks were logged
        self._errors_held = 0  # tracebacks left out since the last one logged
        self.loop.on_error = self.callback_failed

    # -- subclass hooks ---------------------------------------------------------------------------
    def load(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def prepare(self, new: Any) -> Callable[[], None]:
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

    def contain(self, fileobj: Any, callback: Any, exc: Exception) -> str | None:
        """A callback raised ``exc``: close the connection it served (``fileobj`` for I/O, None
        for a timer) and say which one, or return None when it belongs to none."""
        if self.ops.contain(fileobj):
            return "a status or metrics request"
        return None

    # -- unexpected errors ------------------------------------------------------------------------
    def callback_failed(self, fileobj: Any, callback: Any, exc: Exception) -> None:
        """The loop's error handler: close what the failing callback served, log one traceback
        (rate-limited: a peer that can trigger a bug must not flood the log) and go on serving."""
        self.internal_errors += 1
        try:
            what = self.contain(fileobj, callback, exc)
        except Exception as again:  # never let the handler itself take the process down
            what = f"(closing it failed too: {again!r})"
        now = self.loop.time()
        recent = self._errors_logged = [t for t in self._errors_logged if now - t < ERROR_WINDOW]
        if len(recent) >= ERROR_BURST:
            self._errors_held += 1
            return
        recent.append(now)
        held, self._errors_held = self._errors_held, 0
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
        try:
            loop.run()
        finally:
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

    def reload(self) -> bool:
        """SIGHUP: validate the whole new config first; keep the old one running if anything fails."""
        self.notifier.reloading()
        path = self.config.path
        log.info("reloading %s", path)
        handler = None
        try:
            new = self.load()
            handler = self.logs.prepare(new.log_file)
            ops_commit = self.ops.prepare(new)
            try:
                commit = self.prepare(new)
            except BaseException:
                self.ops.abort()
                raise
        except Exception as exc:  # whatever it is, the running configuration stays
            if handler is not None:
                self.logs.discard(handler)
            if not isinstance(exc, HbdError):
                log.error("reload failed: unexpected error", exc_info=True)  # a bug: one traceback
            errors = exc.errors if isinstance(exc, HbdError) else [str(exc) or type(exc).__name__]
            for line in errors:
                log.error("reload failed: %s", line, extra={"fields": {"EVENT": "reload-failed"}})
            log.error("reload failed: still running with the previous configuration of %s", path)
            self.reloads_failed += 1
            self.last_reload_error = errors[0]
            self.last_reload_errors = errors
            self._update_status()
            self.notifier.ready()
            self.on_reloaded(errors)
            return False
        self.logs.commit(new.log_level, new.log_file, handler)
        commit()
        ops_commit()
        self.config = new
        self.reloads_ok += 1
        self.last_reload_error = None
        self.last_reload_errors = []
        log.info("reloaded %s", path, extra={"fields": {"EVENT": "reloaded"}})
        self._update_status()
        self.notifier.ready()
        self.on_reloaded([])
        return True

    def on_reloaded(self, errors: list[str]) -> None:
        """After every reload, however asked for (a worker reports it to its supervisor)."""

    # -- reload asked for over the control socket (``hbd reload``, the units' ExecReload=) ---------------
    def request_reload(self, done: Callable[[list[str]], None]) -> None:
        """Reload from the loop, then call ``done(errors)`` ([] = applied). Requests that arrive while
        one is pending share the next reload, so a flood of them costs one reload at a time."""
        self._reload_waiters.append(done)
        if not self._reload_running and len(self._reload_waiters) == 1:
            self.loop.call_later(0, self._run_requested_reload)

    def _run_requested_reload(self) -> None:
        waiters, self._reload_waiters = self._reload_waiters, []
        if not waiters or self._stopping:
            for done in waiters:
                done(["the daemon is stopping"])
            return
        self._reload_running = True

        def finished(errors: list[str]) -> None:
            self._reload_running = False
            for done in waiters:
                done(errors)
            if self._reload_waiters:  # asked again meanwhile: that needs a reload of its own
                self.loop.call_later(0, self._run_requested_reload)

        ok = self.reload()
        self.reload_verdict(list(self.last_reload_errors) if not ok else [], finished)

    def reload_verdict(self, errors: list[str], finished: Callable[[list[str]], None]) -> None:
        """The answer for a requested reload; the supervisor overrides it to wait for its workers."""
        finished(errors)

    def log_status(self) -> None:
        """SIGUSR1: one line saying how the daemon is doing."""
        text = self.status_text() or "running"
        reloads = f"{self.reloads_ok} reloads ok, {self.reloads_failed} failed"
        if self.last_reload_error:
            reloads += f" (last: {self.last_reload_error})"
        log.info(
            "status: %s; %s; loop lag max %.1f ms",
            text,
            reloads,
            self.loop.max_lag * 1000,
            extra={"fields": {"EVENT": "status"}},
        )

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
