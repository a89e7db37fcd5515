"""Run ``python3 -m hbd ...`` with a memory probe in every process (the supervisor and the forked workers).

Usage: ``python3 -m bench.memprobe DIR server -c CONFIG``; then ``kill -SIGRTMIN+3 PID`` (or
``probe(pids, tag)`` below) makes each process write DIR/PID-TAG.json: VmRSS and /proc/PID/smaps_rollup,
glibc's mallinfo2 (what malloc holds and what of it is free), pymalloc's arenas and blocks
(sys._debugmallocstats), the container objects the collector tracks by type (count and sys.getsizeof
total; untracked objects such as str, float and int are not seen), and who holds the newest small
lists; and the RSS again after
``malloc_trim(0)`` when DIR/trim exists (an experiment: memory freed but held by malloc).
A measuring tool: a probe of 100,000 connections takes about a second and stalls that process's loop.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import runpy
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

SIGNAL = signal.SIGRTMIN + 3
TYPES_NOTE: list[str] = []
TAG_FILE = "tag"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    return ctypes.CDLL("libc.so.6")


def mallinfo() -> dict[str, int]:
    libc = _libc()
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return {name: getattr(m, name) for name, _ in _Mallinfo2._fields_}


def rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[-1] == "kB":
            out[key] = int(words[0]) * 1024
    return out


def vmrss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pymalloc() -> dict[str, int]:
    """sys._debugmallocstats()'s totals (it writes to the C stderr: taken through a temporary file)."""
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"#?\s*([a-z][a-z ()\-]+?)\s*(?:=|\.\.\.)\s*([\d,]+)\s*$", line.strip())
        if m:
            key = m.group(1).strip().replace(" ", "_")
            if key not in out:
                out[key] = int(m.group(2).replace(",", ""))
    return out


def types() -> list[tuple[str, int, int]]:
    """(type, count, bytes by sys.getsizeof) of the tracked objects, biggest first."""
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()  # hbd.heap freezes what lives long: out of get_objects()' sight
    objects = gc.get_objects()
    if frozen:
        gc.freeze()
    for o in objects:
        name = type(o).__qualname__
        count[name] += 1
        try:
            size[name] += sys.getsizeof(o)
        except TypeError:
            pass
    lists = [o for o in objects if type(o) is list and len(o) <= 2]
    holders: Counter[str] = Counter()
    for o in lists[-2000::20]:  # the newest small lists: who holds them
        for r in gc.get_referrers(o):
            if r is not objects and r is not lists:
                holders[f"{type(r).__qualname__}:{repr(o)[:30]}"] += 1
    TYPES_NOTE.append(str(holders.most_common(8)))
    del objects, lists
    return [(name, count[name], size[name]) for name, _ in size.most_common(60)]


def dump(out: Path) -> None:
    pid = os.getpid()
    tag = (out / TAG_FILE).read_text().strip() if (out / TAG_FILE).exists() else str(int(time.time()))
    gc.collect(1)
    rec: dict[str, Any] = {"pid": pid, "tag": tag, "vmrss": vmrss(pid), "rollup": rollup(pid)}
    rec["mallinfo"] = mallinfo()
    rec["pymalloc"] = pymalloc()
    rec["types"] = types()
    rec["list_holders"] = TYPES_NOTE.pop() if TYPES_NOTE else ""
    if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=N (memrig --trace): the allocations by line
        tracemalloc.take_snapshot().dump(str(out / f"{pid}-{tag}.snap"))
    if (out / "trim").exists():
        start = time.perf_counter()
        _libc().malloc_trim(0)
        rec["trim_ms"] = (time.perf_counter() - start) * 1000
        rec["vmrss_after_trim"] = vmrss(pid)
        rec["mallinfo_after_trim"] = mallinfo()
    (out / f"{pid}-{tag}.json").write_text(json.dumps(rec) + "\n")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(SIGNAL, lambda signum, frame: dump(out))
    sys.argv = ["hbd", *sys.argv[2:]]
    runpy.run_module("hbd", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
