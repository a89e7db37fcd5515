"""Values quoted in error messages, cut short: a hostile or careless file must not turn one error
line into megabytes (a YAML alias bomb's value repr()s to hundreds of MB)."""

from __future__ import annotations

import reprlib

QUOTE_MAX = 40  # characters of a quoted value in an error message

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 3
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = QUOTE_MAX


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """repr() of ``value``, at most ``limit`` characters (bounded work whatever the value)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a number too long to print, a broken __repr__...
        text = f"<{type(value).__name__}>"
    return cut(text, limit)


def cut(text: str, limit: int = QUOTE_MAX) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 1)] + "..."


def show(value: object) -> str:
    """A value as error messages name it: its type and a short repr."""
    return f"{type(value).__name__} {quote(value)}" if value is not None else "nothing (null)"
