"""The CI guard on hbd's CPU per ping/pong: a short side-by-side run of hbd and the bare floor.

Each round runs hbd, then the floor (bench/floor_server.py), under the same closed-loop load
generator (bench/loadgen.py, ``--mode closed``: every connection pings again as soon as its pong is
back), and compares their CPU time per pong over the measurement window: process CPU time from
/proc (schedstat, every thread), not wall time, so other load on the machine slows both down
without changing what a ping costs. The start-up, the ramp and the end are outside the window.

On a loaded machine one run can still be unlucky (another process evicting its caches, a window
that lost its first tenth to a late wake-up of the sampler), so the guard takes the best ratio over
a few rounds and stops at the first round under the bound: a pass costs one round, and only a real
regression makes every round fail. What it catches is work added per ping, about 4 µs or more: a
CPU-bound 20 µs per ping made the ratio 4.7-6.1x, a 10 KB allocation per ping 2.1-2.3x, where
today's hbd measures 1.0-1.6x (docs/performance.md).

``python3 -m bench.guard`` prints each round; tests/test_perf_guard.py runs it in ``make test``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import runner
from bench.modes import Mode

BOUND = 1.6  # hbd's CPU per ping at most this times the floor's
MIN_PONGS = 5000  # a window with fewer pongs says nothing (start-up and timer costs would weigh in)
GUARD = Mode(
    "guard",
    ns=(),
    duration=0.0,
    hold_duration=0.0,
    settle=0.3,
    timeout=10.0,
    silent_frac=0.0,
    closed_conns=200,
    closed_duration=1.5,
    client_idle_s=0.0,
    lead=0.5,
)


@dataclass
class Round:
    """One hbd run and the floor run right after it."""

    hbd: dict[str, Any]
    floor: dict[str, Any]

    @property
    def ratio(self) -> float | None:
        """hbd's CPU per pong over the floor's; None when either run says nothing."""
        if not (telling(self.hbd) and telling(self.floor)):
            return None
        return self.hbd["cpu_us_per_ping"] / self.floor["cpu_us_per_ping"]

    def line(self) -> str:
        def one(r: dict[str, Any]) -> str:
            if not r.get("ok"):
                return f"{r['server']}: FAILED {str(r.get('error'))[:120]}"
            return (
                f"{r['server']} {r['cpu_us_per_ping']} us/pong ({r['throughput']:.0f} pong/s, "
                f"server {r['server_cpu_pct']} % CPU, errors {r['errors']})"
            )

        ratio = self.ratio
        return f"{one(self.hbd)}; {one(self.floor)}; ratio " + ("-" if ratio is None else f"{ratio:.2f}")


def telling(r: dict[str, Any]) -> bool:
    """A run that measured something: it answered, without errors, enough pongs in its window."""
    pongs = (r.get("throughput") or 0) * GUARD.closed_duration
    return bool(r.get("ok") and r.get("cpu_us_per_ping") and not r.get("errors") and pongs >= MIN_PONGS)


@dataclass
class Verdict:
    rounds: list[Round] = field(default_factory=list)
    bound: float = BOUND
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after
    seconds: float = 0.0

    @property
    def best(self) -> float | None:
        ratios = [r.ratio for r in self.rounds if r.ratio is not None]
        return min(ratios) if ratios else None

    @property
    def passed(self) -> bool:
        return self.best is not None and self.best <= self.bound

    def report(self) -> str:
        lines = [f"round {i + 1}: {r.line()}" for i, r in enumerate(self.rounds)]
        lines.append(
            f"best ratio {'-' if self.best is None else f'{self.best:.2f}'} (bound {self.bound}), "
            f"{self.seconds:.1f} s, load average {self.load[0]:.2f} -> {self.load[1]:.2f}"
        )
        return "\n".join(lines)


def run(rounds: int = 3, bound: float = BOUND, progress: Callable[[str], object] | None = None) -> Verdict:
    """Up to ``rounds`` rounds of hbd then floor; stops at the first round whose ratio is within ``bound``."""
    verdict = Verdict(bound=bound, load=(os.getloadavg()[0], 0.0))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hbd-guard-") as td:  # short paths: hbd's status socket is in it
        for _ in range(rounds):
            hbd = runner.run_closed("hbd", 1, 1, GUARD, Path(td))
            floor = runner.run_closed("floor", 1, 1, GUARD, Path(td))
            verdict.rounds.append(Round(hbd, floor))
            if progress:
                progress(f"round {len(verdict.rounds)}: {verdict.rounds[-1].line()}")
            ratio = verdict.rounds[-1].ratio
            if ratio is not None and ratio <= bound:
                break
    verdict.seconds = time.monotonic() - t0
    verdict.load = (verdict.load[0], os.getloadavg()[0])
    return verdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bound", type=float, default=BOUND)
    a = ap.parse_args(argv)
    verdict = run(a.rounds, a.bound, progress=lambda s: print(s, flush=True))
    print(verdict.report().splitlines()[-1])
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
