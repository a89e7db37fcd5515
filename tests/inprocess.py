"""Daemons run in the test's own process on virtual time (shared by test_status.py and
test_verdicts.py): ``virtual(cls, config)`` starts one on a loop whose clock only moves when it
would otherwise wait, ``document()`` is its status document, ``run_until()`` advances it."""

import json

from helpers import status_document
from virtual_time import FakeClock, VirtualSelector

from hbd import status
from hbd.logs import Logging
from hbd.loop import EventLoop
from hbd.notify import Notifier


class RunningClock(FakeClock):
    """Virtual time that also moves a little (0.1 µs) at every reading, as a real clock does
    while code runs: a deadline re-armed for exactly "now" (silent exactly half the timeout is
    not yet late) then fires again a moment later instead of in the same instant forever."""

    def __call__(self) -> float:
        self.now += 1e-7
        return self.now


def virtual(cls, config):
    clock = RunningClock()
    loop = EventLoop(clock=clock, selector=VirtualSelector(clock))
    daemon = cls(config, loop=loop, notifier=Notifier({}), logs=Logging(cls.identifier, journald=False))
    events: list[tuple[float, str, str, str]] = []
    real_event = daemon.ops.event

    def record(event, peer, address, **kw):
        events.append((round(clock.now - 1000.0, 3), event, peer, kw.get("reason", "")))
        real_event(event, peer, address, **kw)

    daemon.ops.event = record
    daemon.ops.start()
    daemon.start()
    return daemon, clock, events


def document(daemon) -> dict:
    if daemon.ops.role == "server":
        return status_document(daemon.view(), daemon.loop)
    return json.loads(b"".join(status.client_document(daemon.view())))


def run_until(loop, clock, t: float) -> None:
    while clock.now - 1000.0 < t:
        loop.run_once(max_wait=t - (clock.now - 1000.0))
