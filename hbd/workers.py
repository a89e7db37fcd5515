"""``workers: K`` (K > 1): one supervisor process and K server processes sharing the port.

Each worker is an ordinary ``Server`` with its own event loop and its own SO_REUSEPORT listener, so
the kernel spreads new connections over the workers and each core runs one loop. The supervisor
serves no clients; it owns what must exist once per service:

- sd_notify: READY=1 only once every worker listens, STATUS= summed over the workers, WATCHDOG=1
  from its own loop. A worker that stops reporting (hung loop) is killed and restarted.
- The configuration: the supervisor reads and validates the file; a worker starts with that
  validated configuration and, on SIGHUP, is sent the new one (``Reload``): workers never read the
  file, so they cannot end up on a different version of it. SIGTERM/SIGINT: stop every worker, then exit.
- The error log file: workers send their warning and error lines up a pipe and the supervisor
  writes them, so one process rotates the file.

The messages (ready, status, counters, log lines, reload outcomes up; Reload down) are framed by
hbd.workers_codec. The supervisor's ``hbd reload`` answer waits for every worker's outcome, at most
RELOAD_TIMEOUT.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import select
import signal
import time
from collections.abc import Callable

from hbd.config import ServerConfig, load_server_config
from hbd.daemon import LOOP_SIGNALS, Daemon, StartError
from hbd.early import catch_signals, take_hup
from hbd.logs import Logging, fields, log
from hbd.names import bind_tcp
from hbd.notify import Notifier
from hbd.view import ServerSettings, SupervisorView, WorkerNumbers, WorkerRow
from hbd.workers_codec import (
    CodecError,
    Decoder,
    LogLine,
    Message,
    Numbers,
    PipeLogHandler,
    Ready,
    Reload,
    Reloaded,
    Status,
    WorkerChannel,
    encode,
)

READY_TIMEOUT = 10.0  # a worker that does not listen within this is a start-up failure
HANG_AFTER = 10.0  # a worker silent this long (it reports every second) is killed and restarted
RESTART_DELAY = 1.0
STOP_TIMEOUT = 5.0
RELOAD_TIMEOUT = 5.0  # how long a requested reload waits for the workers' outcomes
# The supervisor's signals (LOOP_SIGNALS) are blocked across fork() and in a new worker until its own loop
# handles them (Daemon.run unblocks them): until then the worker still has the supervisor's handlers, whose
# wakeup fd is the supervisor's (a SIGHUP meant for the worker would reload the supervisor). A signal sent
# meanwhile stays pending and reaches the worker's own handler.


class Worker:
    __slots__ = (
        "clients",
        "decoder",
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
    )

    def __init__(self, index: int, pid: int, rfd: int, wfd: int, now: float) -> None:
        self.index = index
        self.pid = pid
        self.rfd = rfd  # its messages to us
        self.wfd = wfd  # ours to it (Reload)
        self.outbuf = b""  # what the pipe to it did not take yet
        self.decoder = Decoder()
        self.last_seen = now
        self.ready = False
        self.clients = 0
        self.late = 0
        self.numbers: dict = {}  # its latest counters, for the supervisor's metrics
        self.reload: str | None = None  # its latest reload outcome ("ok" or the reason it failed)


class Supervisor(Daemon):
    identifier = "hbd-server"
    supervises = True

    def __init__(self, config: ServerConfig, **kwargs: object) -> None:
        super().__init__(config, **kwargs)  # type: ignore[arg-type]
        self.workers: dict[int, Worker] = {}  # by pid
        self._stopping_workers = False
        self._hupped: set[int] = set()  # pids sent SIGHUP by the latest reload

    def load(self) -> ServerConfig:
        return load_server_config(self.config.path, self.overrides)

    # -- start and stop -----------------------------------------------------------------------------
    def start(self) -> None:
        check_bind(self.config)
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for index in range(1, self.config.workers + 1):
            self._spawn(index, self.config)
        self._wait_ready()
        self.start_status_updates()
        log.info("%d workers listening on %s:%d", len(self.workers), self.config.host, self.config.port)

    def _spawn(self, index: int, config: ServerConfig) -> None:
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
                code = _run_worker(self, config, index, up, down)
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

    def _wait_ready(self) -> None:
        """Start-up only (the loop is not running yet): block until every worker listens."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers.values()):
            left = deadline - time.monotonic()
            pending = [w for w in self.workers.values() if not w.ready]
            if left <= 0:
                self.shutdown()
                raise StartError(f"{len(pending)} worker(s) did not start within {READY_TIMEOUT:g} s")
            readable, _, _ = select.select([w.rfd for w in pending], [], [], left)
            for w in pending:
                if w.rfd in readable and not self._on_pipe(w):
                    _, status = os.waitpid(w.pid, 0)
                    self._forget(w)  # reaped: shutdown() must not wait for it
                    self.shutdown()
                    raise StartError(f"worker {w.index} exited during start-up (status {status})")

    def shutdown(self) -> None:
        self._stopping_workers = True
        for w in self.workers.values():
            _kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.workers and time.monotonic() < deadline:
            self._reap(quiet=True)
            if self.workers:
                time.sleep(0.02)  # shutdown only: the loop has stopped
        for w in list(self.workers.values()):
            log.error("worker %d (pid %d) did not stop within %g s; killing it", w.index, w.pid, STOP_TIMEOUT)
            _kill(w.pid, signal.SIGKILL)
            os.waitpid(w.pid, 0)
            self._forget(w)

    # -- reload ---------------------------------------------------------------------------------------
    def prepare(self, new: ServerConfig) -> Callable[[], None]:
        old = self.config
        if (new.host, new.port) != (old.host, old.port):
            check_bind(new)
        if new.workers < 2:
            raise StartError("workers: going from several workers to 1 needs a restart (systemctl restart hbd-server)")

        def commit() -> None:
            by_index = sorted(self.workers.values(), key=lambda w: w.index)
            self._hupped = set()
            for w in by_index:
                if w.index > new.workers:
                    _kill(w.pid, signal.SIGTERM)  # surplus: stops; _reap will not replace it
                else:
                    w.reload = None
                    self._hupped.add(w.pid)
                    self._send(w, Reload(new))
            running = {w.index for w in by_index}
            for index in range(1, new.workers + 1):
                if index not in running:
                    self._spawn(index, new)  # self.config is still the old one here

        return commit

    def reload_verdict(self, errors: list[str], finished: Callable[[list[str]], None]) -> None:
        """A valid configuration was passed on: the answer is the workers' (each applies it, e.g. loads
        the TLS files and binds), collected from the pipe; a worker that dies or stays silent counts as a
        failure."""
        if errors:
            finished(errors)
            return
        deadline = self.loop.time() + RELOAD_TIMEOUT

        def check() -> None:
            pending = [pid for pid in self._hupped if pid in self.workers and self.workers[pid].reload is None]
            gone = [pid for pid in self._hupped if pid not in self.workers]
            if pending and self.loop.time() < deadline:
                self.loop.call_later(0.02, check)
                return
            failed = [
                f"worker {w.index}: {w.reload}"
                for w in sorted(self.workers.values(), key=lambda w: w.index)
                if w.pid in self._hupped and w.reload not in (None, "ok")
            ]
            failed += [f"worker {self.workers[pid].index}: no answer within {RELOAD_TIMEOUT:g} s" for pid in pending]
            failed += [f"a worker (pid {pid}) exited during the reload" for pid in gone]
            finished(failed)

        check()

    # -- the pipe ---------------------------------------------------------------------------------------
    def _on_pipe(self, w: Worker) -> bool:
        """Read what a worker sent; False at EOF (the worker is gone)."""
        try:
            data = os.read(w.rfd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.loop.forget(w.rfd)
            return False
        w.last_seen = self.loop.time()
        try:
            messages = w.decoder.feed(data)
        except CodecError as exc:  # a bug (the other end is ours): say so, carry on with the next frames
            log.error("worker %d: %s", w.index, exc)
            return True
        for msg in messages:
            self._on_message(w, msg)
        return True

    def _on_message(self, w: Worker, msg: Message) -> None:
        if isinstance(msg, Ready):
            w.ready = True
        elif isinstance(msg, Status):
            w.clients, w.late = msg.clients, msg.late
        elif isinstance(msg, Reloaded):
            w.reload = "ok" if msg.error is None else msg.error or "failed"
        elif isinstance(msg, Numbers):
            w.numbers = msg.values
        elif isinstance(msg, LogLine):
            self._to_file(w, msg.level, msg.message)

    def _send(self, w: Worker, msg: Message) -> None:
        """To a worker, never blocking: what its pipe does not take now is written when it can."""
        w.outbuf += encode(msg)
        self._flush(w)

    def _flush(self, w: Worker) -> None:
        try:
            sent = os.write(w.wfd, w.outbuf) if w.outbuf else 0
        except BlockingIOError:
            sent = 0
        except OSError:  # it is gone: _reap forgets it
            sent, w.outbuf = 0, b""
        w.outbuf = w.outbuf[sent:]
        if w.outbuf:
            self.loop.add_writer(w.wfd, lambda: self._flush(w))
        else:
            self.loop.remove_writer(w.wfd)

    def _to_file(self, w: Worker, level: int, message: str) -> None:
        handler = self.logs.file_handler
        if handler is not None:
            handler.handle(log.makeRecord(log.name, level, __file__, 0, f"worker {w.index}: {message}", (), None))

    # -- children -----------------------------------------------------------------------------------------
    def _reap(self, quiet: bool = False) -> None:
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
            if self._stopping_workers or quiet:
                continue
            if w.index > self.config.workers:
                log.info("worker %d stopped (workers reduced to %d)", w.index, self.config.workers)
                continue
            log.error(
                "worker %d (pid %d) exited unexpectedly (%s); restarting it in %g s",
                w.index,
                pid,
                _describe(status),
                RESTART_DELAY,
                extra=fields(event="worker-died"),
            )
            self.loop.call_later(RESTART_DELAY, functools.partial(self._restart, w.index))

    def _restart(self, index: int) -> None:
        if not self._stopping_workers and all(w.index != index for w in self.workers.values()):
            self._spawn(index, self.config)

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.pid, None)
        for fd in (w.rfd, w.wfd):
            self.loop.forget(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    def status_text(self) -> str:
        clients = sum(w.clients for w in self.workers.values())
        late = sum(w.late for w in self.workers.values())
        return f"{clients} client{'s' if clients != 1 else ''}, {late} late, {len(self.workers)} workers"

    def view(self) -> SupervisorView:
        cfg = self.config
        workers = tuple(
            WorkerRow(w.index, w.pid, w.clients, w.late, WorkerNumbers.from_dict(w.numbers) if w.numbers else None)
            for w in sorted(self.workers.values(), key=lambda w: w.index)
        )
        return SupervisorView(
            self.daemon_view(),
            f"{cfg.host}:{cfg.port}",
            ServerSettings(cfg.heartbeat_timeout, cfg.max_clients, cfg.workers),
            workers,
        )

    def on_status_tick(self) -> None:
        now = self.loop.time()
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
                _kill(w.pid, signal.SIGKILL)  # _reap restarts it


def _run_worker(sup: Supervisor, config: ServerConfig, index: int, up: int, down: int) -> int:
    """In the forked child (LOOP_SIGNALS blocked): drop the supervisor's loop and signal state, then serve
    ``config``."""
    from hbd.server import Server

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    take_hup()
    catch_signals()  # a HUP (or a stray USR1...) before the worker's loop runs must not kill it
    sup.loop.close_in_child()
    sup.ops.close_in_child()
    for w in sup.workers.values():
        os.close(w.rfd)
        os.close(w.wfd)
    channel = WorkerChannel(up, index, config, rfd=down)
    logs = Logging(f"hbd-server/{index}", journald=sup.logs.journald)
    server = Server(
        dataclasses.replace(config, log_file=None),
        notifier=Notifier({}),
        logs=logs,
        overrides={**sup.overrides, "log_file": None},
        worker=channel,
        reuse_port=True,
    )
    log.addHandler(PipeLogHandler(channel))
    return server.run()


def check_bind(cfg: ServerConfig) -> None:
    """Fail fast with a clear error (BindError) if the workers could not listen on host:port."""
    bind_tcp(cfg.host, cfg.port, None, reuse_port=True).close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
