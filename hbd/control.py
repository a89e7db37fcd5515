"""Request/response sockets served by the daemon's own loop: the status socket (and, through the
same machinery, the metrics endpoint in ``hbd.metrics``).

A connection sends one request (a line; for HTTP, a header block), gets one reply and is closed.
Nothing here may stall the loop, whatever the peer does:

- input is bounded (``max_request``) and read without blocking; the whole request must arrive within
  ``REQUEST_DEADLINE`` of the accept (a total, not an idle timer that each byte resets: a peer
  trickling a byte now and then is closed all the same), and a reply that makes no progress for
  ``IDLE_TIMEOUT`` is dropped;
- a reply is an iterator of byte chunks pulled only while the output buffer is below
  ``HIGH_WATER``, so a 2 MB status of 19,000 peers is produced a slice at a time, across loop
  turns, as fast as the reader takes it. A chunk may be ``None``: "nothing yet", and the producer
  calls the ``wake`` it was given when it has more (used to relay the replies of worker processes);
- a big reply (seconds of work: a full status, a scrape at 100,000 peers) is paced by the
  process's ``hbd.pacing.Pacer``: each ``_on_write`` is a slice, timed on the loop's clock, and
  after its first ``BURST`` of CPU the reply rests between slices so that it takes at most a
  fraction of the wall-clock time (the CPU it leaves goes to the pongs of this process and others);
  a reply the handler marks ``Bulk`` (every peer's rows or values) is paced from its first slice;
- at most ``MAX_CONNECTIONS`` requests are served at once. When a new one comes and the table is
  full, the oldest connection that has not sent a whole request yet makes room (then one whose
  reply has stalled for a second); only when every slot is busy answering is the newcomer closed.
  So slow or silent peers cannot keep ``hbd status`` or a scrape out;
- out of file descriptors, accepts pause (``hbd.accept``) instead of spinning.

The status socket is a unix socket (``control_socket``, mode 0660), bound under a temporary name
and renamed into place so it never exists with looser permissions and a stale file left by a
crashed daemon is replaced; one that a live daemon still answers on is an error, not a takeover.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator

from hbd.accept import ACCEPT_PAUSE, Acceptor
from hbd.errors import BindError as BindError  # re-exported: where callers import it from
from hbd.logs import fields, log
from hbd.loop import EventLoop, Timer
from hbd.pacing import Duty, Pacer, pacer_for

Reply = Iterator[bytes | None]
Handler = Callable[[bytes, Callable[[], None]], Reply]

HIGH_WATER = 64 * 1024  # stop producing while this much output is still unsent
# ... and after this long of producing in one write callback: a pong waits behind a whole slice
# (64 KB of status rows were 6-8 ms, the RTT p99 of a full listing at 100,000 peers)
WRITE_SLICE = 0.002
BULK_SLICE = 0.001  # ... a bulk reply's (hbd.pacing): it rests three times as long after each
MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 10.0  # a reply making no progress for this long is dropped
REQUEST_DEADLINE = 3.0  # the whole request must have arrived this long after the accept
STALLED_REPLY = 1.0  # a full table evicts a reply that has made no progress for this long
LOG_EVERY = 10.0  # lines about slow or evicted peers: at most one per this many seconds
ACCEPT_BATCH = 16
SOCKET_MODE = 0o660


# Why a connection was closed, by the name it is counted under in ``dropped``.
_DROPPED_WHY = {
    "slow": f"no whole request within {REQUEST_DEADLINE:g} s of connecting",
    "evicted": f"all {MAX_CONNECTIONS} slots taken, this one still without a whole request",
    "refused": f"all {MAX_CONNECTIONS} slots busy answering",
}


class Bulk:
    """A reply that is bulk production (every peer's rows or values): hbd.pacing paces it from its
    first slice, at its smaller share, rather than after a burst."""

    __slots__ = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def __iter__(self) -> Bulk:
        return self

    def __next__(self) -> bytes | None:
        return next(self.reply)

    def close(self) -> None:
        close = getattr(self.reply, "close", None)
        if close is not None:
            close()


class _Conn:
    __slots__ = (
        "active",
        "closed",
        "duty",
        "inbuf",
        "outbuf",
        "pause",
        "reply",
        "requested",
        "sock",
        "timer",
        "waiting",
    )

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.requested = False  # the whole request has arrived
        self.inbuf = b""
        self.outbuf = b""
        self.reply: Reply | None = None
        self.waiting = False  # the reply said "nothing yet"; its producer will wake us
        self.closed = False
        self.active = now
        self.timer: Timer | None = None
        self.duty = Duty()  # the reply's work, for the pacer
        self.pause: Timer | None = None  # the reply rests (paced) until this fires


class RequestServer:
    def __init__(
        self,
        loop: EventLoop,
        sock: socket.socket,
        handler: Handler,
        *,
        terminator: bytes = b"\n",
        max_request: int = 1024,
        too_long: bytes = b'{"error": "request too long"}\n',
        name: str = "control socket",
        on_close: Callable[[], None] | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.pacer = pacer if pacer is not None else pacer_for(loop)
        self.too_long = too_long
        self.loop = loop
        self.sock = sock
        self.handler = handler
        self.terminator = terminator
        self.max_request = max_request
        self.name = name
        self.conns: dict[_Conn, None] = {}  # in the order they came: the first is the oldest
        self.peer_uid: int | None = None  # while the handler runs: the unix peer's uid (SO_PEERCRED)
        self._on_close = on_close
        self.dropped = {"slow": 0, "evicted": 0, "refused": 0}
        self._logged_at = float("-inf")
        self._held = 0  # drops not logged since the last line
        sock.setblocking(False)
        self.acceptor = Acceptor(loop, sock, self._accept, self._accept_failed, batch=ACCEPT_BATCH)

    def _accept(self, sock: socket.socket, _addr: object) -> None:
        if len(self.conns) >= MAX_CONNECTIONS and not self._make_room():
            self._drop_note("refused")
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock, self.loop.time())
        self.conns[conn] = None
        self.loop.add_reader(sock, functools.partial(self._on_read, conn))
        conn.timer = self.loop.call_later(REQUEST_DEADLINE, functools.partial(self._too_slow, conn))
        # A client sends its request as it connects: read (and answer) it in this turn, not two turns
        # later. Each turn of a busy supervisor can be seconds long (issue 14: 400,000 clients).
        self._on_read(conn)

    def _accept_failed(self, exc: OSError) -> None:
        log.error(
            "%s: cannot accept: %s; pausing accepts for %g s",
            self.name,
            exc.strerror,
            ACCEPT_PAUSE,
            extra=fields(event="accept-error"),
        )

    def _make_room(self) -> bool:
        """The table is full: close the oldest connection still sending its request, else one whose
        reply has stalled. False if every slot is busy answering."""
        now = self.loop.time()
        victim = next((c for c in self.conns if not c.requested), None)
        if victim is None:
            victim = next((c for c in self.conns if _stalled(c, now)), None)
        if victim is None:
            return False
        self._drop_note("evicted")
        self._close(victim)
        return True

    def _too_slow(self, conn: _Conn) -> None:
        conn.timer = None
        self._drop_note("slow")
        self._close(conn)

    def _drop_note(self, kind: str) -> None:
        """Count a connection closed for being slow (or refused), and say so at most every LOG_EVERY."""
        self.dropped[kind] += 1
        now = self.loop.time()
        if now - self._logged_at < LOG_EVERY:
            self._held += 1
            return
        self._logged_at = now
        held, self._held = self._held, 0
        log.warning(
            "%s: closed a connection: %s%s",
            self.name,
            _DROPPED_WHY[kind],
            f" ({held} more closed since the last such line)" if held else "",
            extra=fields(event="request-dropped"),
        )

    def contain(self, fileobj: object) -> bool:
        """A callback on ``fileobj`` raised: if it is one of our connections, close it."""
        for conn in self.conns:
            if conn.sock is fileobj:
                self._close(conn)
                return True
        return False

    def _idle(self, conn: _Conn) -> None:
        left = conn.active + IDLE_TIMEOUT - self.loop.time()
        if left > 0:
            conn.timer = self.loop.call_later(left, lambda: self._idle(conn))
        else:
            conn.timer = None
            self._close(conn)

    def _on_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.active = self.loop.time()
        if data:
            conn.inbuf += data
            end = conn.inbuf.find(self.terminator)
            if end < 0:
                if len(conn.inbuf) > self.max_request:
                    self._respond(conn, None)
                return
            request = conn.inbuf[:end]
        elif conn.inbuf:
            request = conn.inbuf  # EOF after an unterminated request (printf status | nc -U)
        else:
            self._close(conn)
            return
        self._respond(conn, request)

    def _respond(self, conn: _Conn, request: bytes | None) -> None:
        self.loop.remove_reader(conn.sock)  # one request per connection: the rest is ignored
        conn.inbuf = b""
        conn.requested = True
        conn.active = self.loop.time()
        self.loop.cancel(conn.timer)  # from now on, the reply must make progress
        conn.timer = self.loop.call_later(IDLE_TIMEOUT, functools.partial(self._idle, conn))
        if request is None:
            conn.reply = iter([self.too_long])
        else:
            self.peer_uid = _peer_uid(conn.sock)
            try:
                conn.reply = self.handler(request, lambda: self._wake(conn))
            except Exception:
                log.exception("%s: cannot answer %r", self.name, request[:64] if request else request)
                self._close(conn)
                return
            conn.duty.bulk = isinstance(conn.reply, Bulk)
        self.loop.add_writer(conn.sock, lambda: self._on_write(conn))
        self._on_write(conn)  # a fresh socket takes the first slice now: no turn's wait for writability

    def _wake(self, conn: _Conn) -> None:
        if not conn.closed and conn.waiting:
            conn.waiting = False
            if conn.pause is None:  # else the end of the rest resumes it
                self.loop.add_writer(conn.sock, lambda: self._on_write(conn))

    def _on_write(self, conn: _Conn) -> None:
        """A slice of the reply: paced once the reply is big (hbd.pacing)."""
        start = self.loop.time()
        rest = self.pacer.wait(conn.duty, start)
        if rest > 0:
            self.loop.remove_writer(conn.sock)
            if conn.pause is None:
                conn.pause = self.loop.call_later(rest, functools.partial(self._resume, conn))
            return
        cpu = self.loop.cpu_clock()
        self._write(conn)
        if not conn.closed:
            self.pacer.spent(conn.duty, start, self.loop.time(), self.loop.cpu_clock() - cpu)

    def _resume(self, conn: _Conn) -> None:
        conn.pause = None
        if not conn.closed:
            conn.waiting = False  # a spurious pull of a waiting reply only gets None again
            self.loop.add_writer(conn.sock, lambda: self._on_write(conn))

    def _write(self, conn: _Conn) -> None:
        """Pull the reply while the output is under HIGH_WATER (and for at most WRITE_SLICE), and send."""
        reply = conn.reply
        buf = [conn.outbuf] if conn.outbuf else []
        size = len(conn.outbuf)
        clock = self.loop.time
        until = clock() + (BULK_SLICE if conn.duty.bulk else WRITE_SLICE)
        while reply is not None and size < HIGH_WATER and (not buf or clock() < until):
            try:
                chunk = next(reply)
            except StopIteration:
                reply = conn.reply = None
                break
            except Exception:
                log.exception("%s: the reply failed", self.name)
                self._close(conn)
                return
            if chunk is None:
                conn.waiting = True
                break
            buf.append(chunk)
            size += len(chunk)
        out = b"".join(buf)
        if out:
            try:
                sent = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            conn.outbuf = out[sent:]
            if sent:
                conn.active = self.loop.time()
        else:
            conn.outbuf = b""
        if conn.outbuf:
            return  # still writable interest: the socket takes more later
        if reply is None:
            self._close(conn)
        elif conn.waiting:
            self.loop.remove_writer(conn.sock)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn, None)
        self.loop.cancel(conn.timer)
        self.loop.cancel(conn.pause)
        self.pacer.done(conn.duty)
        self.loop.forget(conn.sock)
        close = getattr(conn.reply, "close", None)
        if close is not None:
            close()  # a generator's finally: blocks run now (e.g. a relay closes its sources)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    def retire(self) -> None:
        """Stop accepting (the socket is being replaced) but finish the requests under way: a reload
        that moves the status socket still answers the ``hbd reload`` that asked for it."""
        self.acceptor.close()  # also cancels a pending resume (out of descriptors)
        self.sock.close()

    def close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        self.acceptor.close()
        self.sock.close()
        if self._on_close is not None:
            self._on_close()


def _stalled(conn: _Conn, now: float) -> bool:
    """A reply whose reader has taken nothing for STALLED_REPLY. One resting for the pacer
    (hbd.pacing) is not: its rest is ours, not its reader's."""
    return not conn.waiting and conn.pause is None and now - conn.active >= STALLED_REPLY


def _peer_uid(sock: socket.socket) -> int | None:
    if sock.family != socket.AF_UNIX:
        return None
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    except OSError:
        return None


# -- binding --------------------------------------------------------------------------------------
class UnixListener:
    """A listening unix socket at ``path``; ``remove()`` unlinks it if it is still ours."""

    def __init__(self, path: str, mode: int = SOCKET_MODE, backlog: int = 16) -> None:
        self.path = path
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise BindError(f"{path} exists and is not a socket; remove it or choose another control_socket")
            if _answers(path):
                raise BindError(f"{path} is in use by another running hbd; stop it or choose another control_socket")
        tmp = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            sock.bind(tmp)
            os.chmod(tmp, mode)  # before the socket is reachable under its real name
            sock.listen(backlog)
            os.rename(tmp, path)  # atomically replaces a stale socket
            st = os.stat(path)
        except OSError as exc:
            sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise BindError(f"cannot create the control socket {path}: {exc.strerror or exc}") from None
        self.sock = sock
        self._ident = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:  # not one a newer daemon has put there since
                os.unlink(self.path)
        except OSError:
            pass


def _answers(path: str) -> bool:
    """Does a process accept connections on this unix socket? (Non-blocking: never waits.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect(path)
        except (BlockingIOError, InterruptedError):
            return True  # its backlog is full: very much alive
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise BindError(f"cannot check whether {path} is in use: {exc.strerror or exc}") from None
        return True


# -- the client side (``hbd status``, ``hbd reload``) -------------------------------------------------
def server_pid(sock: socket.socket) -> int:
    """The pid of the process that listens on a connected unix socket (0 if unknown)."""
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    except OSError:
        return 0


def query(path: str, command: str, timeout: float = 10.0, limit: int = 256 * 1024 * 1024) -> bytes:
    """Send one command to a control socket and return the whole reply (blocking: for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        size = 0
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EMSGSIZE, "reply too large")
        return b"".join(chunks)
