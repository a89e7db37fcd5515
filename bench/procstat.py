"""Read a process tree's CPU time, memory and thread count from /proc (Linux only)."""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode()
    # comm may contain spaces or ')': split after the last ')'; fields[0] is the state (field 3)
    return data[data.rindex(")") + 2 :].split()


def cpu_s(pid: int) -> float:
    """utime+stime of the whole process (all its threads) in seconds; 0.0 if it is gone."""
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


# /proc/stat's per-CPU columns after the name, in clock ticks (proc(5))
CPU_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times(cpus: set[int] | None) -> dict[str, float]:
    """Seconds the given CPUs (None: all) spent in each of /proc/stat's columns since boot. A window's
    difference tells what the host did with the server's core besides running it: ``steal`` is time
    the hypervisor ran someone else, ``softirq`` network work that no process is charged for."""
    out = dict.fromkeys(CPU_COLUMNS, 0.0)
    with open("/proc/stat") as f:
        for line in f:
            name, *cols = line.split()
            if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
                continue
            for key, v in zip(CPU_COLUMNS, cols, strict=False):
                out[key] += int(v) / CLK_TCK
    return out


def sched_s(pid: int) -> float:
    """On-CPU time from schedstat summed over threads: ns precision, for tiny loads like an idle client."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def children(pid: int) -> list[int]:
    """All descendants of pid (a server's worker processes), found by walking ppid links."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            parent[int(name)] = int(_stat_fields(int(name))[1])
        except (OSError, ValueError, IndexError):
            pass
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def tree(pid: int) -> list[int]:
    return [pid, *children(pid)]


def status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in bytes and Threads, from /proc/PID/status; empty dict if the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(val.split()[0]) * 1024
                elif key == "Threads":
                    out[key] = int(val)
    except OSError:
        pass
    return out


def tree_cpu_s(pids: list[int]) -> float:
    return sum(cpu_s(p) for p in pids)


def tree_user_sys_s(pids: list[int]) -> tuple[float, float]:
    """utime and stime (seconds, 10 ms ticks) summed over a process tree: where a server's CPU goes,
    its own code (user) or the kernel's work for its system calls (system)."""
    user = system = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        user += int(f[11])
        system += int(f[12])
    return user / CLK_TCK, system / CLK_TCK


def tree_sched_s(pids: list[int]) -> float:
    return sum(sched_s(p) for p in pids)


def tree_wakeups(pids: list[int]) -> int:
    """Voluntary context switches over a process tree's threads: how often they slept and were woken
    (the load generator's, in an open run: each wake-up by a pong is charged to the server's send)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return total


def tree_status(pids: list[int]) -> dict[str, int]:
    """Sum of VmRSS/VmHWM/Threads over a process tree (workers count as one server)."""
    tot: dict[str, int] = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    for p in pids:
        for k, v in status(p).items():
            tot[k] += v
    return tot


def pss(pid: int) -> int:
    """Proportional set size in bytes (/proc/PID/smaps_rollup): a forked worker's pages shared with the
    supervisor count once over the processes that share them, not once in each VmRSS; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
