"""Hostile peers against an hbd server, in one process: ``python3 tests/hostile.py PORT MAX_CLIENTS``.

Runs, at the same time: 500 garbage connections, 20 connections that each push 1 MB of junk, and
100 slowloris peers that trickle bytes of a ping they never finish; then a flood of idle
connections beyond max_clients. Prints one JSON summary line. Bounded in count and time, loopback
only.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"PING\n",
    b"pong",
    b"\x00" * 64,
    b"hello \xff\xfe\n",
    b"ping ping\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
]


def _closed_within(s: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), or None if it did not."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


def garbage(port: int, n: int, out: dict) -> None:
    closed = 0
    for i in range(n):
        try:
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.sendall(GARBAGE[i % len(GARBAGE)] if i % 3 else os.urandom(random.randint(1, 512)))
                if _closed_within(s, 5) is not None:
                    closed += 1
        except OSError:
            closed += 1  # refused or reset: also closed
    with LOCK:
        out["garbage_closed"] = out.get("garbage_closed", 0) + closed


def flood(port: int, kind: int, out: dict) -> None:
    """Push 1 MB of junk (random bytes, blank lines, an endless greeting) as fast as possible;
    note how long the server took to close the connection."""
    payload = [os.urandom(1 << 20), b"\n" * (1 << 20), b"hello " + b"a" * ((1 << 20) - 6)][kind % 3]
    t0 = time.monotonic()
    took = None
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            try:
                s.sendall(payload)  # the kernel's buffers may take it all before the reset comes back
            except OSError:
                took = time.monotonic() - t0
            if took is None and _closed_within(s, 5) is not None:
                took = time.monotonic() - t0
    except OSError:
        took = time.monotonic() - t0
    with LOCK:
        out.setdefault("flood_closed_after", []).append(took)


def slowloris(port: int, n: int, timeout: float, out: dict) -> None:
    """n peers trickling one byte every 0.25 s, never a whole ping: blank lines, a greeting that
    grows byte by byte, or half a ping and then silence."""
    payloads = [b"\n" * 1000, b"hello " + b"a" * 240, b"pi"]
    sel = selectors.DefaultSelector()
    for i in range(n):
        s = socket.create_connection((HOST, port), timeout=5)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [time.monotonic(), payloads[i % 3], 0])
    closed: list[float] = []
    end = time.monotonic() + timeout + 3
    next_byte = time.monotonic()
    while sel.get_map() and time.monotonic() < end:
        for key, _ in sel.select(0.02):
            try:
                data = key.fileobj.recv(100)
            except OSError:
                data = b""
            if not data:
                closed.append(time.monotonic() - key.data[0])
                sel.unregister(key.fileobj)
                key.fileobj.close()
        if time.monotonic() >= next_byte:
            next_byte += 0.25
            for key in list(sel.get_map().values()):
                _, payload, pos = key.data
                if pos < len(payload):
                    try:
                        key.fileobj.send(payload[pos : pos + 1])
                    except OSError:
                        pass
                    key.data[2] = pos + 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    with LOCK:
        out["slowloris_closed"] = len(closed)
        out["slowloris_close_after"] = sorted(closed)


def beyond_max(port: int, n: int, out: dict) -> None:
    """Open n idle connections at once: past max_clients each must be closed at once."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection((HOST, port), timeout=5)
            s.setblocking(False)
            socks.append((time.monotonic(), s))
        except OSError:
            pass
    time.sleep(0.3)
    refused, quick = 0, []
    for t, s in socks:
        try:
            data = s.recv(10)
        except BlockingIOError:
            continue  # still open: it was admitted
        except OSError:
            data = b""
        if not data:
            refused += 1
            quick.append(time.monotonic() - t)
    for _, s in socks:
        s.close()
    with LOCK:
        out["beyond_max_opened"] = len(socks)
        out["beyond_max_refused"] = refused


LOCK = threading.Lock()


def main() -> int:
    port, max_clients, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    # Nice 19 (per thread, so few threads): on a 2-core machine the attacker must not take the CPU
    # the healthy clients' own process needs; a real attacker sits on other hosts.
    os.nice(19)
    out: dict = {}
    t_start = time.monotonic()

    def floods(kinds: range) -> None:
        for i in kinds:
            flood(port, i, out)

    threads = [threading.Thread(target=garbage, args=(port, 250, out)) for _ in range(2)]
    threads += [threading.Thread(target=floods, args=(range(k, 20, 2),)) for k in range(2)]
    threads.append(threading.Thread(target=slowloris, args=(port, 100, timeout, out)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    beyond_max(port, max_clients + 200, out)
    out["t_start"], out["t_end"] = t_start, time.monotonic()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
