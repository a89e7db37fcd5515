"""Lines peers can cause stay few under attack: the limiter (sans-I/O, virtual time) holds every
source, every kind of line and all of them together to a budget per window and sums up the rest
once per kind; hook failures go through it too; a real server attacked from 250 addresses."""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import pytest
from daemons import start_server
from virtual_time import FakeClock

from hbd.hooks import HookRunner
from hbd.logs import PEER_TOTAL_BURST, PeerLog, PeerLogLimiter
from hbd.loop import EventLoop


def test_many_sources_together_get_one_budget() -> None:
    """250 sources, 3 kinds of line, 150 lines a second for a minute: at most the total budget per
    window, and one summary per kind that counts lines and sources."""
    lim = PeerLogLimiter()
    clock = FakeClock(0.0)
    kinds = ("connected", "protocol-error", "dead")
    logged: list[float] = []
    summaries = []
    for i in range(150 * 60):
        source = f"127.0.0.{2 + i % 250}"
        if lim.check(source, kinds[i % 3], clock()):
            logged.append(clock())
        summaries += lim.expired(clock())
        clock.advance(1 / 150)
    summaries += lim.expired(clock() + 10)
    for start in range(0, 60, 10):  # whatever 10 s one looks at
        assert len([t for t in logged if start <= t < start + 10]) <= 2 * PEER_TOTAL_BURST
    assert len(logged) <= 6 * PEER_TOTAL_BURST + PEER_TOTAL_BURST  # ~30 per window
    assert len(logged) >= 6 * PEER_TOTAL_BURST - 3  # but the budget is used: news still gets out
    assert {s.kind for s in summaries} == set(kinds)
    assert len(summaries) <= 3 * 7  # one per kind per window
    assert sum(s.lines for s in summaries) + len(logged) == 150 * 60  # every line is accounted for
    assert all(s.sources > 80 and s.source is None for s in summaries)


def test_one_kind_cannot_use_up_the_others_budget() -> None:
    lim = PeerLogLimiter()
    for i in range(1000):  # a connect flood from many addresses
        lim.check(f"10.0.{i // 250}.{i % 250}", "connected", 1.0)
    assert [lim.check(f"192.0.2.{i}", "dead", 2.0) for i in range(12)] == [True] * 10 + [False] * 2


def test_one_noisy_source_cannot_silence_the_others() -> None:
    lim = PeerLogLimiter()
    assert sum(lim.check("203.0.113.9", "protocol-error", 0.0) for _ in range(100)) == 5
    assert lim.check("198.51.100.1", "protocol-error", 0.0)
    (s,) = lim.expired(10.0)
    assert (s.kind, s.lines, s.sources, s.source) == ("protocol-error", 95, 1, "203.0.113.9")
    assert lim.expired(20.0) == []  # reported once


def test_a_new_window_brings_a_new_budget() -> None:
    lim = PeerLogLimiter(burst=2, kind_burst=3, total_burst=4, interval=10.0)
    assert [lim.check("a", "k", 0.0) for _ in range(3)] == [True, True, False]
    assert lim.check("a", "k", 10.0)
    (s,) = lim.expired(10.0)  # the old window's summary is ready as soon as a new one starts
    assert s.lines == 1


def test_the_limiter_is_bounded_in_memory() -> None:
    lim = PeerLogLimiter(max_sources=100)
    for i in range(100_000):
        lim.check(f"2001:db8::{i:x}", "connected", i / 10_000)
    assert len(lim._windows) <= 100
    assert all(len(kw.sources) <= 100 for kw in lim._kinds.values())
    assert all(s.sources <= 100 for s in lim.expired(100.0))


def test_peer_log_writes_one_summary_per_kind(records) -> None:
    clock = FakeClock(0.0)
    pl = PeerLog(clock)
    for i in range(300):
        pl.log(logging.WARNING, f"127.0.0.{2 + i % 250}", "closing client %d", i, event="protocol-error")
        pl.log(logging.INFO, "127.0.0.2", "client %d connected", i, event="connected")
    lines = [r.getMessage() for r in records]
    assert len(lines) == 10 + 5  # the kind budget; one source's burst
    clock.advance(9.9)
    pl.flush()
    assert len(records) == 15
    clock.advance(0.1)
    pl.flush()
    summaries = sorted(r.getMessage() for r in records[15:])
    assert summaries == [
        "suppressed 290 'protocol-error' lines from 250 sources in the last 10 s",
        "suppressed 295 'connected' lines caused by 127.0.0.2 in the last 10 s",
    ]
    assert all(r.levelno == logging.WARNING for r in records[15:])


# -- hook failures (issue 15, point 11) -------------------------------------------------------------
@pytest.fixture
def runner():
    loop = EventLoop()
    r = HookRunner(loop, "server")
    yield r
    for job in list(r.running.values()):
        job.proc.kill()
        job.proc.wait()
    loop.close()


def test_hook_failures_of_a_flapping_peer_are_rate_limited(tmp_path: Path, runner: HookRunner, records) -> None:
    clock = FakeClock(0.0)
    runner.peer_log = PeerLog(clock)
    runner.configure(["/bin/sh", "-c", "exit 3"], timeout=5, max_running=4, max_queued=100)
    for i in range(30):  # one peer flapping: a new port per connection, the same host
        runner.fire("up" if i % 2 else "down", f"10.0.0.7:{40000 + i}", f"10.0.0.7:{40000 + i}")
    deadline = time.monotonic() + 20
    while runner.counts["failed"] < 30:
        assert time.monotonic() < deadline, runner.counts
        runner.loop.run_once(0.02)
    failed = [r for r in records if "on_change hook for" in r.getMessage()]
    assert len(failed) == 5
    clock.advance(10)
    runner.peer_log.flush()
    assert [r.getMessage() for r in records if "suppressed" in r.getMessage()] == [
        "suppressed 25 'hook-failed' lines caused by 10.0.0.7 in the last 10 s"
    ]


def test_a_missing_hook_program_is_rate_limited(tmp_path: Path, runner: HookRunner, records) -> None:
    runner.configure([str(tmp_path / "gone")], timeout=5, max_running=4, max_queued=100)
    for i in range(20):
        runner.fire("down", f"web{i}", f"192.0.2.{i}:80")  # 20 peers: the kind budget applies
    deadline = time.monotonic() + 10
    while runner.counts["error"] < 20:
        assert time.monotonic() < deadline, runner.counts
        runner.loop.run_once(0.02)
    assert len([r for r in records if "cannot run the on_change hook" in r.getMessage()]) == 10


# -- a real server attacked from 250 addresses (point 12) ----------------------------------------------
@pytest.mark.slow
def test_a_server_attacked_from_250_addresses_logs_a_few_lines(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=1.0)
    procs.append(srv)
    port = srv.config["port"]
    start = srv.mark()
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < 9.0:  # inside one 10 s window of the limiter
        for _ in range(25):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + (sent % 250)}", 0))
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"garbage!\n")  # connected, then closed for a protocol error
            except OSError:
                pass
            s.close()
            sent += 1
        time.sleep(0.5)
    attack = srv.output().splitlines()[start:]
    peer_lines = [ln for ln in attack if re.search(r"127\.0\.0\.\d+:\d+", ln) and "suppressed" not in ln]
    srv.wait_for(r"suppressed \d+ 'protocol-error' lines from \d+ sources", timeout=5, after=start)
    time.sleep(1.5)
    summaries = [ln for ln in srv.output().splitlines()[start:] if "suppressed" in ln]
    file_lines = Path(srv.config["log_file"]).read_text().splitlines()
    print(
        f"\n{sent} connections from 250 addresses in {time.monotonic() - t0:.1f} s: {len(peer_lines)} peer lines, "
        f"{len(summaries)} summaries; log file {len(file_lines)} lines"
    )
    assert sent >= 400
    assert len(peer_lines) <= PEER_TOTAL_BURST, "\n".join(peer_lines)
    kinds = [re.search(r"'([a-z-]+)' lines", ln).group(1) for ln in summaries]
    assert sorted(kinds) == sorted(set(kinds)) and "protocol-error" in kinds, summaries  # one per kind
    assert len(file_lines) <= PEER_TOTAL_BURST + len(summaries) + 2


def test_peer_lines_name_their_real_call_site(records) -> None:
    """journald's CODE_FILE/CODE_FUNC come from the record: the limiter must not take their place."""
    pl = PeerLog(FakeClock(0.0))

    def caller() -> None:
        pl.log(logging.WARNING, "192.0.2.1", "client timed out", event="dead")

    caller()
    (r,) = records
    assert r.pathname == __file__ and r.funcName == "caller"
