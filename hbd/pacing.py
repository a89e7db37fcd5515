"""A duty cycle for big replies: they yield the CPU, not only the loop.

A full status or a scrape at 100,000 peers is seconds of Python. Cut into slices it never holds
the loop, but on a machine of two cores shared with the workers (and whoever sends the pings) a
process that works flat out still takes a core the pongs need. So a reply, once it has worked
``BURST`` seconds of CPU (small replies never do, a filtered status included: CPU time, not wall
time, so that a scan preempted on a loaded machine does not count as big), is paced: after a
slice that took ``t`` it rests ``t * (n / FRACTION - 1)`` before the next, ``n`` being the big
replies this process paces at once, so that together they use at most ``FRACTION`` of the
wall-clock time. The time is the loop's clock (monotonic, virtual in tests) read around each
slice; the rest is a loop timer, never a sleep.

A bulk reply (every peer's row or value: a full listing, a scrape, a worker's rows or last pings
for its supervisor) is paced from its first slice, at ``BULK_FRACTION``: its size is known when it
starts, and the CPU of its first ``BURST`` (a tenth of a second, a core each time a worker starts its
part of a listing) was where the pongs' p99 went (issue 14: a listing or a scrape at 100,000 peers
kept the RTT p99 within 2x the quiet figure in 2 runs of 5 with the burst).

Pure bookkeeping (times in, a wait out): ``hbd.control.RequestServer`` reads the clock, asks
``wait`` before a slice and reports it with ``spent`` after.
"""

from __future__ import annotations

import weakref

# Half a core at most: a scrape of 100,000 peers (about 1.5 CPU-seconds in the supervisor) then
# takes about 3 s, well inside Prometheus' default 10 s scrape timeout, while the other half of
# that core stays with the workers' pongs. A smaller fraction would stretch it towards the timeout.
FRACTION = 0.5
BURST = 0.1  # CPU seconds a reply works unpaced (a worker's scan for a filtered status: tens of ms)
# The supervisor's (``workers: K``): it answers no pings, so its replies' latency matters little, but
# on two cores its 0.1 s unpaced burst of a scrape took a whole core while the workers' pongs waited
# (the slow round trips of a scrape at 100,000 peers fell in its first 0.1-0.6 s, none once it was
# paced). Its small replies (a select's merge, silences, a reload's answer) stay under this.
SUPERVISOR_BURST = 0.01
# A bulk reply's share: a quarter of a core, so that the producing process never holds a core the
# pongs need for more than one short slice (about a millisecond) in four. A full listing of 100,000
# peers then takes about 12 s on the shared two cores (longer when they are contended: the rest is
# counted in wall-clock time), a scrape about 4 s (docs/performance.md, issue 14's fourth round).
BULK_FRACTION = 0.25
MIN_PAUSE = 0.002  # shorter rests are owed, not taken: one loop turn each would cost more than that
MAX_DEBT = 0.5  # a slice that was preempted for long owes no more than this (replies stalled for 1 s are evicted)


class Duty:
    """One reply's account: the work it did, and the rest it owes as of ``at``."""

    __slots__ = ("at", "big", "bulk", "cpu", "debt", "work")

    def __init__(self, bulk: bool = False) -> None:
        self.bulk = bulk  # paced from its first slice, at BULK_FRACTION
        self.work = 0.0
        self.cpu = 0.0  # CPU seconds of its slices
        self.debt = 0.0
        self.at = 0.0
        self.big = False  # paced (it has worked BURST CPU seconds)


class Pacer:
    """The big replies of one process (every request server on its loop shares one)."""

    def __init__(self, fraction: float = FRACTION, burst: float = BURST, bulk_fraction: float = BULK_FRACTION) -> None:
        if not 0 < fraction <= 1 or not 0 < bulk_fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        self.fraction = fraction
        self.bulk_fraction = bulk_fraction
        self.burst = burst
        self.big = 0  # replies being paced now

    def wait(self, duty: Duty, now: float) -> float:
        """How long ``duty``'s reply must rest before its next slice (0: go now)."""
        if not duty.big:
            return 0.0
        owed = duty.debt - (now - duty.at)
        return owed if owed >= MIN_PAUSE else 0.0

    def spent(self, duty: Duty, start: float, end: float, cpu: float) -> None:
        """``duty``'s reply worked from ``start`` to ``end`` (the loop's clock), ``cpu`` of it on the CPU."""
        t = max(end - start, 0.0)
        duty.work += t
        duty.cpu += cpu
        if not duty.big:
            if duty.bulk:  # paced from this first slice on
                duty.big = True
                self.big += 1
                duty.debt, duty.at = 0.0, start
            else:
                if duty.cpu < self.burst:
                    return
                duty.big = True  # the burst owes nothing: the slices after it rest
                self.big += 1
                duty.debt, duty.at = 0.0, end
                return
        rested = max(start - duty.at, 0.0)
        owed = t * (self.big / (self.bulk_fraction if duty.bulk else self.fraction) - 1)
        duty.debt = min(max(duty.debt - rested, 0.0) + owed, MAX_DEBT)
        duty.at = end

    def done(self, duty: Duty) -> None:
        """``duty``'s reply has ended (or was dropped)."""
        if duty.big:
            duty.big = False
            self.big -= 1


_PACERS: weakref.WeakKeyDictionary[object, Pacer] = weakref.WeakKeyDictionary()


def pacer_for(loop: object) -> Pacer:
    """The pacer of the process that runs ``loop`` (the status socket and the metrics share it)."""
    pacer = _PACERS.get(loop)
    if pacer is None:
        pacer = _PACERS[loop] = Pacer()
    return pacer
