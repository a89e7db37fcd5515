"""hbd.worker_pool on its own: the supervisor's writes to a worker that does not read."""

from __future__ import annotations

import itertools
import os
import socket
import time

from hbd.loop import EventLoop
from hbd.worker_pool import HANG_AFTER, Worker, WorkerPool
from hbd.workers_codec import Decoder, PeerMark


def mark(i: int) -> PeerMark:
    return PeerMark(i, f"c1x{i}", True, "UP", 1.0e9 + i, "first ping", False, [], [], None)


def test_a_worker_that_does_not_read_costs_the_supervisor_linear_time() -> None:
    """40,000 marks (about 3 MB) to a worker whose pipe is full: each is appended, not the whole
    backlog copied per mark (that was quadratic: seconds of the supervisor's loop at 150,000
    peers); all arrive, in order, once the worker reads."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    loop = EventLoop()
    pool = WorkerPool(loop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    worker = Worker(1, 0, -1, w, 0.0)
    try:
        start = time.process_time()
        for i in range(40_000):
            pool.send(worker, mark(i))
        took = time.process_time() - start
        assert len(worker.outbuf) > 2_500_000  # the pipe (64 KB) took little: the rest waits
        assert took < 3.0, f"{took:.2f} s of CPU for 40,000 marks"  # bytes: about 40 s here
        got: list[int] = []
        dec = Decoder(down=True)
        os.set_blocking(r, False)
        while len(got) < 40_000:
            try:
                data = os.read(r, 1 << 20)
            except BlockingIOError:
                pool._flush(worker)  # what the loop's writer callback does when the pipe has room
                continue
            got += [m.conn for m in dec.feed(data)]
        assert got == list(range(40_000)) and not worker.outbuf
    finally:
        os.close(r)
        os.close(w)
        loop.close()


def test_a_worker_silent_past_hang_after_is_killed_but_not_for_the_supervisors_own_stall(
    vloop, vclock, monkeypatch
) -> None:
    """Checked every second, a worker that stops reporting is killed after HANG_AFTER; when the
    supervisor's own loop stalled past HANG_AFTER (it read no pipe meanwhile) nobody is killed: each
    worker gets HANG_AFTER afresh from the end of the stall."""
    import hbd.worker_pool as worker_pool

    killed: list[int] = []
    monkeypatch.setattr(worker_pool, "kill", lambda pid, sig: killed.append(pid))
    pool = WorkerPool(vloop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    a, b = Worker(1, 101, -1, -1, vclock.now), Worker(2, 102, -1, -1, vclock.now)
    a.ready = b.ready = True
    pool.workers = {101: a, 102: b}

    def seconds(n: int, reporting: list[Worker]) -> None:
        for _ in range(n):
            vclock.advance(1.0)
            for w in reporting:
                w.last_seen = vclock.now
            pool.check_hung()

    seconds(3, [a, b])
    vclock.advance(HANG_AFTER + 13)  # our own stall of 23 s: neither pipe read meanwhile
    pool.check_hung()
    seconds(int(HANG_AFTER) - 1, [a, b])
    assert killed == []
    seconds(int(HANG_AFTER) + 2, [a])  # b really stops reporting
    assert killed == [102]


class _Reports:
    def __init__(self, into: list[object]) -> None:
        self.into = into

    def report(self, index: int, msg: object) -> None:
        self.into.append(msg)


def test_a_turn_reads_a_bounded_share_of_reports_however_many_workers() -> None:
    """Every worker's pipe full of reports: one read of each (what one loop turn does) takes at most
    TURN_READ in all with many workers (24 x 16 KB before: a 12 s turn at 400,000 clients), its
    share of TURN_READ with few; nothing is lost, the rest waits in the pipes."""
    from hbd.worker_pool import MIN_READ, TURN_READ
    from hbd.workers_codec import PIPE_READ, PeerConnected, encode

    frame = encode(PeerConnected(7, "c1-7", None, "127.0.0.1:40000", 180.0))
    for count in (2, 24, 64):
        loop = EventLoop()
        pool = WorkerPool(loop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
        got: list[object] = []
        pool.peers = _Reports(got)  # type: ignore[assignment]
        pipes = [os.pipe() for _ in range(count)]
        try:
            for i, (r, w) in enumerate(pipes):
                os.set_blocking(w, False)
                os.write(w, frame * (PIPE_READ // len(frame) + 50))  # more than one full read
                pool.workers[1000 + i] = Worker(i + 1, 1000 + i, r, -1, 0.0)
            for wk in list(pool.workers.values()):
                pool._on_pipe(wk)
            taken = len(got) * len(frame)
            share = max(MIN_READ, min(PIPE_READ, TURN_READ // count))
            assert taken <= count * share + count * len(frame)
            if count >= 24:
                assert taken <= TURN_READ + count * MIN_READ
            else:
                assert taken >= count * (share - len(frame))  # each read takes its whole share
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            loop.close()


def test_a_supervisor_turn_of_a_reconnect_storm_is_a_few_dozen_reports() -> None:
    """workers: 6 (the 100,000-client setup) with every pipe full of a reconnect storm's reports (a
    greeting and a first ping per client): one turn's reads hand the registry a few dozen of them
    (TURN_READ 2 KB). A first ping cost the registry 40-50 us at 100,000 peers; with 64 KB a turn it
    was 650-900 reports, 30-55 ms of CPU, and the storm's supervisor turns took 0.4-1.3 s on the
    loaded machine (docs/performance.md, "Mass events"); 8 KB was ~200."""
    from hbd.workers_codec import PIPE_READ, PeerConnected, PeerHello, encode

    loop = EventLoop()
    pool = WorkerPool(loop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    got: list[object] = []
    pool.peers = _Reports(got)  # type: ignore[assignment]
    pipes = [os.pipe() for _ in range(6)]
    try:
        for i, (r, w) in enumerate(pipes):
            os.set_blocking(r, False)  # (as spawn() sets it)
            storm = b"".join(
                encode(PeerHello(c, f"host{c:05d}", None, f"127.66.{i + 1}.1:{40000 + c}"))
                + encode(PeerConnected(c, f"host{c:05d}", None, f"127.66.{i + 1}.1:{40000 + c}", 60.0))
                for c in range(i * 1000, i * 1000 + PIPE_READ // 100)
            )
            os.write(w, storm)  # more than a pipe read's worth
            pool.workers[1000 + i] = Worker(i + 1, 1000 + i, r, -1, 0.0)
        for wk in list(pool.workers.values()):  # one turn: each pipe readable once
            pool._on_pipe(wk)
        assert 25 <= len(got) <= 64, len(got)
        for _ in range(200):  # the next turns
            for wk in pool.workers.values():
                pool._on_pipe(wk)
        assert len(got) == 6 * 2 * (PIPE_READ // 100)  # nothing lost: the rest came in the next turns
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        loop.close()


def test_a_turns_orders_to_a_worker_are_one_write(monkeypatch) -> None:
    """A storm's turn orders hundreds of marks: they are written at the end of the turn, one write()
    per worker of everything queued for it (one per order was 5.5 % of the supervisor's storm CPU),
    in order; a worker whose pipe is full gets the rest from its writer callback, and one that
    exited meanwhile is not written to (its descriptor may be another file's by then)."""
    import hbd.worker_pool as worker_pool

    writes: list[int] = []
    real_write = os.write
    monkeypatch.setattr(worker_pool.os, "write", lambda fd, data: writes.append(fd) or real_write(fd, data))
    loop = EventLoop()
    pool = WorkerPool(loop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    pipes = [os.pipe() for _ in range(3)]
    try:
        for i, (r, w) in enumerate(pipes):
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            pool.workers[1000 + i] = Worker(i + 1, 1000 + i, -1, w, 0.0)
        gone = pool.workers[1002]

        def turn() -> None:  # what a turn's reports make the registry order
            for c in range(300):
                pool.order(c % 3 + 1, mark(c))
                assert writes == []  # nothing written yet: after the turn's I/O
            del pool.workers[1002]  # worker 3 exited in this turn (reap)

        a, b = socket.socketpair()
        loop.add_reader(a, turn)
        b.send(b"x")
        loop.run_once(0)
        loop.remove_reader(a)
        a.close()
        b.close()
        assert sorted(writes) == [pipes[0][1], pipes[1][1]]  # one write each; none to the one that exited
        for i in (0, 1):
            got = [m.conn for m in Decoder(down=True).feed(os.read(pipes[i][0], 1 << 20))]
            assert got == list(range(i, 300, 3))
        assert gone.outbuf and not gone.due
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        loop.close()


def test_a_storms_orders_are_written_at_most_every_flush_gap(monkeypatch, vloop, vclock) -> None:
    """Turns of a storm 2 ms apart, each ordering marks to two workers: their orders are written once
    per FLUSH_GAP (one write per worker), not once per turn (a write wakes a worker, and the woken
    worker may take the supervisor's core); after a quiet FLUSH_GAP an order is written in its turn."""
    import hbd.worker_pool as worker_pool

    writes: list[tuple[float, int]] = []
    real_write = os.write
    monkeypatch.setattr(worker_pool.os, "write", lambda fd, data: writes.append((vclock(), fd)) or real_write(fd, data))
    pool = WorkerPool(vloop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    pipes = [os.pipe() for _ in range(2)]
    try:
        for i, (_, w) in enumerate(pipes):
            os.set_blocking(w, False)
            pool.workers[1000 + i] = Worker(i + 1, 1000 + i, -1, w, 0.0)
        start = vclock()
        for turn in range(20):  # 40 ms of turns, 2 ms apart
            for c in range(10):
                pool.order(c % 2 + 1, mark(turn * 10 + c))
            vloop.run_once(0)
            vclock.advance(0.002)
        vloop.run_once(1.0)  # the last orders: FLUSH_GAP after the previous write
        flushes = sorted({t for t, _ in writes})
        assert len(writes) == 2 * len(flushes)  # one write per worker each time
        assert flushes[0] == start  # the first at once
        assert all(b - a >= worker_pool.FLUSH_GAP - 1e-9 for a, b in itertools.pairwise(flushes))
        assert len(flushes) <= 0.040 / worker_pool.FLUSH_GAP + 2  # not 20
        for i, (r, _) in enumerate(pipes):  # every order arrived, in order
            assert [m.conn for m in Decoder(down=True).feed(os.read(r, 1 << 20))] == list(range(i, 200, 2))
        vclock.advance(1.0)  # quiet: the next order goes out in its own turn
        writes.clear()
        pool.order(1, mark(999))
        vloop.run_once(0)
        assert writes == [(vclock(), pipes[0][1])]
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_garbled_pipe_restarts_its_worker_once_and_a_bad_frame_is_only_skipped(monkeypatch, caplog) -> None:
    """A frame that cannot be decoded (a bug: both ends are ours) is logged and skipped, the reports
    after it still reach the registry; a stream whose framing is lost is logged once, no longer read,
    and its worker killed (reap() restarts it and its connections are gone), not read as garbage turn
    after turn."""
    import logging

    monkeypatch.setattr(logging.getLogger("hbd"), "propagate", True)  # (a daemon's Logging turns it off)
    import hbd.worker_pool as worker_pool
    from hbd.workers_codec import HEADER, PeerBack, PeerLate, encode

    killed: list[int] = []
    monkeypatch.setattr(worker_pool, "kill", lambda pid, sig: killed.append(pid))
    loop = EventLoop()
    pool = WorkerPool(loop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    got: list[object] = []
    pool.peers = _Reports(got)  # type: ignore[assignment]
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        worker = pool.workers[1000] = Worker(1, 1000, r, -1, 0.0)
        loop.add_reader(r, lambda: pool._on_pipe(worker))
        late = encode(PeerLate(5))
        os.write(w, encode(PeerLate(4)) + HEADER.pack(3, late[4]) + b"\0\0\0" + encode(PeerBack(6)))
        loop.run_once(0)
        assert got == [PeerLate(4), PeerBack(6)] and killed == []
        assert "worker 1: bad PeerLate frame" in caplog.text
        os.write(w, late + b"\xff" * 64 + late)
        loop.run_once(0)
        assert got[2:] == [PeerLate(5)] and killed == [1000]
        assert caplog.text.count("restarting it") == 1
        os.write(w, late * 10)
        loop.run_once(0)
        assert len(got) == 3 and killed == [1000]  # no longer read: the worker is being restarted
    finally:
        os.close(r)
        os.close(w)
        loop.close()


def test_a_supervisor_turn_of_a_teardown_is_a_few_dozen_ends() -> None:
    """workers: 6, every pipe full of ends (bench.scale's teardown: 99,000 hang up at once), one turn
    of the real loop: the registry gets a few dozen of them (TURN_READ 2 KB: ~56 ends of 36 bytes,
    ~2 ms of CPU at 30-38 us an end with the state store on). 8 KB (~227 ends, 7-9 ms) made turns of
    60-210 ms in that teardown, 90 % of them waiting for a core (17 runnable tasks on 2 cores: its
    run queue wait 8-23x the turn's CPU; docs/performance.md, "The supervisor's teardown turn")."""
    from hbd.workers_codec import PIPE_READ, PeerGone, encode

    loop = EventLoop()
    pool = WorkerPool(loop, None, lambda *a: None, lambda: None)  # type: ignore[arg-type]
    got: list[object] = []
    pool.peers = _Reports(got)  # type: ignore[assignment]
    pipes = [os.pipe() for _ in range(6)]
    each = PIPE_READ // 30
    try:
        for i, (r, w) in enumerate(pipes):
            os.set_blocking(r, False)
            os.write(w, b"".join(encode(PeerGone(c, "disconnected", 1000.0 + c)) for c in range(each)))
            worker = pool.workers[1000 + i] = Worker(i + 1, 1000 + i, r, -1, 0.0)
            loop.add_reader(r, lambda wk=worker: pool._on_pipe(wk))  # as spawn() registers it
        loop.run_once(0)  # one turn: every pipe is readable
        assert 30 <= len(got) <= 64, len(got)
        turns = 1
        while len(got) < 6 * each and turns < 1000:
            loop.run_once(0)
            turns += 1
        assert len(got) == 6 * each  # nothing lost: the rest waited in the pipes for the next turns
        assert turns >= 6 * each // 64
    finally:
        for r, w in pipes:
            loop.remove_reader(r)
            os.close(r)
            os.close(w)
        loop.close()
