"""Virtual time for loop tests (like asyncio's TestLoop): select() never blocks; it advances the
clock by the time the loop asked to wait, so timers fire in order without any sleeping."""

import selectors


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def select(self, timeout: float | None = None):  # type: ignore[override]
        ready = super().select(0)
        if not ready and timeout:
            self.waits.append(timeout)
            self.clock.advance(timeout)
        return ready
