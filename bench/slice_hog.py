"""hbd beside a CPU hog on its core, with and without a short CPU slice (``python3 -m bench.slice_hog``).

The open run (bench.runner) at N clients, one hbd process pinned to the first CPU, and a busy loop
pinned there too; ``cpu_slice_us`` 0 (the kernel's slice, the default) and 300 alternate, ``--reps``
pairs. Prints one JSON line a run: hbd's loop turns (from its status socket), the pongs' RTT, CPU per
ping. Run it under ``flock /tmp/hbd-bench.lock``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import runner, servers
from bench.modes import FULL


def with_slice(yaml: Callable[..., str], us: int) -> Callable[..., str]:
    """servers.hbd_server_yaml with ``cpu_slice_us: us`` added."""

    def config(*args: Any, **kwargs: Any) -> str:
        return yaml(*args, **kwargs) + f"cpu_slice_us: {us}\n"

    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--window", type=float, default=20.0, help="seconds measured (default 20)")
    a = ap.parse_args(argv)
    mode = dataclasses.replace(FULL, ns=(a.n,), duration=a.window, cpu_pairs=1)
    cpus, _ = runner.cpu_split()
    hog_cpus = cpus or set(os.sched_getaffinity(0))
    plain = servers.hbd_server_yaml
    try:
        for rep in range(a.reps):
            for us in (0, 300):
                servers.hbd_server_yaml = with_slice(plain, us)
                hog = subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, hog_cpus)
                )
                try:
                    with tempfile.TemporaryDirectory(prefix="hbd-slice-") as tmp:
                        rec = runner.run_open("hbd", a.n, mode, Path(tmp))
                finally:
                    hog.kill()
                    hog.wait()
                keep = ("ok", "n", "missed", "errors", "rtt_ms", "turns", "cpu_us_per_ping")
                print(json.dumps({"rep": rep, "cpu_slice_us": us, **{k: rec.get(k) for k in keep}}), flush=True)
    finally:
        servers.hbd_server_yaml = plain
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
