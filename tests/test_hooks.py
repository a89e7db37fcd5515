"""on_change hooks: arguments and environment, timeout kill, concurrency cap, bounded queue, failures,
and a real server that keeps answering pings on time while hooks sleep."""

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from daemons import connect, recv_exactly, start_server

from hbd.control import query
from hbd.hooks import HookRunner
from hbd.loop import EventLoop


@pytest.fixture
def runner():
    loop = EventLoop()
    r = HookRunner(loop, "server")
    yield r
    for job in list(r.running.values()):  # nothing may outlive a test
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
    loop.close()


def drive(r: HookRunner, until, timeout: float = 5.0) -> float:
    """Run the loop until ``until()`` holds; return the largest number of hooks running at once."""
    most = 0
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; counts {r.counts}, running {len(r.running)}"
        r.loop.run_once(0.02)
        most = max(most, len(r.running))
    return most


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_arguments_and_environment(tmp_path: Path, runner: HookRunner, monkeypatch) -> None:
    monkeypatch.setenv("HOOK_OUT", str(tmp_path / "out"))
    hook = script(tmp_path, 'exec > "$HOOK_OUT"; echo "$@"; env | grep ^HBD_ | sort\n')
    runner.configure([hook, "--flag"], timeout=5, max_running=2, max_queued=10)
    runner.fire("up", "web1", "10.0.0.7:40112", {"name": "web1", "previous": "new", "reason": "first ping"})
    drive(runner, lambda: runner.counts["ok"] == 1)
    args, *env = (tmp_path / "out").read_text().splitlines()
    assert args == "--flag up web1 10.0.0.7:40112 server"
    env = dict(line.split("=", 1) for line in env)
    assert env.pop("HBD_TIME").replace(".", "").isdigit()
    assert env == {
        "HBD_ADDRESS": "10.0.0.7:40112",
        "HBD_EVENT": "up",
        "HBD_NAME": "web1",
        "HBD_PEER": "web1",
        "HBD_PREVIOUS": "new",
        "HBD_REASON": "first ping",
        "HBD_ROLE": "server",
        "HBD_COALESCED": "0",
    }


def test_a_hook_past_its_timeout_is_killed_with_its_children(
    tmp_path: Path, runner: HookRunner, records, monkeypatch
) -> None:
    monkeypatch.setenv("HOOK_OUT", str(tmp_path))
    hook = script(tmp_path, 'sleep 30 & echo $! > "$HOOK_OUT/child"; wait\n')
    runner.configure([hook], timeout=0.3, max_running=1, max_queued=10)
    t0 = time.monotonic()
    runner.fire("down", "db1", "10.0.0.8:5000")
    drive(runner, lambda: not runner.running)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert runner.counts == {"ok": 0, "failed": 0, "timeout": 1, "error": 0, "dropped": 0, "coalesced": 0}
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 2
    while True:  # the hook's own child dies too (SIGKILL lands asynchronously; a zombie is dead)
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        assert time.monotonic() < deadline, f"the hook's child {child} is still alive ({state})"
        time.sleep(0.01)
    assert any("still running after 0.3" in r.getMessage() and r.levelno == logging.WARNING for r in records)


def test_at_most_max_concurrent_run_at_once(tmp_path: Path, runner: HookRunner) -> None:
    runner.configure(["/bin/sh", "-c", "sleep 0.1"], timeout=5, max_running=2, max_queued=10)
    t0 = time.monotonic()
    for i in range(6):
        runner.fire("up", f"p{i}", "a:1")
    assert len(runner.running) == 2 and len(runner.queue) == 4
    most = drive(runner, lambda: runner.counts["ok"] == 6)
    assert most == 2
    assert time.monotonic() - t0 >= 0.3  # three rounds of two


def test_process_starts_are_rate_limited(runner: HookRunner, monkeypatch) -> None:
    """Forking costs the loop milliseconds with many sockets open: a burst of fast hooks is paced."""
    monkeypatch.setattr(runner.queue, "rate", 100.0)
    starts: list[float] = []
    real_start = runner._start
    monkeypatch.setattr(runner, "_start", lambda job: (starts.append(runner.loop.time()), real_start(job)))
    runner.configure(["/bin/true"], timeout=5, max_running=5, max_queued=20)
    for i in range(15):
        runner.fire("up", f"p{i}", "a:1")
    drive(runner, lambda: runner.counts["ok"] == 15)
    assert len(starts) == 15
    for k in range(5, 15):  # a burst of 5, then 100 a second
        assert starts[k] - starts[0] >= (k - 4) / 100 - 0.002, (k, starts[k] - starts[0])


def test_a_full_queue_drops_the_oldest_and_says_so_once(
    tmp_path: Path, runner: HookRunner, records, monkeypatch
) -> None:
    monkeypatch.setenv("HOOK_OUT", str(tmp_path / "ran"))
    hook = script(tmp_path, 'echo "$2" >> "$HOOK_OUT"; sleep 0.05\n')
    runner.configure([hook], timeout=5, max_running=1, max_queued=2)
    for i in range(1, 7):
        runner.fire("late", f"e{i}", "a:1")
    drive(runner, lambda: runner.counts["ok"] == 3)
    assert (tmp_path / "ran").read_text().split() == ["e1", "e5", "e6"]
    assert runner.counts["dropped"] == 3
    warnings = [r.getMessage() for r in records if "hook queue full" in r.getMessage()]
    assert len(warnings) == 1 and "the last late for e2" in warnings[0]


def test_failures_are_logged(tmp_path: Path, runner: HookRunner, records) -> None:
    runner.configure(["/bin/sh", "-c", "exit 3"], timeout=5, max_running=2, max_queued=10)
    runner.fire("down", "web2", "a:1")
    drive(runner, lambda: runner.counts["failed"] == 1)
    runner.configure([str(tmp_path / "missing")], timeout=5, max_running=2, max_queued=10)
    runner.fire("down", "web3", "a:1")
    assert runner.counts["error"] == 1
    messages = [(r.levelno, r.getMessage()) for r in records]
    assert (logging.WARNING, "on_change hook for down web2 failed: exit status 3") in [
        (lvl, m.split(" after ")[0]) for lvl, m in messages
    ]
    assert any(lvl == logging.ERROR and "cannot run the on_change hook" in m and "web3" in m for lvl, m in messages)


def test_sleeping_hooks_and_a_flapping_peer_do_not_delay_pongs(tmp_path: Path, procs) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    hook = script(tmp_path, f"echo $$ > {pids}/$$; exec sleep 30 >/dev/null 2>&1\n")  # not holding our pipe
    srv = start_server(
        tmp_path,
        heartbeat_timeout=5,
        on_change=[hook],
        hook_timeout=20,
        hook_max_concurrent=3,
        hook_max_queued=5,
        env={"HOOK_TAG": str(tmp_path)},
    )
    procs.append(srv)
    port = srv.config["port"]
    try:
        steady = connect(port)
        rtts = []
        flaps = 0
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            with connect(port) as f:  # a peer that comes up and goes down again and again
                f.sendall(b"ping")
                recv_exactly(f, 4)
                flaps += 1
            t0 = time.perf_counter()
            steady.sendall(b"ping")
            assert recv_exactly(steady, 4) == b"pong"
            rtts.append(time.perf_counter() - t0)
            time.sleep(0.01)
        doc = json.loads(query(str(tmp_path / "server.sock"), "status"))
        hooks = doc["hooks"]
        assert hooks["running"] == 3 and hooks["queued"] == 5
        assert hooks["dropped"] > 0
        assert hooks["dropped"] + hooks["coalesced"] == doc["events"]["up"] + doc["events"]["down"] - 8
        assert len(list(pids.iterdir())) == 3  # three sleeping hooks, no more
        assert flaps > 20
        rtts.sort()
        assert rtts[len(rtts) // 2] < 0.005 and rtts[-1] < 0.1, (rtts[len(rtts) // 2], rtts[-1])
        srv.wait_for(r"WARNING .*hook queue full")
        steady.close()
    finally:
        srv.stop()  # first: killing a running hook would start a queued one
        for pid in hooks_tagged(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def hooks_tagged(tag: str) -> list[int]:
    """Our hooks still running (they outlive the daemon, in their own sessions), found by their environment."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.isdigit() and f"HOOK_TAG={tag}".encode() in env:
            found.append(int(entry))
    return found


# -- fairness per peer ----------------------------------------------------------------------------
def test_a_flood_of_strangers_never_pushes_out_an_established_peers_change(
    tmp_path: Path, runner: HookRunner, monkeypatch
) -> None:
    monkeypatch.setenv("HOOK_OUT", str(tmp_path / "ran"))
    hook = script(tmp_path, 'echo "$1 $2" >> "$HOOK_OUT"\n')
    runner.configure([hook], timeout=5, max_running=1, max_queued=5)
    port = 40000
    for i in range(1, 6):
        for _ in range(40):  # connections that come and go within a millisecond, from many addresses
            port += 1
            runner.fire("up", f"10.0.{i}.9:{port}", f"10.0.{i}.9:{port}", standing=0.001)
            runner.fire("down", f"10.0.{i}.9:{port}", f"10.0.{i}.9:{port}", standing=0.001)
        runner.fire("down", f"web{i}", f"10.0.0.{i}:5000", standing=30.0)  # up for 30 s
    assert len(runner.queue) <= 5
    drive(runner, lambda: not runner.queue and not runner.running)
    ran = (tmp_path / "ran").read_text().splitlines()
    assert [line for line in ran if line.startswith("down web")] == [f"down web{i}" for i in range(1, 6)]
    assert runner.counts["coalesced"] > 0 and runner.counts["dropped"] > 0


def test_a_flapping_peer_is_coalesced_counted_and_run_in_order(tmp_path: Path, runner: HookRunner, monkeypatch) -> None:
    """Changes of one peer that come while its hook runs wait as one run of the latest, with the
    count of those it replaced; one peer's hooks never overlap; other peers are not held up."""
    monkeypatch.setenv("HOOK_OUT", str(tmp_path / "ran"))
    hook = script(
        tmp_path, 'echo "start $1 $2 $HBD_COALESCED" >> "$HOOK_OUT"; sleep 0.2; echo "end $1 $2" >> "$HOOK_OUT"\n'
    )
    runner.configure([hook], timeout=5, max_running=4, max_queued=10)
    runner.fire("up", "flap", "a:1")
    for event in ("late", "up", "late", "down"):
        runner.fire(event, "flap", "a:1")
    runner.fire("down", "other", "b:1")
    assert len(runner.running) == 2 and len(runner.queue) == 1  # "other" did not wait for "flap"
    drive(runner, lambda: not runner.queue and not runner.running)
    ran = [line for line in (tmp_path / "ran").read_text().splitlines() if line.split()[2] == "flap"]
    assert ran == ["start up flap 0", "end up flap", "start down flap 3", "end down flap"]
    assert runner.counts == {"ok": 3, "failed": 0, "timeout": 0, "error": 0, "dropped": 0, "coalesced": 3}


def test_memory_stays_bounded_under_distinct_peers(runner: HookRunner) -> None:
    runner.configure(["/bin/true"], timeout=5, max_running=1, max_queued=50)
    runner.queue.bucket_at = runner.loop.time()  # no tokens: nothing starts, everything waits
    runner.queue.bucket = 0.0
    for i in range(20000):
        runner.fire("down", f"p{i}", f"10.{i // 256 % 256}.{i % 256}.1:1", standing=i % 7)
    assert len(runner.queue) == 50 and len(runner.queue._order) <= 2 * 50 + 64
    assert runner.counts["dropped"] == 20000 - 50 - len(runner.running)  # a start or two as real time passes
    assert min(j.standing for j in runner.queue.waiting.values()) == 6  # the most established waited


def test_a_flapping_stranger_does_not_cost_real_peers_their_down_hooks(tmp_path: Path, procs) -> None:
    """A stranger connects, pings and leaves as fast as it can while 5 named peers go down: the 5
    `down` hooks all run."""
    out = tmp_path / "ran"
    hook = script(tmp_path, f'echo "$1 $2 $HBD_COALESCED" >> {out}; sleep 0.05\n')
    srv = start_server(tmp_path, heartbeat_timeout=5, on_change=[hook], hook_max_concurrent=2, hook_max_queued=20)
    procs.append(srv)
    port = srv.config["port"]
    real = []
    for i in range(1, 6):
        s = connect(port)
        s.sendall(f"hello web{i}\nping".encode())
        assert recv_exactly(s, 4) == b"pong"
        real.append(s)
    time.sleep(1.0)  # established
    flaps = 0
    t0 = time.monotonic()
    # At least 150 flaps (50 a second for 3 s): on a loaded machine this loop is slower, so it runs longer
    # instead of pressing the server less; whether the hooks were under pressure is asserted on the counters.
    while (time.monotonic() - t0 < 3.0 or flaps < 150) and time.monotonic() - t0 < 20.0:
        with connect(port) as f:
            f.sendall(b"ping")
            recv_exactly(f, 4)
        flaps += 1
        if real and time.monotonic() - t0 > 1.0:
            real.pop().close()  # one real peer goes down every few milliseconds, amid the flapping
        time.sleep(0.004)  # ~200 a second, as in the issue
    rate = flaps / (time.monotonic() - t0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        downs = [line for line in out.read_text().splitlines() if line.startswith("down web")] if out.exists() else []
        if len(downs) == 5:
            break
        time.sleep(0.1)
    doc = json.loads(query(str(tmp_path / "server.sock"), "status"))
    print(f"\nflapping stranger at {rate:.0f} connections/s; real down hooks run: {len(downs)}/5; hooks {doc['hooks']}")
    assert flaps >= 150
    assert sorted(downs) == [f"down web{i} 0" for i in range(1, 6)], downs
    assert doc["hooks"]["dropped"] + doc["hooks"]["coalesced"] > 0  # the stranger did lose its own
