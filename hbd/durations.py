"""Durations as operators write them: ``90s``, ``30m``, ``2h``, ``1d`` (or ``1h30m``), or a plain number
of seconds. One parser for the configuration's seconds keys and ``hbd silence``.

It imports only hbd.quote, so both hbd.config and hbd.tls (which hbd.config imports) can use it.
"""

from __future__ import annotations

import math
import re

from hbd.quote import quote, show

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TEXT = 40  # characters: a longer "duration" is not one (and must not cost a regex its time)

_NUMBER = re.compile(r"\d+(?:\.\d+)?\Z")
_PARTS = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+\Z")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")

EXAMPLES = "90s, 30m, 2h or 1d"


def parse_duration(text: str) -> float:
    """``text`` in seconds; ValueError with the reason when it is not a duration. Zero is a
    duration; whether it is allowed is the caller's bound to check."""
    s = text.strip()
    if not s or len(s) > MAX_TEXT or not s.isascii():
        raise ValueError(f"not a duration (such as {EXAMPLES}, or a number of seconds): {_short(text)}")
    if _NUMBER.match(s):
        seconds = float(s)
    elif _PARTS.match(s):
        seconds = sum(float(n) * UNITS[unit] for n, unit in _PART.findall(s))
    else:
        raise ValueError(f"not a duration (such as {EXAMPLES}, or a number of seconds): {_short(text)}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {_short(text)}")
    return seconds


DAY = 86400.0


def seconds_value(value: object, hi: float = DAY) -> float:
    """Config converter: a positive number of seconds, at most ``hi``, given as a number or as a
    duration string; ValueError(reason) otherwise."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise ValueError(
                f"must be a number of seconds or a duration such as {EXAMPLES}, got {show(value)}"
            ) from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds or a duration such as {EXAMPLES}, got {show(value)}")
    else:
        seconds = value
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive number of seconds, got {quote(value)}")
    if seconds > hi:
        raise ValueError(f"must be at most {hi:.0f} seconds ({describe(hi)}), got {quote(value)}")
    return float(seconds)


def _short(text: str) -> str:
    return repr(text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "...")


def describe(seconds: float) -> str:
    """``7260`` -> ``2h 1m``: a duration in its two largest units, for messages and tables."""
    s = max(int(seconds), 0)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "m"), (s, "s")]
    first = next((i for i, (n, _) in enumerate(units) if n), 3)
    shown = [f"{n}{u}" for i, (n, u) in enumerate(units[first : first + 2]) if n or i == 0]
    return " ".join(shown)
