"""Profile a server under the open-loop load: where does its CPU per ping go?

Starts the server pinned to CPU 0 (as the benchmark does), drives it with N clients from CPU 1,
records it with py-spy (``pip install py-spy``) in the middle of the steady window and prints
the top functions by own time and by inclusive time.

Usage: python3 -m bench.profile [--server hbd] [-n 10000] [--seconds 12] [--wire line|bare]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import servers
from bench.loadgen import make_schedule
from bench.modes import FULL
from bench.runner import cpu_split, gen_command, hello_for, sleep_until


def summarize(raw: Path, top: int) -> str:
    """Own and inclusive sample shares per function from py-spy's collapsed ('raw') output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
            for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * c / total:5.1f} %  {f}" for f, c in own.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"  {100 * c / total:5.1f} %  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="hbd", choices=servers.SERVERS)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--wire", choices=("line", "bare"), default="bare")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="keep the raw py-spy output here")
    a = ap.parse_args()
    spy = shutil.which("py-spy")
    if not spy:
        sys.exit("py-spy not found: pip install py-spy")
    scpu, gcpu = cpu_split()
    with tempfile.TemporaryDirectory(prefix="hbd-prof-") as td:
        tmp = Path(td)
        srv = servers.start(a.server, tmp, timeout=FULL.timeout, cpus=scpu)
        try:
            start_at = time.monotonic() + 1.0
            duration = a.seconds + 4.0
            sch = make_schedule(start_at, a.n, FULL.rate, FULL.settle, duration, 0.0, 2.0)
            m = dataclasses.replace(FULL, wire=a.wire)
            cmd = gen_command(
                srv.port,
                a.n,
                max(1, -(-a.n // m.conns_per_gen)),
                "open",
                start_at,
                m,
                duration,
                0.0,
                0.0,
                gcpu,
                m.rate,
                hello_for(a.server),
            )
            gen = subprocess.Popen(
                cmd, cwd=servers.REPO, stdout=subprocess.DEVNULL, env={"PYTHONPATH": str(servers.REPO)}
            )
            sleep_until(sch.ss + 2.0)
            raw = a.out or tmp / "spy.txt"
            subprocess.run(
                [
                    spy,
                    "record",
                    "-p",
                    str(srv.pid),
                    "-d",
                    str(int(a.seconds)),
                    "-r",
                    str(a.rate),
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--nonblocking",
                ],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            gen.wait(timeout=sch.hard_end - time.monotonic() + 20)
            print(summarize(raw, a.top))
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
