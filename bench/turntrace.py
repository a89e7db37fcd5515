"""Run ``python3 -m hbd ...`` with the long loop turns of its first process (the supervisor, with
``workers:``) taken apart: which callbacks ran, their wall and thread CPU time, the process's CPU
(all its threads: the state store's writer holds the GIL too) and the garbage collector's passes.

Usage: ``python3 -m bench.turntrace FILE [--over MS] server -c CONFIG``; bench.scale runs hbd under
it when HBD_BENCH_TURNTRACE names FILE (MS: HBD_TURNTRACE_OVER). Appends to FILE one JSON line per
turn longer than MS (default 40): its
monotonic end, wall / thread CPU / process CPU (ms), the GC passes in it (generation, ms) and the
callbacks that ran, by name (name, how many, wall, CPU, process CPU, ms), and at exit a summary line. A
measuring tool: two clock reads per callback of the supervisor's loop; the workers are not traced.
HBD_TURNTRACE_WORKER_NICE=N (an experiment): each worker runs N nicer than the supervisor.
HBD_TURNTRACE_SLICE_US=N, HBD_TURNTRACE_WORKER_SLICE_US=M (an experiment, before hbd's own
``cpu_slice_us``): the supervisor's CPU slice (inherited by the workers), and the workers' (0: the kernel's).
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import runpy
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def _name(cb: Callable[..., object]) -> str:
    fn = getattr(cb, "func", cb)  # a functools.partial
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", repr(fn))
    if owner is not None and "<lambda>" not in name:
        return f"{type(owner).__name__}.{getattr(fn, '__name__', name)}"
    code = getattr(fn, "__code__", None)
    return f"{name}@{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}" if code else name


def _gaps(line: list[tuple[float, str]], end: float, top: int = 4) -> list[tuple[float, str, str]]:
    """The longest stretches of a turn between two consecutive points of its timeline (ms, after, before)."""
    line = [*line, (end, "end")]
    gaps = [(round((b[0] - a[0]) * 1000, 1), a[1], b[1]) for a, b in itertools.pairwise(line)]
    return sorted(gaps, reverse=True)[:top]


def trace(path: str, over_ms: float) -> None:
    from hbd.loop import EventLoop

    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    pid = os.getpid()
    state: dict[str, Any] = {"gc": [], "cbs": {}, "line": [], "gc_at": 0.0, "turns": 0, "logged": 0, "max": 0.0}
    clock, tcpu, pcpu = time.perf_counter, time.thread_time, time.process_time

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if os.getpid() != pid:
            return
        if phase == "start":
            state["gc_at"] = clock()
        else:
            state["gc"].append((info["generation"], round((clock() - state["gc_at"]) * 1000, 2)))

    def timed(cb: Callable[..., object]) -> Callable[..., object]:
        name = _name(cb)

        def run(*args: object) -> object:
            w, c, p = clock(), tcpu(), pcpu()
            state["line"].append((w, "+" + name))
            try:
                return cb(*args)
            finally:
                state["line"].append((clock(), "-" + name))
                agg = state["cbs"].setdefault(name, [0, 0.0, 0.0, 0.0])
                agg[0] += 1
                agg[1] += clock() - w
                agg[2] += tcpu() - c
                agg[3] += pcpu() - p

        run.__wrapped__ = cb  # type: ignore[attr-defined]
        return run

    def instrument(loop: EventLoop) -> None:
        call_at, add_reader, add_writer, run_once = loop.call_at, loop.add_reader, loop.add_writer, loop.run_once
        loop_clock, select = loop.clock, loop.selector.select
        tid = threading.get_native_id()

        def sched() -> tuple[float, float, int]:
            """(on-CPU, waited on a run queue, times run) of the loop's thread (/proc schedstat)."""
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    run, wait, slices = f.read().split()
                return int(run) / 1e9, int(wait) / 1e9, int(slices)
            except OSError:
                return 0.0, 0.0, 0

        def traced_clock() -> float:
            t = loop_clock()
            state["line"].append((clock(), "clock"))
            return t

        def traced_select(timeout: Any = None) -> Any:
            state["line"].append((clock(), "select"))
            ready = select(timeout)
            state["line"].append((clock(), "selected"))
            return ready

        def traced_call_at(when: float, callback: Callable[[], object]) -> Any:
            return call_at(when, timed(callback))

        def traced_add_reader(fileobj: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
            return add_reader(fileobj, timed(callback), *args, **kwargs)

        def traced_add_writer(fileobj: Any, callback: Any, *args: Any, **kwargs: Any) -> Any:
            return add_writer(fileobj, timed(callback), *args, **kwargs)

        def traced_run_once(*args: Any, **kwargs: Any) -> None:
            state["gc"], state["cbs"], state["line"] = [], {}, []
            run_once(*args, **kwargs)
            w, c, p = clock(), tcpu(), pcpu()  # this turn's end (the select() of the next one excluded)
            on_cpu, queued, slices = sched()
            state["turns"] += 1
            woke = loop.woke
            turn_ms = (time.monotonic() - woke) * 1000
            state["max"] = max(state["max"], turn_ms)
            last = state.get("last")
            state["last"] = (w, c, p, on_cpu, queued, slices)
            if turn_ms > over_ms and last is not None:
                state["logged"] += 1
                rec = {
                    "t": round(time.monotonic(), 3),
                    "turn_ms": round(turn_ms, 1),
                    # since the end of the previous turn (its select() included: idle there is no CPU)
                    "since_last_wall_ms": round((w - last[0]) * 1000, 1),
                    "since_last_cpu_ms": round((c - last[1]) * 1000, 1),
                    "since_last_proc_cpu_ms": round((p - last[2]) * 1000, 1),
                    "since_last_sched_run_ms": round((on_cpu - last[3]) * 1000, 1),
                    "since_last_runqueue_wait_ms": round((queued - last[4]) * 1000, 1),
                    "since_last_runs": slices - last[5],
                    "gaps": _gaps(state["line"], w),
                    "gc": state["gc"],
                    "cbs": [
                        (name, n, round(w * 1000, 2), round(c * 1000, 2), round(p * 1000, 2))
                        for name, (n, w, c, p) in sorted(state["cbs"].items(), key=lambda x: -x[1][1])
                    ],
                }
                out.write(json.dumps(rec) + "\n")

        loop.call_at = traced_call_at  # type: ignore[method-assign]
        loop.add_reader = traced_add_reader  # type: ignore[method-assign]
        loop.add_writer = traced_add_writer  # type: ignore[method-assign]
        loop.run_once = traced_run_once  # type: ignore[method-assign]
        loop.clock = traced_clock  # type: ignore[method-assign]
        loop.selector.select = traced_select  # type: ignore[method-assign]

    init = EventLoop.__init__

    def traced_init(self: EventLoop, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if os.getpid() == pid and not state.get("done"):
            state["done"] = True  # the first loop of the first process: the supervisor's
            instrument(self)

    EventLoop.__init__ = traced_init  # type: ignore[method-assign]
    nice = int(os.environ.get("HBD_TURNTRACE_WORKER_NICE", "0"))
    if nice:  # an experiment: the workers this much nicer than the supervisor (its share of the cores)
        from hbd.workers import Supervisor

        run_worker = Supervisor._run_worker

        def niced(self: Supervisor, *args: Any) -> int:
            os.nice(nice)
            return run_worker(self, *args)

        Supervisor._run_worker = niced  # type: ignore[method-assign]
    from hbd import cpu_slice

    slice_us = int(os.environ.get("HBD_TURNTRACE_SLICE_US", "0"))
    if slice_us:  # an experiment: the supervisor's (and, inherited, its workers') EEVDF slice
        cpu_slice.request(slice_us / 1e6)
    worker_slice = os.environ.get("HBD_TURNTRACE_WORKER_SLICE_US")
    if worker_slice is not None:
        from hbd.workers import Supervisor

        run_worker_sliced = Supervisor._run_worker

        def sliced(self: Supervisor, *args: Any) -> int:
            cpu_slice.request(int(worker_slice) / 1e6)  # 0: the kernel's default
            return run_worker_sliced(self, *args)

        Supervisor._run_worker = sliced  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)

    def summary() -> None:
        if os.getpid() == pid:
            out.write(json.dumps({"summary": True, "turns": state["turns"], "logged": state["logged"]}) + "\n")

    atexit.register(summary)


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    path, args = args[0], args[1:]
    over = float(os.environ.get("HBD_TURNTRACE_OVER", "40"))
    if args[:1] == ["--over"]:
        over, args = float(args[1]), args[2:]
    trace(path, over)
    sys.argv = ["hbd", *args]
    runpy.run_module("hbd", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
