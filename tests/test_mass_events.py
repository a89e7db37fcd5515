"""Mass events on a real server: thousands of peers that end at the same instant must not make one
long loop turn (issue 14: every peer waits while a turn runs). Measured with the server's own turn
histogram (status ``loop.turns``), not with sleeps."""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from pathlib import Path

import pytest
from daemons import HbdProcess, start_server
from helpers import status_of, wait_until

from hbd.loop import MAX_EVENTS


def hold_clients(port: int, first: int, n: int, ready: int) -> None:
    """A forked process: ``n`` named peers (from host<first>) that greet and ping once, then wait
    to be killed."""
    socks = []
    for i in range(first, first + n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"hello host{i:05d}\nping\n".encode())
        socks.append(s)
    os.write(ready, b"x")
    while True:
        time.sleep(60)


def over(turns: dict, bound_ms: str) -> int:
    return turns["count"] - turns["le_ms"][bound_ms]


def mass_disconnect(srv: HbdProcess, first: int, n: int) -> tuple[dict, dict]:
    """``n`` new peers connect and come UP, then all end while the server is stopped (so that its next
    select() finds them all); the server's turn histograms before and once they are all DOWN."""
    sock = Path(srv.config["control_socket"])
    down = status_of(sock)["counts"].get("DOWN", 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns
        try:
            os.close(r)
            hold_clients(srv.config["port"], first, n, w)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        wait_until(lambda: status_of(sock)["counts"]["UP"] == n, timeout=60)
        before = status_of(sock)["loop"]["turns"]
        srv.signal(signal.SIGSTOP)  # the ends queue up in the kernel
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
        time.sleep(0.5)
        srv.signal(signal.SIGCONT)
        wait_until(lambda: status_of(sock)["counts"]["DOWN"] == down + n, timeout=60)
        return before, status_of(sock)["loop"]["turns"]
    finally:
        os.close(r)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.slow
def test_a_mass_disconnect_is_spread_over_short_turns(tmp_path: Path, procs) -> None:
    """4,000 peers end at once: one turn of 170-400 ms (4,000 closes at 40-70 us, more on a loaded
    machine) before; now at most MAX_EVENTS closes a turn, 15-20 ms. The bound is generous, and the
    best of up to 3 rounds counts: on this shared machine a turn of a few ms of CPU was seen to take
    590 ms of wall time (load 10 on 2 cores), while the one long turn of all closes comes in every
    round."""
    n = 4000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 200:
        pytest.skip(f"needs RLIMIT_NOFILE >= {n + 200} (hard limit is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server
    srv = start_server(tmp_path, heartbeat_timeout=60, max_clients=n + 100, max_peers=3 * n + 100)
    procs.append(srv)
    rounds = []
    for i in range(3):
        before, after = mass_disconnect(srv, i * n, n)
        turns, long = after["count"] - before["count"], over(after, "100") - over(before, "100")
        assert turns >= -(-n // MAX_EVENTS)  # the closes took their share of turns each
        rounds.append((turns, long))
        if long == 0:
            break
    print(f"turns in each disconnect, and how many over 100 ms: {rounds}")
    assert rounds[-1][1] == 0, rounds


@pytest.mark.slow
def test_a_survivors_ping_behind_thousands_of_ends_is_answered_before_most_are_closed(tmp_path: Path, procs) -> None:
    """4,000 peers end at once (a FIN each, while the server is stopped) and a survivor pings after
    them: epoll hands the server the 4,000 ends first. Each end is only taken off epoll in the turns
    that see it; closing them waits for later turns' shares, so the survivor's pong comes before most
    are closed. When every end was read and closed in the turn that saw it (15-20 us each), the pong
    came only after all 4,000 were closed. The server is stopped again as soon as the pong is in, and
    the ends it closed by then are counted (each ending peer sees its FIN): an order, not a time,
    so the shared machine's load cannot flake it."""
    n = 4000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 200:
        pytest.skip(f"needs RLIMIT_NOFILE >= {n + 200} (hard limit is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server
    srv = start_server(tmp_path, heartbeat_timeout=60, max_clients=n + 100, max_peers=n + 100)
    procs.append(srv)
    sock, port = Path(srv.config["control_socket"]), srv.config["port"]
    ending = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    survivor = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        for i, s in enumerate([*ending, survivor]):
            s.sendall(f"hello host{i:05d}\nping\n".encode())
        for s in [*ending, survivor]:
            assert s.recv(100) == b"pong\n"
        wait_until(lambda: status_of(sock)["counts"].get("UP") == n + 1, timeout=60)
        srv.signal(signal.SIGSTOP)  # the ends queue up in epoll's ready list, the ping behind them
        for s in ending:
            s.shutdown(socket.SHUT_WR)
            s.setblocking(False)  # (a socket with a timeout polls before a MSG_DONTWAIT read)
        time.sleep(0.3)
        survivor.sendall(b"ping\n")
        time.sleep(0.1)
        cont = time.monotonic()
        srv.signal(signal.SIGCONT)
        assert survivor.recv(100) == b"pong\n"
        rtt = time.monotonic() - cont
        srv.signal(signal.SIGSTOP)  # what it had closed when the pong came (and a few ms more)
        closed = 0
        for s in ending:
            try:
                closed += s.recv(100, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                pass
        srv.signal(signal.SIGCONT)
        print(f"survivor's pong {rtt * 1000:.1f} ms after the server resumed, {closed} of {n} ends closed by then")
        assert closed < n // 2
        assert rtt < 5.0  # generous: about 10-20 ms on a quiet machine
        wait_until(lambda: status_of(sock)["counts"].get("DOWN") == n, timeout=60)
    finally:
        srv.signal(signal.SIGCONT)
        for s in [*ending, survivor]:
            s.close()
