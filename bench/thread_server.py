"""Thread-per-client fixture: the design users would write without hbd, for comparison.

One thread per client doing blocking recv(), the textbook ``listen(5)`` backlog, and a checker
thread that every second drops clients silent for longer than --timeout. Answers in the form it
was asked, like the floor. Nothing here is tuned: it is the baseline hbd has to beat.

Usage: python3 -m bench.thread_server --port P [--timeout 3.0]
"""

from __future__ import annotations

import argparse
import resource
import signal
import socket
import sys
import threading
import time

from bench.floor_server import reply


class Client:
    __slots__ = ("last", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.last = time.monotonic()


clients: dict[int, Client] = {}
lock = threading.Lock()


def serve(c: Client) -> None:
    tail = b""
    try:
        while True:
            d = c.sock.recv(4096)
            if not d:
                break
            c.last = time.monotonic()
            out, tail = reply(tail + d)
            if out:
                c.sock.sendall(out)
    except OSError:
        pass
    finally:
        with lock:
            clients.pop(id(c), None)
        c.sock.close()


def checker(timeout: float) -> None:
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        with lock:
            silent = [c for c in clients.values() if now - c.last > timeout]
        for c in silent:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv(); close() alone would not
            except OSError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.host, a.port))
    ls.listen(5)
    threading.Thread(target=checker, args=(a.timeout,), daemon=True).start()
    while True:
        try:
            s, _ = ls.accept()
        except OSError:  # EMFILE: back off instead of spinning
            time.sleep(0.01)
            continue
        c = Client(s)
        with lock:
            clients[id(c)] = c
        try:
            threading.Thread(target=serve, args=(c,), daemon=True).start()
        except RuntimeError:  # cannot start new thread: the design's limit, reached
            with lock:
                clients.pop(id(c), None)
            s.close()


if __name__ == "__main__":
    main()
