"""The history in real processes: a server with a state store records its peers' changes and its own
runs; ``hbd history --json`` (the real command, in a process of its own) reads them while it runs,
after a clean restart and after ``kill -9``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from daemons import HbdProcess, start_client, start_server
from helpers import peers_of, wait_until

ROOT = Path(__file__).resolve().parents[1]


def state_of(sock: Path, peer: str) -> str | None:
    return peers_of(sock).get(peer, {}).get("state")


def history(srv: HbdProcess, *args: str) -> dict:
    """``hbd history ARGS --json -c`` the server's own config file, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TZ": "UTC"}
    r = subprocess.run(
        [sys.executable, "-m", "hbd", "history", *args, "--json", "-c", str(srv.config_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def written(srv: HbdProcess, peer: str) -> dict | None:
    """``history(srv, peer)``, or None while the store's flush (every 0.5 s, later on a busy machine)
    has not written the peer yet: the one error a wait may see."""
    try:
        return history(srv, peer)
    except AssertionError as exc:
        if f"no history of a peer named {peer!r}" in str(exc):
            return None
        raise


def client(tmp_path: Path, port: int) -> HbdProcess:
    return start_client(tmp_path, port, client_name="web1", heartbeat_interval=0.1, pong_timeout=0.5)


def test_an_outage_shows_in_hbd_history_while_the_daemon_runs(tmp_path: Path, procs) -> None:
    (tmp_path / "state").mkdir()  # the unit's StateDirectory= makes it; by hand, the operator
    srv = start_server(tmp_path, heartbeat_timeout=1.0, state_dir=str(tmp_path / "state"))
    procs.append(srv)
    sock = tmp_path / "server.sock"
    cli = client(tmp_path, srv.config["port"])
    procs.append(cli)
    wait_until(lambda: state_of(sock, "web1") == "UP")
    cli.kill()  # SIGKILL: the kernel closes its socket, the server sees it go down
    wait_until(lambda: state_of(sock, "web1") == "DOWN")
    down_at = time.time()
    time.sleep(1.5)
    cli2 = client(tmp_path, srv.config["port"])
    procs.append(cli2)
    wait_until(lambda: state_of(sock, "web1") == "UP")
    up_at = time.time()
    # written by the store's flush timer (every 0.5 s): generous for a loaded machine
    doc = wait_until(lambda: (d := written(srv, "web1")) and len(d["peers"][0]["changes"]) >= 3 and d)
    [web1] = doc["peers"]
    assert [(c["old"], c["new"]) for c in web1["changes"]] == [("NEW", "UP"), ("UP", "DOWN"), ("DOWN", "UP")]
    assert web1["changes"][1]["reason"]  # why it went down
    assert web1["state"] == "UP" and doc["runs_recorded"] is True
    [outage] = web1["outages"]
    assert 1.0 <= outage["seconds"] <= up_at - down_at + 3.0
    day = web1["windows"]["24h"]
    assert day["outages"] == 1 and day["down_seconds"] == outage["seconds"]
    assert 0 < day["uptime_percent"] < 100 and day["unknown_seconds"] < 1.0  # the server ran all along


def test_history_survives_a_restart_and_kill_9_and_the_servers_down_time_is_unknown(tmp_path: Path, procs) -> None:
    state = str(tmp_path / "state")
    os.mkdir(state)
    srv = start_server(tmp_path, heartbeat_timeout=1.0, state_dir=state)
    port = srv.config["port"]
    procs.append(srv)
    cli = client(tmp_path, port)
    procs.append(cli)
    wait_until(lambda: state_of(tmp_path / "server.sock", "web1") == "UP")
    first_up = time.time()
    time.sleep(1.0)
    assert srv.stop() == 0  # a clean stop: its run ends now (the last sign of life at close)
    stopped = time.time()
    time.sleep(2.0)  # nobody watching

    srv2 = start_server(tmp_path, name="server2", heartbeat_timeout=1.0, state_dir=state, port=port)
    procs.append(srv2)
    sock2 = tmp_path / "server2.sock"
    wait_until(lambda: state_of(sock2, "web1") == "UP")  # the client reconnected
    cli.kill()
    wait_until(lambda: state_of(sock2, "web1") == "DOWN")
    down_at = time.time()
    time.sleep(1.5)  # more than a second before the kill: this change must be in the file
    srv2.kill()  # SIGKILL: nothing written at exit
    killed = time.time()
    time.sleep(2.0)

    srv3 = start_server(tmp_path, name="server3", heartbeat_timeout=1.0, state_dir=state, port=port)
    procs.append(srv3)
    doc = history(srv3, "web1", "--since", "1h")
    [web1] = doc["peers"]
    changes = [(c["old"], c["new"]) for c in web1["changes"]]
    assert changes[0] == ("NEW", "UP") and abs(web1["changes"][0]["time"] - first_up) < 3.0  # the first run's
    assert ("UP", "DOWN") in changes  # the second run's, written before the kill
    down = [c for c in web1["changes"] if c["new"] == "DOWN"][-1]
    assert abs(down["time"] - down_at) < 3.0
    assert web1["state"] == "DOWN"
    day = web1["windows"]["24h"]
    # unknown: at least the two gaps (2 s after the stop; after the kill, from its last sign of life,
    # at most about a second before it); less than the whole test
    assert 3.5 <= day["unknown_seconds"] <= time.time() - first_up
    # still down: the outage open now began at or after the change (after the kill's unknown gap, again
    # from the restart: the restored state)
    assert day["down_since"] >= down["time"] and stopped < killed
