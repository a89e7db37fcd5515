"""The test's side of a client fleet: ``FleetProcess`` runs ``fleet_main.py`` (N hbd client links in one
process) and collects each link's ``up``/``down``/``late`` lines and the pongs' RTTs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

FLEET_MAIN = Path(__file__).resolve().parent / "fleet_main.py"


class FleetProcess:
    """The test's side: start ``fleet_main.py`` and collect its events."""

    def __init__(self, config: dict, n: int, tmp_path: Path, duration: float = 120.0) -> None:
        cfg_path = tmp_path / "fleet.yaml"
        cfg_path.write_text(yaml.safe_dump({"log_file": None, "log_level": "error", **config}))
        self.n = n
        self.events: list[tuple[str, int, float]] = []
        self.stats: dict = {}
        self.proc = subprocess.Popen(
            [sys.executable, str(FLEET_MAIN), str(cfg_path), str(n), str(duration)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("stats "):
                self.stats = json.loads(line[6:])
                continue
            kind, idx, t = line.split()
            with self._lock:
                self.events.append((kind, int(idx), float(t)))

    def up_links(self, since: float = 0.0) -> dict[int, float]:
        """Each link's first ``up`` at or after ``since``."""
        out: dict[int, float] = {}
        with self._lock:
            for kind, idx, t in self.events:
                if kind == "up" and t >= since and idx not in out:
                    out[idx] = t
        return out

    def wait_up(self, count: int, since: float = 0.0, timeout: float = 30.0) -> dict[int, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ups = self.up_links(since)
            if len(ups) >= count:
                return ups
            time.sleep(0.05)
        return self.up_links(since)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(2)
