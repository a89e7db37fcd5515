"""A short CPU slice for hbd's processes: EEVDF's custom slice (Linux 6.12 and later).

When the cores are busy, Linux's fair scheduler runs a waiting task only once the tasks ahead of it
have had their slices (1.4 ms each on this 2-core machine, 3 ms on bigger ones). hbd's work comes in
short loop turns (a pong, a worker's reports, a verdict), so among a dozen busy tasks a turn of 2 ms
of CPU took 37-125 ms of wall time, nearly all of it waiting for a core (docs/performance.md, "The
supervisor's teardown turn"). A task may ask for a shorter slice (``sched_setattr``'s
``sched_runtime`` for an ordinary task): the kernel then gives it earlier deadlines, so it is picked
sooner and preempts a longer-sliced task when it wakes, for the **same share** of the CPU (its weight
is unchanged: this is not a priority, and it needs no privilege). Threads and forked processes
inherit it. An older kernel ignores the request (``sched_getattr`` reports no slice): None, and
nothing changes.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from typing import TYPE_CHECKING

from hbd.logs import log

if TYPE_CHECKING:
    import ctypes

# sched_setattr, sched_getattr: the system call numbers by architecture (no libc wrapper for either)
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "riscv64": (274, 275), "i686": (351, 352)}
_ATTR = struct.Struct("IIQiIQQQII")  # struct sched_attr as of Linux 5.3 (56 bytes)
MIN_SLICE = 0.0001  # the kernel's bounds for a custom slice (it clamps to them)
MAX_SLICE = 0.1


@functools.cache  # (request() reads the slice back through current(): one libc handle, not one a call)
def _calls() -> tuple[ctypes.CDLL, int, int] | None:
    numbers = _SYSCALLS.get(os.uname().machine)
    if numbers is None:
        return None
    import ctypes  # (here: a daemon that asks nothing, the default, never loads it)

    return ctypes.CDLL(None, use_errno=True), *numbers


def current() -> float | None:
    """This thread's slice in seconds as the kernel reports it (its own default when none was asked for, on
    Linux 6.18), None when the kernel reports none (before 6.12, or no such system call here)."""
    calls = _calls()
    if calls is None:
        return None
    import ctypes

    libc, _, get = calls
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(get, 0, buf, _ATTR.size, 0) != 0:
        return None
    runtime = _ATTR.unpack(buf.raw)[5]
    return runtime / 1e9 if runtime else None


def request(seconds: float) -> float | None:
    """Ask for a slice of ``seconds`` for every thread of this process and whatever they start from now on
    (0: the kernel's default again); returns the slice now in effect for this thread, None when the
    kernel has no custom slices (or refused). Never raises: a kernel that cannot do it leaves hbd as
    it was."""
    calls = _calls()
    if calls is None:
        return None
    import ctypes

    libc, set_, _ = calls
    policy = os.sched_getscheduler(0)
    if policy not in (os.SCHED_OTHER, os.SCHED_BATCH):  # a real-time (or idle) policy an operator chose: keep it
        return None
    runtime = 0 if seconds <= 0 else round(min(max(seconds, MIN_SLICE), MAX_SLICE) * 1e9)
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # (sched_setattr sets the nice value too: keep ours)
    attr = ctypes.c_char_p(_ATTR.pack(_ATTR.size, policy, 0, nice, 0, runtime, 0, 0, 0, 0))
    if libc.syscall(set_, 0, attr, 0) != 0:  # this thread first: whether the kernel takes it at all
        return None
    me = str(threading.get_native_id())
    try:
        others = [int(tid) for tid in os.listdir("/proc/self/task") if tid != me]
    except OSError:
        others = []
    for tid in others:  # (a thread that ended meanwhile: ESRCH, nothing to do)
        libc.syscall(set_, tid, attr, 0)
    return current()


def ask(us: int, was: int = 0) -> None:
    """The configuration's ``cpu_slice_us`` (``was`` before a reload) for this process's threads: one info
    line when it cannot be had. 0 at start asks nothing (a slice set from outside stays)."""
    if us == was:
        return
    got = request(us / 1e6)
    if got is None:
        if us:
            log.info("cpu_slice_us: %d has no effect here (custom slices need Linux 6.12 or later)", us)
    elif us:
        log.debug("CPU slice %d us", round(got * 1e6))
