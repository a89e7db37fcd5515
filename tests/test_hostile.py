"""Hostile input while healthy clients ping: garbage, 1 MB floods, slowloris, a flood beyond
max_clients. Healthy clients must see no missed pong and a p99 RTT within 2x the quiet baseline."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemons import ROOT, start_server
from fleet import FleetProcess
from test_reliability import report

HEALTHY, INTERVAL, TIMEOUT, MAX_CLIENTS = 100, 0.2, 2.0, 400
RTT_FLOOR = 0.001  # loopback RTTs are ~0.1-0.3 ms: "2x" of that is scheduler noise, so the baseline is at least 1 ms


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(0.99 * len(v)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def attack_once(srv, port: int) -> tuple[dict, float, float, int, int]:
    """A quiet period, then every attack at once; returns the attack's summary, the quiet window
    and the server's RSS before and at its peak."""
    time.sleep(0.5)
    quiet_from = time.monotonic()
    time.sleep(3.0)
    quiet_to = time.monotonic()
    rss_before = rss_kib(srv.pid)
    rss_peak = [rss_before]
    sampling = True

    def sample() -> None:
        while sampling:
            rss_peak.append(rss_kib(srv.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attack = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile.py"), str(port), str(MAX_CLIENTS),
                             str(TIMEOUT)], capture_output=True, text=True, timeout=120)
    sampling = False
    sampler.join()
    assert attack.returncode == 0, attack.stderr
    result = json.loads(attack.stdout.strip().splitlines()[-1])
    result["quiet"] = (quiet_from, quiet_to)
    time.sleep(TIMEOUT + 0.5)  # the connections admitted by the max_clients flood time out
    return result, quiet_from, quiet_to, rss_before, max(rss_peak)


@pytest.mark.slow
def test_hostile_peers_do_not_hurt_healthy_clients(tmp_path: Path, procs) -> None:
    """Two rounds. Everything must hold in both, except the RTT bound, which must hold in at least
    one: this 2-core machine also runs the attacker, the healthy clients and the test itself, and
    other work on it can skew one round's percentiles."""
    srv = start_server(tmp_path, heartbeat_timeout=TIMEOUT, max_clients=MAX_CLIENTS)
    procs.append(srv)
    port = srv.config["port"]
    fleet = FleetProcess({"host": "127.0.0.1", "port": port, "heartbeat_interval": INTERVAL, "pong_timeout": 1.0,
                          "reconnect_delay": 0.2, "reconnect_max_delay": 1.0}, HEALTHY, tmp_path)
    try:
        assert len(fleet.wait_up(HEALTHY)) == HEALTHY
        rounds = [attack_once(srv, port) for _ in range(2)]
    finally:
        fleet.stop()
    rtts = fleet.stats["rtts"]
    downs = [e for e in fleet.events if e[0] in ("down", "late")]
    assert not downs, f"healthy clients missed pongs: {downs[:5]}"
    rtt_ok = []
    for n, (result, quiet_from, quiet_to, rss_before, rss_peak) in enumerate(rounds, 1):
        quiet = [r for t, r in rtts if quiet_from <= t < quiet_to]
        loud = [r for t, r in rtts if result["t_start"] <= t <= result["t_end"]]
        base = max(p99(quiet), RTT_FLOOR)
        slow = result["slowloris_close_after"]
        floods = result["flood_closed_after"]
        report(f"hostile input while 100 healthy clients ping every 0.2 s (round {n})", [
            f"quiet: {len(quiet)} pongs, p99 RTT {p99(quiet) * 1000:.3f} ms (baseline for the check: "
            f"{base * 1000:.3f} ms)",
            f"under attack ({result['t_end'] - result['t_start']:.1f} s): {len(loud)} pongs, "
            f"p99 RTT {p99(loud) * 1000:.3f} ms, max {max(loud) * 1000:.3f} ms; missed or late pongs: {len(downs)}",
            f"garbage connections closed: {result['garbage_closed']}/500",
            f"1 MB floods: {sum(f is not None for f in floods)}/20 closed by the server, the last after "
            f"{max(f or 99 for f in floods):.3f} s",
            f"slowloris peers closed: {result['slowloris_closed']}/100, after {min(slow):.3f}-{max(slow):.3f} s "
            f"(heartbeat_timeout {TIMEOUT:g} s)",
            f"beyond max_clients ({MAX_CLIENTS}): {result['beyond_max_opened']} opened, "
            f"{result['beyond_max_refused']} closed at once",
            f"server RSS: {rss_before / 1024:.1f} MiB before, peak {rss_peak / 1024:.1f} MiB",
        ])
        rtt_ok.append(p99(loud) <= 2 * base)
        assert result["garbage_closed"] == 500
        assert None not in floods and max(floods) < 1.0, floods
        assert result["slowloris_closed"] == 100 and max(slow) <= TIMEOUT + 0.3, slow[-5:]
        assert result["beyond_max_refused"] >= result["beyond_max_opened"] - MAX_CLIENTS
        assert rss_peak - rss_before < 50 * 1024, "server memory grew by more than 50 MiB"
    assert any(rtt_ok), "p99 RTT under attack was above 2x the quiet baseline in both rounds"
    log_lines = (tmp_path / "server.log").read_text().splitlines()
    report("server log file after both rounds", [f"warning/error lines: {len(log_lines)} "
                                                 "(for ~2,400 hostile connections)"])
    assert len(log_lines) < 200, "peer-caused lines were not rate-limited"
    # what the limiter held back is still reported, once its window is over
    srv.wait_for(r"WARNING .*suppressed \d+ 'protocol-error' lines caused by 127\.0\.0\.1 in the last 10 s",
                 timeout=15)
