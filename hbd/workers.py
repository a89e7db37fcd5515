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
hbd.workers_codec; the worker processes and their pipes are hbd.worker_pool's. The supervisor's
``hbd reload`` answer waits for every worker's outcome, at most RELOAD_TIMEOUT.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable

from hbd.config import ServerConfig
from hbd.daemon import Daemon, StartError
from hbd.early import catch_signals, take_hup
from hbd.logs import Logging, log
from hbd.names import bind_tcp
from hbd.notify import Notifier
from hbd.pacing import SUPERVISOR_BURST, pacer_for
from hbd.registry import expected_peers, registry_settings
from hbd.reload_process import ChildLoad
from hbd.reloading import Load
from hbd.server_registry import open_store
from hbd.supervisor_registry import SupervisorRegistry
from hbd.view import LazySource, ServerSettings, Source, SupervisorView, WorkerNumbers, WorkerRow, source_rows
from hbd.worker_pool import WorkerPool, kill
from hbd.workers_codec import PipeLogHandler, Reload, WorkerChannel

RELOAD_TIMEOUT = 5.0  # how long a requested reload waits for the workers' outcomes


class Supervisor(Daemon[ServerConfig]):
    """The daemon face of ``workers: K``: start-up, reload and status over the ``WorkerPool``."""

    identifier = "hbd-server"
    supervises = True

    def __init__(self, config: ServerConfig, **kwargs: object) -> None:
        super().__init__(config, **kwargs)  # type: ignore[arg-type]
        self.pool = WorkerPool(self.loop, self._run_worker, self._to_file, lambda: self.config)
        self._hupped: set[int] = set()  # pids sent the new configuration by the latest reload
        self.registry: SupervisorRegistry | None = None  # the one peer registry (hbd.supervisor_registry)
        pacer_for(self.loop).burst = SUPERVISOR_BURST  # its big replies yield the CPU almost at once

    def loader(self) -> Load:
        plan = None if self.registry is None else self.registry.reload.planner()  # its plan: in slices after
        return ChildLoad("server", self.config.path, self.overrides, plan)

    # -- start and stop -----------------------------------------------------------------------------
    def start(self) -> None:
        check_bind(self.config)
        self.loop.add_signal_handler(signal.SIGCHLD, self.pool.reap)
        self._start_registry(self.config)
        for index in range(1, self.config.workers + 1):
            self.pool.spawn(index, self.config)
        self.pool.wait_ready()
        self.start_status_updates()
        log.info("%d workers listening on %s:%d", len(self.pool.workers), self.config.host, self.config.port)

    def _start_registry(self, cfg: ServerConfig) -> None:
        reg = SupervisorRegistry(
            self.loop,
            registry_settings(cfg),
            expected_peers(cfg),
            self.peer_log,
            self.ops,
            self.pool.order,
            backlog=self.pool.backlog,
        )
        self.registry = self.pool.peers = self.silencing = reg  # silences on the supervisor's socket
        # The store is opened before the workers are forked: they inherit the open database but never
        # touch it, and end with os._exit (no close, no checkpoint from a child).
        store, peers, silences = open_store(cfg.state_dir)
        if store is not None:
            reg.attach(store, peers, silences, cfg.history_days)

    def shutdown(self) -> None:
        if self.registry is not None:
            self.registry.close()
        self.pool.stop()

    # -- reload ---------------------------------------------------------------------------------------
    def prepare(self, new: ServerConfig) -> Callable[[], None]:
        old = self.config
        if (new.host, new.port) != (old.host, old.port):
            check_bind(new)
        if new.workers < 2:
            raise StartError("workers: going from several workers to 1 needs a restart (systemctl restart hbd-server)")

        def commit() -> None:
            if self.registry is not None:
                self.registry.reconfigure(new, old)  # its peers' changes: a slice per loop turn
            by_index = self.pool.by_index()
            self._hupped = set()
            for w in by_index:
                if w.index > new.workers:
                    kill(w.pid, signal.SIGTERM)  # surplus: stops; reap() will not replace it
                else:
                    w.reload = None
                    self._hupped.add(w.pid)
                    self.pool.send(w, Reload(new))
            running = {w.index for w in by_index}
            for index in range(1, new.workers + 1):
                if index not in running:
                    self.pool.spawn(index, new)  # self.config is still the old one here

        return commit

    def reload_verdict(self, errors: list[str], finished: Callable[[list[str]], None]) -> None:
        """A valid configuration was passed on: the answer is the workers' (each applies it, e.g. loads
        the TLS files and binds), collected from the pipe; a worker that dies or stays silent counts as a
        failure."""
        if errors:
            finished(errors)
            return
        if self.registry is not None:  # the answer also waits for the registry's slices
            self.registry.reload.when_applied(lambda: self._workers_verdict(finished))
        else:
            self._workers_verdict(finished)

    def _workers_verdict(self, finished: Callable[[list[str]], None]) -> None:
        deadline = self.loop.time() + RELOAD_TIMEOUT
        workers = self.pool.workers

        def check() -> None:
            pending = [pid for pid in self._hupped if pid in workers and workers[pid].reload is None]
            gone = [pid for pid in self._hupped if pid not in workers]
            if pending and self.loop.time() < deadline:
                self.loop.call_later(0.02, check)
                return
            failed = [
                f"worker {w.index}: {w.reload}"
                for w in self.pool.by_index()
                if w.pid in self._hupped and w.reload not in (None, "ok")
            ]
            failed += [f"worker {workers[pid].index}: no answer within {RELOAD_TIMEOUT:g} s" for pid in pending]
            failed += [f"a worker (pid {pid}) exited during the reload" for pid in gone]
            finished(failed)

        check()

    def _to_file(self, index: int, level: int, message: str) -> None:
        """A worker's warning or error line: the supervisor alone writes (and rotates) the file."""
        handler = self.logs.file_handler
        if handler is not None:
            handler.handle(log.makeRecord(log.name, level, __file__, 0, f"worker {index}: {message}", (), None))

    # -- status ---------------------------------------------------------------------------------------
    def status_text(self) -> str:
        workers = self.pool.workers.values()
        clients = sum(w.clients for w in workers)
        late = sum(w.late for w in workers)
        return f"{clients} client{'s' if clients != 1 else ''}, {late} late, {len(workers)} workers"

    def view(self) -> SupervisorView:
        cfg = self.config
        workers = tuple(
            WorkerRow(w.index, w.pid, w.clients, w.late, WorkerNumbers.from_dict(w.numbers) if w.numbers else None)
            for w in self.pool.by_index()
        )
        reg = self.registry
        # the registry's peers no worker holds; its snapshot is taken when something reads it
        unconnected: tuple[Source, ...] = (LazySource(reg.unconnected_source),) if reg is not None else ()
        return SupervisorView(
            self.daemon_view(),
            f"{cfg.host}:{cfg.port}",
            ServerSettings(cfg.heartbeat_timeout, cfg.max_clients, cfg.workers),
            workers,
            reg.counts() if reg is not None else None,
            source_rows(unconnected),  # the same rows, for a listing (one producer: hbd.view.source_rows)
            reg.account if reg is not None else None,
            unconnected,
            reg.metric_samples if reg is not None else None,
        )

    def on_status_tick(self) -> None:
        self.pool.check_hung()

    def _run_worker(self, config: ServerConfig, index: int, up: int, down: int) -> int:
        """In the forked child (LOOP_SIGNALS blocked): drop the supervisor's loop and signal state, then
        serve ``config``."""
        from hbd.server import Server

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        take_hup()
        catch_signals()  # a HUP (or a stray USR1...) before the worker's loop runs must not kill it
        self.loop.close_in_child()
        self.ops.close_in_child()
        self.pool.close_in_child()
        channel = WorkerChannel(up, index, config, rfd=down)
        logs = Logging(f"hbd-server/{index}", journald=self.logs.journald)
        server = Server(
            dataclasses.replace(config, log_file=None),
            notifier=Notifier({}),
            logs=logs,
            overrides={**self.overrides, "log_file": None},
            worker=channel,
            reuse_port=True,
        )
        log.addHandler(PipeLogHandler(channel))
        return server.run()


def check_bind(cfg: ServerConfig) -> None:
    """Fail fast with a clear error (BindError) if the workers could not listen on host:port."""
    bind_tcp(cfg.host, cfg.port, None, reuse_port=True).close()
