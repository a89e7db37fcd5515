"""Stray and early signals: HUP during start-up is queued, USR1 logs a status line, USR2 reopens
the log file, ALRM and friends are ignored; none of them kills a daemon or leaves its socket behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from daemons import HbdProcess, connect, free_port, recv_exactly, start_client, start_server

from hbd import early


def caught(pid: int, signum: int) -> bool:
    """True once the process has a handler for ``signum`` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def server_config(tmp_path: Path) -> dict:
    return {
        "host": "127.0.0.1",
        "port": free_port(),
        "heartbeat_timeout": 5.0,
        "log_level": "info",
        "log_file": str(tmp_path / "server.log"),
        "control_socket": str(tmp_path / "server.sock"),
    }


def serves(port: int) -> bool:
    with connect(port) as s:
        s.sendall(b"ping")
        return recv_exactly(s, 4) == b"pong"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM])
def test_a_signal_storm_from_the_first_line_of_hbd(tmp_path: Path, procs, sig: int) -> None:
    """Signals sent in a tight loop from the moment hbd's first line has run (before that the
    interpreter itself is starting: see the README) for 0.5 s: the daemon survives and serves."""
    cfg = server_config(tmp_path)
    srv = HbdProcess("server", cfg, tmp_path)
    procs.append(srv)
    deadline = time.monotonic() + 10
    while not caught(srv.pid, sig):
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
    # caught before the heavy imports (ssl, yaml: ~0.1 s of start-up), not only once the loop runs
    maps = Path(f"/proc/{srv.pid}/maps").read_text()
    assert "_ssl" not in maps and "_yaml" not in maps, "the signal was caught only after the heavy imports"
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        os.kill(srv.pid, sig)
        sent += 1
    assert srv.proc.poll() is None, f"killed by the {sent} signals:\n{srv.output()}"
    print(f"{signal.Signals(sig).name}: {sent} signals in 0.5 s from the first line of hbd; still running")
    srv.wait_for(r"listening on")
    assert serves(cfg["port"])
    if sig == signal.SIGHUP:  # at least the one queued during start-up is acted upon
        srv.wait_for(r"reloaded ")
    assert "Traceback" not in srv.output()
    assert srv.stop() == 0
    assert not Path(cfg["control_socket"]).exists()


def test_usr1_logs_a_status_line(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        srv.signal(signal.SIGUSR1)
        srv.wait_for(r"INFO +status: 1 client, 0 late; 0 reloads ok, 0 failed; loop lag max \d+\.\d ms")
    cli = start_client(tmp_path, srv.config["port"])
    procs.append(cli)
    cli.wait_for(r"pong from")
    cli.signal(signal.SIGUSR1)
    cli.wait_for(r"INFO +status: 127\.0\.0\.1:\d+ up, rtt")


def test_usr2_reopens_the_log_file(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    log_file = Path(srv.config["log_file"])
    assert log_file.exists()
    rotated = log_file.with_name("server.log.1")
    log_file.rename(rotated)  # what logrotate does, before it signals the daemon
    srv.signal(signal.SIGUSR2)
    srv.wait_for(r"log file reopened")
    assert log_file.exists()
    with connect(srv.config["port"]) as s:  # a warning: goes to the new file, not the old one
        s.sendall(b"garbage!\n")
        s.settimeout(3)
        s.recv(10)
    srv.wait_for(r"WARNING .*closing client")
    deadline = time.monotonic() + 5
    while "closing client" not in log_file.read_text():
        assert time.monotonic() < deadline, log_file.read_text()
        time.sleep(0.05)
    assert "closing client" not in rotated.read_text()


@pytest.mark.parametrize("name", ["SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGUSR1", "SIGUSR2"])
def test_stray_signals_do_not_kill(tmp_path: Path, procs, name: str) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    for _ in range(3):
        srv.signal(getattr(signal, name))
    time.sleep(0.2)
    assert srv.proc.poll() is None, srv.output()
    assert serves(srv.config["port"])
    assert srv.stop() == 0
    assert not Path(srv.config["control_socket"]).exists()


def test_early_hup_is_remembered_once() -> None:
    old = {s: signal.getsignal(s) for s in (signal.SIGHUP, *early.STRAY_SIGNALS)}
    try:
        early.catch_signals()
        assert not early.take_hup()
        os.kill(os.getpid(), signal.SIGALRM)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
        assert early.take_hup()
        assert not early.take_hup()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_a_hup_during_start_up_reloads_once_the_loop_runs(tmp_path: Path) -> None:
    from hbd.config import load_server_config
    from hbd.daemon import Daemon
    from hbd.logs import Logging
    from hbd.loop import EventLoop
    from hbd.notify import Notifier

    class Probe(Daemon):
        reloads = 0

        def start(self) -> None:
            self.loop.call_later(0.05, self.stop)

        def shutdown(self) -> None:
            pass

        def reload(self) -> bool:
            Probe.reloads += 1
            return True

    path = tmp_path / "s.yaml"
    path.write_text(f"log_file: null\ncontrol_socket: {tmp_path / 's.sock'}\n")
    early.take_hup()
    early._hup_pending = True  # what the start-up handler records
    d = Probe(load_server_config(path), loop=EventLoop(), notifier=Notifier({}), logs=Logging("t", journald=False))
    assert d.run() == 0
    assert Probe.reloads == 1 and not early.take_hup()


def _blocked(tid: int) -> int:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)


def test_a_quiet_helper_thread_leaves_every_signal_but_its_own_faults_to_the_loop() -> None:
    """hbd.early.start_quiet: a helper thread blocks what is sent to the process (so the loop's thread
    takes a TERM, a HUP, the watchdog's ABRT), not the faults it may cause itself (so the fault handler
    names it); the caller's mask is as it was."""
    import threading

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen: list[int] = []
    go = threading.Event()
    thread = threading.Thread(target=lambda: (seen.append(threading.get_native_id()), go.wait(5)))
    early.start_quiet(thread)
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        wait_for_thread = time.monotonic() + 5
        while not seen and time.monotonic() < wait_for_thread:
            time.sleep(0.01)
        blocked = _blocked(seen[0])
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGABRT, signal.SIGUSR1, signal.SIGCHLD):
            assert blocked & (1 << (signum - 1)), f"{signal.Signals(signum).name} not blocked in a helper"
        for signum in early.FAULTS:
            assert not blocked & (1 << (signum - 1)), f"{signal.Signals(signum).name} blocked in a helper"
    finally:
        go.set()
        thread.join(5)


def test_the_watchdogs_abort_dumps_the_loops_stack_and_no_other_threads(tmp_path: Path, procs) -> None:
    """systemd's watchdog kills a hung daemon with SIGABRT, then SIGCONT: faulthandler writes the stack
    of the thread that took it, the loop's (every helper blocks it), and no other thread's (walking the
    store writer's frames while it runs again once crashed the dump before the loop's stack: seen in a
    real systemd, tests/test_systemd.py's watchdog test)."""
    state = tmp_path / "state"
    state.mkdir()
    srv = start_server(tmp_path, state_dir=str(state))
    procs.append(srv)
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{srv.pid}/task")) < 2:  # the store's writer runs beside the loop
        assert time.monotonic() < deadline, "no writer thread"
        time.sleep(0.05)
    assert serves(srv.config["port"])  # the loop runs (it answered)
    time.sleep(0.2)  # and waits in select() again
    srv.signal(signal.SIGABRT)
    assert srv.proc.wait(10) == -signal.SIGABRT
    srv.wait_for(r'File ".*/hbd/loop\.py", line \d+')  # where the loop was: waiting in run_once
    out = srv.output()
    assert "Fatal Python error: Aborted" in out and "Stack (most recent call first)" in out, out
    assert "Thread 0x" not in out and "store_thread.py" not in out, out  # no other thread walked
