"""Virtual time for loop tests (like asyncio's TestLoop): select() never blocks; it advances the
clock by the time the loop asked to wait, so timers fire in order without any sleeping.

Tests take the fixtures (registered in conftest.py): ``vclock`` (a FakeClock at 1000.0),
``vselector`` (a VirtualSelector on it) and ``vloop`` (an EventLoop on both, closed after the test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hbd.loop import EventLoop
from hbd.selector import EpollSelector


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class VirtualSelector(EpollSelector):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []
        self.last_ready: list[tuple[int, int]] = []  # what the latest poll() found

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        ready = self.last_ready = super().poll(0)
        if not ready and timeout:
            self.waits.append(timeout)
            self.clock.advance(timeout)
        return ready


def run_until(loop: EventLoop, clock: FakeClock, when: float) -> None:
    """Turn the loop until virtual time reaches ``when`` (a turn with nothing due jumps to its deadline)."""
    while clock() < when:
        loop.run_once(max(when - clock(), 0.0))


@pytest.fixture
def vclock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def vselector(vclock: FakeClock) -> VirtualSelector:
    return VirtualSelector(vclock)


@pytest.fixture
def vloop(vclock: FakeClock, vselector: VirtualSelector) -> Iterator[EventLoop]:
    loop = EventLoop(clock=vclock, selector=vselector)
    yield loop
    loop.close()
