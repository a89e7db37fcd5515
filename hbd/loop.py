"""A small single-threaded event loop: selectors for I/O, a deadline heap for timers, signals.

The shape is asyncio's ``_run_once``: wait in ``select()`` until the earliest deadline, run the
I/O callbacks that are ready, then the timers that are due. I/O runs before timers on purpose:
after a stall (SIGSTOP, CPU starvation) the pings that queued up in the kernel are read before
any silence verdict is taken.

Time enters only through ``clock`` (default ``time.monotonic``), so tests can drive virtual time.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import heapq
import itertools
import math
import selectors
import signal
import socket
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Protocol

from hbd.selector import (  # noqa: F401 (MAX_EVENTS: tests)
    EVENT_HANGUP,
    IN,
    MAX_EVENTS,
    OUT,
    EpollSelector,
    Handler,
    default_selector,
)
from hbd.view import TURN_BUCKETS

Callback = Callable[[], object]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


# What the selector watches: a socket (plain or TLS), a pipe's fd, anything with fileno().
FileLike = int | HasFileno
# A reader's hang-up callback (add_reader's ``hung_up``): called with the socket instead of the reader
# once its peer has ended (closed or shut down its side; data sent before may still be unread), so one
# callable serves every socket. epoll only (EPOLLRDHUP, hbd.selector); elsewhere the reader reads the end.
HangUp = Callable[[FileLike], object]

# A wake-up this much later than planned, or this much of a turn spent not running (wall time
# minus our thread's CPU time), means our own process was stopped or starved (SIGSTOP, swap, CPU
# starvation): daemons use it to forgive peers they could not have heard. A turn that is long
# because we were working is not a stall: that time is ours, and peers' silence still counts.
STALL_THRESHOLD = 0.25
# The CPU clock is read at a turn's start only when the last reading is older than this: it is a system
# call (2-11 us on this shared machine when loaded, most of a busy turn's own cost, and under load a turn
# handles 2-3 pings). A stale reading counts the CPU used since it (at most this much) as the turn's own,
# so a stall is measured at most this much short; STALL_THRESHOLD stays far above it.
CPU_EVERY = 0.05
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_HANGUP = EVENT_HANGUP

# What one turn handles at most: MAX_EVENTS ready sockets (hbd.selector's bound) and MAX_TIMERS due
# timers. The rest waits for the next turn, which does not sleep (epoll is level-triggered: a ready
# socket not handled now is returned again; a due timer stays in the heap, so the next wait is 0).
# A mass disconnect used to be one turn of 15,000 closes (about 1 s); a close costs 50-70 us, so
# 256 of them are 13-18 ms, and a ping costs less.
MAX_TIMERS = 256
# WOKE: ``EventLoop.woke`` is the time of the latest look at the sockets: when this turn's select()
# returned, a time by which the bytes of every socket it found ready had arrived. hbd.connection
# stamps a ping with it (one clock reading a turn, not one a read: ~430 instructions a ping less);
# a reader that looks at a socket outside the I/O phase sets it first (hbd.liveness's last look).
_order = itertools.count()  # timers due at the same time run in the order they were set


class Timer:
    __slots__ = ("callback", "cancelled", "seq", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False  # set through EventLoop.cancel(), which keeps the count
        self.seq = next(_order)

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when or (self.when == other.when and self.seq < other.seq)


class Registrations:
    """The loop's I/O registrations (EventLoop's part): callbacks per socket (``add_reader`` ...,
    kept in the selector's key) or, for the server's connections, a handler per socket (``watch``)."""

    selector: selectors.BaseSelector
    _epoll: EpollSelector | None  # the selector when it is ours (watch() needs it), else None
    _in_io: bool  # the turn's I/O callbacks are running
    _gone: set[int]  # descriptors forgotten meanwhile: their events already returned are skipped
    report_error: Callable[[FileLike | None, Callable[..., object] | None, Exception], None]  # (EventLoop's)

    def add_reader(self, sock: FileLike, callback: Callback, hung_up: HangUp | None = None) -> None:
        _set_callback(self.selector, sock, 0, callback, hung_up)  # hung_up: see HangUp

    def remove_reader(self, sock: FileLike) -> None:
        _set_callback(self.selector, sock, 0, None)  # (and its hang-up callback: it comes with the reader)

    def add_writer(self, sock: FileLike, callback: Callback) -> None:
        _set_callback(self.selector, sock, 1, callback)

    def remove_writer(self, sock: FileLike) -> None:
        _set_callback(self.selector, sock, 1, None)

    def watch(self, sock: FileLike, handler: Handler, events: int) -> None:
        """Pass ``sock``'s readiness for ``events`` (EVENT_READ, EVENT_WRITE, EVENT_HANGUP) to
        ``handler.on_read(bits)``, epoll's bits as they came (IN alone for a read): one call per event
        and no callback list, key or bound method kept per socket (hbd.selector). Again to change the
        events; ``forget`` ends it. Without epoll, callbacks that pass IN or OUT (a hang-up is read)."""
        if self._epoll is not None:
            self._epoll.watch(sock if isinstance(sock, int) else sock.fileno(), handler, events)
            return
        if events & _READ:
            self.add_reader(sock, functools.partial(handler.on_read, IN))
        else:
            self.remove_reader(sock)
        if events & _WRITE:
            self.add_writer(sock, functools.partial(handler.on_read, OUT))
        else:
            self.remove_writer(sock)

    def watches(self, sock: FileLike) -> bool:
        """``sock`` is watched for a handler (``watch``) and not through callbacks."""
        return self._epoll is not None and (sock if isinstance(sock, int) else sock.fileno()) in self._epoll.handlers

    def forget(self, sock: FileLike) -> None:
        """Drop every callback of a socket that is about to be closed."""
        if self._epoll is not None and self._epoll.handlers:
            fd = sock if isinstance(sock, int) else sock.fileno()
            if self._epoll.unwatch(fd) is not None:
                if self._in_io:
                    self._gone.add(fd)  # its events of this turn are skipped, even if the number is reused
                return
        try:
            key = self.selector.unregister(sock)
        except (KeyError, ValueError):
            return
        if self._in_io:
            self._gone.add(key.fd)
        key.data[0] = key.data[1] = key.data[2] = None  # events already returned for it in this turn are skipped

    def _run_key(self, key: selectors.SelectorKey, mask: int) -> None:
        """A socket's callbacks (add_reader ...) for the selector's events."""
        cbs = key.data
        cb = None
        try:  # free unless something raises (3.11): no cost per event on the normal path
            if mask & _HANGUP and (cb := cbs[2]) is not None:  # only a socket with one is told (HangUp)
                cb(key.fileobj)
            elif mask & _READ:
                cb = cbs[0]
                if cb is not None:
                    cb()
            if mask & _WRITE:
                cb = cbs[1]
                if cb is not None:
                    cb()
        except Exception as exc:
            self.report_error(key.fileobj, cb, exc)

    def _run_other(self, sel: EpollSelector, fd: int, bits: int, handler: Handler | None) -> None:
        """An event the loop's usual path does not take: a descriptor with callbacks (a key), or any
        while something forgotten this turn has been skipped (watch()'s handler, still watched)."""
        if handler is None:
            event = sel.key_event(fd, bits)
            if event is not None:
                self._run_key(*event)
            return
        try:
            handler.on_read(bits)
        except Exception as exc:
            self.report_error(None, handler.on_read, exc)


class Stalls:
    """EventLoop's part that tells a stall (our process stopped or starved) from a long turn of work."""

    cpu_clock: Callable[[], float]
    _cpu: float
    _cpu_at: float
    stall_callbacks: list[Callable[[float, float], object]]

    def _check_turn(self, start: float, cpu_start: float, end: float) -> float:
        """A stretch of a turn that took much longer than the CPU it used: we were stopped or starved
        in the middle of it. Returns the CPU clock now, for the next stretch."""
        cpu = self.cpu_clock()
        self._cpu, self._cpu_at = cpu, end
        idle = (end - start) - (cpu - cpu_start)
        if idle > STALL_THRESHOLD:
            self._stalled(end - idle, end)
        return cpu

    def _stalled(self, planned: float, woke: float) -> None:
        for cb in self.stall_callbacks:
            cb(planned, woke)


class EventLoop(Registrations, Stalls):
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        selector: selectors.BaseSelector | None = None,
        cpu_clock: Callable[[], float] | None = None,
    ) -> None:
        self.clock = clock
        self.woke = clock()  # the latest look at the sockets (see WOKE)
        # CPU time of the loop's thread; with a virtual clock (tests) every second of a turn is work.
        self.cpu_clock = cpu_clock or (time.thread_time if clock is time.monotonic else clock)
        self._cpu = 0.0  # the last CPU clock reading ...
        self._cpu_at = -math.inf  # ... and when (the clock's time): see CPU_EVERY
        self.selector = selector if selector is not None else default_selector()
        self._epoll = self.selector if isinstance(self.selector, EpollSelector) else None
        self._gone = set()
        self._in_io = False
        self._timers: list[Timer] = []
        self._cancelled = 0
        self._running = False
        self._signal_handlers: dict[int, Callback] = {}
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._wakeup()  # created now, in the loop's thread: other threads may only write to it
        self._threadsafe: collections.deque[Callback] = collections.deque()
        self.stall_callbacks: list[Callable[[float, float], object]] = []
        # Lag: how long something that became ready could wait for the loop to look at it, i.e. how
        # late a wake-up was plus how long the turn after it took (busy turns count, not only late
        # wake-ups), seconds.
        self.last_lag = 0.0
        self.max_lag = 0.0
        # Turn durations, wake-up to the end of the turn's callbacks (the loop's own work, or its
        # being preempted mid-turn): counts per TURN_BUCKETS bound, then +Inf; their sum and the
        # longest, seconds. Kept from the timestamps the lag takes anyway: no clock call of its own.
        self.turn_counts = [0] * (len(TURN_BUCKETS) + 1)
        self.turn_sum = 0.0
        self.turn_max = 0.0
        # Called as on_error(fileobj or None, callback, exc) when a callback raises; the daemons
        # close what the callback belonged to and carry on. None: the exception propagates.
        self.on_error: Callable[[FileLike | None, Callback, Exception], object] | None = None

    # -- timers ---------------------------------------------------------------------------------
    def time(self) -> float:
        return self.clock()

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def cancel(self, timer: Timer | None) -> None:
        if timer is not None and not timer.cancelled:
            timer.cancelled = True
            self._cancelled += 1

    # -- signals ----------------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run ``callback`` from the loop (never from the signal handler) when ``signum`` arrives."""
        if not self._signal_handlers:
            signal.set_wakeup_fd(self._wakeup().fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        signal.signal(signum, _note_signal)

    def _wakeup(self) -> socket.socket:
        if self._wakeup_w is None:
            self._wakeup_r, self._wakeup_w = socket.socketpair()
            self._wakeup_r.setblocking(False)
            self._wakeup_w.setblocking(False)
            self.add_reader(self._wakeup_r, self._on_wakeup)
        return self._wakeup_w

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run ``callback`` in the loop; the only loop method another thread may call."""
        wakeup = self._wakeup_w
        if wakeup is None:  # closed: nothing would run it (a helper thread finishing after the daemon stopped)
            return
        self._threadsafe.append(callback)
        with contextlib.suppress(OSError):  # BlockingIOError: already being woken; else closed meanwhile
            wakeup.send(b"\0")

    def _on_wakeup(self) -> None:
        assert self._wakeup_r is not None
        try:
            data = self._wakeup_r.recv(512)
        except BlockingIOError:
            return
        # One at a time: a handler that raises must not lose the signals read with it (a SIGTERM
        # behind a failing SIGHUP) nor the callbacks other threads queued (a DNS answer).
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                try:
                    handler()
                except Exception as exc:
                    self.report_error(None, handler, exc)
        while self._threadsafe:
            callback = self._threadsafe.popleft()
            try:
                callback()
            except Exception as exc:
                self.report_error(None, callback, exc)

    # -- running ----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, max_wait: float = 3600.0) -> None:
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
            self._cancelled -= 1
        before = self.clock()
        timeout = timers[0].when - before if timers else max_wait  # (min()/max(): two builtin calls a turn)
        if timeout > max_wait:
            timeout = max_wait
        elif timeout < 0.0:
            timeout = 0.0
        if (sel := self._epoll) is not None:
            ready = sel.poll(timeout)  # epoll's own (fd, bits): dispatched below, no list or tuple of ours
            events: Sequence[tuple[selectors.SelectorKey, int]] = ()
        else:
            ready, events = [], self.selector.select(timeout)
        now = seg = woke = self.woke = self.clock()
        if woke - self._cpu_at > CPU_EVERY:
            self._cpu, self._cpu_at = self.cpu_clock(), woke
        cpu = self._cpu
        late = now - before - timeout
        if late > STALL_THRESHOLD:  # we were not running while we waited
            self._stalled(before + timeout, now)
        gone = self._gone
        if gone:
            gone.clear()
        self._in_io = True
        for key, mask in events:  # (a selector other than ours)
            self._run_key(key, mask)
        if sel is not None:
            handlers = sel.handlers
            for fd, bits in ready:
                try:  # looked up now: a handler forgotten earlier in the turn has none
                    handler = handlers[fd]  # (a subscript, not .get(): no method call per event)
                except KeyError:  # a callback's descriptor (a key), or one forgotten this turn
                    if not (gone and fd in gone):
                        self._run_other(sel, fd, bits, None)
                    continue
                if gone:  # something was forgotten this turn: its number may be another's by now
                    if fd not in gone:
                        self._run_other(sel, fd, bits, handler)
                    continue
                try:
                    handler.on_read(bits)
                except Exception as exc:  # the bound method tells what it served (its __self__)
                    self.report_error(None, handler.on_read, exc)
        self._in_io = False
        if timers and timers[0].when <= (now := self.clock()):
            if now - seg > STALL_THRESHOLD:  # a stop in the middle of the I/O, before verdicts
                cpu = self._check_turn(seg, cpu, now)
                seg = now
            # Take the due timers (up to MAX_TIMERS; the rest stay due), then run them: a callback that
            # re-arms at a time already due runs on the next turn instead of spinning in this one.
            due: list[Timer] = []
            while timers and timers[0].when <= now and len(due) < MAX_TIMERS:
                timer = heapq.heappop(timers)
                if timer.cancelled:
                    self._cancelled -= 1
                    continue
                due.append(timer)
            for timer in due:
                if timer.cancelled:  # cancelled by an earlier callback of this turn
                    self._cancelled -= 1
                    continue
                timer.cancelled = True  # fired: a late cancel() must not count it again
                try:
                    timer.callback()
                except Exception as exc:
                    self.report_error(None, timer.callback, exc)
        end = self.clock()
        if end - seg > STALL_THRESHOLD:  # only a stretch that long can hide a stall: spare the CPU clock
            self._check_turn(seg, cpu, end)  # (a system call) on every other turn
        turn = end - woke
        if turn < 0.001:  # TURN_BUCKETS[0]: most turns skip the bisect (~100 ns of the ~200 this costs)
            self.turn_counts[0] += 1
        else:
            self.turn_counts[bisect_left(TURN_BUCKETS, turn)] += 1
        self.turn_sum += turn
        if turn > self.turn_max:
            self.turn_max = turn
        lag = (late if late > 0 else 0.0) + turn
        self.last_lag = lag
        if lag > self.max_lag:
            self.max_lag = lag
        if self._cancelled > 4096 and self._cancelled * 2 > len(timers):
            self._compact()

    def report_error(self, fileobj: FileLike | None, callback: Callable[..., object] | None, exc: Exception) -> None:
        """One callback raised: the others of this turn still run (one bad connection must not
        take the process, or the peers served after it in this turn, down with it)."""
        if self.on_error is None:
            raise exc
        self.on_error(fileobj, callback, exc)  # type: ignore[arg-type]

    def _compact(self) -> None:
        self._timers = [t for t in self._timers if not t.cancelled]
        heapq.heapify(self._timers)
        self._cancelled = 0

    def close(self) -> None:
        if self._signal_handlers:
            signal.set_wakeup_fd(-1)
        for signum in list(self._signal_handlers):
            signal.signal(signum, signal.SIG_DFL)
        self._signal_handlers.clear()
        if self._wakeup_r is not None:
            self.forget(self._wakeup_r)
            self._wakeup_r.close()
            assert self._wakeup_w is not None
            self._wakeup_w.close()
            self._wakeup_r = self._wakeup_w = None
        self.selector.close()

    def close_in_child(self) -> None:
        """After fork(): drop this loop's descriptors without unregistering anything, because the
        epoll instance is shared with the parent and unregistering would change the parent's loop."""
        self._signal_handlers.clear()
        for sock in (self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()
        self._wakeup_r = self._wakeup_w = None
        self._timers.clear()
        self.selector.close()


def _set_callback(
    selector: selectors.BaseSelector,
    sock: FileLike,
    slot: int,
    callback: Callback | None,
    hung_up: HangUp | None = None,
) -> None:
    """Set (or with None clear) the read (slot 0) or write (slot 1) callback of ``sock``, and with the
    read callback its hang-up callback (slot 2): the selector watches what has a callback, and forgets a
    socket that has none left."""
    if hung_up is not None and not isinstance(selector, EpollSelector):
        hung_up = None  # no EPOLLRDHUP: the reader reads the end
    try:
        key = selector.get_key(sock)
    except KeyError:
        if callback is None:
            return
        cbs: list[Callable[..., object] | None] = [None, None, None]
        cbs[slot] = callback
        if slot == 0:
            cbs[2] = hung_up
        selector.register(sock, _mask(cbs), cbs)
        return
    cbs = key.data
    cbs[slot] = callback
    if slot == 0:
        cbs[2] = hung_up if callback is not None else None
    mask = _mask(cbs)
    if mask:
        selector.modify(sock, mask, cbs)
    else:
        selector.unregister(sock)


def _mask(cbs: list[Callback | None]) -> int:
    return (_READ if cbs[0] else 0) | (_WRITE if cbs[1] else 0) | (_HANGUP if cbs[2] else 0)


def _note_signal(signum: int, frame: object) -> None:
    """Python-level handler: the work happens in the loop, woken through the wakeup fd."""
