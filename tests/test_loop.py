import contextlib
import os
import select
import selectors
import signal
import socket
from collections.abc import Callable

import pytest
from helpers import bytes_each, close_pairs
from virtual_time import FakeClock, VirtualSelector

import hbd.loop
from hbd.loop import EVENT_HANGUP, STALL_THRESHOLD, EventLoop
from hbd.selector import busy
from hbd.view import TURN_BUCKETS, Turns


def test_timers_fire_in_deadline_order_at_their_time(vloop: EventLoop, vclock: FakeClock) -> None:
    loop, clock = vloop, vclock
    fired: list[tuple[str, float]] = []
    loop.call_later(3.0, lambda: fired.append(("c", clock())))
    loop.call_later(1.0, lambda: fired.append(("a", clock())))
    loop.call_later(2.0, lambda: fired.append(("b", clock())))
    for _ in range(3):
        loop.run_once()
    assert fired == [("a", 1001.0), ("b", 1002.0), ("c", 1003.0)]


def test_cancelled_timer_does_not_fire(vloop: EventLoop) -> None:
    loop = vloop
    fired: list[int] = []
    t = loop.call_later(1.0, lambda: fired.append(1))
    loop.call_later(2.0, lambda: fired.append(2))
    loop.cancel(t)
    loop.cancel(t)  # twice is harmless
    loop.run_once()
    loop.run_once()
    assert fired == [2]


def test_select_waits_exactly_until_the_next_deadline(vloop: EventLoop, vselector: VirtualSelector) -> None:
    loop = vloop
    sel = vselector
    loop.call_later(0.25, lambda: None)
    loop.run_once()
    assert sel.waits == [0.25]


def test_many_cancellations_are_compacted(vloop: EventLoop) -> None:
    loop = vloop
    timers = [loop.call_later(10.0 + i, lambda: None) for i in range(10000)]
    for t in timers[:9000]:
        loop.cancel(t)
    loop.call_later(0.1, lambda: None)
    loop.run_once()
    assert len(loop._timers) < 2000


def test_io_runs_before_due_timers(vloop: EventLoop, vclock: FakeClock) -> None:
    """After a stall, data that queued up is read before any silence verdict is taken."""
    loop, clock = vloop, vclock
    a, b = socket.socketpair()
    order: list[str] = []
    loop.add_reader(a, lambda: (a.recv(10), order.append("read")))
    loop.call_at(clock() - 1.0, lambda: order.append("timer"))
    b.send(b"x")
    loop.run_once()
    assert order == ["read", "timer"]
    a.close()
    b.close()


def test_reader_and_writer_on_one_socket(vloop: EventLoop) -> None:
    loop = vloop
    a, b = socket.socketpair()
    seen: list[str] = []
    loop.add_reader(a, lambda: seen.append("r"))
    loop.add_writer(a, lambda: (seen.append("w"), loop.remove_writer(a)))
    b.send(b"x")
    loop.run_once()
    assert sorted(seen) == ["r", "w"]
    loop.forget(a)
    loop.forget(a)
    a.close()
    b.close()


def test_a_hang_up_goes_to_its_own_callback_with_the_socket(vloop: EventLoop) -> None:
    """A reader with a hang-up callback: data alone is a read; the peer's end (with data before it or
    not) calls the hang-up callback with the socket, not the reader; re-adding the reader without one,
    or removing it, takes the watch off."""
    loop = vloop
    a, b = socket.socketpair()
    seen: list[object] = []
    reader = lambda: seen.append(("read", a.recv(10)))  # noqa: E731
    loop.add_reader(a, reader, lambda sock: seen.append(("hung up", sock)))
    b.send(b"ping\n")
    loop.run_once(0)
    assert seen == [("read", b"ping\n")]
    b.send(b"ping\n")
    b.shutdown(socket.SHUT_WR)
    loop.run_once(0)
    assert seen[1:] == [("hung up", a)]  # its last data is the hang-up callback's to read
    loop.add_reader(a, reader)  # the usual way again: the end is a read
    loop.run_once(0)
    assert seen[2:] == [("read", b"ping\n")]
    loop.remove_reader(a)
    assert not busy(loop.selector)  # a batch of 1 of MAX_EVENTS
    a.close()
    b.close()


def test_closing_a_socket_in_a_callback_skips_its_pending_event(vloop: EventLoop) -> None:
    loop = vloop
    pairs = [socket.socketpair() for _ in range(2)]
    calls: list[int] = []

    def close_other(i: int) -> None:
        calls.append(i)
        other = pairs[1 - i][0]
        loop.forget(other)

    for i, (a, b) in enumerate(pairs):
        loop.add_reader(a, lambda i=i: close_other(i))
        b.send(b"x")
    loop.run_once()
    assert len(calls) == 1
    for a, b in pairs:
        a.close()
        b.close()


def test_stall_is_reported(vloop: EventLoop, vclock: FakeClock) -> None:
    loop, clock = vloop, vclock
    stalls: list[tuple[float, float]] = []
    loop.stall_callbacks.append(lambda planned, woke: stalls.append((planned, woke)))
    loop.call_later(1.0, lambda: clock.advance(0))

    real_poll = loop.selector.poll  # type: ignore[attr-defined]

    def slow_poll(timeout):  # the process was stopped while waiting
        ready = real_poll(timeout)
        clock.advance(STALL_THRESHOLD + 5)
        return ready

    loop.selector.poll = slow_poll  # type: ignore[attr-defined]
    loop.run_once()
    assert stalls == [(1001.0, 1001.0 + STALL_THRESHOLD + 5)]


def test_signal_handler_runs_in_the_loop() -> None:
    loop = EventLoop()
    got: list[str] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (got.append("usr1"), loop.stop()))
    loop.call_later(0.01, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(5.0, loop.stop)  # safety net
    loop.run()
    loop.close()
    assert got == ["usr1"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_call_soon_threadsafe_wakes_the_loop() -> None:
    import threading

    loop = EventLoop()
    got: list[int] = []
    threading.Timer(0.01, lambda: loop.call_soon_threadsafe(lambda: (got.append(1), loop.stop()))).start()
    loop.call_later(5.0, loop.stop)
    loop.run()
    loop.close()
    assert got == [1]


def test_call_soon_threadsafe_after_close_is_dropped() -> None:
    """A reload's helper thread may finish after the daemon stopped and closed its loop: its callback
    is dropped, and the closed loop makes no new wakeup socket for it."""
    loop = EventLoop()
    loop.close()
    loop.call_soon_threadsafe(lambda: None)
    assert loop._wakeup_w is None and not loop._threadsafe


def test_timer_rearmed_at_a_due_time_runs_next_turn_not_forever(vloop: EventLoop, vclock: FakeClock) -> None:
    loop, clock = vloop, vclock
    runs: list[float] = []

    def rearm() -> None:
        runs.append(clock())
        if len(runs) < 3:
            loop.call_at(clock(), rearm)  # already due: must wait for the next turn

    loop.call_later(1.0, rearm)
    loop.run_once()
    assert runs == [1001.0]
    loop.run_once()
    loop.run_once()
    assert len(runs) == 3


def test_a_callback_can_cancel_another_due_timer(vloop: EventLoop, vclock: FakeClock) -> None:
    loop, clock = vloop, vclock
    fired: list[str] = []
    second = loop.call_later(1.0, lambda: fired.append("second"))
    loop.call_later(0.5, lambda: (fired.append("first"), loop.cancel(second)))
    loop.call_later(5.0, lambda: None)
    clock.advance(1.5)  # both are due in the same turn
    loop.run_once()
    assert fired == ["first"]
    assert loop._cancelled == 0


def test_a_raising_callback_does_not_stop_the_others_of_its_turn(vloop: EventLoop) -> None:
    """With on_error set (the daemons set it), an exception in one connection's callback goes to
    the handler with that connection's socket; the other ready sockets and due timers still run."""
    loop = vloop
    errors: list[tuple[object, str]] = []
    loop.on_error = lambda fileobj, cb, exc: errors.append((fileobj, str(exc)))
    pairs = [socket.socketpair() for _ in range(3)]
    served: list[int] = []

    def reader(i: int):
        def cb() -> None:
            pairs[i][0].recv(16)
            if i == 1:
                raise RuntimeError("bug while serving connection 1")
            served.append(i)

        return cb

    try:
        for i, (a, b) in enumerate(pairs):
            loop.add_reader(a, reader(i))
            b.send(b"x")
        fired: list[str] = []
        loop.call_later(0, lambda: (_ for _ in ()).throw(ValueError("bad timer")))
        loop.call_later(0, lambda: fired.append("next timer"))
        loop.run_once(0)
        loop.run_once(0)
        assert sorted(served) == [0, 2]
        assert (pairs[1][0], "bug while serving connection 1") in errors
        assert (None, "bad timer") in errors
        assert fired == ["next timer"]
    finally:
        for a, b in pairs:
            loop.forget(a)
            a.close()
            b.close()


def test_without_an_error_handler_exceptions_propagate(vloop: EventLoop) -> None:
    loop = vloop
    loop.call_later(0, lambda: 1 / 0)
    try:
        loop.run_once(0)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("the exception was swallowed")


def test_a_raising_signal_handler_loses_neither_the_next_signal_nor_threadsafe_callbacks(vloop: EventLoop) -> None:
    loop = vloop
    errors: list[str] = []
    loop.on_error = lambda fileobj, cb, exc: errors.append(str(exc))
    seen: list[str] = []

    def bad_reload() -> None:
        raise RuntimeError("reload blew up")

    loop.add_signal_handler(signal.SIGHUP, bad_reload)
    loop.add_signal_handler(signal.SIGUSR2, lambda: seen.append("usr2"))
    try:
        loop.call_soon_threadsafe(lambda: seen.append("threadsafe"))
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(3):
            loop.run_once(0)
        assert errors == ["reload blew up"]
        assert sorted(seen) == ["threadsafe", "usr2"]
    finally:
        loop.close()


def test_a_long_turn_of_work_is_no_stall_but_shows_in_the_lag(vloop: EventLoop, vclock: FakeClock) -> None:
    """Time spent working (here a callback that "takes" 0.4 s) is ours: no stall, but the lag says so."""
    loop, clock = vloop, vclock
    stalls: list[tuple[float, float]] = []
    loop.stall_callbacks.append(lambda planned, woke: stalls.append((planned, woke)))
    for i in range(5):
        loop.call_later(0.1 * (i + 1), lambda: clock.advance(0.4))
    for _ in range(5):
        loop.run_once()
    assert stalls == []
    assert loop.max_lag >= 0.4


def test_a_stop_in_the_middle_of_a_turn_is_a_stall() -> None:
    """Wall time that passes without our thread using CPU (SIGSTOP mid-turn, starvation) is a stall,
    reported before the turn's timers take any verdict."""
    clock = FakeClock()
    cpu = FakeClock(0.0)
    loop = EventLoop(clock=clock, selector=VirtualSelector(clock), cpu_clock=cpu)
    a, b = socket.socketpair()
    order: list[str] = []
    loop.stall_callbacks.append(lambda planned, woke: order.append(f"stall {woke - planned:.1f}"))

    def read() -> None:
        a.recv(10)
        cpu.advance(0.1)  # worked 0.1 s ...
        clock.advance(2.1)  # ... and was stopped for 2 s

    loop.add_reader(a, read)
    loop.call_at(clock() + 1.0, lambda: order.append("verdict"))
    b.send(b"x")
    loop.run_once()
    assert order == ["stall 2.0", "verdict"]
    a.close()
    b.close()


def test_turn_durations_land_in_their_buckets_with_the_longest_and_the_sum(vloop: EventLoop, vclock: FakeClock) -> None:
    """Each turn's work (wake-up to the end of its callbacks) is counted once, in the bucket of its
    upper bound; the time waited in select() is no part of it."""
    loop, clock = vloop, vclock
    assert TURN_BUCKETS[0] == 0.001  # run_once's fast path for the first bucket says 0.001
    works = [0.0, 0.0005, 0.001, 0.0015, 0.03, 0.1, 0.1004, 0.7, 2.5]
    for i, work in enumerate(works):
        loop.call_at(clock() + 10.0 * (i + 1), lambda w=work: clock.advance(w))
    for _ in works:
        loop.run_once()
    counts = dict(zip([*TURN_BUCKETS, "+Inf"], loop.turn_counts, strict=True))
    assert counts == {
        0.001: 3,  # 0, 0.5 ms and exactly 1 ms (a bucket holds its bound)
        0.002: 1,
        0.005: 0,
        0.01: 0,
        0.02: 0,
        0.05: 1,
        0.1: 1,  # exactly 100 ms is not over it
        0.2: 1,
        0.5: 0,
        1.0: 1,
        "+Inf": 1,
    }
    assert loop.turn_max == 2.5
    assert abs(loop.turn_sum - sum(works)) < 1e-6
    turns = Turns(counts=tuple(loop.turn_counts), sum=loop.turn_sum, max=loop.turn_max)
    assert turns.count == len(works) and turns.over(0.1) == 3
    assert loop.max_lag >= 2.5  # the lag sees the same turns


def test_the_turn_histogram_takes_no_clock_reading_of_its_own() -> None:
    """An idle turn reads the clock before and after select() and at its end, and the CPU clock once,
    after select() (a system call: at the end only when the turn took long enough to hide a stall):
    the histogram reuses those readings."""
    clock = FakeClock()
    cpu = FakeClock(0.0)
    reads = {"clock": 0, "cpu": 0}

    def counted(c: FakeClock, name: str) -> Callable[[], float]:
        def read() -> float:
            reads[name] += 1
            return c()

        return read

    loop = EventLoop(clock=counted(clock, "clock"), selector=VirtualSelector(clock), cpu_clock=counted(cpu, "cpu"))
    try:
        for _ in range(10):
            loop.run_once(1.0)  # nothing due: an idle turn
        assert reads == {"clock": 1 + 30, "cpu": 10}  # (1: the loop's first ``woke``, when it is made)
        assert loop.turn_counts[0] == 10
    finally:
        loop.close()


def test_a_turn_handles_at_most_max_events_ready_sockets_and_none_starves(
    vloop: EventLoop, vselector: VirtualSelector
) -> None:
    """A mass disconnect makes thousands of sockets ready at once: each turn takes its share, the
    rest come back on the next turns (epoll is level-triggered), every one within ceil(N / budget)
    turns, each handled once, none of them skipped."""
    loop, budget, n = vloop, 8, 50
    vselector.max_events = budget
    pairs = [socket.socketpair() for _ in range(n)]
    handled: list[int] = []
    per_turn: list[int] = []

    def reader(i: int, s: socket.socket) -> Callable[[], None]:
        def on_read() -> None:
            s.recv(10)  # no longer ready once read: as a connection that is closed
            loop.remove_reader(s)
            handled.append(i)

        return on_read

    try:
        for i, (a, b) in enumerate(pairs):
            loop.add_reader(a, reader(i, a))
            b.send(b"x")
        while len(handled) < n and len(per_turn) < 100:
            before = len(handled)
            loop.run_once(0.0)
            per_turn.append(len(handled) - before)
        assert sorted(handled) == list(range(n))  # each once
        assert len(per_turn) == -(-n // budget)
        assert max(per_turn) == budget
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_socket_that_stays_ready_does_not_starve_the_others(vloop: EventLoop, vselector: VirtualSelector) -> None:
    """Level-triggered sockets that stay ready (a peer that floods) are handed out round-robin:
    with more ready than the budget, each gets its turn."""
    loop, budget, n = vloop, 4, 12
    vselector.max_events = budget
    pairs = [socket.socketpair() for _ in range(n)]
    seen: list[int] = []
    try:
        for i, (a, b) in enumerate(pairs):
            loop.add_reader(a, lambda i=i: seen.append(i))  # never reads: stays ready for ever
            b.send(b"x")
        for _ in range(-(-n // budget)):
            loop.run_once(0.0)
        assert sorted(seen) == list(range(n))
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_turn_runs_at_most_max_timers_due_timers_in_order(
    vloop: EventLoop, vclock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, clock = vloop, vclock
    monkeypatch.setattr(hbd.loop, "MAX_TIMERS", 10)
    fired: list[int] = []
    for i in range(35):
        loop.call_at(clock() - 1.0 + (i // 5) * 0.01, lambda i=i: fired.append(i))  # due, some at the same time
    waits: list[int] = []
    turns = 0
    while len(fired) < 35 and turns < 10:
        before = len(fired)
        loop.run_once(5.0)
        turns += 1
        waits.append(len(fired) - before)
    assert fired == list(range(35))  # earliest first, and in the order set when due at the same time
    assert waits == [10, 10, 10, 5]
    assert clock() == 1000.0  # the turns after a full one did not sleep: the rest were due


def test_a_timer_rearming_for_now_does_not_starve_the_other_due_timers(
    vloop: EventLoop, vclock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, clock = vloop, vclock
    monkeypatch.setattr(hbd.loop, "MAX_TIMERS", 2)
    fired: list[str] = []

    def again() -> None:
        fired.append("again")
        loop.call_at(clock(), again)

    loop.call_at(clock(), again)
    for name in "abcd":
        loop.call_at(clock(), lambda name=name: fired.append(name))
    for _ in range(4):
        loop.run_once(0.0)
    assert [f for f in fired if f != "again"] == ["a", "b", "c", "d"]


class Recorder:
    """A handler for ``EventLoop.watch``: records epoll's bits and reads what is there."""

    def __init__(self, sock: socket.socket, seen: list[tuple[str, int, bytes]], name: str = "h") -> None:
        self.sock, self.seen, self.name = sock, seen, name
        self.then: Callable[[], object] | None = None  # what the next event also does

    def on_read(self, events: int) -> None:
        data = self.sock.recv(64) if events & select.EPOLLIN else b""
        self.seen.append((self.name, events, data))
        if self.then is not None:
            self.then()


def test_a_watched_socket_hands_epolls_bits_to_its_handler(vloop: EventLoop, vclock: FakeClock) -> None:
    """watch(): a read is on_read(IN) alone; room to send adds OUT once asked for; the peer's end comes
    with EPOLLRDHUP; nothing is kept per socket but the handler in the selector's table (no key, no
    callback list); and virtual time does not jump over a turn whose only events are handlers'."""
    loop = vloop
    a, b = socket.socketpair()
    a.setblocking(False)
    seen: list[tuple[str, int, bytes]] = []
    h = Recorder(a, seen)
    loop.watch(a, h, selectors.EVENT_READ | EVENT_HANGUP)
    assert loop.watches(a) and a not in loop.selector.get_map() and loop.selector.handlers == {a.fileno(): h}  # type: ignore[attr-defined]
    b.send(b"ping")
    start = vclock()
    loop.run_once(5.0)
    assert seen == [("h", select.EPOLLIN, b"ping")] and vclock() == start
    loop.watch(a, h, selectors.EVENT_READ | selectors.EVENT_WRITE | EVENT_HANGUP)
    loop.run_once(0)
    assert seen[1:] == [("h", select.EPOLLOUT, b"")]
    loop.watch(a, h, selectors.EVENT_READ | EVENT_HANGUP)
    b.send(b"ping\n")
    b.shutdown(socket.SHUT_WR)
    loop.run_once(0)
    assert seen[2][1] & select.EPOLLRDHUP and seen[2][2] == b"ping\n"
    loop.forget(a)
    assert not loop.watches(a) and not loop.selector.handlers  # type: ignore[attr-defined]
    loop.run_once(0)
    assert len(seen) == 3  # forgotten: no more events
    a.close()
    b.close()


def test_a_handler_forgotten_in_the_turn_is_not_called_for_its_returned_event(vloop: EventLoop) -> None:
    """Two handlers ready in the same turn: the first forgets the second (a takeover closes the old
    connection), whose event in this turn's batch is skipped; a raising handler goes to on_error with
    its bound method (its __self__ tells the server which connection) and the turn goes on."""
    loop = vloop
    errors: list[object] = []
    loop.on_error = lambda fileobj, cb, exc: errors.append(getattr(cb, "__self__", None))
    pairs = [socket.socketpair() for _ in range(3)]
    seen: list[tuple[str, int, bytes]] = []
    handlers = [Recorder(a, seen, str(i)) for i, (a, _) in enumerate(pairs)]

    def forget_the_other_one() -> None:
        first = seen[0][0]
        loop.forget(pairs[1 - int(first)][0] if first in "01" else pairs[0][0])

    def bug() -> None:
        raise RuntimeError("bug")

    for (a, b), h in zip(pairs, handlers, strict=True):
        loop.watch(a, h, selectors.EVENT_READ)
        b.send(b"x")
    handlers[0].then = handlers[1].then = forget_the_other_one
    handlers[2].then = bug
    loop.run_once(0)
    names = [name for name, _, _ in seen]
    assert sorted(names) in (["0", "2"], ["1", "2"])  # one of 0 and 1, never both
    assert errors == [handlers[2]]
    for a, b in pairs:
        loop.forget(a)
        a.close()
        b.close()


def test_a_descriptor_number_reused_in_the_turn_does_not_get_the_old_sockets_event(vloop: EventLoop) -> None:
    """The loop looks a handler up when it dispatches an event, by descriptor number: a socket forgotten
    and closed in a turn whose number the kernel hands to a new socket watched in the same turn must not
    pass the old socket's already returned event to the new handler (skipped by number until the turn ends)."""
    loop = vloop
    pairs = [socket.socketpair() for _ in range(2)]
    seen: list[tuple[str, int, bytes]] = []
    handlers = [Recorder(a, seen, str(i)) for i, (a, _) in enumerate(pairs)]
    fresh: list[tuple[socket.socket, socket.socket]] = []

    def replace_the_other_one() -> None:
        old = pairs[1 - int(seen[0][0])][0]
        number = old.fileno()
        loop.forget(old)
        old.close()
        a, b = socket.socketpair()  # the lowest free number: the one just closed
        fresh.append((a, b))
        assert number in (a.fileno(), b.fileno())
        mine = a if a.fileno() == number else b
        mine.setblocking(False)  # (a stale IN passed to it would find nothing to read)
        loop.watch(mine, Recorder(mine, seen, "new"), selectors.EVENT_READ)

    for (a, b), h in zip(pairs, handlers, strict=True):
        loop.watch(a, h, selectors.EVENT_READ)
        b.send(b"x")
        h.then = replace_the_other_one
    loop.run_once(0)
    assert [name for name, _, _ in seen] in (["0"], ["1"])  # not "new" with the old socket's event
    for a, b in [*pairs, *fresh]:
        with contextlib.suppress(OSError, KeyError, ValueError):
            loop.forget(a)
            loop.forget(b)
        a.close()
        b.close()


def test_a_watched_socket_costs_the_loop_one_table_entry() -> None:
    """What the loop keeps per socket: for a watched one only the selector's entry to the handler
    (about 40 bytes with the table's growth), where a reader kept a SelectorKey, its table entry, a
    callback list and the bound method in it (about 250)."""
    loop = EventLoop()
    pairs = [socket.socketpair() for _ in range(400)]
    handlers = [Recorder(a, []) for a, _ in pairs]
    try:
        watched = zip((a for a, _ in pairs), handlers, strict=True)
        per = bytes_each(watched, lambda w: loop.watch(w[0], w[1], selectors.EVENT_READ | EVENT_HANGUP))
        assert per < 130, f"{per:.0f} bytes per watched socket"
    finally:
        close_pairs(loop, pairs)


def test_without_epoll_a_watched_socket_is_served_through_callbacks() -> None:
    """Another selector (not Linux): watch() sets callbacks that pass IN or OUT; the end is a read."""
    loop = EventLoop(selector=selectors.PollSelector())
    a, b = socket.socketpair()
    a.setblocking(False)
    seen: list[tuple[str, int, bytes]] = []
    h = Recorder(a, seen)
    try:
        loop.watch(a, h, selectors.EVENT_READ | EVENT_HANGUP)
        assert not loop.watches(a)
        b.send(b"ping")
        loop.run_once(0)
        loop.watch(a, h, selectors.EVENT_READ | selectors.EVENT_WRITE | EVENT_HANGUP)
        loop.run_once(0)
        assert seen == [("h", select.EPOLLIN, b"ping"), ("h", select.EPOLLOUT, b"")]
        loop.watch(a, h, selectors.EVENT_READ)
        b.close()
        loop.run_once(0)
        assert seen[2:] == [("h", select.EPOLLIN, b"")]
    finally:
        loop.forget(a)
        a.close()
        loop.close()


def test_busy_turns_read_the_cpu_clock_once_per_cpu_every_and_still_see_a_stop() -> None:
    """The CPU clock (a system call) is read at a turn's start only when the last reading is older
    than CPU_EVERY: 100 busy turns of 1 ms read it twice, not 100 times; a stop in the middle of a turn
    after a stale reading is still a stall, measured at most CPU_EVERY short."""
    clock = FakeClock()
    cpu = FakeClock(0.0)
    reads = [0]

    def read_cpu() -> float:
        reads[0] += 1
        return cpu()

    loop = EventLoop(clock=clock, selector=VirtualSelector(clock), cpu_clock=read_cpu)
    a, b = socket.socketpair()
    stalls: list[float] = []
    loop.stall_callbacks.append(lambda planned, woke: stalls.append(woke - planned))

    def read() -> None:
        a.recv(10)
        cpu.advance(0.001)
        clock.advance(0.001)

    try:
        loop.add_reader(a, read)
        for _ in range(100):
            b.send(b"x")
            loop.run_once(0)
        assert reads[0] == 2 and stalls == []  # at 0 and after 51 ms (the 100 turns span 100 ms)
        # then a turn that works 10 ms and is stopped for 2 s, its reading 49 ms old (not re-read)

        def stopped() -> None:
            a.recv(10)
            cpu.advance(0.01)
            clock.advance(2.01)

        loop.add_reader(a, stopped)
        b.send(b"x")
        loop.run_once(0)
        assert reads[0] == 3  # (the stall's own look at the CPU clock)
        assert len(stalls) == 1 and 2.0 - hbd.loop.CPU_EVERY <= stalls[0] < 1.96, stalls
    finally:
        loop.forget(a)
        a.close()
        b.close()
        loop.close()
