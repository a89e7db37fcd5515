"""The client link's lifecycle, sans I/O: where the connection is, how healthy the server is, and
when to try again. ``client.Link`` owns the socket, the timer and the log lines; it tells this
machine what happened (with ``now``) and does what it answers (report a health change, arm a
retry, give up). No sockets, no clock, no logging here, so every order of events is a unit test.

    WAITING --attempt--> CONNECTING --connected--> UP
       ^                     |                      | (pong, late)
       +------ down ---------+---------- down ------+      down: a retry, or GAVE_UP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from hbd.backoff import Backoff


class LinkState(StrEnum):
    """Where a link's connection is (a StrEnum: status shows the value as it is)."""

    WAITING = "waiting"  # for the first connect or the next retry
    CONNECTING = "connecting"  # resolving, connecting, TLS handshake
    UP = "up"  # connected: pinging
    GAVE_UP = "gave up"  # reconnect_attempts used up, or closed (shutdown, removed by a reload)


class Health(StrEnum):
    """The server's health as reported to status, metrics and on_change hooks (the event names)."""

    UP = "up"
    LATE = "late"
    DOWN = "down"


class LinkError(RuntimeError):
    """An event that cannot happen in the link's state (a bug in the driver, never the peer's doing)."""


@dataclass(frozen=True, slots=True)
class HealthChange:
    old: Health | None
    new: Health
    reason: str
    standing: float = field(default=0.0, compare=False)  # how long ``old`` had stood


@dataclass(frozen=True, slots=True)
class Retry:
    """Connect again at ``at`` (``delay`` from the loss); ``attempt`` of ``limit`` (0: no limit)."""

    at: float
    delay: float
    attempt: int
    limit: int


@dataclass(frozen=True, slots=True)
class GaveUp:
    attempts: int


class Lifecycle:
    """One link's lifecycle. A link counts as healthy once it has answered pings for ``2 x pong_timeout``
    after a connect: only then does its next loss start a fresh series of quick retries."""

    __slots__ = (
        "_healthy",
        "attempts_limit",
        "backoff",
        "down_reason",
        "health",
        "health_since",
        "pong_timeout",
        "retry_at",
        "state",
        "up_since",
    )

    def __init__(
        self,
        now: float,
        *,
        reconnect_delay: float,
        reconnect_max_delay: float,
        reconnect_attempts: int,
        pong_timeout: float,
        rand: Callable[[], float] | None = None,
    ) -> None:
        self.backoff = (
            Backoff(reconnect_delay, reconnect_max_delay)
            if rand is None
            else Backoff(reconnect_delay, reconnect_max_delay, rand)
        )
        self.attempts_limit = reconnect_attempts
        self.pong_timeout = pong_timeout
        self.state = LinkState.WAITING
        self.health: Health | None = None  # None until the first attempt ends one way or the other
        self.health_since = now
        self.down_reason: str | None = None  # why the last attempt failed or the link was lost
        self.retry_at: float | None = None
        self.up_since: float | None = None
        self._healthy = False

    @property
    def retries(self) -> int:
        """Reconnect attempts since the link was last healthy."""
        return self.backoff.attempts

    def retime(
        self, *, reconnect_delay: float, reconnect_max_delay: float, reconnect_attempts: int, pong_timeout: float
    ) -> None:
        """A reload: new timings; the series of retries under way carries on."""
        self.backoff.base, self.backoff.cap = reconnect_delay, reconnect_max_delay
        self.attempts_limit = reconnect_attempts
        self.pong_timeout = pong_timeout

    # -- events ---------------------------------------------------------------------------------------
    def attempt(self, now: float) -> None:
        """A connect starts. Only from WAITING: never two attempts in flight, none after giving up."""
        if self.state is not LinkState.WAITING:
            raise LinkError(f"connect while {self.state}")
        self.state = LinkState.CONNECTING
        self.retry_at = None

    def connected(self, now: float) -> None:
        if self.state is not LinkState.CONNECTING:
            raise LinkError(f"connected while {self.state}")
        self.state = LinkState.UP
        self.up_since = now
        self.down_reason = None
        self._healthy = False

    def pong(self, now: float, answering: bool) -> HealthChange | None:
        """Pongs arrived; ``answering``: no ping is overdue any more (the protocol is not LATE)."""
        if self.state is not LinkState.UP or self.up_since is None:
            raise LinkError(f"pong while {self.state}")
        if not self._healthy and now - self.up_since >= 2 * self.pong_timeout:
            self._healthy = True
            self.backoff.reset()
        if answering:
            return self._report(now, Health.UP, "pong")
        return None

    def late(self, now: float) -> HealthChange | None:
        if self.state is not LinkState.UP:
            raise LinkError(f"late while {self.state}")
        return self._report(now, Health.LATE, "no pong")

    def down(self, now: float, reason: str) -> tuple[HealthChange | None, Retry | GaveUp]:
        """The attempt failed or the link was lost: report DOWN and retry (or give up). The series of
        retries restarts only after a healthy period (see pong()), so a server that breaks the protocol
        or resets every connection early meets a growing backoff."""
        if self.state not in (LinkState.CONNECTING, LinkState.UP):
            raise LinkError(f"down while {self.state}")
        self.up_since = None
        self.down_reason = reason
        change = self._report(now, Health.DOWN, reason)
        self._healthy = False
        return change, self._next(now)

    def restart(self, now: float) -> Retry:
        """The driver could not even report a loss (a bug): start over with a plain retry."""
        self._healthy = False
        self.up_since = None
        return self._retry(now)

    def redial(self, now: float) -> float:
        """The driver dropped a sound connection on purpose (a reload renamed the client): connect
        again at once; not a failure, so the health stays as reported and no retry is counted."""
        if self.state is not LinkState.UP:
            raise LinkError(f"redial while {self.state}")
        self.state = LinkState.WAITING
        self.up_since = None
        self._healthy = False
        self.retry_at = now
        return now

    def close(self) -> None:
        self.state = LinkState.GAVE_UP
        self.retry_at = None
        self.up_since = None

    # -- answers --------------------------------------------------------------------------------------
    def _next(self, now: float) -> Retry | GaveUp:
        limit = self.attempts_limit
        if limit and self.backoff.attempts >= limit:
            self.state = LinkState.GAVE_UP
            self.retry_at = None
            return GaveUp(limit)
        return self._retry(now)

    def _retry(self, now: float) -> Retry:
        delay = self.backoff.next_delay()
        self.state = LinkState.WAITING
        self.retry_at = now + delay
        return Retry(self.retry_at, delay, self.backoff.attempts, self.attempts_limit)

    def _report(self, now: float, health: Health, reason: str) -> HealthChange | None:
        if health is self.health:
            return None
        old, self.health = self.health, health
        standing, self.health_since = now - self.health_since, now
        return HealthChange(old, health, reason, standing)

    def status(self, label: str, now: float, rtt: float | None) -> str:
        """The link in the STATUS= line: up with its RTT, or DOWN with why and what happens next."""
        if self.state is LinkState.UP:
            return f"{label} up, rtt {rtt * 1000:.1f} ms" if rtt is not None else f"{label} up"
        if self.down_reason is None:
            return f"{label} {self.state}"  # the first attempt, still under way
        if self.state is LinkState.WAITING and self.retry_at is not None:
            nxt = f"retry in {max(self.retry_at - now, 0.0):.1f} s"
        else:
            nxt = str(self.state)  # connecting, gave up
        return f"{label} DOWN ({_short(self.down_reason)}), {nxt}"


def _short(reason: str) -> str:
    """ "cannot connect: Connection refused" -> "connection refused", for the one-line status."""
    reason = reason.removeprefix("cannot connect: ")
    if len(reason) > 1 and reason[0].isupper() and reason[1].islower():
        reason = reason[0].lower() + reason[1:]
    return reason
