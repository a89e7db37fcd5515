"""The messages between the supervisor and its workers (see hbd.workers), and the worker's end of
the two pipes.

One frame per message: a 4-byte big-endian payload length, a 1-byte kind, the payload. The peer
registry's messages (a storm's hundreds of thousands of reports, and the marks sent back) are packed
by ``struct``: fixed fields first, then each string as a 2-byte length and its UTF-8 (0xFFFF: None),
then lists as a count and their items; decoding one checks every length against its frame and that
the frame holds nothing more (JSON took the supervisor ~4 times the CPU a report). The rare ones
(Ready, Status, Numbers, LogLine, Reloaded) are JSON; none is ever unpickled by the supervisor. The
one supervisor -> worker message of its own, ``Reload``, carries the validated ``ServerConfig``
pickled: the worker applies the configuration the supervisor checked and never reads the file itself
(it could have changed in between). Both pipes are private to the two processes (created before the
fork).

Below both hbd.server (which reports through it) and hbd.workers (which reads it), so neither
imports the other to talk over it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import select
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hbd.errors import HbdError

if TYPE_CHECKING:
    from hbd.config import ServerConfig
    from hbd.loop import EventLoop

HEADER = struct.Struct(">IB")
MAX_FRAME = 1024 * 1024  # a bigger frame is garbage: the config file itself is at most 64 KB
MAX_ERRORS = 16  # bad frames' errors a decoder keeps until they are logged


class CodecError(HbdError):
    """Bytes on the pipe that are not a frame we know, or a message that cannot be one (a bug: the
    other end is ours)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker listens."""


@dataclass(frozen=True, slots=True)
class Status:
    clients: int
    late: int


@dataclass(frozen=True, slots=True)
class Numbers:
    """The worker's counters, for the supervisor's metrics."""

    values: dict


@dataclass(frozen=True, slots=True)
class LogLine:
    """A warning or error line for the supervisor's log file."""

    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Reloaded:
    """The outcome of a reload: error None means applied."""

    error: str | None = None


@dataclass(frozen=True, slots=True)
class Reload:
    """Supervisor -> worker: apply this (validated) configuration."""

    config: ServerConfig


# -- the peer registry (hbd.registry_remote in the worker, hbd.supervisor_registry in the supervisor) ---
# ``conn`` is the worker's own number for one connection (a counter, never reused: a reused fd cannot
# be confused). Times are monotonic: one host, one clock. Nothing goes up per ping except while a
# peer rises (``rise:``, PeerPinged). Not frozen: a frozen dataclass's __init__ took 5 times as long
# (object.__setattr__ per field), paid per report and per mark; nothing changes one after it is made.
@dataclass(slots=True)
class PeerHello:
    """A connection greeted (the registry may refuse the name at once)."""

    conn: int
    name: str
    certificate: str | None
    address: str


@dataclass(slots=True)
class PeerConnected:
    """A connection's first ping."""

    conn: int
    name: str | None
    certificate: str | None
    address: str
    timeout: float


@dataclass(slots=True)
class PeerPinged:
    """A ping on a watched connection (its peer is rising)."""

    conn: int
    silent_for: float


@dataclass(slots=True)
class PeerLate:
    conn: int


@dataclass(slots=True)
class PeerBack:
    conn: int


@dataclass(slots=True)
class PeerGone:
    """A connection that pinged has ended."""

    conn: int
    reason: str
    last_ping: float | None


@dataclass(slots=True)
class PeerClose:
    """Supervisor -> worker: close this connection (a refused name, a takeover)."""

    conn: int
    reason: str
    level: int


@dataclass(slots=True)
class PeerWatch:
    """Supervisor -> worker: report this connection's every ping while ``on`` (its peer rises)."""

    conn: int
    on: bool


@dataclass(slots=True)
class PeerMark:
    """Supervisor -> worker: what the registry says of this connection's peer, for its status row
    (sent when it changes, never per ping)."""

    conn: int
    peer: str
    named: bool
    state: str
    since: float
    reason: str
    expected: bool
    flags: Sequence[str]  # (decoded: lists; the supervisor sends its own tuples, not copies)
    labels: Sequence[Sequence[str]]
    silenced_until: float | None
    # The registry's accounting of the peer (hbd.peer_uptime.Account.copy(): it changes with the
    # state), so that the worker's row shows its 24 h uptime, outages and down time as one process does.
    outages: int = 0
    down: float = 0.0
    spans: Sequence[Sequence[object]] = field(default_factory=list)  # (monotonic start, state), at most MAX_SPANS


@dataclass(slots=True)
class PeerKnown:
    """Supervisor -> worker: this connection greeted with a known peer's name; until its first ping
    the registry's row of that peer stands for it (as in one process)."""

    conn: int


PeerReport = PeerHello | PeerConnected | PeerPinged | PeerLate | PeerBack | PeerGone
PeerOrder = PeerClose | PeerWatch | PeerMark | PeerKnown
MAX_REASON = 256  # characters of a reason sent up (a TLS error can be long; frames stay under PIPE_BUF)

Message = Ready | Status | Numbers | LogLine | Reloaded | Reload | PeerReport | PeerOrder
UP_KINDS: dict[type, int] = {
    Ready: 1,
    Status: 2,
    Numbers: 3,
    LogLine: 4,
    Reloaded: 5,
    PeerHello: 20,
    PeerConnected: 21,
    PeerPinged: 22,
    PeerLate: 23,
    PeerBack: 24,
    PeerGone: 25,
}  # worker -> supervisor
DOWN_KINDS: dict[type, int] = {
    Reload: 10,
    PeerClose: 30,
    PeerWatch: 31,
    PeerMark: 32,
    PeerKnown: 33,
}  # supervisor -> worker
KINDS = {**UP_KINDS, **DOWN_KINDS}


# -- the peer registry's messages, packed ----------------------------------------------------------
# The fixed part of each (a struct) ends with the lengths of its strings (NONE: None), which follow it
# as UTF-8: the supervisor decodes a report with one unpack and a slice per string, and the lengths
# must add up to the frame's exactly. A mark's lists follow its strings, each item after its count.
_CONN = struct.Struct(">q")  # PeerLate, PeerBack, PeerKnown
_PINGED = struct.Struct(">qd")
_HELLO = struct.Struct(">qHHH")  # conn; name, certificate, address
_CONNECTED = struct.Struct(">qdHHH")  # conn, timeout; name, certificate, address
_GONE = struct.Struct(">q?dH")  # conn, pinged, last ping; reason
_CLOSE = struct.Struct(">qiH")  # conn, log level; reason
_WATCH = struct.Struct(">q?")
_MARK = struct.Struct(">q??d?dqdHHH")  # conn named expected since silenced until outages down; 3 counts
_SPAN = struct.Struct(">d")
_LEN = struct.Struct(">H")
NONE = 0xFFFF  # a string's length that stands for None
MAX_STRING = NONE - 1  # bytes of one string


def _b(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")  # any str (a reason may carry anything) round-trips
    if len(data) > MAX_STRING:
        raise CodecError(f"a string of {len(data)} bytes is more than a frame field holds ({MAX_STRING})")
    return data


def _n(data: bytes | None) -> int:
    return NONE if data is None else len(data)


def _text(data: bytes, at: int, n: int) -> str:
    return data[at : at + n].decode("utf-8", "surrogatepass")


def _exact(data: bytes, at: int, cls: type) -> None:
    if at != len(data):
        raise CodecError(f"bad {cls.__name__} frame: its lengths add up to {at} bytes, not {len(data)}")


def _pack_hello(m: PeerHello) -> bytes:
    name, addr = _b(m.name), _b(m.address)
    cert = None if m.certificate is None else _b(m.certificate)
    return _HELLO.pack(m.conn, len(name), _n(cert), len(addr)) + name + (cert or b"") + addr


def _unpack_hello(data: bytes) -> Message:
    conn, a, c, d = _HELLO.unpack_from(data)
    at = _HELLO.size
    name = _text(data, at, a)
    at += a
    cert = None
    if c != NONE:
        cert = _text(data, at, c)
        at += c
    addr = _text(data, at, d)
    _exact(data, at + d, PeerHello)
    return PeerHello(conn, name, cert, addr)


def _pack_connected(m: PeerConnected) -> bytes:
    name = None if m.name is None else _b(m.name)
    cert = None if m.certificate is None else _b(m.certificate)
    addr = _b(m.address)
    head = _CONNECTED.pack(m.conn, m.timeout, _n(name), _n(cert), len(addr))
    return head + (name or b"") + (cert or b"") + addr


def _unpack_connected(data: bytes) -> Message:
    conn, timeout, a, c, d = _CONNECTED.unpack_from(data)
    at = _CONNECTED.size
    name = cert = None
    if a != NONE:
        name = _text(data, at, a)
        at += a
    if c != NONE:
        cert = _text(data, at, c)
        at += c
    addr = _text(data, at, d)
    _exact(data, at + d, PeerConnected)
    return PeerConnected(conn, name, cert, addr, timeout)


def _pack_gone(m: PeerGone) -> bytes:
    reason = _b(m.reason)
    return _GONE.pack(m.conn, m.last_ping is not None, m.last_ping or 0.0, len(reason)) + reason


def _unpack_gone(data: bytes) -> Message:
    conn, pinged, last, n = _GONE.unpack_from(data)
    _exact(data, _GONE.size + n, PeerGone)
    return PeerGone(conn, _text(data, _GONE.size, n), last if pinged else None)


def _pack_close(m: PeerClose) -> bytes:
    reason = _b(m.reason)
    return _CLOSE.pack(m.conn, m.level, len(reason)) + reason


def _unpack_close(data: bytes) -> Message:
    conn, level, n = _CLOSE.unpack_from(data)
    _exact(data, _CLOSE.size + n, PeerClose)
    return PeerClose(conn, _text(data, _CLOSE.size, n), level)


def _fixed(st: struct.Struct, cls: Callable[..., Message]) -> Callable[[bytes], Message]:
    """A message of fixed fields only."""

    def unpack(data: bytes) -> Message:
        _exact(data, st.size, cls)  # type: ignore[arg-type]
        return cls(*st.unpack(data))

    return unpack


def _s(value: str) -> bytes:
    data = _b(value)
    return _LEN.pack(len(data)) + data


def _pack_mark(m: PeerMark) -> bytes:
    until = m.silenced_until
    out = [
        _MARK.pack(
            m.conn,
            m.named,
            m.expected,
            m.since,
            until is not None,
            until or 0.0,
            m.outages,
            m.down,
            len(m.flags),
            len(m.labels),
            len(m.spans),
        ),
        _s(m.peer),
        _s(m.state),
        _s(m.reason),
    ]
    out += [_s(f) for f in m.flags]
    for label in m.labels:
        if len(label) != 2:
            raise CodecError(f"a label is a (name, value) pair, not {label!r}")
        out += (_s(label[0]), _s(label[1]))
    for span in m.spans:
        start, state = span
        if not isinstance(start, int | float) or not isinstance(state, str):
            raise CodecError(f"a span is a (start, state) pair, not {span!r}")
        out += (_SPAN.pack(start), _s(state))
    return b"".join(out)


class _Reader:
    """A mark's payload, read front to back (past its end: struct.error, or CodecError)."""

    __slots__ = ("at", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def fixed(self, st: struct.Struct) -> tuple:
        at = self.at
        self.at = at + st.size
        return st.unpack_from(self.data, at)

    def str(self) -> str:
        data, at = self.data, self.at
        (n,) = _LEN.unpack_from(data, at)
        at += 2
        end = self.at = at + n
        if end > len(data):
            raise CodecError(f"bad PeerMark frame: a string of {n} bytes past its end")
        return data[at:end].decode("utf-8", "surrogatepass")


def _unpack_mark(data: bytes) -> Message:
    r = _Reader(data)
    conn, named, expected, since, silenced, until, outages, down, flags, labels, spans = r.fixed(_MARK)
    peer, state, reason = r.str(), r.str(), r.str()
    mark = PeerMark(
        conn,
        peer,
        named,
        state,
        since,
        reason,
        expected,
        [r.str() for _ in range(flags)],
        [[r.str(), r.str()] for _ in range(labels)],
        until if silenced else None,
        outages,
        down,
        [[r.fixed(_SPAN)[0], r.str()] for _ in range(spans)],
    )
    _exact(data, r.at, PeerMark)
    return mark


_PACK: dict[type, Callable[..., bytes]] = {
    PeerHello: _pack_hello,
    PeerConnected: _pack_connected,
    PeerPinged: lambda m: _PINGED.pack(m.conn, m.silent_for),
    PeerLate: lambda m: _CONN.pack(m.conn),
    PeerBack: lambda m: _CONN.pack(m.conn),
    PeerGone: _pack_gone,
    PeerClose: _pack_close,
    PeerWatch: lambda m: _WATCH.pack(m.conn, m.on),
    PeerKnown: lambda m: _CONN.pack(m.conn),
    PeerMark: _pack_mark,
}
_UNPACK: dict[type, Callable[[bytes], Message]] = {
    PeerHello: _unpack_hello,
    PeerConnected: _unpack_connected,
    PeerPinged: _fixed(_PINGED, PeerPinged),
    PeerLate: _fixed(_CONN, PeerLate),
    PeerBack: _fixed(_CONN, PeerBack),
    PeerGone: _unpack_gone,
    PeerClose: _unpack_close,
    PeerWatch: _fixed(_WATCH, PeerWatch),
    PeerKnown: _fixed(_CONN, PeerKnown),
    PeerMark: _unpack_mark,
}


def encode(msg: Message) -> bytes:
    cls = type(msg)
    if cls in _PACK:
        kind, payload = KINDS[cls], _PACK[cls](msg)
    elif isinstance(msg, Reload):
        # Without the expected peers: the registry is the supervisor's, and 100,000 of them (a
        # peers_file) would not fit a frame.
        config = dataclasses.replace(msg.config, peers=())
        kind, payload = DOWN_KINDS[Reload], pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        fields = (
            {"values": msg.values} if isinstance(msg, Numbers) else {k: getattr(msg, k) for k in type(msg).__slots__}
        )
        kind, payload = KINDS[cls], json.dumps(fields).encode()
    if len(payload) > MAX_FRAME:
        raise CodecError(f"{type(msg).__name__}: {len(payload)} bytes is more than a frame holds ({MAX_FRAME})")
    return HEADER.pack(len(payload), kind) + payload


class Decoder:
    """Frames in, messages out. ``down``: the worker's decoder (Reload and the registry's orders);
    the supervisor's takes the worker's messages and never unpickles.

    Both ends are ours, so a bad frame is a bug; it never raises out of ``feed`` (that lost the good
    messages read with it): a frame whose payload is wrong is skipped, its error kept in ``errors``
    (the frames after it are still good); a header that is not a frame means the stream is lost (where
    the next frame starts is unknown), so ``broken`` says why and nothing more is decoded or buffered
    (the caller restarts the other end). The buffer holds at most one frame (MAX_FRAME)."""

    def __init__(self, down: bool = False) -> None:
        self.kinds = {v: k for k, v in (DOWN_KINDS if down else UP_KINDS).items()}
        self.buf = b""
        self.errors: list[str] = []  # bad frames skipped since the caller last took them (at most MAX_ERRORS)
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self.broken is not None:
            return []
        buf = self.buf + data if self.buf else data
        out: list[Message] = []
        at, end = 0, len(buf)  # an offset, not a slice per frame: a 64 KB read of small frames stays O(n)
        kinds, unpack = self.kinds, _UNPACK
        while end - at >= HEADER.size:
            size, kind = HEADER.unpack_from(buf, at)
            cls = kinds.get(kind)
            if cls is None or size > MAX_FRAME:
                self.buf = b""
                self.broken = f"not a frame: kind {kind}, {size} bytes"
                return out
            start = at + HEADER.size
            if end < start + size:
                break
            at = start + size
            packed = unpack.get(cls)
            try:
                if packed is not None:
                    out.append(packed(buf[start:at]))
                else:
                    out.append(self._message(cls, buf[start:at]))
            except (struct.error, UnicodeDecodeError) as exc:
                self._bad(f"bad {cls.__name__} frame: {exc}")
            except CodecError as exc:
                self._bad(str(exc))
        self.buf = buf[at:]
        return out

    def _bad(self, error: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors

    @staticmethod
    def _message(cls: type, payload: bytes) -> Message:
        if cls is Reload:
            return Reload(pickle.loads(payload))  # only from our own supervisor's private pipe
        try:
            fields = json.loads(payload)
            msg = cls(**fields)
        except (ValueError, TypeError) as exc:
            raise CodecError(f"bad {cls.__name__} frame: {exc}") from None
        return msg


# Bytes read from a pipe per loop turn: about 200 peer reports (a PeerGone frame is about 80
# bytes, handling one in the supervisor 40-70 us). After a mass disconnect every worker's pipe is
# full: 64 KB reads from 6 of them were 5,000 reports in one turn; the rest stays in the pipe (and
# the pipe stays readable) for the next turns.
PIPE_READ = 16384
MAX_PENDING = 4 << 20  # bytes of registry reports a worker keeps while its pipe is full (~40,000 reports)
REPORTS = (PeerHello, PeerConnected, PeerPinged, PeerLate, PeerBack, PeerGone)


class WorkerChannel:
    """The worker's end of the pipes. Writes never block: if the supervisor is not reading, a
    status or log message is dropped (the worker's own terminal/journald output still has its log
    lines); the registry's reports are not (a lost ``gone`` would leave a peer UP for ever): they
    wait in order, up to MAX_PENDING, until the pipe takes them (a reconnect storm of thousands of
    peers fills a 64 KB pipe faster than the supervisor's loop turns). While any wait, nothing else
    is written, so frames never interleave. ``attach()`` starts reading the supervisor's messages on
    the worker's loop."""

    def __init__(self, fd: int, index: int = 0, config: ServerConfig | None = None, rfd: int = -1) -> None:
        self.fd = fd
        self.rfd = rfd  # the supervisor -> worker pipe (-1: none)
        self.index = index  # which worker this is (its status socket is <control_socket>.<index>)
        self.config = config  # the latest configuration the supervisor sent: the one a reload applies
        self.decoder = Decoder(down=True)
        self.pending = bytearray()  # reports the pipe did not take yet
        self.lost = 0  # reports dropped past MAX_PENDING (the supervisor is hung: it will be restarted)
        self.loop: EventLoop | None = None
        os.set_blocking(fd, False)

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        while len(frame) > select.PIPE_BUF and isinstance(msg, LogLine) and msg.message:
            msg = LogLine(msg.level, msg.message[: len(msg.message) // 2])  # a long line: its start
            frame = encode(msg)
        if len(frame) > select.PIPE_BUF:
            return  # only writes up to PIPE_BUF are all-or-nothing: a torn frame would garble the rest
        report = isinstance(msg, REPORTS)
        if self.pending:
            if report:
                self._queue(frame)
            return  # the pipe is full: a status or log line is dropped, as it always was
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            if report:
                self._queue(frame)
        except BrokenPipeError:
            pass

    def _queue(self, frame: bytes) -> None:
        if len(self.pending) + len(frame) > MAX_PENDING:
            if not self.lost:
                logging.getLogger("hbd").error("the supervisor does not read its pipe: peer reports are lost")
            self.lost += 1
            return
        self.pending += frame
        if self.loop is not None:
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        """The pipe takes more: as much of the waiting reports as it will (a partial write is fine:
        nothing else is written meanwhile)."""
        try:
            n = os.write(self.fd, self.pending)
        except BlockingIOError:
            return
        except OSError:  # the supervisor is gone
            n = len(self.pending)
        del self.pending[:n]
        if not self.pending and self.loop is not None:
            self.loop.remove_writer(self.fd)

    def attach(
        self,
        loop: EventLoop,
        reload: Callable[[], object],
        orders: Callable[[PeerOrder], object] | None = None,
        stop: Callable[[], object] | None = None,
    ) -> None:
        """On each Reload from the supervisor: keep its config, then call ``reload()``; the
        registry's orders go to ``orders``. If the pipe's stream is lost (a bug), ``stop()`` (the
        loop's, by default): the worker exits and the supervisor starts a new one."""
        self.loop = loop
        stop = stop or loop.stop
        if self.pending:
            loop.add_writer(self.fd, self._flush)
        if self.rfd < 0:
            return
        os.set_blocking(self.rfd, False)

        def on_read() -> None:
            try:
                data = os.read(self.rfd, PIPE_READ)
            except BlockingIOError:
                return
            if not data:  # the supervisor is gone: it will not send again
                loop.forget(self.rfd)
                return
            decoder = self.decoder
            for msg in decoder.feed(data):
                if isinstance(msg, Reload):
                    self.config = msg.config
                    reload()
                elif orders is not None and isinstance(msg, PeerClose | PeerWatch | PeerMark | PeerKnown):
                    orders(msg)
            for error in decoder.take_errors():  # (a bug: skipped, the next frames are good)
                logging.getLogger("hbd").error("the supervisor's pipe: %s", error)
            if decoder.broken is not None:  # no order can be read any more: a new worker will be started
                logging.getLogger("hbd").error("the supervisor's pipe: %s; this worker stops", decoder.broken)
                loop.forget(self.rfd)
                stop()

        loop.add_reader(self.rfd, on_read)


class PipeLogHandler(logging.Handler):
    """In a worker: warnings and errors go up the pipe for the supervisor's log file."""

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__(logging.WARNING)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.send(LogLine(record.levelno, record.getMessage()))
