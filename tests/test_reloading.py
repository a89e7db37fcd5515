"""A daemon's reload machinery on its own, in virtual time: the load runs off the loop and its outcome
comes back to it, reloads are serialised (SIGHUPs coalesce, requests share one and get its verdict),
a load that hangs is cancelled and fails the reload after LOAD_TIMEOUT without wedging the next ones,
one under way at shutdown is cancelled, and what a reload keeps when it fails. (The loads here are
stand-ins the test finishes; the real loader process: tests/test_reload_process.py.)"""

from __future__ import annotations

from collections.abc import Callable

from virtual_time import run_until

from hbd.errors import ConfigError
from hbd.loop import EventLoop
from hbd.reloading import LOAD_TIMEOUT, Deliver, Done, Given, Reloader

PATH = "/etc/hbd/x.yaml"


class FakeLoad:
    """A load that stays under way until the test finishes it (``Host.finish``)."""

    def __init__(self, host: Host, number: int, fails: Exception | None) -> None:
        self.host, self.number, self.fails = host, number, fails
        self.deliver: Deliver | None = None
        self.cancelled = False

    def start(self, loop: EventLoop, deliver: Deliver) -> None:
        self.deliver = deliver
        self.host.loads.append(self)

    def cancel(self) -> None:
        self.cancelled = True
        self.host.loads.remove(self)


class Host:
    """The daemon's side. Loads stay under way until the test finishes them (``finish``), as a loader
    process would at any moment: the new config is the load's number."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.loads: list[FakeLoad] = []  # under way, not finished yet
        self.made: list[FakeLoad] = []
        self.jobs = 0
        self.load_fails: Exception | None = None
        self.prepare_fails: Exception | None = None
        self.verdict_after = 0.0
        self.stopping = False
        self.committed: list[object] = []
        self.ended: list[list[str]] = []
        self.reloader: Reloader[int] = Reloader(loop, self)

    def finish(self, index: int = 0) -> None:
        load = self.loads.pop(index)
        deliver = load.deliver
        assert deliver is not None  # (from the loop, as a loader's outcome comes)
        self.loop.call_later(0, lambda: deliver(None if load.fails else load.number, load.fails))

    # -- hbd.reloading.ReloadHost --------------------------------------------------------------------
    def reload_job(self) -> tuple[str, FakeLoad]:
        self.jobs += 1
        load = FakeLoad(self, self.jobs, self.load_fails)
        self.made.append(load)
        return PATH, load

    def prepare_reload(self, new: int) -> Callable[[], None]:
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


def test_a_given_load_is_made_on_the_loop_in_a_turn_of_its_own(vloop, vclock) -> None:
    made: list[int] = []
    load = Given(lambda: made.append(7) or 7)
    got: list[tuple[object, Exception | None]] = []
    load.start(vloop, lambda result, error: got.append((result, error)))
    assert made == []
    turn(vloop, vclock)
    assert got == [(7, None)]
    load = Given(lambda: 1 // 0)
    load.start(vloop, lambda result, error: got.append((result, error)))
    load.cancel()  # cancelled: never made, never delivered
    turn(vloop, vclock)
    assert len(got) == 1


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
    reload()  # invalid, found by the load (in its loader process)
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


def test_a_load_that_hangs_is_cancelled_and_fails_the_reload_and_later_ones_still_work(vloop, vclock, records) -> None:
    host = Host(vloop)
    r = host.reloader
    answers: list[list[str]] = []
    r.request(answers.append)
    turn(vloop, vclock, LOAD_TIMEOUT - 1)
    assert answers == [] and not r.idle  # a slow load is waited for...
    turn(vloop, vclock, 1.5)
    (errors,) = answers  # ... up to LOAD_TIMEOUT
    assert errors == [
        f"{PATH}: loading took more than {LOAD_TIMEOUT:g} s (a file on a hung filesystem?); its loader was killed"
    ]
    assert r.failed == 1 and r.last_errors == errors and r.idle
    assert host.made[0].cancelled and host.loads == []  # (its process killed)
    r.hup()  # the next reload runs as usual
    turn(vloop, vclock)
    host.finish()
    turn(vloop, vclock)
    assert host.committed == [2] and r.ok == 1
    host.made[0].deliver(1, None)  # a late outcome of the cancelled one (it cannot come: if it did) is dropped
    turn(vloop, vclock)
    assert host.committed == [2] and r.ok == 1


def test_a_load_under_way_at_shutdown_is_cancelled_and_its_requests_told(vloop, vclock) -> None:
    host = Host(vloop)
    r = host.reloader
    answers: list[tuple[str, list[str]]] = []
    r.request(lambda errors: answers.append(("a", errors)))
    turn(vloop, vclock)
    r.request(lambda errors: answers.append(("b", errors)))  # waits for the next one
    r.close()
    assert host.made[0].cancelled and host.loads == [] and host.jobs == 1
    assert sorted(answers) == [("a", ["the daemon is stopping"]), ("b", ["the daemon is stopping"])]
    assert host.committed == [] and r.idle


def test_a_stopping_daemon_answers_without_reloading(vloop, vclock) -> None:
    host = Host(vloop)
    host.stopping = True
    answers: list[list[str]] = []
    host.reloader.request(answers.append)
    run_until(vloop, vclock, 1001.0)
    assert answers == [["the daemon is stopping"]] and host.jobs == 0


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
