"""The client's side of the history (issue 13): a real client records its server links' changes and
its own runs in its own file under state_dir (client.db, never the server's state.db), and
``hbd history -c client.yaml`` (the real command) shows the links as it shows a server's peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from daemons import start_client, start_server
from helpers import status_of, wait_until
from test_server_registry import FakeStore
from virtual_time import run_until

from hbd.client import Client, Link, Target
from hbd.config import config_role, load_client_config
from hbd.logs import Logging
from hbd.notify import Notifier
from hbd.state_store import CLIENT_DB_NAME, DB_NAME
from hbd.store_writer import ALIVE_INTERVAL, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


def hbd_history(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TZ": "UTC", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "hbd", "history", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )


def link_state(sock: Path) -> str | None:
    try:
        servers = status_of(sock).get("servers") or [{}]
    except OSError:  # not listening yet
        return None
    return servers[0].get("state")


def test_a_links_outage_is_in_the_clients_store_and_hbd_history_shows_it(tmp_path: Path, procs) -> None:
    state = tmp_path / "state"
    state.mkdir()  # the unit's StateDirectory= makes it; by hand, the operator
    srv = start_server(tmp_path, heartbeat_timeout=1.0)
    procs.append(srv)
    port = srv.config["port"]
    servers = [{"host": "127.0.0.1", "port": port, "name": "hub"}]
    cli = start_client(tmp_path, port, servers=servers, state_dir=str(state), client_name="web1")
    procs.append(cli)
    sock = tmp_path / "client.sock"
    wait_until(lambda: link_state(sock) == "UP")
    srv.stop()  # the server goes away: the link goes DOWN, the client retries
    wait_until(lambda: link_state(sock) == "DOWN")
    srv2 = start_server(tmp_path, name="server2", heartbeat_timeout=1.0, port=port)
    procs.append(srv2)
    wait_until(lambda: link_state(sock) == "UP")  # it came back

    def changes() -> list[dict] | None:  # written by the store's flush timer (every 0.5 s)
        r = hbd_history(cli.config_path, "hub", "--json")
        if r.returncode and "no history of a peer named 'hub'" in r.stderr:
            return None  # not written yet (a flush comes later on a busy machine)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        found = doc["peers"][0]["changes"] if doc["peers"] else []
        return (doc, found) if len(found) >= 3 else None

    doc, found = wait_until(changes, 15)
    assert doc["daemon"] == "client" and doc["runs_recorded"] is True
    assert doc["store"] == str(state / CLIENT_DB_NAME)
    assert [(c["old"], c["new"]) for c in found] == [("NEW", "UP"), ("UP", "DOWN"), ("DOWN", "UP")]
    assert found[1]["reason"]  # why the link went down
    [hub] = doc["peers"]
    assert hub["peer"] == "hub" and hub["state"] == "UP" and len(hub["outages"]) == 1
    day = hub["windows"]["24h"]
    assert day["outages"] == 1 and 0 < day["uptime_percent"] < 100 and day["unknown_seconds"] < 1.0
    assert not (state / DB_NAME).exists()  # the server's file name is the server's alone

    table = hbd_history(cli.config_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["SERVER", "STATE", "UPTIME"]
    row = next(line for line in lines if line.startswith("hub "))
    assert row.split()[1] == "UP" and "%" in row.split()[2]
    assert "client not running" in table.stdout

    assert cli.stop() == 0  # a clean stop: the run's end is on file, the client's store is closed
    after = json.loads(hbd_history(cli.config_path, "--json").stdout)
    assert [p["peer"] for p in after["peers"]] == ["hub"]


def test_a_client_without_its_state_dir_says_so_once_and_runs_on(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=1.0)
    procs.append(srv)
    missing = tmp_path / "nowhere"
    cli = start_client(tmp_path, srv.config["port"], state_dir=str(missing))
    procs.append(cli)
    cli.wait_for(r"no state store: the directory .*nowhere does not exist")
    wait_until(lambda: link_state(tmp_path / "client.sock") == "UP")
    assert not missing.exists() and cli.count("state store") == 1


def test_the_config_files_role_comes_from_its_keys(tmp_path: Path) -> None:
    cases = {
        "a.yaml": ("heartbeat_interval: 2\nstate_dir: /x\n", "client"),
        "b.yaml": ("servers: [{host: h}]\n", "client"),
        "c.yaml": ("heartbeat_timeout: 3\n", "server"),
        "d.yaml": ("host: h\nheartbeat_interval: 2\nmax_clients: 5\n", "server"),  # invalid for a client
        "e.yaml": ("port: 1\n", "server"),  # shared keys only: by its name
        "client-x.yaml": ("port: 1\n", "client"),
        "f.yaml": ("", "server"),
    }
    for name, (text, role) in cases.items():
        (tmp_path / name).write_text(text)
        assert config_role(tmp_path / name) == role, name
    assert config_role(ROOT / "etc" / "client.yaml") == "client"
    assert config_role(ROOT / "etc" / "server.yaml") == "server"


def test_hbd_history_of_a_client_with_state_dir_null_says_so(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("heartbeat_interval: 2\nstate_dir: null\n")
    r = hbd_history(config)
    assert r.returncode == 1 and "state_dir: null: the client keeps no history" in r.stderr


def test_a_links_changes_and_the_clients_run_are_queued_in_virtual_time(tmp_path: Path, vclock, vloop) -> None:
    """Each health change of a link is a change of side "client" named as the link is (its name, else
    its address), old NEW before the first; the run starts with the writer, is alive every second
    and once more at the stop, when the store is closed."""
    cfg_file = tmp_path / "client.yaml"
    cfg_file.write_text("host: 127.0.0.1\nport: 54321\nreconnect_delay: 4\nreconnect_max_delay: 4\nlog_file: null\n")
    logs = Logging("hbd-client", journald=False)
    wall = [1_790_000_000.0]
    try:
        client = Client(load_client_config(cfg_file), loop=vloop, notifier=Notifier({}), logs=logs)
        store = FakeStore()
        client.writer = StoreWriter(vloop, store, lambda: wall[0], 30, side="client")
        assert store.runs == [wall[0]] and store.flushes == 1
        hub = Link(client, Target("127.0.0.1", 54321, "hub"))
        bare = Link(client, Target("127.0.0.1", 54322))
        client.links = [hub, bare]
        hub.connect()
        hub._failed("cannot connect: Connection refused")
        bare.connect()
        bare._failed("cannot connect: Connection refused")
        hub.connect()
        hub._failed("cannot connect: Connection refused")  # still down: no change
        assert [(c.peer, c.old, c.new, c.reason, c.side) for c in store.changes] == [
            ("hub", "NEW", "DOWN", "cannot connect: Connection refused", "client"),
            ("127.0.0.1:54322", "NEW", "DOWN", "cannot connect: Connection refused", "client"),
        ]
        start = vclock()
        for _ in range(3):
            wall[0] += ALIVE_INTERVAL
            run_until(vloop, vclock, vclock() + ALIVE_INTERVAL)
        assert len(store.alives) >= 2 and store.alives[-1] <= wall[0] and vclock() - start >= 3 * ALIVE_INTERVAL
        assert store.prunes == [1_790_000_000.0 + ALIVE_INTERVAL - 30 * 86400.0]  # history_days, at the first flush
        client.shutdown()
        assert store.closed and store.alives[-1] == wall[0] and client.writer is None
    finally:
        logs.close()


def test_a_clients_state_dir_is_as_the_servers(tmp_path: Path) -> None:
    """The default is the units' StateDirectory=; a relative path is relative to the file; null is none."""
    (tmp_path / "client.yaml").write_text("heartbeat_interval: 2\n")
    assert load_client_config(tmp_path / "client.yaml").state_dir == "/var/lib/hbd"
    (tmp_path / "client.yaml").write_text("state_dir: state\nhistory_days: 7\n")
    cfg = load_client_config(tmp_path / "client.yaml")
    assert cfg.state_dir == str(tmp_path / "state") and cfg.history_days == 7
    (tmp_path / "client.yaml").write_text("state_dir: null\n")
    assert load_client_config(tmp_path / "client.yaml").state_dir is None
