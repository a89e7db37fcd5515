"""The hbd wire protocol and liveness rules, as pure state machines (sans-I/O).

Nothing here touches a socket, a clock or a logger: callers feed bytes together with the current
monotonic time and get back the bytes to send, events, and the next deadline to wake up at.

Wire format (see docs/protocol.md):
  client -> server   ``ping`` bare (legacy) or ``ping\\n`` / ``ping\\r\\n`` (line form)
                     ``hello <name>[ <interval>]\\n`` optional greeting, before the first ping;
                     repeated later only to change the interval (same name, about once a second)
  server -> client   ``pong`` in the form of the ping it answers: the terminator after a ping is
                     echoed after the pong, so a bare ping gets a bare pong and ``ping\\n`` gets
                     ``pong\\n`` however the bytes are split across reads.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from enum import Enum

from hbd.errors import ProtocolError as ProtocolError  # re-exported: where callers import it from

PING = b"ping"
PONG = b"pong"
PING_LINE = b"ping\n"
PONG_LINE = b"pong\n"
HELLO = b"hello "
# Longest greeting line we accept; also bounds how much a peer can make us buffer.
MAX_LINE = 256
# Bytes a peer may send without a valid ping before we call it garbage (blank lines, a greeting).
MAX_JUNK = 1024
# A connection may greet again (a client reload changed its interval) once per GREETING_GAP
# seconds on average, with bursts of GREETING_BURST (network and scheduling jitter).
GREETING_GAP = 1.0
GREETING_BURST = 3
STALLS_KEPT = 16  # our own stalls a client link remembers to forgive their time (see ClientLink.extend)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}\Z"  # a peer name in a greeting
_NAME_RE = re.compile(NAME_PATTERN.encode())
_TOKENS = (PING, b"\r\n", b"\n", HELLO)


class PeerState(Enum):
    NEW = "NEW"  # connected, no ping yet: becomes UP with its first ping (hooks and status wait for it)
    UP = "UP"
    LATE = "LATE"
    DEAD = "DEAD"
    # Set by the server (never by this class) on a peer whose every ping it must hear: the peer
    # registry's rise count. Like any state other than UP, the next ping reports a StateChange to
    # UP, so the ping path gains no test for it; the server sets RISING again while it counts.
    RISING = "RISING"


_UP = PeerState.UP  # a module global: reading an Enum member through its class costs about 0.1 us

# Halves of timeouts, and the timeouts they are halves of, as shared float objects: peers with the same
# timeout (most: the config's) share one object for its half and read back the config's own, where a
# product per peer would be a float (24 bytes) per connection, twice over where others keep what they
# read. Bounded (timeouts come from the config and from greetings, whose intervals are anyone's): a full
# memo starts over, so strangers' timeouts cannot keep out one every peer has (a reload's) for good.
_HALF: dict[float, float] = {}
_WHOLE: dict[float, float] = {}
HALVES_KEPT = 256


def _half(timeout: float) -> float:
    half = _HALF.get(timeout)
    if half is None:
        if len(_HALF) >= HALVES_KEPT:
            _HALF.clear()
            _WHOLE.clear()
        half = _HALF[timeout] = timeout * 0.5
        _WHOLE[half] = timeout
    return half


_BURST = float(GREETING_BURST)  # one float for every peer's full bucket, not 24 bytes each


@dataclass(frozen=True, slots=True)
class Hello:
    """A client greeted us with its name (and optionally the ping interval it intends to use)."""

    name: str
    interval: float | None


def peer_timeout(base: float, interval: float | None) -> float:
    """A client that announced its ping interval may stay silent for at least 3 intervals."""
    return base if interval is None else max(base, 3 * interval)


@dataclass(frozen=True, slots=True)
class StateChange:
    old: PeerState
    new: PeerState
    silent_for: float


class ServerPeer:
    """One connected client as the server sees it: framing plus the silence rule.

    The peer is NEW until its first ping, UP while pings arrive, LATE once silent for more than
    half its timeout and DEAD when silent for longer than ``timeout``. A NEW peer is never LATE:
    it goes straight to DEAD at its timeout (it was never up, so there is nothing to suspect).
    Only complete, valid messages count as life: a peer that trickles bytes or sends garbage does
    not extend its deadline.
    """

    __slots__ = (
        "_buf",
        "_echo",
        "_greeted",
        "_greetings",
        "_junk",
        "_state",
        "due_in",
        "events",
        "interval",
        "last_heard",
        "name",
        "pings",
    )

    def __init__(self, now: float, timeout: float) -> None:
        self._state = PeerState.NEW
        self.due_in = timeout  # (the timeout, while not UP: see the setters below)
        self.last_heard = now
        self.pings = 0
        self.name: str | None = None
        self.interval: float | None = None  # announced in the greeting
        # Rare events (greetings, state changes) for the caller to drain; None rather than an empty
        # list per peer, which would cost 56 bytes for each of thousands of connections.
        self.events: list[Hello | StateChange] | None = None
        self._buf = b""
        self._echo = False  # the previous token was a ping: echo its line terminator
        self._junk = 0
        self._greeted = 0.0  # when the last greeting came
        self._greetings = _BURST  # greetings allowed now (a token bucket)

    # The state and the timeout are kept as the state and the seconds after ``last_heard`` that its next
    # verdict is due (``due_in``: half the timeout while UP, when it would be LATE; else the timeout),
    # which the deadline wheel reads once a ping (hbd.liveness): one attribute, not a product, a test and
    # two attributes. Both are set through these setters only; halving and doubling are exact in
    # binary floating point, so ``timeout`` reads back exactly what was set.
    @property
    def state(self) -> PeerState:
        return self._state

    @state.setter
    def state(self, new: PeerState) -> None:
        timeout = self.timeout
        self._state = new
        self.due_in = _half(timeout) if new is _UP else timeout

    @property
    def timeout(self) -> float:
        due_in = self.due_in
        if self._state is not _UP:
            return due_in
        timeout = _WHOLE.get(due_in)
        return due_in * 2.0 if timeout is None else timeout

    @timeout.setter
    def timeout(self, timeout: float) -> None:
        self.due_in = _half(timeout) if self._state is _UP else timeout

    def feed(self, data: bytes, now: float) -> bytes:
        """Consume received bytes; return the reply to send (may be empty).

        Raises ProtocolError on garbage or when the peer exceeds the input bounds.
        """
        # (A plain connection answers the usual read, one whole ping from an UP peer, itself: hbd.connection)
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pings = 0
        pos = 0
        end = len(buf)
        while pos < end:
            if buf.startswith(PING, pos):
                pos += 4
                pings += 1
                out.append(PONG)
                self._echo = True
                self._junk = 0  # here, not once per read: the allowance must not depend on splits
                continue
            if buf.startswith(b"\n", pos) or buf.startswith(b"\r\n", pos):
                term = b"\n" if buf[pos] == 10 else b"\r\n"
                pos += len(term)
                if self._echo:
                    out.append(term)
                    self._echo = False
                else:
                    self._count_junk(len(term))
                continue
            if buf.startswith(HELLO, pos):
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if end - pos > MAX_LINE:
                        raise ProtocolError(f"greeting line longer than {MAX_LINE} bytes")
                    break
                if nl - pos > MAX_LINE:  # the same limit as for a line still arriving, however split
                    raise ProtocolError(f"greeting line longer than {MAX_LINE} bytes")
                self._hello(buf[pos + len(HELLO) : nl].rstrip(b"\r"), now, bool(pings or self.pings))
                self._count_junk(nl + 1 - pos)
                self._echo = False
                pos = nl + 1
                continue
            rest = buf[pos : pos + 6]
            if any(tok.startswith(rest) for tok in _TOKENS):
                break  # an incomplete token at the end: wait for more bytes
            raise ProtocolError(f"unexpected bytes {bytes(buf[pos : pos + 16])!r}")
        self._buf = buf[pos:] if pos < end else b""
        if pings:
            self._alive(now, pings)
        return b"".join(out)

    def _alive(self, now: float, pings: int) -> None:
        if self._state is not _UP:
            self._event(StateChange(self._state, PeerState.UP, now - self.last_heard))
            self.state = PeerState.UP
        self.last_heard = now
        self.pings += pings
        self._junk = 0

    def _event(self, event: Hello | StateChange) -> None:
        if self.events is None:
            self.events = [event]
        else:
            self.events.append(event)

    def _count_junk(self, n: int) -> None:
        self._junk += n
        if self._junk > MAX_JUNK:
            raise ProtocolError(f"more than {MAX_JUNK} bytes without a ping")

    def _hello(self, line: bytes, now: float, pinged: bool) -> None:
        parts = line.split(b" ")
        if len(parts) > 2 or not _NAME_RE.match(parts[0]):
            raise ProtocolError(f"malformed greeting {line[:64]!r}")
        interval = None
        if len(parts) == 2:
            try:
                interval = float(parts[1])
            except ValueError:
                raise ProtocolError(f"malformed greeting interval {parts[1][:16]!r}") from None
            if not 0 < interval < 86400:
                raise ProtocolError(f"greeting interval out of range: {interval}")
        name = parts[0].decode("ascii")
        if self.name is None:
            if pinged:  # else a peer could ping at one pace and then claim a slower one
                raise ProtocolError("greeting after the first ping")
        elif name != self.name:
            raise ProtocolError(f"greeting as {name!r} on a connection that greeted as {self.name!r}")
        tokens = min(GREETING_BURST, self._greetings + (now - self._greeted) / GREETING_GAP)
        if tokens < 1:
            raise ProtocolError(f"greetings more often than once every {GREETING_GAP:g} s")
        self._greetings = tokens - 1
        self._greeted = now
        self.name = name
        self.interval = interval
        self._event(Hello(self.name, interval))

    def next_deadline(self) -> float:
        """When poll() may next change this peer's state: LATE at half its timeout while UP; LATE, or
        NEW (never LATE), closed at its timeout."""
        return self.last_heard + self.due_in

    def poll(self, now: float) -> StateChange | None:
        """Apply the silence rule at ``now``; return the state change, if any."""
        silent = now - self.last_heard
        if silent > self.timeout:
            new = PeerState.DEAD
        elif silent > self.timeout / 2 and self.state is not PeerState.NEW:
            new = PeerState.LATE
        else:
            return None
        if new is self.state:
            return None
        change = StateChange(self.state, new, silent)
        self.state = new
        return change


class Answers(Enum):
    """Does the server answer our pings (``ClientLink.answers``)? ANSWERING -> LATE -> ANSWERING, or -> DEAD (final)."""

    ANSWERING = "answering"
    LATE = "late"  # a ping unanswered for more than half of pong_timeout: a suspicion, worth a warning
    DEAD = "dead"  # a ping unanswered for longer than pong_timeout: the connection is given up


class ClientLink:
    """One client->server link: when to ping, pong parsing, RTT and the pong-timeout rule.

    ``poll(now)`` returns the bytes to send now (a ping when due) and moves ``answers`` (see Answers).
    """

    __slots__ = (
        "_buf",
        "_sent",
        "_stalls",
        "answers",
        "interval",
        "line",
        "next_ping",
        "pong_timeout",
        "pongs",
        "silent_for",
    )

    def __init__(self, now: float, interval: float, pong_timeout: float, line: bool = False) -> None:
        self.interval = interval
        self.pong_timeout = pong_timeout
        self.line = line
        self.next_ping = now
        self.answers = Answers.ANSWERING
        self._stalls: deque[tuple[float, float]] | None = None  # when our process did not run (extend())
        self.silent_for = 0.0  # age of the unanswered ping when the link was declared dead
        self.pongs = 0  # answers on this connection (RTTs are returned by feed(), counted by the caller once)
        self._sent: deque[float] = deque()
        self._buf = b""

    @property
    def outstanding(self) -> int:
        return len(self._sent)

    def waiting(self, now: float) -> float:
        """How long the oldest unanswered ping has been waiting (0 if none), less forgiven time."""
        if not self._sent:
            return 0.0
        start = self._sent[0]
        return now - start - self._forgiven(start, now)

    def _forgiven(self, since: float, now: float) -> float:
        """Seconds of [since, now] during which our own process did not run."""
        total = 0.0
        for start, end in self._stalls or ():
            lo = start if start > since else since
            hi = end if end < now else now
            if hi > lo:
                total += hi - lo
        return total

    def overdue(self, now: float) -> bool:
        """True when poll(now) would declare the link dead."""
        return bool(self._sent) and self.waiting(now) > self.pong_timeout

    def extend(self, planned: float, woke: float) -> None:
        """Our own process did not run from ``planned`` to ``woke`` (stopped or starved): that time
        does not count as waiting for a pong; time we spent working does."""
        if self._stalls is None:
            self._stalls = deque(maxlen=STALLS_KEPT)
        self._stalls.append((planned, woke))

    def poll(self, now: float) -> bytes:
        """Return a ping if one is due at ``now`` (else b""), and apply the pong timeout."""
        if self._sent:
            waited = self.waiting(now)
            if waited > self.pong_timeout:
                self.silent_for = waited
                self.answers = Answers.DEAD
            elif waited > self.pong_timeout / 2 and self.answers is Answers.ANSWERING:
                self.answers = Answers.LATE
        if self.answers is Answers.DEAD or now < self.next_ping:
            return b""
        self._sent.append(now)
        # Skip missed slots instead of bursting after a stall (as tornado's PeriodicCallback does).
        self.next_ping = max(self.next_ping + self.interval, now + self.interval / 2)
        return b"ping\n" if self.line else PING

    def retime(self, interval: float, pong_timeout: float) -> None:
        """New timings (a reload): the next ping moves as if the new interval had always applied."""
        self.next_ping += interval - self.interval
        self.interval = interval
        self.pong_timeout = pong_timeout

    def next_deadline(self) -> float:
        if self.answers is Answers.DEAD:
            return float("inf")
        if self._sent:
            start = self._sent[0] + self._forgiven(self._sent[0], float("inf"))
            late = self.answers is Answers.LATE
            # The first instant at which poll() finds the wait *longer* than the limit: waking exactly at
            # the limit would find nothing to do and re-arm for the same time (a spin in virtual time).
            return min(
                self.next_ping, math.nextafter(start + (self.pong_timeout if late else self.pong_timeout / 2), math.inf)
            )
        return self.next_ping

    def feed(self, data: bytes, now: float) -> list[float]:
        """Consume bytes from the server; return the RTT of each pong they complete."""
        buf = self._buf + data
        rtts: list[float] = []
        pos = 0
        end = len(buf)
        while pos < end:
            if buf.startswith(PONG, pos):
                if not self._sent:  # more pongs than pings: not an answer, and not a sign of life
                    raise ProtocolError("pong without a ping")
                pos += 4
                rtt = now - self._sent.popleft()
                rtts.append(rtt)
                self.pongs += 1
                continue
            if buf.startswith(b"\n", pos):
                pos += 1
                continue
            if buf.startswith(b"\r\n", pos):
                pos += 2
                continue
            rest = buf[pos:]
            if len(rest) < 4 and (PONG.startswith(rest) or rest == b"\r"):
                break
            raise ProtocolError(f"unexpected bytes from server {bytes(buf[pos : pos + 16])!r}")
        self._buf = buf[pos:]
        if rtts and self.answers is Answers.LATE and self.waiting(now) <= self.pong_timeout / 2:
            self.answers = Answers.ANSWERING
        return rtts
