"""The supervisor's CPU per worker report, in one process: ``python3 -m bench.sup_reports [-n 100000]
[--workers 6] [--profile out.prof]``.

What a supervisor of ``workers: K`` does with a mass event's reports, without the machine's other
processes in the way (bench.mass_down measures the same in real processes, where most of a long turn
is waiting for a core): the real WorkerPool reads report frames from real pipes (as ``K`` workers
wrote them), hands them to the real SupervisorRegistry (with a real Ops: events counted and
remembered, no hooks), and its orders go down real pipes, written when the loop turn's timers run.
This process plays the workers too: it writes each turn's reports before the turn and drains the
orders after it (neither counted). Phases, as bench.mass_down's: a ramp of ``n`` named peers (a
greeting and a first ping each), all of them gone at once, and a reconnect storm (greetings with
known names, then first pings). Prints CPU microseconds per report and per turn of each phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from types import SimpleNamespace

from hbd.config import ServerConfig
from hbd.heap import Heap
from hbd.logs import PeerLog
from hbd.loop import EventLoop
from hbd.ops import Ops
from hbd.registry_types import registry_settings
from hbd.supervisor_registry import SupervisorRegistry
from hbd.worker_pool import Worker, WorkerPool
from hbd.workers_codec import Message, PeerConnected, PeerGone, PeerHello, encode

PER_TURN = 200  # reports a worker writes before each turn (a turn reads its share of them)


def storm(n: int, workers: int, base: int, phase: str) -> dict[int, list[Message]]:
    """Each worker's reports of one phase; connection numbers from ``base`` (a reconnect is a new one)."""
    out: dict[int, list[Message]] = {i: [] for i in range(1, workers + 1)}
    for c in range(n):
        index = c % workers + 1
        conn = base + c
        name = f"host{c:05d}"
        addr = f"127.66.{index}.1:{10000 + c % 50000}"
        if phase == "down":
            out[index].append(PeerGone(conn, "disconnected", 1000.0 + c % 100))
        else:
            out[index] += [PeerHello(conn, name, None, addr), PeerConnected(conn, name, None, addr, 60.0)]
    return out


def run_phase(pool: WorkerPool, loop: EventLoop, ups: dict[int, int], downs: dict[int, int], reports) -> dict:
    frames = {i: b"".join(encode(m) for m in msgs) for i, msgs in reports.items()}
    sent = {i: 0 for i in frames}
    total = sum(len(m) for m in reports.values())
    cpu = 0.0
    turns = 0
    longest = 0.0
    workers = pool.by_index()
    while True:
        for i, data in frames.items():  # the workers write (up to a pipe's worth: as they would)
            if sent[i] < len(data):
                try:
                    sent[i] += os.write(ups[i], data[sent[i] : sent[i] + 65536])
                except BlockingIOError:
                    pass
        start = time.process_time()
        for w in workers:  # one turn: each pipe readable once, then the turn's timers
            pool._on_pipe(w)
        loop.run_once(0)
        took = time.process_time() - start
        cpu += took
        longest = max(longest, took)
        turns += 1
        for fd in downs.values():  # the workers read their orders
            try:
                while os.read(fd, 1 << 20):
                    pass
            except BlockingIOError:
                pass
        if all(sent[i] == len(frames[i]) for i in frames) and all(_empty(ups_r) for ups_r in pool_rfds(pool)):
            break
    return {
        "reports": total,
        "turns": turns,
        "cpu_s": round(cpu, 3),
        "us_per_report": round(cpu / total * 1e6, 2),
        "longest_turn_cpu_ms": round(longest * 1000, 2),
    }


def pool_rfds(pool: WorkerPool) -> list[int]:
    return [w.rfd for w in pool.workers.values()]


def _empty(fd: int) -> bool:
    import select

    return not select.select([fd], [], [], 0)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--profile", help="write a cProfile of the phases here")
    args = ap.parse_args()
    logging.getLogger("hbd").addHandler(logging.FileHandler(os.devnull))
    logging.getLogger("hbd").setLevel(logging.INFO)
    loop = EventLoop()
    cfg = ServerConfig(heartbeat_timeout=60.0, max_peers=args.n + 100, workers=args.workers)
    peer_log = PeerLog(loop.clock)
    daemon = SimpleNamespace(loop=loop, role="server", peer_log=peer_log, worker_index=None)
    ops = Ops(daemon)  # type: ignore[arg-type]
    pool = WorkerPool(loop, None, lambda *a: None, lambda: cfg)  # type: ignore[arg-type]
    reg = SupervisorRegistry(loop, registry_settings(cfg), (), peer_log, ops, pool.order, backlog=pool.backlog)
    pool.peers = reg
    ups: dict[int, int] = {}
    downs: dict[int, int] = {}
    for index in range(1, args.workers + 1):
        rfd, up = os.pipe()
        down, wfd = os.pipe()
        for fd in (rfd, up, down, wfd):
            os.set_blocking(fd, False)
        ups[index], downs[index] = up, down
        w = Worker(index, 100 + index, rfd, wfd, loop.time())
        pool.workers[w.pid] = w
    heap = Heap(loop).start()  # as a daemon's: its long-lived objects out of the collector's sight
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    out = {"n": args.n, "workers": args.workers}
    out["ramp"] = run_phase(pool, loop, ups, downs, storm(args.n, args.workers, 1, "ramp"))
    out["down"] = run_phase(pool, loop, ups, downs, storm(args.n, args.workers, 1, "down"))
    out["reconnect"] = run_phase(pool, loop, ups, downs, storm(args.n, args.workers, args.n + 1, "ramp"))
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    heap.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
