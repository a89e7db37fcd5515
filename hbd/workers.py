"""``workers: K`` (K > 1): one supervisor process and K server processes sharing the port.

Each worker is an ordinary ``Server`` with its own event loop and its own SO_REUSEPORT listener, so
the kernel spreads new connections over the workers and each core runs one loop. The supervisor
serves no clients; it owns what must exist once per service:

- sd_notify: READY=1 only once every worker listens, STATUS= summed over the workers, WATCHDOG=1
  from its own loop. A worker that stops reporting (hung loop) is killed and restarted.
- SIGHUP: the supervisor validates the new file first; only a valid file is passed on (SIGHUP to
  each worker, which reloads itself). SIGTERM/SIGINT: stop every worker, then exit.
- The error log file: workers send their warning and error lines up a pipe and the supervisor
  writes them, so one process rotates the file.

Worker -> supervisor pipe, one line per message: ``R`` ready, ``S <clients> <late>`` status,
``M <json>`` counters for the metrics, ``L<levelno> <message>`` a log line for the file,
``H ok`` / ``H failed <reason>`` the outcome of a reload (the supervisor's ``hbd reload`` answer
waits for every worker's, at most RELOAD_TIMEOUT).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from hbd.config import ServerConfig, load_server_config
from hbd.daemon import LOOP_SIGNALS, Daemon, StartError
from hbd.entry import catch_signals, take_hup
from hbd.logs import Logging, fields, log
from hbd.names import listen_info
from hbd.notify import Notifier
from hbd.view import ServerSettings, SupervisorView, WorkerNumbers, WorkerRow

READY_TIMEOUT = 10.0  # a worker that does not listen within this is a start-up failure
HANG_AFTER = 10.0  # a worker silent this long (it reports every second) is killed and restarted
RESTART_DELAY = 1.0
STOP_TIMEOUT = 5.0
RELOAD_TIMEOUT = 5.0  # how long a requested reload waits for the workers' outcomes
# The supervisor's signals (LOOP_SIGNALS) are blocked across fork() and in a new worker until its own loop
# handles them (Daemon.run unblocks them): until then the worker still has the supervisor's handlers, whose
# wakeup fd is the supervisor's (a SIGHUP meant for the worker would reload the supervisor). A signal sent
# meanwhile stays pending and reaches the worker's own handler.


class WorkerChannel:
    """The worker's end of the pipe. Writes never block: if the supervisor is not reading, the
    line is dropped (the worker's own terminal/journald output still has it)."""

    def __init__(self, fd: int, index: int = 0) -> None:
        self.fd = fd
        self.index = index  # which worker this is (its status socket is <control_socket>.<index>)
        os.set_blocking(fd, False)

    def send(self, line: str) -> None:
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except (BlockingIOError, BrokenPipeError):
            pass


class PipeLogHandler(logging.Handler):
    """In a worker: warnings and errors go up the pipe for the supervisor's log file."""

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__(logging.WARNING)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.send(f"L{record.levelno} {record.getMessage()}")


class Worker:
    __slots__ = ("buf", "clients", "index", "last_seen", "late", "numbers", "pid", "ready", "reload", "rfd")

    def __init__(self, index: int, pid: int, rfd: int, now: float) -> None:
        self.index = index
        self.pid = pid
        self.rfd = rfd
        self.buf = b""
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
        rfd, wfd = os.pipe()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(rfd)
            code = 70
            try:
                code = _run_worker(self, config, index, wfd)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(wfd)
        os.set_blocking(rfd, False)
        worker = Worker(index, pid, rfd, self.loop.time())
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
                    _kill(w.pid, signal.SIGHUP)
            running = {w.index for w in by_index}
            for index in range(1, new.workers + 1):
                if index not in running:
                    self._spawn(index, new)  # self.config is still the old one here

        return commit

    def reload_verdict(self, errors: list[str], finished: Callable[[list[str]], None]) -> None:
        """A valid file was passed on: the answer is the workers' (each validates it again, e.g. the
        TLS files), collected from the pipe; a worker that dies or stays silent counts as a failure."""
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
            failed = [f"worker {w.index}: {w.reload}" for w in sorted(self.workers.values(), key=lambda w: w.index)
                      if w.pid in self._hupped and w.reload not in (None, "ok")]
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
        *lines, w.buf = (w.buf + data).split(b"\n")
        if len(w.buf) > 65536:
            w.buf = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line == "R":
                w.ready = True
            elif line.startswith("S "):
                parts = line.split()
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    w.clients, w.late = int(parts[1]), int(parts[2])
            elif line.startswith("H "):
                w.reload = "ok" if line == "H ok" else line.removeprefix("H failed ").strip() or "failed"
            elif line.startswith("M "):
                try:
                    w.numbers = json.loads(line[2:])
                except ValueError:
                    pass
            elif line.startswith("L") and " " in line:
                level, message = line[1:].split(" ", 1)
                self._to_file(w, int(level) if level.isdigit() else logging.ERROR, message)
        return True

    def _to_file(self, w: Worker, level: int, message: str) -> None:
        handler = self.logs.file_handler
        if handler is not None:
            handler.handle(log.makeRecord(log.name, level, __file__, 0, f"worker {w.index}: {message}", None, None))

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
                w.index, pid, _describe(status), RESTART_DELAY, extra=fields(event="worker-died"),
            )
            self.loop.call_later(RESTART_DELAY, lambda index=w.index: self._restart(index))

    def _restart(self, index: int) -> None:
        if not self._stopping_workers and all(w.index != index for w in self.workers.values()):
            self._spawn(index, self.config)

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.pid, None)
        self.loop.forget(w.rfd)
        try:
            os.close(w.rfd)
        except OSError:
            pass

    def status_text(self) -> str:
        clients = sum(w.clients for w in self.workers.values())
        late = sum(w.late for w in self.workers.values())
        return f"{clients} client{'s' if clients != 1 else ''}, {late} late, {len(self.workers)} workers"

    def view(self) -> SupervisorView:
        cfg = self.config
        workers = tuple(WorkerRow(w.index, w.pid, w.clients, w.late, WorkerNumbers.from_dict(w.numbers) if w.numbers
                                  else None) for w in sorted(self.workers.values(), key=lambda w: w.index))
        return SupervisorView(self.daemon_view(), f"{cfg.host}:{cfg.port}",
                              ServerSettings(cfg.heartbeat_timeout, cfg.max_clients, cfg.workers), workers)

    def on_status_tick(self) -> None:
        now = self.loop.time()
        for w in list(self.workers.values()):
            if w.ready and now - w.last_seen > HANG_AFTER:
                log.error("worker %d (pid %d) stopped reporting for %.0f s; killing it",
                          w.index, w.pid, now - w.last_seen, extra=fields(event="worker-hung"))
                w.last_seen = now
                _kill(w.pid, signal.SIGKILL)  # _reap restarts it


def _run_worker(sup: Supervisor, config: ServerConfig, index: int, wfd: int) -> int:
    """In the forked child (LOOP_SIGNALS blocked): drop the supervisor's loop and signal state, then serve."""
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
    channel = WorkerChannel(wfd, index)
    logs = Logging(f"hbd-server/{index}", journald=sup.logs.journald)
    server = Server(
        dataclasses.replace(config, log_file=None), notifier=Notifier({}), logs=logs,
        overrides={**sup.overrides, "log_file": None}, worker=channel, reuse_port=True,
    )
    log.addHandler(PipeLogHandler(channel))
    return server.run()


def check_bind(cfg: ServerConfig) -> None:
    """Fail fast with a clear error if the workers could not listen on host:port."""
    try:
        family, stype, proto, _, addr = listen_info(cfg.host, cfg.port)  # a host name: bounded wait
        with socket.socket(family, stype, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(addr)
    except OSError as exc:
        raise StartError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
