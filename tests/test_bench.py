"""Smoke test of the benchmark harness (bench/) at tiny N, so the benchmark cannot silently rot.

Runs the real runner in its 'smoke' mode: the floor, hbd and thread-per-client servers on
127.0.0.1 with 20 clients for about a second each, plus one closed-loop run per server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is not an installed package

from bench import __main__ as bench_main  # noqa: E402
from bench import report  # noqa: E402
from bench.floor_server import reply  # noqa: E402
from bench.loadgen import loopback_addr  # noqa: E402


def test_floor_reply_framing() -> None:
    assert reply(b"pingping") == (b"pongpong", b"")
    assert reply(b"ping\nping\n") == (b"pong\npong\n", b"")
    assert reply(b"ping\npi") == (b"pong\n", b"pi")
    assert reply(b"xyz") == (b"", b"")


def test_loadgen_refuses_non_loopback() -> None:
    assert loopback_addr("127.0.0.1", 1) == ("127.0.0.1", 1)
    with pytest.raises(SystemExit):
        loopback_addr("192.0.2.1", 1)  # TEST-NET: rejected before any packet is sent


@pytest.mark.slow  # about 15 s of real load on the machine
def test_runner_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main.main(["--mode", "smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    recs = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in recs}
    assert {"machine", "open", "closed", "target"} <= kinds
    opened = {r["server"]: r for r in recs if r["kind"] == "open"}
    assert set(opened) == {"floor", "hbd", "thread"}
    for name, r in opened.items():
        assert r["ok"], r
        assert r["connected"] == 20 and r["pongs"] > 0, r
        assert r["errors"] == 0 and r["missed"] == 0, (name, r["errors"], r["missed"], r["error_kinds"], r["rtt_ms"])
        assert r["cpu_us_per_ping"] > 0 and r["threads"] >= 1
        assert r["cpu_user_us_per_ping"] >= 0 and r["cpu_sys_us_per_ping"] >= 0  # (10 ms ticks: may be 0)
        assert r["gen_wakeups_per_pong"] is not None and r["gen_wakeups_per_pong"] >= 0
        host = r["server_core_pct"]  # the host's share of the server's core in the window
        assert set(host) == {"steal", "softirq"} and all(0 <= v <= 100 for v in host.values()), host
        if name != "floor":  # the silent quarter is closed by the server, within timeout + checker slack
            assert r["silenced"] == 5 and r["undetected"] == 0, r
            assert r["detect_ms"]["p99"] < 1000 * (r["timeout_s"] + 1.1)
    assert opened["hbd"]["cpu_x_floor"] is not None
    # hbd's own loop turns, read from its status socket, next to the generator's RTT and lag
    turns = opened["hbd"]["turns"]
    assert turns["count"] > 0 and turns["max_ms"] > 0 and turns["over_100ms"] >= 0, turns
    assert opened["hbd"]["loop_turns"]["le_ms"]["+Inf"] == turns["count"]
    assert opened["floor"]["turns"] is None
    assert "hbd loop turns" in out and "generator lag p99" in out
    assert opened["thread"]["threads"] >= 20  # one per client
    for r in recs:
        if r["kind"] == "closed":
            assert r["ok"] and r["throughput"] > 0 and r["errors"] == 0, r
    assert "targets:" in out and "us/ping" in out
    # a second pair at the CPU target's N, hbd first (ABBA), and the median of the pairs' ratios
    paired = [(r["server"], r["pair"], r["n"]) for r in recs if r["kind"] == "cpu_pair"]
    assert paired == [("hbd", 1, 20), ("floor", 1, 20)]
    target = next(r for r in recs if r["kind"] == "target" and r["name"] == "cpu_per_ping_vs_floor_pairs")
    assert len(target["value"]["x"]) == 2 and target["value"]["median"] > 0


def test_cpu_pairs_take_the_median_of_the_pairs_ratios() -> None:
    def rec(kind: str, server: str, cpu: float, pair: int = 0) -> dict[str, object]:
        return {"kind": kind, "server": server, "n": 10000, "ok": True, "cpu_us_per_ping": cpu, "pair": pair}

    recs = [rec("open", "floor", 10.0), rec("open", "hbd", 15.0), rec("open", "hbd", 1.0) | {"n": 19000}]
    recs += [rec("cpu_pair", "hbd", 11.0, 1), rec("cpu_pair", "floor", 10.0, 1)]
    recs += [rec("cpu_pair", "floor", 10.0, 2), rec("cpu_pair", "hbd", 11.5, 2)]
    recs += [rec("cpu_pair", "floor", 9.0, 3)]  # its hbd run failed: not a pair
    pairs = report.cpu_pairs(recs)
    assert pairs is not None and pairs["n"] == 10000
    assert pairs["x"] == [1.5, 1.1, 1.15] and pairs["median"] == 1.15
    assert report.cpu_pairs([rec("open", "floor", 10.0), rec("open", "hbd", 15.0)]) is None


def test_history_read_smoke() -> None:
    """bench/history_read.py at 50 peers: it builds its store and times the three commands."""

    r = subprocess.run(
        [sys.executable, "-m", "bench.history_read", "--peers", "50", "--changes", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("store: 50 peers, 200 changes")
    assert [line.split(":")[0] for line in lines[1:]] == [
        "hbd history table",
        "hbd history --json",
        "hbd history one peer",
    ]


def test_memprobe_dump(tmp_path: Path) -> None:
    """bench/memprobe.py's probe, in this process: the figures bench/memrig.py subtracts are there."""
    import json

    from bench import memprobe

    (tmp_path / "tag").write_text("t")
    (tmp_path / "trim").write_text("")
    memprobe.dump(tmp_path)
    (found,) = tmp_path.glob("*-t.json")
    rec = json.loads(found.read_text())
    assert rec["vmrss"] > 0 and rec["rollup"]["Rss"] > 0
    assert rec["mallinfo"]["uordblks"] > 0 and rec["vmrss_after_trim"] > 0
    assert rec["pymalloc"]["bytes_in_allocated_blocks"] > 0
    assert any(name == "dict" and count > 0 for name, count, _ in rec["types"])


@pytest.mark.parametrize("server", ["hbd", "floor"])
def test_ping_instructions_driver_serves_every_ping(server: str) -> None:
    """bench.ping_instructions' measured process, without valgrind: a few rounds, every pong read
    (its recv would wait forever otherwise: a timeout fails the test)."""
    cmd = [sys.executable, "-m", "bench.ping_instructions", "--drive", server, "--rounds", "8"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ping_instructions_counts_the_bytecode_of_the_open_runs_mix() -> None:
    """--mix open --opcodes: the open run's mix (2,000 peers, 11 pings a turn) served, and the bytecode
    a ping runs counted by function, the connection's read among them."""
    cmd = [sys.executable, "-m", "bench.ping_instructions", "--mix", "open", "--opcodes"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    per_ping = float(done.stdout.split()[0])
    assert 20 < per_ping < 1000 and "Connection.on_read" in done.stdout


def test_procstat_splits_a_process_cpu_into_user_and_system() -> None:
    """The open runs' user/system split: a busy loop of our own is user time, not system time."""
    from bench import procstat

    u0, s0 = procstat.tree_user_sys_s([os.getpid()])
    end = time.monotonic() + 0.5  # (the vDSO's clock: no system call, unlike process_time())
    while time.monotonic() < end:
        pass
    u1, s1 = procstat.tree_user_sys_s([os.getpid()])
    assert u1 - u0 >= 0.05 and u1 - u0 > 2 * (s1 - s0)
    assert procstat.tree_user_sys_s([2**22 + 7]) == (0.0, 0.0)  # gone: nothing, not an error


def test_slice_hog_runs_hbd_with_the_slice_it_names(tmp_path: Path) -> None:
    from bench import servers, slice_hog
    from hbd.config import load_server_config

    yaml = slice_hog.with_slice(servers.hbd_server_yaml, 0)
    text = yaml(1234, 3.0, tmp_path / "log", None, 100, tmp_path / "s.sock", tmp_path / "state")
    (tmp_path / "c.yaml").write_text(text)
    assert load_server_config(tmp_path / "c.yaml").cpu_slice_us == 0
