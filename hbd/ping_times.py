"""A worker's last pings for its supervisor's scrape, as fixed-size binary records.

Only the worker that holds a connection knows when its peer last pinged (nothing goes up the pipe
per ping), so a scrape of a supervisor asks each worker (``pings``). That answer used to be a JSON
line ``["peer", time]`` per peer: at 100,000 peers about 36 ms of CPU per worker to write (17,000
``json.dumps``, ``round`` and f-strings; too little to be paced) and 85 ms in the supervisor to parse,
in the scrape's first second, while the pongs waited for the two cores. A record is now the worker's
number for the connection and its last ping (monotonic: the supervisor's loop reads the same clock),
16 bytes, packed and unpacked by ``struct`` in C; the supervisor keys it as its registry keys the
connection (``conn << WORKER_BITS | index``), so no name is written, escaped or parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from itertools import islice, starmap

RECORD = struct.Struct("<qd")  # the worker's connection number, its last ping (time.monotonic)
PER_CHUNK = 1024  # records per chunk: 16 KiB, well under a millisecond (a paced reply's slices stay short)
_INF = float("inf")


def chunks(pairs: Iterable[tuple[int, float]]) -> Iterator[bytes]:
    """``(connection number, last ping)`` pairs as records, PER_CHUNK a chunk."""
    it = iter(pairs)
    while chunk := b"".join(starmap(RECORD.pack, islice(it, PER_CHUNK))):
        yield chunk


class Reader:
    """One worker's records as they arrive, in chunks cut anywhere: a partial record waits for its rest."""

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> list[tuple[int, float]]:
        """The whole records of ``rest + data``; a time that is not finite is dropped (the exposition
        writes times with ``repr``, and ``round`` of an infinity raises)."""
        if self.rest:
            data = self.rest + data
        end = len(data) - len(data) % RECORD.size
        self.rest = data[end:]
        return [r for r in RECORD.iter_unpack(memoryview(data)[:end]) if -_INF < r[1] < _INF]
