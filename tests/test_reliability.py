"""Faults on real processes: a fleet reconnecting after kill -9, stalls, file descriptors running out,
wall-clock jumps and a vanished log directory. Measured figures are printed (pytest -s) and, when
HBD_REPORT names a file, appended to it; docs/reliability.md quotes them."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest
from daemons import connect, recv_exactly, start_client, start_server
from fleet import FleetProcess


def report(title: str, lines: list[str]) -> None:
    text = "\n".join([f"== {title}", *lines, ""])
    print("\n" + text)
    path = os.environ.get("HBD_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def max_in_window(times: list[float], width: float) -> int:
    """The most events in any window [t, t + width) (a sliding window, not fixed bins)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - width + 1e-9 and j < i:
            j += 1
        best = max(best, i - j + 1)
    return best


def histogram(times: list[float], start: float, width: float = 0.1) -> list[str]:
    bins: dict[int, int] = {}
    for t in times:
        bins[int((t - start) // width)] = bins.get(int((t - start) // width), 0) + 1
    top = max(bins.values())
    return [f"{b * width:5.1f}-{(b + 1) * width:4.1f} s {bins.get(b, 0):5d} {'#' * round(50 * bins.get(b, 0) / top)}"
            for b in range(min(bins), max(bins) + 1)]


@pytest.mark.slow
def test_fleet_of_2000_reconnects_spread_out_after_kill_9(tmp_path: Path, procs) -> None:
    n, base, cap = 2000, 2.0, 6.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 200:
        pytest.skip(f"needs RLIMIT_NOFILE >= {n + 200} (hard limit is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server
    srv = start_server(tmp_path, heartbeat_timeout=10)
    procs.append(srv)
    port = srv.config["port"]
    fleet = FleetProcess({"host": "127.0.0.1", "port": port, "heartbeat_interval": 1.0, "pong_timeout": 1.5,
                          "receive_timeout": 5, "reconnect_delay": base, "reconnect_max_delay": cap}, n, tmp_path)
    try:
        assert len(fleet.wait_up(n, timeout=30)) == n
        time.sleep(2 * 1.5 + 1.0)  # every link healthy: its next drop starts a fresh backoff series
        srv.kill()
        killed = time.monotonic()
        time.sleep(0.5)
        srv2 = start_server(tmp_path, name="server2", port=port, heartbeat_timeout=10)
        procs.append(srv2)
        restarted, _ = srv2.wait_for("listening on")
        ups = fleet.wait_up(n, since=killed, timeout=cap + 10)
        times = sorted(ups.values())
        late = [t - restarted for t in times if t - restarted > cap + 2]
        worst = max_in_window(times, 0.1)
        report("kill -9 under 2000 clients, restart after 0.5 s", [
            f"clients {n}, reconnect_delay {base:g} s, reconnect_max_delay {cap:g} s",
            f"reconnected {len(ups)}/{n}; last {times[-1] - restarted:.2f} s after the restart",
            f"busiest 100 ms window: {worst} reconnects ({100 * worst / n:.1f} %)",
            "reconnects per 100 ms after the restart:",
            *histogram(times, restarted),
        ])
        assert len(ups) == n, f"only {len(ups)} of {n} reconnected"
        assert not late, f"{len(late)} reconnected later than cap + 2 s"
        assert worst <= 0.10 * n, f"{worst} reconnects in one 100 ms window"
        assert srv2.count("Traceback") == 0
    finally:
        fleet.stop()
