"""``hbd reload`` (the units' ExecReload=): asks the daemon over its status socket and waits for its verdict."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemons import ROOT, free_port, start_client, start_server
from helpers import run_reload


def hbd_reload(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hbd", "reload", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_applied_reload_exits_0_after_the_daemon_applied_it(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    srv.write_config({**srv.config, "heartbeat_timeout": 7})
    mark = srv.mark()
    r = hbd_reload("server", "-c", str(srv.config_path))
    assert r.returncode == 0, r.stderr
    assert srv.count(r"reloaded ", after=mark) == 1  # already logged when the command returned


def test_rejected_reload_exits_1_with_the_reason_and_the_old_config_runs_on(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    srv.config_path.write_text(srv.config_path.read_text().replace("heartbeat_timeout: 1.0", "heartbeat_timeout: -1"))
    r = hbd_reload("server", "-c", str(srv.config_path), "--pid", str(srv.pid))
    assert r.returncode == 1
    assert "reload failed:" in r.stderr and "heartbeat_timeout" in r.stderr
    assert srv.proc.poll() is None
    # Broken beyond reading: the file's own socket is unknown, so the default is tried, then -s works.
    srv.config_path.write_text("port: [\n")
    r = hbd_reload("server", "-c", str(srv.config_path), "-s", srv.config["control_socket"])
    assert r.returncode == 1 and "reload failed:" in r.stderr and "line" in r.stderr, r.stderr


def test_reload_that_moves_the_socket_is_still_answered(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    old = srv.config["control_socket"]
    srv.write_config({**srv.config, "control_socket": str(tmp_path / "moved.sock")})
    r = hbd_reload("server", "-s", old)
    assert r.returncode == 0, r.stderr
    assert Path(tmp_path / "moved.sock").exists() and not Path(old).exists()


def test_client_reload_and_the_pid_check(tmp_path: Path, procs) -> None:
    cli = start_client(tmp_path, free_port())
    procs.append(cli)
    cli.wait_for("status socket")
    r = hbd_reload("client", "-c", str(cli.config_path), "--pid", str(cli.pid))
    assert r.returncode == 0, r.stderr
    other = subprocess.Popen(["sleep", "30"])  # a pid that is not the socket's owner
    try:
        r = hbd_reload("client", "-c", str(cli.config_path), "--pid", str(other.pid))
        assert other.poll() is None  # it was not sent SIGHUP either
    finally:
        other.kill()
        other.wait()
    assert r.returncode == 1 and "belongs to pid" in r.stderr


def test_without_a_socket_pid_gets_sighup_and_the_local_validation_decides(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, control_socket=None)
    procs.append(srv)
    mark = srv.mark()
    r = hbd_reload("server", "-c", str(srv.config_path), "--pid", str(srv.pid))
    assert r.returncode == 0 and "sent SIGHUP" in r.stderr
    srv.wait_for("reloaded ", after=mark)
    srv.write_config({**srv.config, "heartbeat_timeout": -1})
    r = hbd_reload("server", "-c", str(srv.config_path), "--pid", str(srv.pid))
    assert r.returncode == 1 and "heartbeat_timeout" in r.stderr
    srv.wait_for("reload failed", after=mark)
    r = hbd_reload("server", "-c", str(srv.config_path))  # no socket, no pid: nothing to ask
    assert r.returncode == 1 and "cannot ask the daemon" in r.stderr


def test_workers_reload_answer_waits_for_every_worker(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5)
    procs.append(srv)
    srv.wait_for("2 workers listening")
    mark = srv.mark()
    srv.write_config({**srv.config, "heartbeat_timeout": 7})
    r = hbd_reload("server", "-c", str(srv.config_path))
    assert r.returncode == 0, r.stderr
    assert srv.count(r"hbd-server/\d .*reloaded ", after=mark) == 2  # both workers had applied it
    # A worker that cannot answer (stopped) makes the answer a failure, after a bounded wait.
    workers = Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[0]), signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = hbd_reload("server", "-c", str(srv.config_path))
        took = time.monotonic() - t0
    finally:
        os.kill(int(workers[0]), signal.SIGCONT)
    assert r.returncode == 1 and "no answer within 5 s" in r.stderr, r.stderr
    assert 4.5 < took < 15, took
    srv.write_config({**srv.config, "heartbeat_timeout": -1})  # rejected by the supervisor itself
    r = hbd_reload("server", "-s", srv.config["control_socket"])
    assert r.returncode == 1 and "heartbeat_timeout" in r.stderr


def test_only_root_or_the_daemons_user_may_reload(tmp_path: Path, procs) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    sockdir = Path(tempfile.mkdtemp(prefix="hbd-reload-"))  # reachable for another user, unlike tmp_path
    try:
        os.chmod(sockdir, 0o755)
        srv = start_server(tmp_path, control_socket=str(sockdir / "server.sock"))
        procs.append(srv)
        os.chmod(srv.config["control_socket"], 0o666)
        out = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "hbd",
                "reload",
                "-s",
                srv.config["control_socket"],
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    assert out.returncode == 1 and "permission denied" in out.stderr, out.stderr
    assert srv.count("reloading") == 0


def test_requests_that_arrive_together_share_one_reload(tmp_path: Path, vloop) -> None:
    """Cost bound: a burst of `reload` requests runs the reload once, not once per request, and every
    requester gets the verdict; a request during a reload gets a reload of its own afterwards."""
    from hbd.client import Client
    from hbd.config import load_client_config
    from hbd.logs import Logging
    from hbd.notify import Notifier

    cfg_file = tmp_path / "client.yaml"
    cfg_file.write_text("host: 127.0.0.1\nport: 54321\nlog_file: null\ncontrol_socket: null\n")
    loop = vloop
    logs = Logging("hbd-client", journald=False)
    try:
        client = Client(load_client_config(cfg_file), loop=loop, notifier=Notifier({}), logs=logs)
        answers: list[list[str]] = []
        for _ in range(10):
            client.request_reload(answers.append)
        assert client.reloads_ok == 0  # nothing runs inside the request: the loop does it
        run_reload(loop, client.reloads)
        assert client.reloads_ok == 1 and answers == [[]] * 10
        cfg_file.write_text("port: 0\n")
        client.request_reload(answers.append)
        run_reload(loop, client.reloads)
        assert client.reloads_failed == 1 and "port" in answers[-1][0]
    finally:
        logs.close()


def test_a_long_reload_keeps_its_answer_alive_past_the_sockets_idle_timeout(vloop, vclock) -> None:
    """A reload of a 100,000-entry peers_file can take longer than the status socket's IDLE_TIMEOUT
    (a reply making no progress is dropped): the answer sends a space every RELOAD_KEEPALIVE, which
    JSON allows before the document."""
    import json
    import os
    from types import SimpleNamespace

    from hbd.commands import RELOAD_KEEPALIVE, _reload_reply
    from hbd.control import IDLE_TIMEOUT

    asked: list = []
    woken: list[float] = []
    daemon = SimpleNamespace(loop=vloop, request_reload=asked.append)
    reply = _reload_reply(daemon, lambda: woken.append(vclock()), os.geteuid())  # type: ignore[arg-type]
    assert next(reply) is None and len(asked) == 1
    out = b""
    start = vclock()
    while vclock() < start + 3 * IDLE_TIMEOUT:
        vloop.run_once(RELOAD_KEEPALIVE)
        if woken:
            woken.clear()
            chunk = next(reply)
            if chunk is not None:
                out += chunk
                assert next(reply) is None
    assert RELOAD_KEEPALIVE < IDLE_TIMEOUT and out == b" " * int(3 * IDLE_TIMEOUT / RELOAD_KEEPALIVE)
    asked[0]([])
    out += b"".join(c for c in reply if c is not None)
    assert json.loads(out) == {"reload": "ok"}
