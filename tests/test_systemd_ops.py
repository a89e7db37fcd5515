"""The operator's surface in the packaged daemons under a real systemd: the status sockets in /run/hbd
(owner, mode, who may ask), `hbd status` for both units, a hook inside the unit's sandbox, metrics, and
the sockets' removal at stop. Needs root and systemd-nspawn, like tests/test_systemd.py (one guest at a
time per machine; this module boots its own).

    /usr/bin/python3 -m pytest -m systemd tests/test_systemd_ops.py
"""

from __future__ import annotations

import json
import urllib.request

import pytest

try:
    from . import systemd_guest as sg
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import systemd_guest as sg

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

HOOK = """#!/bin/sh
echo "$@ uid=$(id -u) HBD_PEER=$HBD_PEER HBD_ROLE=$HBD_ROLE" >> /run/hbd/hook.log
"""


@pytest.fixture(scope="module")
def guest():
    port, metrics = sg.free_port(), sg.free_port()
    with sg.installed() as g:
        g.write("/usr/local/bin/hbd-hook", HOOK)
        g.run("chmod", "755", "/usr/local/bin/hbd-hook")
        g.sh(
            f"sed -i 's/^port: .*/port: {port}/; s/^heartbeat_timeout: .*/heartbeat_timeout: 5/; "
            f"s|^on_change: .*|on_change: /usr/local/bin/hbd-hook|; s/^metrics: .*/metrics: {{port: {metrics}}}/' "
            "/etc/hbd/server.yaml"
        )
        g.sh(
            f"sed -i 's/^port: .*/port: {port}/; s/^heartbeat_interval: .*/heartbeat_interval: 0.5/; "
            f"s/^client_name: .*/client_name: web1/' /etc/hbd/client.yaml"
        )
        g.run("useradd", "--no-create-home", "alice")
        g.run("useradd", "--no-create-home", "--groups", "_hbd", "bob")
        g.run("systemctl", "start", "hbd-server", "hbd-client")
        g.metrics_port = metrics
        yield g


def status(guest, role: str, user: str = "root"):
    return guest.run("runuser", "-u", user, "--", "hbd", "status", role, "--json", check=False)


def test_status_sockets_owner_mode_and_access(guest):
    for role in ("server", "client"):
        ls = guest.run("stat", "-c", "%F %a %U:%G", f"/run/hbd/{role}.sock").stdout.split()
        assert ls[-2:] == ["660", "_hbd:_hbd"] and ls[0] == "socket"
    doc = sg.wait_for(
        "the client's greeting and first pings at the server",
        lambda: (
            (d := json.loads(status(guest, "server").stdout))
            and any(p["name"] == "web1" and p["pings"] > 1 for p in d["peers"])
            and d
        ),
    )
    (peer,) = doc["peers"]
    assert peer["state"] == "UP" and peer["interval"] == 0.5
    denied = status(guest, "server", "alice")  # not in _hbd: the directory and socket keep it out
    assert denied.returncode == 1 and "Permission denied" in denied.stderr and "_hbd" in denied.stderr
    assert status(guest, "server", "bob").returncode == 0  # a member of _hbd may ask
    table = guest.run("hbd", "status", "client").stdout
    assert "SERVER" in table and " UP " in table


def test_hook_runs_in_the_sandbox_as_the_service_user(guest):
    uid = guest.run("id", "-u", "_hbd").stdout.strip()
    line = sg.wait_for("the hook's line", lambda: guest.run("cat", "/run/hbd/hook.log", check=False).stdout)
    assert line.startswith("up web1 127.0.0.1:") and f"uid={uid} HBD_PEER=web1 HBD_ROLE=server" in line


def test_metrics_answer(guest):
    http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with http.open(f"http://127.0.0.1:{guest.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "hbd_server_clients 1" in text.splitlines()


def test_stop_removes_the_sockets(guest):
    guest.run("systemctl", "stop", "hbd-client", "hbd-server")
    assert guest.run("ls", "-A", "/run/hbd").stdout.split() == ["hook.log"]
