"""Cost floor fixture: the least Python can do per ping -- bare epoll, ping -> pong, nothing else.

No timeouts, no logging, no per-peer state beyond a partial-read tail. Answers in the form it
was asked (``ping`` -> ``pong``, ``ping\\n`` -> ``pong\\n``). ``--workers K`` forks K copies that
share the port with SO_REUSEPORT, as the reference for what multi-core scaling this machine and
load generator can show at all.

Usage: python3 -m bench.floor_server --port P [--host 127.0.0.1] [--workers K]
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import sys

PING, PONG = b"ping", b"pong"


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def listener(host: str, port: int, reuseport: bool) -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.bind((host, port))
    ls.listen(4096)  # large backlog: a 1000 conn/s ramp must not overflow the accept queue
    ls.setblocking(False)
    return ls


def reply(buf: bytes) -> tuple[bytes, bytes]:
    """(bytes to send, tail to keep) for a buffer that is not exactly one ping."""
    n = buf.count(PING)
    out = (PONG + b"\n" if b"\n" in buf else PONG) * n
    tail = buf[buf.rfind(PING) + len(PING) :] if n else buf
    tail = tail.lstrip(b"\r\n")
    return out, tail if PING.startswith(tail) else b""


def serve(ls: socket.socket) -> None:
    ep = select.epoll()
    lfd = ls.fileno()
    ep.register(lfd, select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    tails: dict[int, bytes] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                while True:  # accept everything pending: one wakeup per burst, not per conn
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE etc.: the benchmark counts the refused clients
                        break
                    c.setblocking(False)
                    socks[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            s = socks[fd]
            try:
                d = s.recv(4096)
            except OSError:
                d = b""
            if not d:
                ep.unregister(fd)
                del socks[fd]
                tails.pop(fd, None)
                s.close()
                continue
            if d == b"ping\n" and fd not in tails:  # the common case, no bookkeeping
                out = b"pong\n"
            elif d == PING and fd not in tails:
                out = PONG
            else:
                out, tail = reply(tails.pop(fd, b"") + d)
                if tail:
                    tails[fd] = tail
            if out:
                try:
                    s.send(out)  # a few bytes into an empty send buffer; a full one just drops it
                except OSError:
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if a.workers <= 1:
        serve(listener(a.host, a.port, False))
        return
    kids = []
    for _ in range(a.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener(a.host, a.port, True))
            os._exit(0)
        kids.append(pid)

    def stop(*_: object) -> None:
        for k in kids:
            try:
                os.kill(k, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    for k in kids:
        os.waitpid(k, 0)


if __name__ == "__main__":
    main()
