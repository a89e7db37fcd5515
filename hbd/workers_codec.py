"""The worker's end of the supervisor <-> worker pipe (see hbd.workers).

Below both hbd.server (which reports through it) and hbd.workers (which reads it), so neither
imports the other to talk over it.
"""

from __future__ import annotations

import logging
import os


class WorkerChannel:
    """The worker's end of the pipe. Writes never block: if the supervisor is not reading, the
    line is dropped (the worker's own terminal/journald output still has it)."""

    def __init__(self, fd: int, index: int = 0) -> None:
        self.fd = fd
        self.index = index  # which worker this is (its status socket is <control_socket>.<index>)
        os.set_blocking(fd, False)

    def send(self, line: str) -> None:
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except (BlockingIOError, BrokenPipeError):
            pass


class PipeLogHandler(logging.Handler):
    """In a worker: warnings and errors go up the pipe for the supervisor's log file."""

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__(logging.WARNING)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.send(f"L{record.levelno} {record.getMessage()}")
