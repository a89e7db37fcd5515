"""Instructions per ping under callgrind: a repeatable measure of the CPU a ping costs in user space.

Timings on this shared 2-core machine move by 10-20 % from run to run; callgrind's instruction count
does not (it is the same to within 0.1 % from run to run). One process holds N = 400 loopback
connections to a server on the same thread: hbd's ``Server`` with the registry and the state store
on its own ``EventLoop`` and the real epoll selector, or the floor's loop (bench/floor_server.py's
body). Each round sends one ping on each of 100 connections, runs one loop turn, reads the 100
pongs and moves the loop's clock by 1/4 s (each peer pings once a virtual second, as in the open
benchmark: deadline-wheel re-filings and timers come due as they would; ``--frozen`` keeps the
clock still, for the I/O path alone). Instructions per ping are the difference between two runs
(``--rounds`` and ``--rounds`` + 400) over the 40,000 pings between them, so start-up cancels out;
the client's own send and recv are in both servers' figures alike.

``--mix open`` is the open benchmark's mix at N = 10000 instead (docs/performance.md, "CPU per ping:
the bytecode a ping runs"): 2,000 peers, 11 pings a loop turn (what the status socket counts there)
and 10,000 pings a virtual second, each peer pinging every 0.2 s with a 0.6 s timeout, so a ping
costs one deadline re-filing, the loop's per-turn work is shared by 11 pings and time-driven work
comes 10,000 pings apart, as in the open run. ``--opcodes`` counts the bytecode instructions the
server's turns run a ping, by function (``sys.settrace``; no valgrind, a few seconds).

Usage: python3 -m bench.ping_instructions [--server hbd|floor] [--frozen] [--mix classic|open]
[--opcodes] [--tree DIR] (needs valgrind; about a minute for hbd). ``--tree`` measures another
checkout's hbd package.
"""

from __future__ import annotations

import argparse
import collections
import functools
import operator
import os
import re
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

N, BATCH, EXTRA = 400, 100, 400  # connections, pings a round, rounds between the two runs
# --mix: (connections, pings a round = a loop turn, virtual seconds a round, heartbeat_timeout, extra rounds)
MIXES = {"classic": (N, BATCH, 0.25, 3.0, EXTRA), "open": (2000, 11, 11 / 10000, 0.6, 1000)}
REPO = Path(__file__).resolve().parent.parent


def hbd_turn(clock: Callable[[], float], timeout: float = 3.0) -> tuple[int, Callable[[], None]]:
    from hbd.config import load_server_config
    from hbd.logs import Logging
    from hbd.loop import EventLoop
    from hbd.server import Server

    td = Path(tempfile.mkdtemp(prefix="hbd-instr-"))
    (td / "state").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (td / "s.yaml").write_text(
        f"host: 127.0.0.1\nport: {port}\nheartbeat_timeout: {timeout}\nmax_clients: 100000\nbacklog: 4096\n"
        f"log_file: {td}/log\nlog_level: warning\ncontrol_socket: {td}/ctl\nmax_peers: 100000\nstate_dir: {td}/state\n"
    )
    loop = EventLoop(clock=clock, cpu_clock=time.thread_time)
    server = Server(load_server_config(td / "s.yaml"), loop=loop, logs=Logging("hbd-server", journald=False))
    server.ops.start()
    server.start()
    return port, lambda: loop.run_once(max_wait=0.0)


def floor_turn() -> tuple[int, Callable[[], None]]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    ls.setblocking(False)
    ep, lfd = select.epoll(), ls.fileno()
    ep.register(lfd, select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    tails: dict[int, bytes] = {}

    def turn() -> None:  # bench/floor_server.py's loop body, with a zero timeout
        for fd, _ in ep.poll(0):
            if fd == lfd:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    c.setblocking(False)
                    socks[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            s = socks[fd]
            try:
                d = s.recv(4096)
            except OSError:
                d = b""
            if not d:
                continue
            if d == b"ping\n" and fd not in tails:
                out = b"pong\n"
            elif d == b"ping" and fd not in tails:
                out = b"pong"
            else:
                out = b""
            if out:
                try:
                    s.send(out)
                except OSError:
                    pass

    return ls.getsockname()[1], turn


def drive(server: str, rounds: int, frozen: bool, mix: str = "classic", opcodes: bool = False) -> None:
    """The measured process: serve N connections for ``rounds`` rounds (after a warm-up)."""
    n, batch, step, timeout, _ = MIXES[mix]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * n + 100)), hard))  # both ends of n
    now = [1000.0]
    clock = functools.partial(operator.getitem, now, 0)  # a C callable: no Python frame per reading
    port, turn = hbd_turn(clock, timeout) if server == "hbd" else floor_turn()
    clients = []
    for i in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        if server == "hbd":
            c.send(f"hello peer-{i}\n".encode())  # named peers: the registry keeps each
        clients.append(c)
        if i % 50 == 0:
            turn()
    for _ in range(20):
        turn()
    groups = n // batch
    counter = OpcodeCounter() if opcodes else None
    for k in range(4 * groups + rounds):  # 4 * groups: every peer UP before the counted rounds
        group = clients[(k % groups) * batch : (k % groups + 1) * batch]
        for c in group:
            c.send(b"ping")
        if counter is not None and k >= 4 * groups:
            counter.run(turn)
        else:
            turn()
        for c in group:
            c.recv(100)
        if not frozen:
            now[0] += step
    if counter is not None:
        counter.report(rounds * batch)


class OpcodeCounter:
    """Bytecode instructions run, by function, through ``sys.settrace``'s opcode events."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def _trace(self, frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            self.counts[frame.f_code.co_qualname] += 1
        return self._trace

    def run(self, turn: Callable[[], None]) -> None:
        sys.settrace(self._trace)
        try:
            turn()
        finally:
            sys.settrace(None)

    def report(self, pings: int) -> None:
        print(f"{sum(self.counts.values()) / pings:.1f} bytecode instructions a ping")
        for name, count in self.counts.most_common(8):
            print(f"  {count / pings:7.2f}  {name}")


def instructions(server: str, rounds: int, frozen: bool, mix: str, tree: Path) -> int:
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "cg.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m"]
        cmd += ["bench.ping_instructions", "--drive", server, "--rounds", str(rounds), "--mix", mix]
        cmd += ["--frozen"] * frozen
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{REPO}"}
        subprocess.run(cmd, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
        assert m, "no totals in callgrind's output"
        return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("hbd", "floor"), default="hbd")
    ap.add_argument("--frozen", action="store_true", help="keep the clock still: the I/O path alone")
    ap.add_argument("--rounds", type=int, default=None, help="rounds before the measured ones (40 / 200)")
    ap.add_argument("--mix", choices=sorted(MIXES), default="classic", help="classic, or the open run's (see above)")
    ap.add_argument("--opcodes", action="store_true", help="count bytecode instructions instead (no valgrind)")
    ap.add_argument("--tree", type=Path, default=REPO, help="directory holding the hbd package to measure")
    ap.add_argument("--drive", choices=("hbd", "floor"), help=argparse.SUPPRESS)  # the measured process
    a = ap.parse_args(argv)
    n, batch, _, _, extra = MIXES[a.mix]
    rounds = a.rounds if a.rounds is not None else (40 if a.mix == "classic" else 200)
    if a.drive or a.opcodes:
        if a.opcodes:
            sys.path.insert(0, str(a.tree))
        drive(a.drive or a.server, rounds if a.drive else 5 * (n // batch), a.frozen, a.mix, a.opcodes)
        return 0
    low = instructions(a.server, rounds, a.frozen, a.mix, a.tree)
    high = instructions(a.server, rounds + extra, a.frozen, a.mix, a.tree)
    label = f"{a.server}{' (frozen clock)' if a.frozen else ''}{' (open mix)' if a.mix == 'open' else ''}"
    print(f"{label}: {(high - low) / (extra * batch):.0f} instructions per ping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
