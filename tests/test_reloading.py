"""A daemon's reload machinery on its own, in virtual time: the load runs off the loop and its outcome
comes back to it, reloads are serialised (SIGHUPs coalesce, requests share one and get its verdict),
a load that hangs fails the reload after LOAD_TIMEOUT without wedging the next ones, and what a reload
keeps when it fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from helpers import run_reload
from virtual_time import run_until

from hbd.errors import ConfigError
from hbd.loop import EventLoop
from hbd.reloading import LOAD_TIMEOUT, MAX_UNFINISHED, Deliver, Done, Reloader

PATH = "/etc/hbd/x.yaml"


class Host:
    """The daemon's side. Loads are handed to ``offload`` and stay there until the test finishes
    them (``finish``), as a helper thread would at any moment: the new config is the load's number."""

    def __init__(self, loop, threads: bool = False) -> None:
        self.loop = loop
        self.loads: list[tuple[Callable[[], object], Deliver]] = []  # handed off, not finished yet
        self.jobs = 0
        self.load_fails: Exception | None = None
        self.prepare_fails: Exception | None = None
        self.verdict_after = 0.0
        self.stopping = False
        self.committed: list[object] = []
        self.ended: list[list[str]] = []
        self.threads: dict[str, int] = {}  # where each part ran
        self.gate: threading.Event | None = None  # set: loads wait for it (a hung file read)
        self.reloader: Reloader[int] = Reloader(loop, self) if threads else Reloader(loop, self, self.offload)

    def offload(self, load: Callable[[], object], deliver: Deliver) -> None:
        self.loads.append((load, deliver))

    def finish(self, index: int = 0) -> None:
        load, deliver = self.loads.pop(index)
        try:
            result = load()
        except Exception as exc:
            deliver(None, exc)
            return
        deliver(result, None)

    # -- hbd.reloading.ReloadHost --------------------------------------------------------------------
    def reload_job(self) -> tuple[str, Callable[[], int]]:
        self.jobs += 1
        number, fails, gate = self.jobs, self.load_fails, self.gate

        def load() -> int:
            self.threads["load"] = threading.get_ident()
            if gate is not None:
                gate.wait(10)
            if fails is not None:
                raise fails
            return number

        return PATH, load

    def prepare_reload(self, new: int) -> Callable[[], None]:
        self.threads["prepare"] = threading.get_ident()
        if self.prepare_fails is not None:
            raise self.prepare_fails
        return lambda: self.committed.append(new)

    def reload_began(self) -> None:
        pass

    def reload_ended(self, errors: list[str]) -> None:
        self.ended.append(errors)

    def reload_verdict(self, errors: list[str], finished: Done) -> None:
        self.loop.call_later(self.verdict_after, lambda: finished(errors))

    def reload_stopping(self) -> bool:
        return self.stopping


def turn(loop, clock, seconds: float = 0.1) -> None:
    run_until(loop, clock, clock() + seconds)


def test_the_load_runs_off_the_loop_which_goes_on_meanwhile(vloop, vclock) -> None:
    host = Host(vloop)
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(vclock())
        vloop.call_later(0.5, tick)

    tick()
    host.reloader.hup()
    assert host.jobs == 0  # nothing runs inside the signal handler: the loop does it
    turn(vloop, vclock, 5.0)
    assert host.jobs == 1 and len(host.loads) == 1 and host.committed == []  # still loading
    assert len(ticks) >= 10  # ... and the loop served its timers all along
    host.finish()
    turn(vloop, vclock)
    assert host.committed == [1] and host.ended == [[]] and host.reloader.ok == 1 and host.reloader.idle


def test_with_a_real_thread_only_the_load_leaves_the_loop_thread(vloop) -> None:
    host = Host(vloop, threads=True)
    host.reloader.hup()
    run_reload(vloop, host.reloader)
    assert host.committed == [1]
    assert host.threads["prepare"] == threading.get_ident() != host.threads["load"]


def test_a_failed_reload_changes_nothing_and_says_why(vloop, vclock, records) -> None:
    host = Host(vloop)
    r = host.reloader

    def reload() -> None:
        r.hup()
        turn(vloop, vclock)
        host.finish()
        turn(vloop, vclock)

    reload()
    host.load_fails = ConfigError(["x.yaml: line 3: port: must be 1-65535", "x.yaml: line 4: bogus: unknown key"])
    reload()  # invalid, found by the load (in its thread)
    assert (r.ok, r.failed, host.committed) == (1, 1, [1])
    assert r.last_error == "x.yaml: line 3: port: must be 1-65535" and len(r.last_errors) == 2
    assert host.ended[-1] == r.last_errors
    assert not any(rec.exc_info for rec in records)  # an HbdError is words, not a traceback
    messages = [rec.getMessage() for rec in records]
    assert f"reload failed: still running with the previous configuration of {PATH}" in messages
    host.load_fails = RuntimeError("a bug")
    reload()
    assert r.last_errors == ["a bug"] and sum(1 for rec in records if rec.exc_info) == 1
    host.load_fails, host.prepare_fails = None, ConfigError(["cannot listen on 127.0.0.1:1"])
    reload()  # what is prepared on the loop can fail too
    assert r.last_errors == ["cannot listen on 127.0.0.1:1"] and host.committed == [1]
    host.prepare_fails = None
    reload()
    assert r.last_error is None and r.last_errors == [] and (r.ok, r.failed) == (2, 3) and host.committed == [1, 5]


def test_sighups_while_one_loads_coalesce_into_one_more_reload_after_it(vloop, vclock) -> None:
    host = Host(vloop)
    host.reloader.hup()
    turn(vloop, vclock)
    for _ in range(5):
        host.reloader.hup()
        turn(vloop, vclock)
    assert host.jobs == 1 and len(host.loads) == 1  # never two at once
    host.finish()
    turn(vloop, vclock)
    assert host.committed == [1] and host.jobs == 2 and len(host.loads) == 1  # one more, for all five
    host.finish()
    turn(vloop, vclock, 10.0)
    assert host.committed == [1, 2] and host.jobs == 2 and host.reloader.idle


def test_requests_get_the_verdict_of_the_reload_they_were_asked_before(vloop, vclock) -> None:
    host = Host(vloop)
    answers: list[tuple[str, list[str]]] = []
    host.reloader.request(lambda errors: answers.append(("a", errors)))
    host.reloader.request(lambda errors: answers.append(("b", errors)))
    turn(vloop, vclock)
    host.reloader.request(lambda errors: answers.append(("c", errors)))  # asked while a and b's loads
    host.load_fails = ConfigError(["x.yaml: line 1: port: must be 1-65535"])
    turn(vloop, vclock)
    host.finish()  # a and b's load was taken before the file broke: it succeeds
    turn(vloop, vclock)
    assert answers == [("a", []), ("b", [])] and host.jobs == 2
    host.finish()
    turn(vloop, vclock)
    assert answers[2] == ("c", ["x.yaml: line 1: port: must be 1-65535"]) and host.committed == [1]


def test_requests_share_a_reload_and_one_asked_during_its_verdict_gets_its_own(vloop, vclock) -> None:
    host = Host(vloop)
    host.verdict_after = 2.0  # a supervisor waiting for its workers
    answers: list[tuple[str, float, list[str]]] = []
    for who in "abc":
        host.reloader.request(lambda errors, who=who: answers.append((who, vclock(), errors)))
    assert host.jobs == 0  # nothing runs inside the request: the loop does it
    run_until(vloop, vclock, 1000.5)
    host.finish()
    run_until(vloop, vclock, 1001.0)
    assert host.jobs == 1 and answers == []
    host.reloader.request(lambda errors: answers.append(("d", vclock(), errors)))
    run_until(vloop, vclock, 1002.9)
    assert [w for w, _, _ in answers] == ["a", "b", "c"] and answers[0][1] < 1002.6
    assert host.jobs == 2  # d's own reload started once the first verdict was in
    host.finish()
    run_until(vloop, vclock, 1010.0)
    assert answers[-1][0] == "d" and answers[-1][2] == [] and host.jobs == 2


def test_a_load_that_hangs_fails_the_reload_and_later_ones_still_work(vloop, vclock, records) -> None:
    host = Host(vloop)
    r = host.reloader
    answers: list[list[str]] = []
    r.request(answers.append)
    turn(vloop, vclock, LOAD_TIMEOUT - 1)
    assert answers == [] and not r.idle  # a slow load is waited for...
    turn(vloop, vclock, 1.5)
    (errors,) = answers  # ... up to LOAD_TIMEOUT
    assert errors == [
        f"{PATH}: loading took more than {LOAD_TIMEOUT:g} s (a file on a hung filesystem?); gave up on it"
    ]
    assert r.failed == 1 and r.last_errors == errors and r.idle and r.unfinished == 1
    r.hup()  # the next reload runs as usual
    turn(vloop, vclock)
    host.finish(1)
    turn(vloop, vclock)
    assert host.committed == [2] and r.ok == 1
    host.finish(0)  # the hung one comes back after all: dropped
    turn(vloop, vclock)
    assert host.committed == [2] and r.unfinished == 0
    assert any("given up on has finished after all" in rec.getMessage() for rec in records)


def test_hung_loads_do_not_pile_up(vloop, vclock) -> None:
    host = Host(vloop)
    r = host.reloader
    for _ in range(MAX_UNFINISHED):
        r.hup()
        turn(vloop, vclock, LOAD_TIMEOUT + 1)
    assert len(host.loads) == MAX_UNFINISHED and r.failed == MAX_UNFINISHED
    answers: list[list[str]] = []
    r.request(answers.append)
    turn(vloop, vclock)
    assert len(host.loads) == MAX_UNFINISHED  # no new thread while that many are stuck
    assert answers == [
        [f"{PATH}: 3 earlier loads have not finished (a file on a hung filesystem?); not starting another"]
    ]
    host.finish()  # one comes back: reloads start again
    turn(vloop, vclock)
    r.hup()
    turn(vloop, vclock)
    assert len(host.loads) == MAX_UNFINISHED
    host.finish(MAX_UNFINISHED - 1)
    turn(vloop, vclock)
    assert r.ok == 1 and r.idle


def test_a_stopping_daemon_answers_without_reloading(vloop, vclock) -> None:
    host = Host(vloop)
    host.stopping = True
    answers: list[list[str]] = []
    host.reloader.request(answers.append)
    run_until(vloop, vclock, 1001.0)
    assert answers == [["the daemon is stopping"]] and host.jobs == 0


def test_a_real_thread_stuck_in_a_load_is_given_up_on_and_its_late_result_dropped() -> None:
    loop = EventLoop()
    try:
        host = Host(loop, threads=True)
        host.reloader.timeout = 0.3
        host.gate = threading.Event()
        answers: list[list[str]] = []
        host.reloader.request(answers.append)
        run_reload(loop, host.reloader)
        assert "loading took more than 0.3 s" in answers[0][0] and host.reloader.unfinished == 1
        host.gate.set()  # the stuck one comes back, then a new reload works
        host.gate = None
        host.reloader.hup()
        run_reload(loop, host.reloader)
        deadline = time.monotonic() + 10
        while host.reloader.unfinished:
            assert time.monotonic() < deadline
            loop.run_once(0.01)
        assert host.committed == [2] and host.reloader.ok == 1
    finally:
        loop.close()


def test_a_commit_that_raises_is_a_bug_that_does_not_wedge_later_reloads(vloop, vclock) -> None:
    host = Host(vloop)
    errors: list[Exception] = []
    vloop.on_error = lambda fileobj, callback, exc: errors.append(exc)
    real = host.prepare_reload

    def broken(new: int) -> Callable[[], None]:
        def commit() -> None:
            raise RuntimeError("a bug in a commit")

        return commit

    host.prepare_reload = broken  # type: ignore[method-assign]
    answers: list[list[str]] = []
    host.reloader.request(answers.append)
    turn(vloop, vclock)
    host.finish()
    turn(vloop, vclock)
    assert [str(e) for e in errors] == ["a bug in a commit"] and host.reloader.idle
    assert answers == [["an unexpected error while applying the new configuration (see the log)"]]
    host.prepare_reload = real  # type: ignore[method-assign]
    host.reloader.hup()
    turn(vloop, vclock)
    host.finish()
    turn(vloop, vclock)
    assert host.committed == [2]
