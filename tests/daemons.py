"""Real hbd processes for integration tests: start one with a config, watch its output, signal it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HbdProcess:
    """``python3 -m hbd ROLE -c FILE`` with its terminal output collected line by line."""

    def __init__(
        self,
        role: str,
        config: dict,
        tmp_path: Path,
        env: dict | None = None,
        name: str = "",
        wrap: list[str] | None = None,
    ) -> None:
        self.role = role
        self.config_path = tmp_path / f"{name or role}.yaml"
        self.write_config(config)
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("JOURNAL_STREAM", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "hbd", role, "-c", str(self.config_path)],  # wrap: e.g. ip netns exec
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=full_env,
        )
        self._terminated = False
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write_config(self, config: dict) -> None:
        self.config = dict(config)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def mark(self) -> int:
        """Position in the output; wait_for(after=mark) looks only at lines that come later."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 5.0, after: int = 0) -> tuple[float, str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, line in self.lines[after:]:
                    if rx.search(line):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{self.output()}")
                self._cond.wait(min(left, 0.1))

    def count(self, pattern: str, after: int = 0) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for _, line in self.lines[after:] if rx.search(line))

    def output(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM, after a SIGCONT in case it was stopped); stop() waits for it."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> int:
        self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(2)
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(2)


def start_server(
    tmp_path: Path,
    name: str = "server",
    env: dict | None = None,
    wrap: list[str] | None = None,
    ready_timeout: float = 20.0,  # generous: a loaded machine starts Python slowly; a failed start ends sooner
    **cfg,
) -> HbdProcess:
    config = {
        "host": "127.0.0.1",
        "port": free_port(),
        "heartbeat_timeout": 1.0,
        "log_file": str(tmp_path / f"{name}.log"),
        "log_level": "info",
        "control_socket": str(tmp_path / f"{name}.sock"),
        "state_dir": None,  # no state store unless a test asks for one (never the system's /var/lib/hbd)
        **cfg,
    }
    srv = HbdProcess("server", config, tmp_path, env=env, name=name, wrap=wrap)
    try:
        srv.wait_for(r"listening on", timeout=ready_timeout)
    except AssertionError:
        srv.kill()  # not handed to the caller yet: nobody else would stop it
        raise
    return srv


def start_client(
    tmp_path: Path, port: int, name: str = "client", env: dict | None = None, wrap: list[str] | None = None, **cfg
) -> HbdProcess:
    config = {
        "host": "127.0.0.1",
        "port": port,
        "heartbeat_interval": 0.2,
        "pong_timeout": 0.6,
        "receive_timeout": 1.0,
        "reconnect_delay": 0.1,
        "reconnect_max_delay": 0.5,
        "log_file": str(tmp_path / f"{name}.log"),
        "log_level": "info",
        "control_socket": str(tmp_path / f"{name}.sock"),
        "state_dir": None,  # no state store unless a test asks for one (never the system's /var/lib/hbd)
        **cfg,
    }
    if "servers" in cfg:
        del config["host"]  # the list replaces it; port stays as the default port of its items
    return HbdProcess("client", config, tmp_path, env=env, name=name, wrap=wrap)


def connect(port: int, timeout: float = 3.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
