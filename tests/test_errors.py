"""The error family: every expected error is an HbdError, reported as its lines, never a traceback."""

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import run_reload

from hbd import config, control, daemon, errors, logs, protocol, state_store
from hbd.daemon import Daemon
from hbd.errors import BindError, ConfigError, HbdError, LogSetupError, ProtocolError, StartError, StoreError


@pytest.mark.parametrize("cls", [ConfigError, LogSetupError, StartError, BindError, ProtocolError, StoreError])
def test_every_expected_error_is_an_hbd_error(cls: type) -> None:
    assert issubclass(cls, HbdError)


def test_the_classes_are_still_importable_from_where_they_are_raised() -> None:
    assert config.ConfigError is errors.ConfigError
    assert control.BindError is errors.BindError
    assert logs.LogSetupError is errors.LogSetupError
    assert daemon.StartError is errors.StartError
    assert protocol.ProtocolError is errors.ProtocolError
    assert state_store.StoreError is errors.StoreError


def test_errors_are_lines() -> None:
    assert ConfigError(["a: bad", "b: worse"]).errors == ["a: bad", "b: worse"]
    assert str(ConfigError(["a: bad", "b: worse"])) == "a: bad\nb: worse"
    assert BindError("port 80 is taken").errors == ["port 80 is taken"]
    assert StartError().errors == ["StartError"]


class _Failing(Daemon):
    identifier = "hbd-test"

    def __init__(self, exc: Exception) -> None:
        cfg = SimpleNamespace(path="/nonexistent/test.yaml", log_file=None, log_level="info")
        super().__init__(cfg)
        self.exc = exc

    def loader(self) -> Any:
        from hbd.reloading import Given

        def load() -> Any:
            raise self.exc  # as a loader's outcome: reported from the loop all the same

        return Given(load)


class _NewKind(HbdError):
    """A subclass daemon.py has never heard of: caught as an HbdError all the same."""


@pytest.mark.parametrize(
    ("exc", "lines"),
    [
        (
            ConfigError(["line 3: port: must be an integer", "line 4: nope: unknown key"]),
            ["line 3: port: must be an integer", "line 4: nope: unknown key"],
        ),
        (
            BindError("cannot listen on 127.0.0.1:1: permission denied"),
            ["cannot listen on 127.0.0.1:1: permission denied"],
        ),
        (_NewKind("something an operator can fix"), ["something an operator can fix"]),
    ],
)
def test_a_failed_reload_reports_an_hbd_error_without_a_traceback(exc: Exception, lines: list[str]) -> None:
    records = _reload_failing(exc)
    assert [r.getMessage() for r in records if r.getMessage().startswith("reload failed: ")][: len(lines)] == [
        f"reload failed: {line}" for line in lines
    ]
    assert not [r for r in records if r.exc_info]


def test_any_other_exception_in_a_reload_is_a_bug_with_one_traceback() -> None:
    records = _reload_failing(ValueError("oops"))
    assert len([r for r in records if r.exc_info]) == 1


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _reload_failing(exc: Exception) -> list[logging.LogRecord]:
    d = _Failing(exc)
    handler = _Records()
    logs.log.addHandler(handler)
    try:
        d.reload()
        run_reload(d.loop, d.reloads)
    finally:
        logs.log.removeHandler(handler)
        d.loop.close()
    assert d.reloads_failed == 1
    assert d.last_reload_errors == (exc.errors if isinstance(exc, HbdError) else [str(exc)])
    return handler.records
