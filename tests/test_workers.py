"""workers: K — a supervisor and K server processes sharing the port (real processes, real signals)."""

import os
import signal
import time
from pathlib import Path

from daemons import connect, recv_exactly, start_server
from helpers import NotifySocket


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_workers_share_the_port_and_report_to_the_supervisor(tmp_path: Path, procs) -> None:
    notify = NotifySocket(tmp_path)
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5, env={"NOTIFY_SOCKET": notify.path})
    procs.append(srv)
    _, ready = notify.wait_for("READY=1")
    assert "2 workers" in ready
    kids = children(srv.pid)
    assert len(kids) == 2
    socks = [connect(srv.config["port"]) for _ in range(60)]
    for s in socks:
        s.sendall(b"ping")
    for s in socks:
        assert recv_exactly(s, 4) == b"pong"
    notify.wait_for("STATUS=60 clients, 0 late, 2 workers", timeout=5)
    served_by = {w: srv.count(rf"hbd-server/{w} INFO +client .* connected") for w in (1, 2)}
    assert all(served_by.values()), served_by  # the kernel spread the connections

    # a worker that dies is replaced; the others keep serving
    os.kill(kids[0], signal.SIGKILL)
    srv.wait_for(r"ERROR .*worker \d \(pid \d+\) exited unexpectedly \(killed by SIGKILL\)")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(children(srv.pid)) != 2 or kids[0] in children(srv.pid)):
        time.sleep(0.1)
    assert len(children(srv.pid)) == 2
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"

    # reload reaches every worker; a broken file reaches none
    srv.write_config({**srv.config, "heartbeat_timeout": 4})
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"hbd-server/1 INFO +heartbeat_timeout is now 4 s", after=mark)
    srv.wait_for(r"hbd-server/2 INFO +heartbeat_timeout is now 4 s", after=mark)
    for w in (1, 2):  # each worker's last line of that reload, so none comes after the next mark
        srv.wait_for(rf"hbd-server/{w} INFO +reloaded ", after=mark)
    srv.config_path.write_text("port: [\n")
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"hbd-server ERROR +reload failed", after=mark)
    time.sleep(0.3)
    assert srv.count(r"hbd-server/\d .*reload", after=mark) == 0

    kids = children(srv.pid)
    for s in socks:
        s.close()
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0
    notify.close()
    for k in kids:
        assert not Path(f"/proc/{k}").exists() or "Z" in Path(f"/proc/{k}/stat").read_text().split()[2]


def test_a_signal_for_a_starting_worker_waits_for_its_own_handlers(tmp_path: Path, procs) -> None:
    # The supervisor signals its workers (SIGHUP on reload, SIGTERM at stop) whenever it needs to, also
    # while one it just restarted is still starting. Such a signal must neither kill the new worker nor
    # run the supervisor's handler it inherited (whose wakeup fd is the supervisor's: a reload nobody
    # asked for); the worker handles it as its own once it runs.
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5)
    procs.append(srv)
    srv.wait_for(r"hbd-server INFO +2 workers listening")
    old = children(srv.pid)
    os.kill(old[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (new := [k for k in children(srv.pid) if k not in old]):  # as early as possible after fork
        assert time.monotonic() < deadline, srv.output()
        time.sleep(0.001)
    mark = srv.mark()
    os.kill(new[0], signal.SIGHUP)
    srv.wait_for(r"hbd-server/\d INFO +reloaded ", after=mark, timeout=10)
    time.sleep(0.3)
    assert srv.count(r"hbd-server INFO +reloading", after=mark) == 0, srv.output()
    assert "killed by SIGHUP" not in srv.output()
    assert new[0] in children(srv.pid)


def test_worker_errors_reach_the_supervisors_log_file(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=0.3)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        s.settimeout(3)
        assert s.recv(10) == b""
    srv.wait_for("timed out")
    srv.stop()
    text = (tmp_path / "server.log").read_text()
    assert "hbd-server WARNING worker " in text and "timed out" in text
    assert "INFO" not in text
    assert not list(tmp_path.glob("server.log.*"))


def test_workers_port_in_use_fails_fast(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    from daemons import HbdProcess

    other = HbdProcess(
        "server",
        {**srv.config, "workers": 2, "log_file": None, "control_socket": str(tmp_path / "other.sock")},
        tmp_path,
        name="other",
    )
    assert other.proc.wait(10) == 1
    other.stop()
    assert "cannot listen on 127.0.0.1" in other.output()


def test_a_worker_that_dies_during_start_up_is_a_clean_start_error(tmp_path: Path, procs) -> None:
    from daemons import HbdProcess, free_port

    for _attempt in range(5):
        srv = HbdProcess(
            "server",
            {"host": "127.0.0.1", "port": free_port(), "workers": 2, "log_file": None, "control_socket": None},
            tmp_path,
        )
        procs.append(srv)
        deadline = time.monotonic() + 10
        while not (kids := children(srv.pid)):  # the first worker, normally long before it listens
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.output()
            time.sleep(0.001)
        os.kill(kids[0], signal.SIGKILL)
        _, line = srv.wait_for("exited during start-up|exited unexpectedly", timeout=10)
        # On a loaded machine this thread can be scheduled only after the workers have started:
        # that kill is a crash at run time (restarted, a different test); try again.
        if "exited unexpectedly" not in line:
            break
        srv.stop()
    assert srv.proc.wait(10) == 1, srv.output()
    assert "exited during start-up" in srv.output() and "Traceback" not in srv.output(), srv.output()


def test_a_worker_added_by_a_reload_runs_the_new_configuration(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5)
    procs.append(srv)
    srv.wait_for(r"hbd-server INFO +2 workers listening")
    srv.write_config({**srv.config, "workers": 3, "heartbeat_timeout": 4})
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    _, line = srv.wait_for(r"hbd-server/3 INFO +listening on", after=mark)
    assert "heartbeat_timeout 4 s" in line


def test_workers_apply_the_supervisors_configuration_not_the_file(tmp_path: Path, procs) -> None:
    """A worker never reads the file: after the file went bad, a SIGHUP straight to a worker reloads the
    configuration the supervisor validated last (before, the worker re-read the file and failed)."""
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=5)
    procs.append(srv)
    srv.wait_for("2 workers listening")
    srv.write_config({**srv.config, "heartbeat_timeout": 4})
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    for w in (1, 2):
        srv.wait_for(rf"hbd-server/{w} INFO +reloaded ", after=mark)
    srv.config_path.write_text("port: [\n")  # broken from now on
    kid = children(srv.pid)[0]
    mark = srv.mark()
    os.kill(kid, signal.SIGHUP)
    srv.wait_for(r"hbd-server/\d INFO +reloaded ", after=mark)
    assert srv.count(r"reload failed", after=mark) == 0
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
    srv.signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0
