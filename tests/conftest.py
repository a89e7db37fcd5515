import collections
import logging
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers importable as plain modules

from daemons import HbdProcess
from virtual_time import vclock, vloop, vselector  # noqa: F401  (fixtures: virtual time for every test module)

from hbd.logs import log

# The property tests run on a fixed seed, so a run's verdict does not depend on luck: CI's, `make test`'s
# (the README's second command) and the package build's own test run. TEST_RANDOM=1 (`make
# test-random`) lets hypothesis look for new cases: a developer's run, before a change lands (add each
# case found as a test of its own).
settings.register_profile("fixed", derandomize=True)
if not os.environ.get("TEST_RANDOM"):
    settings.load_profile("fixed")


@pytest.fixture
def records():
    """Every record hbd logs during the test, at any level."""
    lines: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record)

    handler = Keep(logging.DEBUG)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.DEBUG)
    yield lines
    log.removeHandler(handler)
    log.setLevel(old)


@pytest.fixture
def procs():
    """Processes started through this list are stopped (and reaped) after the test."""
    started: list[HbdProcess] = []
    yield started
    for p in started:  # all told first, then each awaited: a slow stopper costs its time once, not per process
        p.terminate()
    for p in started:
        p.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that run hbd daemons as real processes (the ``procs`` fixture) are marked ``process``: the
    package build runs the others (debian/rules). Under pytest-xdist (`make test` runs
    `-n N --dist loadgroup`) the real-systemd tests go to one worker, in file order (they share one
    container at a time, guest.lock, and boot it per module), and the slow load tests to another, one
    at a time, so that they never load the 2 cores together."""
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if "procs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.process)
        if not xdist:
            continue
        if item.get_closest_marker("xdist_group") is not None:
            continue  # the module chose (package builds: slow, but no timing to disturb)
        if item.get_closest_marker("systemd") is not None:
            item.add_marker(pytest.mark.xdist_group("systemd"))
        elif item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("slow"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In CI (CI set) a real-systemd test must run: its skip is a failure, whatever skipped it."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and item.get_closest_marker("systemd") is not None:
        report.outcome = "failed"
        report.longrepr = f"CI must run the real-systemd tests, but this one was skipped: {_reason(report)}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Every run ends with what was skipped and why (a skip must never pass unnoticed)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    for report in skipped:
        by_reason[_reason(report)].append(report.nodeid)
    terminalreporter.section(f"{len(skipped)} skipped, and why", sep="-", yellow=True, bold=True)
    for reason, nodeids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(nodeids) - 1} more" if len(nodeids) > 1 else ""
        terminalreporter.line(f"{reason}: {nodeids[0] or '(module)'}{more}")


def _reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)
