"""Maintenance silences: what the status socket's ``silence``, ``unsilence`` and ``silences`` requests
need from a daemon (``Silencing``, which the server's registry provides), the record a reply
carries (``Silence``), and the checks both ends apply to a request's fields.

A silenced peer is still tracked and shown; its state changes are logged at info and its hooks do
not run until the silence expires (the registry's rules, not this module's).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Protocol

from hbd.durations import DAY, describe, seconds_value
from hbd.protocol import NAME_PATTERN
from hbd.quote import quote

MAX_REASON = 200  # characters of a silence's reason
MAX_SILENCE = 365 * DAY  # longest silence, seconds
NO_SILENCES = "this daemon keeps no silences"  # the answer of a daemon without a registry (the client)

_NAME = re.compile(NAME_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class Silence:
    """One silence in force. Times are wall clock (epoch seconds): a silence outlives restarts."""

    peer: str
    until: float
    reason: str
    created: float

    def to_json(self) -> dict[str, str | float]:
        return {
            "peer": self.peer,
            "until": round(self.until, 3),
            "reason": self.reason,
            "created": round(self.created, 3),
        }

    @classmethod
    def from_json(cls, doc: object) -> Silence:
        """A reply's silence; ValueError if it is not one."""
        if not isinstance(doc, dict):
            raise ValueError(f"not a silence: {quote(doc)}")
        peer, until, reason, created = (doc.get(k) for k in ("peer", "until", "reason", "created"))
        if not isinstance(peer, str) or not isinstance(reason, str):
            raise ValueError(f"not a silence: {quote(doc)}")
        if not all(_finite(t) for t in (until, created)):
            raise ValueError(f"not a silence: {quote(doc)}")
        assert isinstance(until, int | float) and isinstance(created, int | float)
        return cls(peer, float(until), reason, float(created))


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Silencing(Protocol):
    """What a daemon that keeps silences offers its status socket (the server's registry)."""

    def silence(self, peer: str, seconds: float, reason: str) -> Silence | str:
        """Silence ``peer`` for ``seconds`` from now (replacing a silence it has): the silence, or
        why not (an unknown name the registry refuses, a full table...)."""
        ...

    def unsilence(self, peer: str) -> bool:
        """End ``peer``'s silence now; False if it had none."""
        ...

    def silences(self) -> list[Silence]:
        """The silences in force."""
        ...


# -- the fields of a request: checked by ``hbd silence`` before sending and by the daemon on receipt --
def check_peer(value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"PEER must be a peer's name (1-64 of the characters A-Z a-z 0-9 . _ : @ -), got {quote(value)}"
        )
    return value


def check_seconds(value: object) -> float:
    """A silence's length: seconds, or a duration such as 2h; positive, at most MAX_SILENCE."""
    try:
        return seconds_value(value, MAX_SILENCE)
    except ValueError as exc:
        raise ValueError(f"DURATION {exc}") from None


def check_reason(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"the reason must be text, got {quote(value)}")
    if len(value) > MAX_REASON:
        raise ValueError(f"the reason may have at most {MAX_REASON} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise ValueError(f"the reason may not hold control characters (such as a newline), got {quote(value)}")
    return value


def until_text(until: float, now: float) -> str:
    """``2026-11-26 21:04:00 (in 1h 59m)``: when a silence ends, in local time and from ``now``."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
    left = until - now
    return f"{stamp} (in {describe(left)})" if left > 0 else f"{stamp} (ended)"
