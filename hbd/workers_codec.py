"""The messages between the supervisor and its workers (see hbd.workers), and the worker's end of
the two pipes.

One frame per message: a 4-byte big-endian payload length, a 1-byte kind, the payload. Worker ->
supervisor payloads are JSON (small, and never unpickled by the supervisor); the one supervisor ->
worker message, ``Reload``, carries the validated ``ServerConfig`` pickled: the worker applies the
configuration the supervisor checked and never reads the file itself (it could have changed in
between). Both pipes are private to the two processes (created before the fork).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hbd.config import ServerConfig
    from hbd.loop import EventLoop

HEADER = struct.Struct(">IB")
MAX_FRAME = 1024 * 1024  # a bigger frame is garbage: the config file itself is at most 64 KB


class CodecError(Exception):
    """Bytes on the pipe that are not a frame we know (a bug: the other end is ours)."""


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


Message = Ready | Status | Numbers | LogLine | Reloaded | Reload
UP_KINDS = {Ready: 1, Status: 2, Numbers: 3, LogLine: 4, Reloaded: 5}  # worker -> supervisor
DOWN_KINDS = {Reload: 10}  # supervisor -> worker


def encode(msg: Message) -> bytes:
    if isinstance(msg, Reload):
        # Without the expected peers: the registry is the supervisor's, and 100,000 of them (a
        # peers_file) would not fit a frame.
        config = dataclasses.replace(msg.config, peers=())
        kind, payload = DOWN_KINDS[Reload], pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        fields = (
            {"values": msg.values} if isinstance(msg, Numbers) else {k: getattr(msg, k) for k in type(msg).__slots__}
        )
        kind, payload = UP_KINDS[type(msg)], json.dumps(fields).encode()
    if len(payload) > MAX_FRAME:
        raise CodecError(f"{type(msg).__name__}: {len(payload)} bytes is more than a frame holds ({MAX_FRAME})")
    return HEADER.pack(len(payload), kind) + payload


class Decoder:
    """Frames in, messages out. ``down``: the worker's decoder (it takes Reload and nothing else);
    the supervisor's takes the worker's messages and never unpickles."""

    def __init__(self, down: bool = False) -> None:
        self.kinds = {v: k for k, v in (DOWN_KINDS if down else UP_KINDS).items()}
        self.buf = b""

    def feed(self, data: bytes) -> list[Message]:
        buf = self.buf + data
        out: list[Message] = []
        while len(buf) >= HEADER.size:
            size, kind = HEADER.unpack_from(buf)
            cls = self.kinds.get(kind)
            if cls is None or size > MAX_FRAME:
                self.buf = b""
                raise CodecError(f"not a frame: kind {kind}, {size} bytes")
            if len(buf) < HEADER.size + size:
                break
            payload, buf = buf[HEADER.size : HEADER.size + size], buf[HEADER.size + size :]
            out.append(self._message(cls, payload))
        self.buf = buf
        return out

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


class WorkerChannel:
    """The worker's end of the pipes. Writes never block: if the supervisor is not reading, the
    message is dropped (the worker's own terminal/journald output still has its log lines).
    ``attach()`` starts reading the supervisor's Reload messages on the worker's loop."""

    def __init__(self, fd: int, index: int = 0, config: ServerConfig | None = None, rfd: int = -1) -> None:
        self.fd = fd
        self.rfd = rfd  # the supervisor -> worker pipe (-1: none)
        self.index = index  # which worker this is (its status socket is <control_socket>.<index>)
        self.config = config  # the latest configuration the supervisor sent: the one a reload applies
        self.decoder = Decoder(down=True)
        os.set_blocking(fd, False)

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        while len(frame) > select.PIPE_BUF and isinstance(msg, LogLine) and msg.message:
            msg = LogLine(msg.level, msg.message[: len(msg.message) // 2])  # a long line: its start
            frame = encode(msg)
        if len(frame) > select.PIPE_BUF:
            return  # only writes up to PIPE_BUF are all-or-nothing: a torn frame would garble the rest
        try:
            os.write(self.fd, frame)
        except (BlockingIOError, BrokenPipeError):
            pass

    def attach(self, loop: EventLoop, reload: Callable[[], object]) -> None:
        """On each Reload from the supervisor: keep its config, then call ``reload()``."""
        if self.rfd < 0:
            return
        os.set_blocking(self.rfd, False)

        def on_read() -> None:
            try:
                data = os.read(self.rfd, 65536)
            except BlockingIOError:
                return
            if not data:  # the supervisor is gone: it will not send again
                loop.forget(self.rfd)
                return
            for msg in self.decoder.feed(data):
                if isinstance(msg, Reload):
                    self.config = msg.config
                    reload()

        loop.add_reader(self.rfd, on_read)


class PipeLogHandler(logging.Handler):
    """In a worker: warnings and errors go up the pipe for the supervisor's log file."""

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__(logging.WARNING)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.send(LogLine(record.levelno, record.getMessage()))
