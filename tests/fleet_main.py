"""A fleet of hbd client links in one process, for herd tests: ``python3 tests/fleet_main.py CONFIG N [SECONDS]``
(tests start it through ``fleet.FleetProcess``).

It is hbd's own client code (``hbd.client.Client`` with N ``Link`` objects to the same server: the
same connect, ping, backoff and full-jitter reconnect policy as N hbd-client processes, without
N interpreters). Each link's transitions are printed as ``up|down INDEX MONOTONIC`` lines;
CLOCK_MONOTONIC is system-wide, so the test compares them with its own clock.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hbd.client import Client, Link, Target
from hbd.config import ClientConfig, load_client_config
from hbd.protocol import ClientLink


class Fleet(Client):
    def __init__(self, config: ClientConfig, n: int, **kw: object) -> None:
        super().__init__(config, **kw)
        self.n = n

    def targets(self, cfg: ClientConfig) -> list[Target]:  # type: ignore[override]
        return [Target(cfg.host, cfg.port, name=str(i)) for i in range(self.n)]

    def start(self) -> None:
        """Like Client.start, but the links' first connects are spread over one ping interval, as
        independent hosts would be, so their pings do not all land in the same instant."""
        self.tls_context = self._context(self.config)
        self.loop.stall_callbacks.append(self.on_stall)
        self.links = [Link(self, t) for t in self.targets(self.config)]
        step = self.config.heartbeat_interval / max(len(self.links), 1)
        for i, link in enumerate(self.links):
            self.loop.call_later(i * step, link.connect)
        self.start_status_updates()

    def log_link(self, link: Link, level: int, message: str, *, event: str) -> None:
        if event == "late":
            _emit("late", link)
        super().log_link(link, level, message, event=event)


def _emit(what: str, link: Link) -> None:
    sys.stdout.write(f"{what} {link.target.name} {time.monotonic():.6f}\n")
    sys.stdout.flush()


def main() -> int:
    path, n = sys.argv[1], int(sys.argv[2])
    duration = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    up, lost = Link._up, Link.lost

    def _up(self: Link, *args: object) -> None:
        up(self, *args)  # type: ignore[arg-type]
        _emit("up", self)

    def _lost(self: Link, reason: str, *args: object, **kw: object) -> None:
        _emit("down", self)
        lost(self, reason, *args, **kw)  # type: ignore[arg-type]

    Link._up = _up  # type: ignore[method-assign]
    Link.lost = _lost  # type: ignore[method-assign]
    rtts: list[tuple[float, float]] = []  # (when, rtt): every pong any link got
    feed = ClientLink.feed

    def _feed(self: ClientLink, data: bytes, now: float) -> list[float]:
        got = feed(self, data, now)
        rtts.extend((now, r) for r in got)
        return got

    ClientLink.feed = _feed  # type: ignore[method-assign]
    fleet = Fleet(load_client_config(path), n)
    fleet.loop.call_later(duration, fleet.stop)  # bounded: the fleet always ends by itself
    rc = fleet.run()
    sys.stdout.write("stats " + json.dumps({"rtts": rtts}) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
