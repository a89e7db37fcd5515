"""Run ``python3 -m hbd ...`` with every pass of Python's cyclic garbage collector timed.

Usage: HBD_BENCH_GCTRACE=FILE python3 -m bench ... (bench/servers.py then starts hbd under this), or
directly ``python3 -m bench.gctrace FILE server -c CONFIG``. Appends to FILE one line per full
(generation 2) collection and per any collection over 20 ms (monotonic time, pid, generation,
milliseconds, objects collected), and at exit a summary per generation: (count, total s, longest s).
A measuring tool: gc.callbacks cost a few microseconds per collection.
"""

from __future__ import annotations

import atexit
import gc
import os
import runpy
import sys
import time
from typing import Any

LOGGED_MS = 20.0


def trace(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    started = [0.0]
    stats: dict[int, tuple[int, float, float]] = {}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        gen = info["generation"]
        n, total, longest = stats.get(gen, (0, 0.0, 0.0))
        stats[gen] = (n + 1, total + took, max(longest, took))
        if gen == 2 or took * 1000 > LOGGED_MS:
            ms, collected = took * 1000, info["collected"]
            out.write(f"{time.monotonic():.3f} pid={os.getpid()} gen={gen} ms={ms:.1f} collected={collected}\n")

    gc.callbacks.append(callback)
    atexit.register(lambda: out.write(f"{time.monotonic():.3f} pid={os.getpid()} summary {stats}\n"))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    trace(sys.argv[1])
    sys.argv = ["hbd", *sys.argv[2:]]
    runpy.run_module("hbd", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
