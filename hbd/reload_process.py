"""A reload's load in a loader process (hbd.reload_child), driven by the daemon's loop.

Parsing and validating a 100,000-entry peers_file takes seconds of CPU; in a thread of the daemon it
competed with the loop for the GIL (pong RTTs of 120-250 ms on a loaded machine). Here it runs in a
process of its own and the loop only reads its output: the pipe is in the loop's selector and read
when readable (never a blocking read), then decoded a slice of peers per turn (hbd.config_wire),
then ``then`` (the registry's plan of the new peers) a slice per turn as well. What each slice built
is frozen at its end (hbd.heap): else the collector's full passes would walk all the new peers built
so far, again and again (up to 90 ms a pass at 100,000).

What the loader cannot do to the daemon: it gets none of the daemon's descriptors (``close_fds``;
stdin is /dev/null), so no socket, log file or store; its output is bounded (MAX_OUTPUT: past it, it
is killed and the reload fails) and is data, checked as it is decoded (JSON lines, never a pickle);
its stderr is kept to its last MAX_STDERR bytes, for the error line of a crash; it runs for at most
the reload's time limit (hbd.reloading kills it then, and at shutdown). It is the daemon's own
code run as the daemon's own user: what it could do as such is not guarded against.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

from hbd import config_wire, heap
from hbd.config import ClientConfig, ServerConfig
from hbd.errors import ConfigError, HbdError, StartError
from hbd.logs import log

if TYPE_CHECKING:
    from hbd.loop import EventLoop, Timer
    from hbd.reloading import Deliver

Then = Callable[[ServerConfig], Generator[None, None, None]]

READ_SIZE = 256 * 1024  # bytes read from the pipe per readable event
MAX_OUTPUT = 64 * 1024 * 1024  # the loader's output for 100,000 peers is about 5 MB (peers_file: at most 4 MiB)
MAX_STDERR = 2000  # bytes of a loader's stderr kept (its last ones: a traceback's last line)
REAP_POLL = 0.01  # seconds between looks at a loader that closed its output but has not exited yet
KILL_POLLS = 50  # looks (every 10 * REAP_POLL) at a killed loader before giving up on reaping it
ROOT = str(Path(__file__).resolve().parent.parent)  # where the hbd package is: the loader imports it from there


def loader_argv(role: str, path: str, overrides: Mapping[str, object]) -> list[str]:
    # -I: no PYTHON* variables, no user site, not the current directory: the loader imports this hbd only
    boot = f"import sys; sys.path.insert(0, {ROOT!r}); from hbd.reload_child import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-I", "-c", boot, role, path, json.dumps(dict(overrides))]


class ChildLoad:
    """hbd.reloading's Load for a daemon's configuration file: ``start`` spawns the loader, ``deliver``
    gets the configuration (or the error) on the loop; ``cancel`` kills the loader (time limit, shutdown)."""

    def __init__(
        self,
        role: str,
        path: str,
        overrides: Mapping[str, object],
        then: Then | None = None,
        *,
        argv: list[str] | None = None,
        max_output: int = MAX_OUTPUT,
    ) -> None:
        self.role = role
        self.path = path
        self.argv = argv if argv is not None else loader_argv(role, path, overrides)
        self.then = then
        self.max_output = max_output
        self.proc: subprocess.Popen[bytes] | None = None
        self._loop: EventLoop | None = None
        self._deliver: Deliver | None = None
        self._out = bytearray()
        self._err = bytearray()
        self._open: list[IO[bytes]] = []  # the pipes not at their end yet
        self._timer: Timer | None = None
        self._work: Generator[None, None, ServerConfig | ClientConfig] | None = None

    def start(self, loop: EventLoop, deliver: Deliver) -> None:
        self._loop, self._deliver = loop, deliver
        try:
            proc = self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StartError(f"{self.path}: cannot start the configuration's loader: {exc}") from None
        assert proc.stdout is not None and proc.stderr is not None
        for pipe, keep in ((proc.stdout, self._out), (proc.stderr, self._err)):
            os.set_blocking(pipe.fileno(), False)
            self._open.append(pipe)
            loop.add_reader(pipe, lambda pipe=pipe, keep=keep: self._read(pipe, keep))  # type: ignore[misc]

    def _read(self, pipe: IO[bytes], keep: bytearray) -> None:
        try:
            chunk = os.read(pipe.fileno(), READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._fail(StartError(f"{self.path}: cannot read the configuration's loader: {exc}"))
        if chunk:
            keep += chunk
            if keep is self._err:
                del keep[:-MAX_STDERR]
            elif len(keep) > self.max_output:
                limit = self.max_output
                self._fail(StartError(f"{self.path}: the configuration's loader wrote more than {limit} bytes"))
            return
        self._close(pipe)
        if not self._open:
            self._reap()

    def _close(self, pipe: IO[bytes]) -> None:
        assert self._loop is not None
        self._loop.remove_reader(pipe)
        pipe.close()
        self._open.remove(pipe)

    def _reap(self) -> None:
        """Both pipes at their end: the decode of a whole output (its "end" line: the loader's exit is
        not waited for, only reaped), else the loader's status once it has exited, for the error."""
        assert self.proc is not None and self._loop is not None
        self._timer = None
        if self._out.endswith(b"\n" + config_wire.END + b"\n"):
            self._collect(KILL_POLLS)
        else:
            rc = self.proc.poll()  # (0 if a supervisor's waitpid(-1) took it)
            if rc is None:
                self._timer = self._loop.call_later(REAP_POLL, self._reap)
                return
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}" if rc else "stopped short"
            last = bytes(self._err).decode("utf-8", "replace").strip().splitlines()[-1:]
            detail = f": {last[0][-300:]}" if last else ""
            return self._fail(StartError(f"{self.path}: the configuration's loader {how}{detail}"))
        data, self._out = bytes(self._out), bytearray()
        self._work = self._steps(data)
        self._timer = self._loop.call_later(0, self._step)  # (in this turn's timers: one slice, not two)

    def _steps(self, data: bytes) -> Generator[None, None, ServerConfig | ClientConfig]:
        cfg = yield from config_wire.decode(data, self.role)
        del data
        if self.then is not None and isinstance(cfg, ServerConfig):
            yield from self.then(cfg)
        return cfg

    def _step(self) -> None:
        """One slice of the decode (or of ``then``) per loop turn."""
        assert self._work is not None and self._loop is not None
        self._timer = None
        try:
            next(self._work)
        except StopIteration as done:
            self._work = None
            return self._finish(done.value, None)
        except ConfigError as exc:  # the file is invalid: the loader's lines, as they are
            return self._finish(None, exc)
        except HbdError as exc:
            return self._finish(None, StartError(f"{self.path}: {exc}"))
        finally:
            if heap.frozen:  # what the slice built is long-lived: frozen now, as hbd.heap does every second
                gc.collect(1)
                gc.freeze()
        self._timer = self._loop.call_later(0, self._step)

    def _fail(self, error: Exception) -> None:
        deliver = self._deliver
        self.cancel()
        if deliver is not None:
            deliver(None, error)

    def _finish(self, result: object, error: Exception | None) -> None:
        deliver, self._deliver = self._deliver, None
        if deliver is not None:
            deliver(result, error)

    def cancel(self) -> None:
        """Kill the loader and let go of everything; ``deliver`` is not called any more."""
        self._deliver = None
        self._work = None
        if self._loop is not None:
            self._loop.cancel(self._timer)
            self._timer = None
            for pipe in list(self._open):
                self._close(pipe)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except OSError:
                pass
            self._collect(KILL_POLLS)

    def _collect(self, tries: int) -> None:
        """Reap the loader once it has exited (killed, or done), looking every 10 * REAP_POLL: never a
        blocking wait on the loop (a process stuck in a hung file read dies when that read returns)."""
        proc = self.proc
        if proc is None or proc.poll() is not None or self._loop is None:
            return
        if tries > 0:
            self._loop.call_later(REAP_POLL * 10, lambda: self._collect(tries - 1))
        else:
            log.warning("the configuration's loader (pid %d) has not exited; not waiting for it any more", proc.pid)


def config_load(role: str, path: str, overrides: Mapping[str, object], then: Then | None = None) -> ChildLoad:
    return ChildLoad(role, path, overrides, then)
