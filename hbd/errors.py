"""One family for the errors hbd expects: each says what is wrong in words an operator can act on.

Anything that is an ``HbdError`` is reported as its message (``errors``: one line per problem) and
never as a traceback; any other exception reaching a daemon's top level is a bug. The classes are
also importable from the modules that raise them (``hbd.config.ConfigError`` and so on).
This module imports nothing from hbd, so every floor can use it.
"""

from __future__ import annotations


class HbdError(Exception):
    """An expected failure; the message says why."""

    @property
    def errors(self) -> list[str]:
        """One line per problem (most errors have one)."""
        return [str(self) or type(self).__name__]


class ConfigError(HbdError):
    """A configuration file is invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self._errors = errors

    @property
    def errors(self) -> list[str]:
        return self._errors


class LogSetupError(HbdError):
    """The log file (or the journal) cannot be set up."""


class StartError(HbdError):
    """The daemon cannot start (or a reload cannot be applied); the message says why."""


class BindError(HbdError):
    """A listening socket cannot be set up; the message says why."""


class ProtocolError(HbdError):
    """The peer sent something that is not hbd protocol; the connection should be closed."""


class StoreError(HbdError):
    """The state store (``state_dir``) cannot be opened; the message says why."""
