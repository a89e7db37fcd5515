"""The duty cycle of big replies (hbd.pacing), in virtual time: the rule itself, then through a real
request server whose reply "works" by advancing the virtual clock."""

import itertools
import socket
from pathlib import Path

import pytest
from helpers import drain
from virtual_time import FakeClock

from hbd.control import WRITE_SLICE, RequestServer, UnixListener
from hbd.loop import EventLoop
from hbd.pacing import BURST, FRACTION, MAX_DEBT, MIN_PAUSE, Duty, Pacer


def timed_reply(
    vloop: EventLoop, vclock: FakeClock, client: socket.socket, server: RequestServer, listener: UnixListener
) -> tuple[float, float, bytes]:
    """Read the whole reply while a 1 ms timer ticks: how long it took, the longest gap between ticks
    (how long the loop was held), the bytes; then close everything."""
    client.setblocking(False)
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(vclock())
        vloop.call_later(0.001, tick)

    tick()
    t0 = vclock()
    data = drain(vloop, client, 1.0, vclock)
    duration = vclock() - t0
    gap = max(b - a for a, b in itertools.pairwise(ticks))
    assert not server.conns and server.pacer.big == 0
    client.close()
    server.close()
    listener.remove()
    return duration, gap, data


def test_a_small_reply_is_never_paced() -> None:
    """Small: under BURST seconds of CPU, however long its slices took on the clock (a filtered
    status's scan preempted on a loaded machine)."""
    pacer, duty = Pacer(), Duty()
    now = 0.0
    while duty.cpu + 0.01 < BURST:
        pacer.spent(duty, now, now + 0.01, 0.01)
        now += 0.01
        assert pacer.wait(duty, now) == 0.0
    preempted = Duty()
    for _ in range(100):
        pacer.spent(preempted, now, now + 0.01, 0.0005)
        now += 0.01
        assert pacer.wait(preempted, now) == 0.0
    assert pacer.big == 0


def test_a_big_reply_rests_so_that_it_works_at_most_the_fraction() -> None:
    pacer, duty = Pacer(fraction=0.5), Duty()
    pacer.spent(duty, 0.0, BURST, BURST)  # its burst: from now on it is paced
    assert pacer.big == 1
    now = BURST
    for _ in range(10):
        pacer.spent(duty, now, now + 0.004, 0.004)
        now += 0.004
        rest = pacer.wait(duty, now)
        assert rest == pytest.approx(0.004)  # at half the time: as long a rest as the slice
        now += rest
    # Time that passed anyway (waiting for the reader) counts as rest.
    pacer.spent(duty, now, now + 0.004, 0.004)
    assert pacer.wait(duty, now + 0.004 + 0.003) == 0.0  # 1 ms owed: under MIN_PAUSE, not a turn
    # Owed rests below MIN_PAUSE add up until they are worth a pause.
    d2, p2 = Duty(), Pacer(fraction=0.5)
    p2.spent(d2, 0.0, BURST, BURST)
    t = BURST
    waits = []
    for _ in range(10):
        p2.spent(d2, t, t + MIN_PAUSE / 4, MIN_PAUSE / 4)
        t += MIN_PAUSE / 4
        waits.append(p2.wait(d2, t))
    assert waits[:3] == [0.0] * 3 and max(waits) >= MIN_PAUSE
    pacer.done(duty)
    assert pacer.big == 0


def test_big_replies_share_the_fraction_and_a_preempted_slice_owes_at_most_max_debt() -> None:
    pacer = Pacer(fraction=0.5)
    a, b = Duty(), Duty()
    pacer.spent(a, 0.0, BURST, BURST)
    pacer.spent(b, 0.0, BURST, BURST)
    assert pacer.big == 2
    pacer.spent(a, 1.0, 1.004, 0.004)
    assert pacer.wait(a, 1.004) == pytest.approx(0.004 * 3)  # two at once: each rests 3 slices' time
    pacer.done(b)
    pacer.spent(a, 2.0, 4.0, 0.01)  # two seconds (the process was preempted)
    assert pacer.wait(a, 4.0) == MAX_DEBT
    with pytest.raises(ValueError):
        Pacer(fraction=0)


def _serve(
    tmp_path: Path, vclock, vloop, slices: int, work: float, size: int, turns: bool = True
) -> tuple[float, float, bytes]:
    """A reply of ``slices`` chunks, each ``work`` seconds of (virtual) work and ``size`` bytes more
    than its number, read as fast as it comes:
    (its duration, the longest gap between two ticks of a 1 ms timer, the bytes read)."""

    def handler(request: bytes, wake):
        for i in range(slices):
            vclock.advance(work)
            yield b"%d," % i + b"." * size
            if turns:
                vloop.call_later(0, wake)
                yield None  # one slice per loop turn, as the status and the scrape do

    listener = UnixListener(str(tmp_path / "c.sock"))
    server = RequestServer(vloop, listener.sock, handler)
    assert server.pacer.fraction == FRACTION
    client = socket.socket(socket.AF_UNIX)
    client.connect(listener.path)
    client.sendall(b"status\n")
    return timed_reply(vloop, vclock, client, server, listener)


def test_a_big_reply_through_the_request_server_takes_work_over_fraction(tmp_path: Path, vclock, vloop) -> None:
    """1 s of work in 4 ms slices takes about 1 s / FRACTION of loop time (but for its first BURST);
    every slice's bytes arrive;
    timers still run between slices (the longest gap is one slice, not the rest)."""
    duration, gap, data = _serve(tmp_path, vclock, vloop, 250, 0.004, 4000)
    assert data == b"".join(b"%d," % i + b"." * 4000 for i in range(250))
    work = 250 * 0.004
    assert duration >= 1.4 * work  # paced at all (FRACTION is at most 2/3)
    assert 0.95 <= duration / (BURST + (work - BURST) / FRACTION) <= 1.05, duration
    assert gap <= 0.004 + 0.0011


def test_a_small_reply_through_the_request_server_is_not_paced(tmp_path: Path, vclock, vloop) -> None:
    """A filtered status's worth of work (tens of ms) goes at full speed."""
    duration, _, data = _serve(tmp_path, vclock, vloop, 20, 0.004, 4000)
    assert data.count(b",") == 20
    assert duration <= 20 * 0.004 + 0.01, duration


def test_the_supervisors_replies_are_paced_after_a_smaller_burst(tmp_path: Path, vclock, vloop) -> None:
    """The supervisor answers no pings: its big replies (a scrape at 100,000 peers) yield the CPU
    after SUPERVISOR_BURST, not BURST (its 0.1 s unpaced burst took a core while the workers'
    pongs waited). A worker's pacer keeps BURST: its filtered scans are not slowed."""
    from hbd.config import ServerConfig
    from hbd.pacing import SUPERVISOR_BURST, pacer_for
    from hbd.server import Server
    from hbd.workers import Supervisor

    cfg = ServerConfig(host="127.0.0.1", port=0, workers=2, log_file=None, control_socket=None, state_dir=None)
    Supervisor(cfg, loop=vloop)
    assert pacer_for(vloop).burst == SUPERVISOR_BURST < BURST
    duration, _, data = _serve(tmp_path, vclock, vloop, 20, 0.004, 4000)  # 80 ms of work: under BURST
    assert data.count(b",") == 20
    work = 20 * 0.004
    assert 0.9 <= duration / (SUPERVISOR_BURST + (work - SUPERVISOR_BURST) / FRACTION) <= 1.1, duration
    worker = Server(cfg)
    assert pacer_for(worker.loop).burst == BURST
    worker.loop.close()


def test_a_write_callback_produces_for_at_most_write_slice(tmp_path: Path, vclock, vloop) -> None:
    """Chunks that come without a pause (the status rows' generators) are pulled for at most
    WRITE_SLICE of a write callback, not until 64 KB wait unsent: a 1 ms timer (a pong) waits one
    short slice, not 60 ms of rows."""
    duration, gap, data = _serve(tmp_path, vclock, vloop, 60, 0.001, 1000, turns=False)
    assert data.count(b",") == 60 and duration <= 0.06 + 0.01
    assert WRITE_SLICE <= 0.002 and gap <= 0.002 + 0.001 + 0.0011, gap


# -- bulk replies: every peer's rows or values, paced from the first slice ---------------------------------
ROW_COST = 0.00002  # 20 us of (virtual) work per status row: about what a worker's costs
PING_COST = 0.000001  # 1 us per last ping (a 16-byte record: hbd.ping_times)


def _worker(vloop, vclock, peers: int, calls: list[float]):
    """A stand-in for a worker (hbd.operated.Operated, as hbd.commands reads it) of ``peers``
    connected peers whose every row costs ROW_COST of the virtual clock, every last ping PING_COST;
    ``calls``: when each was made."""
    from types import SimpleNamespace

    from hbd.view import DaemonView, LoopNumbers, PeerRow, PeerSource, ServerCounters, ServerSettings, ServerView

    def row(i: int) -> PeerRow:
        calls.append(vclock())
        vclock.advance(ROW_COST)
        return PeerRow(f"host{i:06d}", f"host{i:06d}", f"10.0.0.1:{i}", "UP", 1.0, 2.0, 3, 30.0, 10.0, 0)

    def pings():
        for i in range(peers):
            calls.append(vclock())
            vclock.advance(PING_COST)
            yield i, 2.0

    def view() -> ServerView:
        daemon = DaemonView("server", vclock(), 1.7e9, "", 0, 0, None, LoopNumbers(0.0, 0.0, 0), {}, {}, ())
        source = PeerSource(peers, lambda i: (f"host{i:06d}", f"10.0.0.1:{i}", "UP"), row)
        return ServerView(
            daemon, None, ServerSettings(30.0, 100, 6), ServerCounters(), [], None, (source,), last_pings=pings
        )

    return SimpleNamespace(role="server", supervises=False, worker_index=0, loop=vloop, view=view)


def _ask_worker(tmp_path: Path, vclock, vloop, request: bytes, peers: int) -> tuple[float, float, list[float], bytes]:
    """``request`` to a worker's status socket (hbd.commands.answer), read as fast as it comes:
    (its duration, the longest gap between two ticks of a 1 ms timer, when each row was made, the reply)."""
    from hbd import commands

    calls: list[float] = []
    daemon = _worker(vloop, vclock, peers, calls)
    listener = UnixListener(str(tmp_path / "w.sock"))
    server = RequestServer(vloop, listener.sock, lambda req, wake: commands.answer(daemon, None, req, wake))
    client = socket.socket(socket.AF_UNIX)
    client.connect(listener.path)
    client.sendall(request)
    duration, gap, data = timed_reply(vloop, vclock, client, server, listener)
    return duration, gap, calls, data


def _busiest(calls: list[float], window: float, cost: float) -> float:
    """The most work (``cost`` per call) done in any ``window`` of the clock."""
    most, first = 0, 0
    for last, t in enumerate(calls):
        while calls[first] < t - window:
            first += 1
        most = max(most, last - first + 1)
    return most * cost


@pytest.mark.parametrize(
    ("request_line", "peers", "cost"),
    [(b'{"request": "peers", "limit": 0}\n', 4000, ROW_COST), (b"pings\n", 80000, PING_COST)],
)
def test_a_workers_bulk_reply_is_paced_from_its_first_slice(
    tmp_path: Path, vclock, vloop, request_line: bytes, peers: int, cost: float
) -> None:
    """A worker's part of a full listing (its every row) and of a scrape (its every last ping) take
    at most BULK_FRACTION of the loop's time in every 20 ms from their first slice, and a timer (a
    pong) waits at most one short slice. 80 ms of work (4,000 peers) is under BURST: before bulk
    replies were paced from the start, it went unpaced, a core for 80 ms while the pongs waited
    (80,000 last pings likewise: 80 ms)."""
    from hbd.control import BULK_SLICE
    from hbd.pacing import BULK_FRACTION

    duration, gap, calls, data = _ask_worker(tmp_path, vclock, vloop, request_line, peers)
    assert len(calls) == peers and data  # every row (or record) made and sent
    work = peers * cost
    assert duration >= 0.9 * work / BULK_FRACTION, duration
    assert duration <= 1.3 * work / BULK_FRACTION, duration  # and not slower than its share
    window = 0.02
    assert _busiest(calls, window, cost) <= BULK_FRACTION * window + 2 * BULK_SLICE
    assert gap <= 2 * BULK_SLICE + 0.0011, gap


def test_a_filtered_status_is_not_paced(tmp_path: Path, vclock, vloop) -> None:
    """A worker's part of a filtered status (a name glob) looks at every peer but makes few rows: it
    is no bulk reply and goes at full speed (hbd.status_select.SCAN peers per turn)."""
    request = b'{"request": "peers", "peer": "host0000*", "limit": 100}\n'
    duration, _, calls, data = _ask_worker(tmp_path, vclock, vloop, request, 4000)
    assert len(calls) == 100 and b'"matched":100' in data
    assert duration <= 100 * ROW_COST + 0.01, duration
