"""A reload's load in a real loader process (hbd.reload_process, hbd.reload_child): the configuration
it gives is the one a load at start-up gives, an invalid file gives the same error lines, and a loader
that hangs, writes too much, crashes or is cut short fails the reload cleanly and is killed; it gets
none of the daemon's descriptors; SIGHUPs during a load coalesce (the newest file wins); a daemon that
stops kills the load under way. The time limit's own rule is in virtual time (tests/test_reloading.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hbd.config import ConfigError, ServerConfig, load_server_config
from hbd.errors import StartError
from hbd.loop import EventLoop
from hbd.reload_process import ChildLoad
from hbd.reloading import Done, Reloader

DEADLINE = 60.0  # seconds of real time a test waits for a loader at most (the machine is shared)


def drive(loop: EventLoop, until: Callable[[], object], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)


def load(loop: EventLoop, job: ChildLoad) -> tuple[object, Exception | None]:
    got: list[tuple[object, Exception | None]] = []
    job.start(loop, lambda result, error: got.append((result, error)))
    drive(loop, lambda: got)
    return got[0]


def gone(pid: int, timeout: float = 10.0) -> bool:
    """The process has exited (reaped, or a zombie waiting for its parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    loop.close()


def fleet(path: Path, n: int, site: str = "a") -> None:
    entry = "- {{name: p{i}, address: 10.1.{a}.{b}, labels: {{site: {site}}}}}\n"
    path.write_text("".join(entry.format(i=i, a=i // 250, b=i % 250, site=site) for i in range(n)))


def server_yaml(tmp_path: Path, **more: object) -> Path:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps({"port": 5999, "log_file": None, "control_socket": None, "state_dir": None, **more}))
    return cfg


def test_the_loader_gives_the_config_a_load_at_start_up_gives_and_then_runs_in_slices(loop, tmp_path) -> None:
    fleet(tmp_path / "fleet.yaml", 5000)
    path = server_yaml(tmp_path, peers_file="fleet.yaml", allow=["127.0.0.1"], peers=["solo"])
    steps: list[int] = []

    def then(cfg: ServerConfig):
        for i in range(3):
            steps.append(i)
            yield

    result, error = load(loop, ChildLoad("server", str(path), {"host": "127.0.0.2"}, then))
    assert error is None and steps == [0, 1, 2]
    assert result == load_server_config(path, {"host": "127.0.0.2"}) and len(result.peers) == 5001


def test_an_invalid_file_gives_the_error_lines_a_load_at_start_up_gives(loop, tmp_path) -> None:
    (tmp_path / "fleet.yaml").write_text("- ok1\n- {name: bad one}\n- ok2\n")
    path = server_yaml(tmp_path, peers_file="fleet.yaml", heartbeat_timeout="soon", colour="blue")
    with pytest.raises(ConfigError) as expected:
        load_server_config(path)
    result, error = load(loop, ChildLoad("server", str(path), {}))
    assert isinstance(error, ConfigError) and result is None
    assert error.errors == expected.value.errors and len(error.errors) == 3
    assert any(f"{tmp_path}/fleet.yaml: line 2: item 2:" in e for e in error.errors), error.errors
    assert any(f"{path}: line 1: colour: unknown key" in e for e in error.errors), error.errors


def test_a_loader_that_crashes_is_a_clean_error_with_its_last_words(loop) -> None:
    job = ChildLoad("server", "/etc/s.yaml", {}, argv=[sys.executable, "-c", "raise RuntimeError('boom')"])
    _result, error = load(loop, job)
    assert isinstance(error, StartError)
    assert str(error) == "/etc/s.yaml: the configuration's loader exited with status 1: RuntimeError: boom"


def test_output_cut_short_by_a_loader_killed_is_never_taken_for_a_config(loop) -> None:
    code = (
        "import os, sys, signal; "
        'sys.stdout.buffer.write(b\'{"config": {}, "peers": 2}\\n["a",null,null,[]]\\n\'); sys.stdout.flush(); '
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    _, error = load(loop, ChildLoad("server", "/etc/s.yaml", {}, argv=[sys.executable, "-c", code]))
    assert isinstance(error, StartError) and "the configuration's loader was killed by signal 9" in str(error)
    code = 'import sys; sys.stdout.write(\'{"config": {}, "peers": 2}\\n["a",null,null,[]]\\n"end"\\n\')'
    _result, error = load(loop, ChildLoad("server", "/etc/s.yaml", {}, argv=[sys.executable, "-c", code]))
    assert str(error) == "/etc/s.yaml: the loader's output is cut short after 1 of 2 peers"


def test_an_oversized_output_kills_the_loader_and_fails_the_reload(loop) -> None:
    code = "import sys, time\nwhile True: sys.stdout.buffer.write(b'x' * 65536); sys.stdout.flush()"
    job = ChildLoad("server", "/etc/s.yaml", {}, argv=[sys.executable, "-c", code], max_output=1_000_000)
    _result, error = load(loop, job)
    assert str(error) == "/etc/s.yaml: the configuration's loader wrote more than 1000000 bytes"
    assert job.proc is not None and gone(job.proc.pid)
    assert len(job._out) <= 1_000_000 + 256 * 1024  # read no further than one read past the bound


def test_the_loader_gets_none_of_the_daemons_descriptors(loop, tmp_path) -> None:
    listener = socket.socket()
    listener.set_inheritable(True)  # even one that a careless exec would pass on
    held = open(tmp_path / "x", "w")  # noqa: SIM115
    os.set_inheritable(held.fileno(), True)
    try:
        code = "import os, sys; print(sorted(map(int, os.listdir('/proc/self/fd'))), file=sys.stderr); sys.exit(3)"
        _result, error = load(loop, ChildLoad("server", "/etc/s.yaml", {}, argv=[sys.executable, "-c", code]))
    finally:
        listener.close()
        held.close()
    fds = json.loads(str(error).rsplit(": ", 1)[1])
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds  # stdin (/dev/null), its two pipes, listdir's own


class Host:
    """A daemon's side of a Reloader whose loads are real loader processes of ``path``."""

    def __init__(self, loop: EventLoop, path: Path, argv: list[str] | None = None) -> None:
        self.loop, self.path, self.argv = loop, path, argv
        self.jobs: list[ChildLoad] = []
        self.committed: list[ServerConfig] = []
        self.reloader: Reloader[ServerConfig] = Reloader(loop, self)

    def reload_job(self) -> tuple[str, ChildLoad]:
        self.jobs.append(ChildLoad("server", str(self.path), {}, argv=self.argv))
        return str(self.path), self.jobs[-1]

    def prepare_reload(self, new: ServerConfig) -> Callable[[], None]:
        return lambda: self.committed.append(new)

    def reload_began(self) -> None:
        pass

    def reload_ended(self, errors: list[str]) -> None:
        pass

    def reload_verdict(self, errors: list[str], finished: Done) -> None:
        finished(errors)

    def reload_stopping(self) -> bool:
        return False


def test_a_loader_over_the_time_limit_is_killed_and_the_reload_fails(loop, tmp_path) -> None:
    host = Host(loop, tmp_path / "s.yaml", argv=[sys.executable, "-c", "import time; time.sleep(120)"])
    host.reloader.timeout = 0.5
    answers: list[list[str]] = []
    host.reloader.request(answers.append)
    drive(loop, lambda: answers)
    limit = "loading took more than 0.5 s (a file on a hung filesystem?); its loader was killed"
    assert answers == [[f"{tmp_path}/s.yaml: {limit}"]]
    proc = host.jobs[0].proc
    assert proc is not None and gone(proc.pid)
    drive(loop, lambda: proc.returncode is not None)  # and reaped, from the loop
    assert proc.returncode == -signal.SIGKILL and host.committed == []


def test_sighups_during_a_load_coalesce_and_the_newest_file_wins(loop, tmp_path) -> None:
    path = server_yaml(tmp_path, heartbeat_timeout=1)
    host = Host(loop, path)
    host.reloader.hup()
    loop.run_once(0)  # the first load has started: the loader reads the file as it is now
    assert len(host.jobs) == 1 and host.jobs[0].proc is not None
    path.write_text(path.read_text().replace('"heartbeat_timeout": 1', '"heartbeat_timeout": 3'))
    for _ in range(3):
        host.reloader.hup()
    drive(loop, lambda: host.reloader.idle)
    assert len(host.jobs) == 2  # one more for all three
    assert host.committed[-1].heartbeat_timeout == 3.0 and host.reloader.ok == 2


def test_a_daemon_stopped_during_a_load_kills_its_loader(tmp_path, procs) -> None:
    """A real ``hbd server``: SIGHUP with a big peers_file to parse, then SIGTERM while the loader runs."""
    from daemons import start_server

    fleet(tmp_path / "fleet.yaml", 40_000)
    srv = start_server(tmp_path, ready_timeout=120, peers_file=str(tmp_path / "fleet.yaml"), max_peers=50_000)
    procs.append(srv)
    fleet(tmp_path / "fleet.yaml", 40_000, site="b")  # changed: a parse of seconds in the loader
    srv.proc.send_signal(signal.SIGHUP)
    children = Path(f"/proc/{srv.pid}/task/{srv.pid}/children")
    deadline = time.monotonic() + 30
    while not (kids := children.read_text().split()):
        assert time.monotonic() < deadline, "no loader process"
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0
    assert gone(int(kids[0]), timeout=1.0), "the loader outlived its daemon"
    assert not srv.count("reloaded"), "the reload was not under way when the daemon stopped"
