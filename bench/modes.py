"""Benchmark modes: which N, how long, which servers. Full must fit ~15 min, quick < 2 min."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    ns: tuple[int, ...]
    duration: float  # steady window, s
    hold_duration: float  # steady window at the largest N (the "held for 60 s" target)
    settle: float  # s between the end of the ramp and the window
    timeout: float  # heartbeat_timeout of hbd and the thread server
    silent_frac: float  # clients that go silent after the window, for detection latency
    rate: float = 1000.0  # connect ramp, conn/s
    interval: float = 1.0
    wire: str = "bare"  # what hbd-client sends by default; "line" sends ping\n
    servers: tuple[str, ...] = ("floor", "hbd", "thread")
    thread_max_n: int = 19000  # larger N is not attempted for the thread-per-client fixture
    conns_per_gen: int = 5000  # one generator process per this many conns
    closed_conns: int = 200
    closed_duration: float = 10.0
    closed_workers: tuple[int, ...] = (1, 2)
    # pings in flight per conn; 1 is the spec (ping again when the pong is back). More (e.g. 16)
    # was tried: the generator stays the bottleneck, because a loopback send costs the sender as
    # much as the receiver, so on 2 cores no same-box generator lets a server saturate both
    closed_depths: tuple[int, ...] = (1,)
    client_idle_s: float = 30.0  # 0: skip the hbd-client idle measurement
    lead: float = 1.0  # s from launching the generator to its first connect (imports, fork)
    detect_extra: float = 1.5  # detection wait beyond timeout: the thread checker adds up to 1 s
    # CPU per ping against the floor at cpu_n, in this many pairs (the first is the open run's own; the
    # others after every open run, in the order hbd-floor, floor-hbd, ...): one 15 s window of each
    # varied 0.99-1.54x on the same code in one hour (docs/performance.md, "... sixth round")
    cpu_pairs: int = 1
    cpu_n: int = 10000


FULL = Mode(
    "full",
    ns=(100, 1000, 5000, 10000, 19000),
    duration=15.0,
    hold_duration=60.0,
    settle=2.0,
    timeout=3.0,
    silent_frac=0.05,
    closed_duration=8.0,
    cpu_pairs=3,
)
QUICK = Mode(
    "quick",
    ns=(100, 1000),
    duration=4.0,
    hold_duration=4.0,
    settle=1.0,
    timeout=2.0,
    silent_frac=0.1,
    closed_conns=100,
    closed_duration=3.0,
    client_idle_s=8.0,
)
# For tests/test_bench.py: seconds, not minutes
SMOKE = Mode(
    "smoke",
    ns=(20,),
    duration=1.0,
    hold_duration=1.0,
    settle=0.3,
    timeout=0.5,
    silent_frac=0.25,
    interval=0.1,
    closed_conns=10,
    closed_duration=1.0,
    closed_workers=(1,),
    client_idle_s=0.0,
    lead=0.4,
    detect_extra=1.1,
    cpu_pairs=2,
    cpu_n=20,
)
MODES = {m.name: m for m in (FULL, QUICK, SMOKE)}
