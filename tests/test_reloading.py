"""A daemon's reload machinery on its own, in virtual time: what a reload keeps when it fails, and
how ``hbd reload`` requests share reloads and wait for their verdict."""

from __future__ import annotations

from collections.abc import Callable

from virtual_time import run_until

from hbd.errors import ConfigError
from hbd.reloading import Done, Reloader


class Host:
    """The daemon's side: each attempt's outcome is scripted; a verdict may come later."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.attempts = 0
        self.fail_with: Exception | None = None
        self.verdict_after = 0.0
        self.stopping = False
        self.committed = 0
        self.reloader = Reloader(loop, self.attempt, self.verdict, lambda: self.stopping)

    def prepare(self) -> Callable[[], None]:
        if self.fail_with is not None:
            raise self.fail_with

        def commit() -> None:
            self.committed += 1

        return commit

    def attempt(self) -> bool:
        self.attempts += 1
        return self.reloader.run("/etc/hbd/x.yaml", self.prepare)

    def verdict(self, errors: list[str], finished: Done) -> None:
        self.loop.call_later(self.verdict_after, lambda: finished(errors))


def test_a_failed_reload_changes_nothing_and_says_why(vloop, records) -> None:
    host = Host(vloop)
    assert host.reloader.run("/etc/hbd/x.yaml", host.prepare) is True
    host.fail_with = ConfigError(["x.yaml: line 3: port: must be 1-65535", "x.yaml: line 4: bogus: unknown key"])
    assert host.reloader.run("/etc/hbd/x.yaml", host.prepare) is False
    r = host.reloader
    assert (r.ok, r.failed, host.committed) == (1, 1, 1)
    assert r.last_error == "x.yaml: line 3: port: must be 1-65535" and len(r.last_errors) == 2
    assert not any(rec.exc_info for rec in records)  # an HbdError is words, not a traceback
    host.fail_with = RuntimeError("a bug")
    assert host.reloader.run("/etc/hbd/x.yaml", host.prepare) is False
    assert r.last_errors == ["a bug"] and sum(1 for rec in records if rec.exc_info) == 1
    host.fail_with = None
    assert host.reloader.run("/etc/hbd/x.yaml", host.prepare) is True
    assert r.last_error is None and r.last_errors == [] and (r.ok, r.failed) == (2, 2)


def test_requests_share_a_reload_and_one_asked_during_its_verdict_gets_its_own(vloop, vclock) -> None:
    host = Host(vloop)
    host.verdict_after = 2.0  # a supervisor waiting for its workers
    answers: list[tuple[str, float, list[str]]] = []
    for who in "abc":
        host.reloader.request(lambda errors, who=who: answers.append((who, vclock(), errors)))
    assert host.attempts == 0  # nothing runs inside the request: the loop does it
    run_until(vloop, vclock, 1001.0)
    assert host.attempts == 1 and answers == []
    host.reloader.request(lambda errors: answers.append(("d", vclock(), errors)))
    run_until(vloop, vclock, 1002.5)
    assert [(w, t) for w, t, _ in answers] == [("a", 1002.0), ("b", 1002.0), ("c", 1002.0)]
    assert host.attempts == 2  # d's own reload started once the first verdict was in
    run_until(vloop, vclock, 1010.0)
    assert answers[-1] == ("d", 1004.0, []) and host.attempts == 2


def test_a_stopping_daemon_answers_without_reloading(vloop, vclock) -> None:
    host = Host(vloop)
    host.stopping = True
    answers: list[list[str]] = []
    host.reloader.request(answers.append)
    run_until(vloop, vclock, 1001.0)
    assert answers == [["the daemon is stopping"]] and host.attempts == 0
