"""Load generator for ping/pong heartbeat servers, loopback only.

Holds N TCP connections spread over K forked worker processes, one epoll loop each (one process
cannot hold 19000 sockets under a 20000 fd limit and still be cheap). Two modes:

  open    every connection pings once per --interval at a random phase (a heartbeat fleet)
  closed  every connection pings again as soon as its pong arrives (throughput)

Timeline, in absolute CLOCK_MONOTONIC seconds (one clock for every process on the machine, so
the runner samples the server at the same instants the generator switches phase):

  start   connects ramp at --rate conn/s in total
  ss      start + N/rate + settle: the steady window begins
  se      ss + duration: the window ends; in open mode --silent-frac of the conns stop pinging
          (but stay open) and the time until the server closes each is recorded
  end     se + detect-wait: no more pings; wait at most --grace for outstanding pongs

Every loop is bounded: a worker exits at end + grace + 1 s whatever happens. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import pickle
import random
import resource
import select
import signal
import socket
import sys
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import summary

mono = time.monotonic
CONNECTING, OPEN, CLOSED = 0, 1, 2
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
NSLOTS = 100  # ping phases per interval: a slot list is cheaper than a per-ping heap entry
ERRORS = (
    "refused",
    "connect_timeout",
    "connect_error",
    "fd_exhausted",
    "reset",
    "closed_by_peer",
    "send_error",
    "bad_reply",
    "unexpected_pong",
)


@dataclass(frozen=True)
class Schedule:
    start: float
    ss: float
    se: float
    end: float
    grace: float

    @property
    def hard_end(self) -> float:
        return self.end + self.grace + 1.0


def make_schedule(
    start: float, conns: int, rate: float, settle: float, duration: float, detect_wait: float, grace: float
) -> Schedule:
    ramp = conns / rate if rate > 0 else 0.0
    ss = start + ramp + settle
    se = ss + duration
    return Schedule(start, ss, se, se + detect_wait, grace)


class Conn:
    __slots__ = ("fd", "last_ping", "out", "rbuf", "silent", "sock", "state", "t_conn", "wbuf")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = CONNECTING
        self.t_conn = now
        self.out: deque[float] = deque()  # send times of pings still waiting for a pong
        self.rbuf = b""
        self.wbuf = b""
        self.silent = False
        self.last_ping: float | None = None


def raise_nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_now() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def loopback_addr(host: str, port: int) -> tuple[str, int]:
    """Resolve host and refuse anything that is not loopback: this tool never leaves the machine."""
    infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    addr = infos[0][4]
    if not ipaddress.ip_address(addr[0]).is_loopback:
        sys.exit(f"loadgen: refusing non-loopback target {host} ({addr[0]})")
    return addr[0], addr[1]


def worker(a: argparse.Namespace, sch: Schedule, n: int, wid: int) -> dict[str, Any]:
    """One epoll loop driving n connections; returns raw counters and sample arrays."""
    rng = random.Random(a.seed * 1_000_003 + wid)
    if a.cpus:
        os.sched_setaffinity(0, a.cpus)
    nofile = raise_nofile()
    closed_loop = a.mode == "closed"
    ping = b"ping\n" if a.wire == "line" else b"ping"
    pong = b"pong\n" if a.wire == "line" else b"pong"
    plen = len(pong)
    addr = loopback_addr(a.host, a.port)
    # Our own source address per worker: a run's 19000 ports in TIME_WAIT would otherwise crowd
    # the next run (same port range, 28k ports) and slow its connect()s down.
    src = loopback_addr(f"{a.src_net}.{wid + 1}", 0)[0] if a.src_net and not a.src_per else None
    rate = a.rate / a.procs
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    pending: dict[int, Conn] = {}
    to_silence: list[Conn] = []  # conns chosen to go silent at se
    slots: list[list[Conn]] = [[] for _ in range(NSLOTS)]
    slot_len = a.interval / NSLOTS
    E = dict.fromkeys(ERRORS, 0)
    C = {
        "pings": 0,
        "pongs": 0,
        "pings_total": 0,
        "pongs_total": 0,
        "missed": 0,
        "late_pongs": 0,
        "skipped_slots": 0,
    }
    rtt_max = [0.0]  # the longest RTT over the deadline, whole run (rtt holds the window's only)
    rtt, conn_lat, detect, lag = array("d"), array("d"), array("d"), array("d")
    silent_idx: set[int] = set()
    if not closed_loop and a.silent_frac > 0:
        silent_idx = set(rng.sample(range(n), round(n * a.silent_frac)))
    st = {"outstanding": 0}
    ss, se, end = sch.ss, sch.se, sch.end

    def close(c: Conn, now: float) -> None:
        if c.state == CLOSED:
            return
        pending.pop(c.fd, None)
        conns.pop(c.fd, None)
        try:
            ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()
        c.state = CLOSED
        st["outstanding"] -= len(c.out)
        C["missed"] += len(c.out)  # these pings can never be answered now

    def lost(c: Conn, why: str, now: float) -> None:
        """The server closed c: detection when c was silent, an error otherwise."""
        if c.silent:
            detect.append(now - (c.last_ping if c.last_ping is not None else c.t_conn))
        else:
            E[why] += 1
        close(c, now)

    def send_ping(c: Conn, k: int = 1) -> None:
        """Send k pings in one write (k > 1 only in closed mode with --depth)."""
        t = mono()
        if k == 1:
            c.out.append(t)
        else:
            c.out.extend((t,) * k)
        c.last_ping = t
        st["outstanding"] += k
        C["pings_total"] += k
        if ss <= t < se:
            C["pings"] += k
        data = ping * k if k > 1 else ping
        if c.wbuf:
            c.wbuf += data
            return
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except ConnectionResetError:
            lost(c, "reset", t)
            return
        except OSError:
            E["send_error"] += 1
            close(c, t)
            return
        if sent < len(data):
            c.wbuf = data[sent:]
            ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(c: Conn, now: float) -> None:
        try:
            k = c.sock.send(c.wbuf)
        except BlockingIOError:
            return
        except OSError:
            lost(c, "reset", now)
            return
        c.wbuf = c.wbuf[k:]
        if not c.wbuf:
            ep.modify(c.fd, select.EPOLLIN)

    def on_pongs(c: Conn, data: bytes, now: float) -> None:
        if c.rbuf:
            data = c.rbuf + data
            c.rbuf = b""
        if data == pong:
            k = 1
        else:
            k = data.count(pong)
            tail = data[data.rfind(pong) + plen :] if k else data
            if k * plen + len(tail) != len(data) or not pong.startswith(tail):
                E["bad_reply"] += 1
                tail = b""
            c.rbuf = tail
        for _ in range(k):
            if not c.out:
                E["unexpected_pong"] += 1
                continue
            t = c.out.popleft()
            st["outstanding"] -= 1
            C["pongs_total"] += 1
            if now - t > a.deadline:  # answered, but later than a client would have waited
                C["late_pongs"] += 1
                rtt_max[0] = max(rtt_max[0], now - t)
            if closed_loop:
                if ss <= now < se:
                    C["pongs"] += 1
                    rtt.append(now - t)
            elif ss <= t < se:
                C["pongs"] += 1
                rtt.append(now - t)
        if closed_loop and k and now < se:
            send_ping(c, k)  # as many new pings as pongs came back: depth stays constant

    while mono() < sch.start:
        time.sleep(min(0.05, max(0.0, sch.start - mono())))
    cpu0 = cpu_now()
    cpu_ss = cpu_se = None
    started = 0
    next_slot, cur_slot = sch.start, 0
    next_sweep = 0.0
    silenced = False
    named = 0
    while True:
        now = mono()
        if now >= sch.hard_end:
            break
        # ramp: open the connections that are due by now
        due = n if rate <= 0 else min(n, int((now - sch.start) * rate) + 1)
        while started < due:
            idx = started
            started += 1
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as e:
                E["fd_exhausted" if e.errno in (errno.EMFILE, errno.ENFILE) else "connect_error"] += 1
                continue
            s.setblocking(False)
            if a.src_per:  # SRC_NET.(worker+1).(k+1): a few ports per address keeps connect()'s port search short
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((f"{a.src_net}.{wid + 1}.{idx // a.src_per + 1}", 0))
            elif src is not None:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # port chosen at connect()
                s.bind((src, 0))
            c = Conn(s, mono())
            if idx in silent_idx:
                to_silence.append(c)
            err = s.connect_ex(addr)
            if err in (0, errno.EINPROGRESS):
                conns[c.fd] = c
                pending[c.fd] = c
                ep.register(c.fd, select.EPOLLOUT)
            else:
                E["refused" if err == errno.ECONNREFUSED else "connect_error"] += 1
                c.state = CLOSED
                s.close()
        # phase switches
        if cpu_ss is None and now >= ss:
            cpu_ss = cpu_now()
        if cpu_se is None and now >= se:
            cpu_se = cpu_now()
        if not silenced and now >= se:
            silenced = True
            for c in to_silence:
                if c.state == OPEN:
                    c.silent = True
        if now >= end and (st["outstanding"] <= 0 or now >= end + sch.grace):
            break
        # open loop: fire the ping slots that are due
        if not closed_loop:
            if now - next_slot > a.interval:  # a whole interval behind: skip ahead, do not burst
                C["skipped_slots"] += int((now - next_slot) / slot_len)
                next_slot = now
            while next_slot <= now:
                lag.append(now - next_slot)
                if now < end:
                    for c in slots[cur_slot]:
                        if c.state == OPEN and not c.silent:
                            if c.out and c.out[0] + a.deadline < now:
                                while c.out and c.out[0] + a.deadline < now:
                                    c.out.popleft()
                                    st["outstanding"] -= 1
                                    C["missed"] += 1
                            send_ping(c)
                cur_slot = (cur_slot + 1) % NSLOTS
                next_slot += slot_len
        # connects that never completed
        if pending and now >= next_sweep:
            next_sweep = now + 0.1
            for c in [c for c in pending.values() if now - c.t_conn > a.connect_timeout]:
                E["connect_timeout"] += 1
                close(c, now)
        # wait for I/O until the next thing is due
        wake = now + 0.05
        if not closed_loop:
            wake = min(wake, next_slot)
        if started < n and rate > 0:
            wake = min(wake, sch.start + started / rate)
        for t in (ss, se, end):
            if t > now:
                wake = min(wake, t)
        for fd, ev in ep.poll(max(0.0, wake - mono())):
            c = conns.get(fd)
            if c is None:
                continue
            if c.state == CONNECTING:
                now = mono()
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    E["refused" if err == errno.ECONNREFUSED else "connect_error"] += 1
                    close(c, now)
                    continue
                del pending[fd]
                c.state = OPEN
                conn_lat.append(now - c.t_conn)
                ep.modify(fd, select.EPOLLIN)
                if a.hello:  # a named peer, as a fleet of hbd clients greets: one line before its pings
                    named += 1
                    try:
                        c.sock.send(f"hello {a.hello}{wid}-{named}\n".encode())
                    except OSError:
                        lost(c, "reset", now)
                        continue
                if closed_loop:
                    if now < se:
                        send_ping(c, a.depth)
                else:
                    slots[rng.randrange(NSLOTS)].append(c)
                continue
            if ev & select.EPOLLOUT and c.wbuf:
                flush(c, mono())
                if c.state == CLOSED:
                    continue
            if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                continue
            try:
                data = c.sock.recv(512)
            except BlockingIOError:
                continue
            except OSError:
                lost(c, "reset", mono())
                continue
            now = mono()
            if not data:
                lost(c, "closed_by_peer", now)
            else:
                on_pongs(c, data, now)

    now = mono()
    if cpu_ss is None:
        cpu_ss = cpu0
    if cpu_se is None:
        cpu_se = cpu_now()
    silent_conns = [c for c in to_silence if c.silent]
    undetected = sum(1 for c in silent_conns if c.state == OPEN)
    connected = len(conn_lat)
    open_at_end = len(conns) - len(pending)
    for c in list(conns.values()):
        close(c, now)  # counts still-outstanding pings as missed
    ep.close()
    return {
        "n": n,
        "nofile": nofile,
        "errors": E,
        "counts": C,
        "connected": connected,
        "open_at_end": open_at_end,
        "silenced": len(silent_conns),
        "undetected": undetected,
        "rtt": rtt.tobytes(),
        "conn_lat": conn_lat.tobytes(),
        "detect": detect.tobytes(),
        "lag": lag.tobytes(),
        "cpu_window_s": cpu_se - cpu_ss,
        "late_rtt_max_s": rtt_max[0],
        "cpu_total_s": cpu_now() - cpu0,
    }


def _arr(b: bytes) -> array:
    x = array("d")
    x.frombytes(b)
    return x


def merge(a: argparse.Namespace, sch: Schedule, parts: list[dict[str, Any]]) -> dict[str, Any]:
    E = dict.fromkeys(ERRORS, 0)
    C: dict[str, int] = {}
    rtt, cl, det, lag = array("d"), array("d"), array("d"), array("d")
    for r in parts:
        for k, v in r["errors"].items():
            E[k] += v
        for k, v in r["counts"].items():
            C[k] = C.get(k, 0) + v
        rtt += _arr(r["rtt"])
        cl += _arr(r["conn_lat"])
        det += _arr(r["detect"])
        lag += _arr(r["lag"])
    window = sch.se - sch.ss
    cpu_w = [r["cpu_window_s"] for r in parts]
    out: dict[str, Any] = {
        "mode": a.mode,
        "conns": a.conns,
        "procs": len(parts),
        "rate": a.rate,
        "interval": a.interval,
        "wire": a.wire,
        "window_s": round(window, 3),
        "schedule": asdict(sch),
        "connected": sum(r["connected"] for r in parts),
        "open_at_end": sum(r["open_at_end"] for r in parts),
        "nofile": min(r["nofile"] for r in parts),
        "errors": E,
        "errors_total": sum(E.values()),
        **C,
        "rtt_ms": summary(rtt, 1000.0),
        "connect_ms": summary(cl, 1000.0),
        "lag_ms": summary(lag, 1000.0),
        "late_rtt_max_ms": round(1000.0 * max(r.get("late_rtt_max_s", 0.0) for r in parts), 1),
        "gen_cpu_pct": round(100.0 * sum(cpu_w) / window, 1) if window > 0 else None,
        "gen_cpu_max_proc_pct": round(100.0 * max(cpu_w) / window, 1) if window > 0 else None,
    }
    if a.mode == "closed":
        out["throughput"] = round(C.get("pongs", 0) / window, 1) if window > 0 else None
        out["depth"] = a.depth
    else:
        out["silent"] = {
            "frac": a.silent_frac,
            "silenced": sum(r["silenced"] for r in parts),
            "detected": len(det),
            "undetected": sum(r["undetected"] for r in parts),
            "detect_ms": summary(det, 1000.0, 1),
            "detect_min_ms": round(min(det) * 1000.0, 1) if det else None,
        }
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Fork the workers, gather their pickled results (bounded in time), merge."""
    start = a.start_at if a.start_at is not None else mono() + 0.3
    sch = make_schedule(start, a.conns, a.rate, a.settle, a.duration, a.detect_wait, a.grace)
    procs = max(1, min(a.procs, a.conns))
    a.procs = procs
    shares = [a.conns // procs + (1 if i < a.conns % procs else 0) for i in range(procs)]
    if procs == 1:
        return merge(a, sch, [worker(a, sch, a.conns, 0)])
    kids: dict[int, tuple[int, bytearray]] = {}
    for i, n in enumerate(shares):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                data = pickle.dumps(worker(a, sch, n, i))
                with os.fdopen(w, "wb") as f:
                    f.write(data)
            except BaseException as e:  # report, never fall back into the parent's code
                print(f"loadgen worker {i}: {e!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        os.close(w)
        kids[r] = (pid, bytearray())
    ep = select.epoll()
    for r in kids:
        ep.register(r, select.EPOLLIN)
    live = set(kids)
    while live and mono() < sch.hard_end + 10.0:
        for fd, _ in ep.poll(0.5):
            chunk = os.read(fd, 1 << 20)
            if chunk:
                kids[fd][1].extend(chunk)
            else:
                ep.unregister(fd)
                os.close(fd)
                live.discard(fd)
    parts = []
    for fd, (pid, buf) in kids.items():
        if fd in live:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if buf:
            parts.append(pickle.loads(bytes(buf)))
    if not parts:
        sys.exit("loadgen: all workers failed")
    return merge(a, sch, parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="loopback only")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", "--conns", type=int, default=100)
    ap.add_argument("--procs", type=int, default=1, help="worker processes (N/K conns each)")
    ap.add_argument("--mode", choices=("open", "closed"), default="open")
    ap.add_argument("--wire", choices=("line", "bare"), default="line")
    ap.add_argument(
        "--depth",
        type=int,
        default=1,
        help="closed mode: pings in flight per conn (1: ping only when the pong is back)",
    )
    ap.add_argument("--rate", type=float, default=1000.0, help="total connect rate, conn/s (0: at once)")
    ap.add_argument("--interval", type=float, default=1.0, help="open mode: seconds between pings")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between ramp end and window")
    ap.add_argument("--duration", type=float, default=10.0, help="steady window, seconds")
    ap.add_argument("--detect-wait", type=float, default=0.0, help="seconds after the window (detection)")
    ap.add_argument("--silent-frac", type=float, default=0.0, help="open mode: conns that go silent at se")
    ap.add_argument("--deadline", type=float, default=2.0, help="a ping unanswered this long is missed")
    ap.add_argument("--grace", type=float, default=2.0, help="max wait for outstanding pongs at the end")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--start-at", type=float, default=None, help="absolute time.monotonic() to start")
    ap.add_argument(
        "--cpus", type=lambda s: {int(x) for x in s.split(",")}, default=None, help="pin workers to these CPUs, e.g. 1"
    )
    ap.add_argument("--src-net", default=None, help="bind worker i to source address SRC_NET.(i+1), e.g. 127.1.7")
    ap.add_argument(
        "--src-per",
        type=int,
        default=0,
        help="with a two-part --src-net (127.A): connection k of worker i binds to 127.A.(i+1).(k/SRC_PER+1)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--hello", default=None, metavar="PREFIX", help="greet each conn as `hello PREFIX<worker>-<k>` before its pings"
    )
    return ap


def main() -> None:
    a = parser().parse_args()
    if a.conns < 1 or a.interval <= 0 or a.duration < 0 or a.deadline <= 0:
        sys.exit("loadgen: bad arguments")
    if a.src_per and (not a.src_net or a.procs > 254 or a.conns / a.procs / a.src_per > 254):
        sys.exit("loadgen: --src-per needs --src-net 127.A and at most 254 workers and addresses per worker")
    print(json.dumps(run(a)), flush=True)


if __name__ == "__main__":
    main()
