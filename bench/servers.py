"""Start and stop the servers under test on 127.0.0.1 at a free port.

Servers: ``floor`` (bench/floor_server.py), ``thread`` (bench/thread_server.py) and ``hbd``
(``python3 -m hbd server -c <tmp yaml>``). Each runs with its fd soft limit at the hard limit and,
when asked, pinned to given CPUs (set before exec, so every thread and worker inherits it).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable or "/usr/bin/python3"
SERVERS = ("floor", "hbd", "thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hbd_server_yaml(
    port: int,
    timeout: float,
    log_file: Path,
    workers: int | None,
    max_clients: int,
    control_socket: Path,
    state_dir: Path,
) -> str:
    lines = [
        "host: 127.0.0.1",
        f"port: {port}",
        f"heartbeat_timeout: {timeout}",
        f"max_clients: {max_clients}",
        "backlog: 4096",
        f"log_file: {log_file}",
        "log_level: info",
        f"control_socket: {control_socket}",
        # everything in: every client a named peer of the registry (max_peers at least N) and the
        # state store with its history (a directory per run; the default /var/lib/hbd is the unit's)
        f"max_peers: {max_clients}",
        f"state_dir: {state_dir}",
    ]
    if workers is not None:  # only sent when asked, so a core without the option still runs
        lines.append(f"workers: {workers}")
    return "\n".join(lines) + "\n"


def hbd_client_yaml(port: int, interval: float, log_file: Path) -> str:
    return (
        "\n".join(
            [
                "host: 127.0.0.1",
                f"port: {port}",
                f"heartbeat_interval: {interval}",
                f"pong_timeout: {interval * 3}",
                "wire: line",
                f"log_file: {log_file}",
                "log_level: info",
            ]
        )
        + "\n"
    )


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    extra: dict[str, object] = field(default_factory=dict)
    status_path: Path | None = None  # hbd's status socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return procstat.tree(self.proc.pid) if self.proc.poll() is None else []

    def output_tail(self, n: int = 600) -> str:
        try:
            return self.out.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server (it stops its own workers), then SIGKILL whatever of its tree is left."""
        tree = self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        for p in tree[1:]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _preexec(cpus: set[int] | None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus:
        os.sched_setaffinity(0, cpus)


def command(
    name: str, port: int, tmp: Path, timeout: float, workers: int | None, max_clients: int = 100_000
) -> list[str]:
    if name == "floor":
        return [PYTHON, "-m", "bench.floor_server", "--port", str(port), "--workers", str(workers or 1)]
    if name == "thread":
        return [PYTHON, "-m", "bench.thread_server", "--port", str(port), "--timeout", str(timeout)]
    if name == "hbd":
        cfg = tmp / f"hbd-server-{port}.yaml"
        log, sock, state = tmp / f"hbd-server-{port}.log", status_socket(tmp, port), tmp / f"hbd-state-{port}"
        state.mkdir(exist_ok=True)
        cfg.write_text(hbd_server_yaml(port, timeout, log, workers, max_clients, sock, state))
        trace = os.environ.get("HBD_BENCH_GCTRACE")  # every collector pass timed (bench/gctrace.py)
        run = ["-m", "bench.gctrace", trace] if trace else ["-m", "hbd"]
        return [PYTHON, *run, "server", "-c", str(cfg)]
    raise ValueError(f"unknown server {name!r}")


def start(
    name: str,
    tmp: Path,
    *,
    timeout: float,
    workers: int | None = None,
    cpus: set[int] | None = None,
    client_of: int | None = None,
) -> Running:
    """Start a server (or, with client_of=PORT, an hbd client of that port) and wait until it is up."""
    port = free_port()
    if client_of is not None:
        cfg = tmp / f"hbd-client-{client_of}.yaml"
        cfg.write_text(hbd_client_yaml(client_of, timeout, tmp / f"hbd-client-{client_of}.log"))
        cmd = [PYTHON, "-m", "hbd", "client", "-c", str(cfg)]
        port = client_of
    else:
        cmd = command(name, port, tmp, timeout, workers)
    out = tmp / f"{name}-{port}.out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _preexec(cpus),
        )
    status_path = status_socket(tmp, port) if name == "hbd" and client_of is None else None
    srv = Running(name, proc, port, out, status_path=status_path)
    if client_of is None and not wait_ready(srv):
        srv.stop()
        raise RuntimeError(f"{name} did not start: {srv.output_tail() or 'no output'}")
    return srv


def status_socket(tmp: Path, port: int) -> Path:
    return tmp / f"{port}.sock"  # short: a status socket's path must fit sockaddr_un (108 bytes)


def loop_turns(path: Path, timeout: float = 20.0) -> dict[str, Any] | None:
    """hbd's loop turn histogram from its status socket (``loop.turns``: with workers, every process's
    together); None if it cannot be read or the daemon has none (an older core)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"status\n")
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        turns = json.loads(b"".join(chunks))["loop"]["turns"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return turns if isinstance(turns, dict) else None


def turns_summary(turns: dict[str, Any] | None) -> dict[str, Any] | None:
    """count, max, turns over 10 and 100 ms, and the bucket bound under which 99 % of the turns fell."""
    if not turns:
        return None
    le: dict[str, int] = turns["le_ms"]
    count = turns["count"]
    p99 = next((b for b, n in le.items() if n >= 0.99 * count), "+Inf")
    return {
        "count": count,
        "max_ms": turns["max_ms"],
        "over_10ms": count - le.get("10", count),
        "over_100ms": turns["over_100ms"],
        "p99_le_ms": p99,
    }


def wait_ready(srv: Running, limit: float = 15.0) -> bool:
    """Poll-connect until the port accepts (the probe closes at once, sending nothing)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if srv.proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
