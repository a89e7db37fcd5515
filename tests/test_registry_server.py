"""The peer registry in a real server process: what `hbd status` (the status socket's JSON) and the
metrics show, and which hooks run, with real clients, signals and sockets on 127.0.0.1."""

from __future__ import annotations

import json
import stat
import time
import urllib.request
from pathlib import Path

from daemons import connect, free_port, recv_exactly, start_client, start_server

from hbd.control import query

http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status_of(path: Path) -> dict:
    return json.loads(query(str(path), "status"))


def peers_of(path: Path) -> dict[str, dict]:
    return {p["peer"]: p for p in status_of(path)["peers"]}


def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def metric_lines(port: int, name: str) -> list[str]:
    with http.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return [line for line in r.read().decode().splitlines() if line.startswith(name + "{")]


def test_a_named_client_killed_is_listed_down_with_its_reason(tmp_path: Path, procs) -> None:
    mport = free_port()
    srv = start_server(tmp_path, heartbeat_timeout=0.6, metrics={"host": "127.0.0.1", "port": mport})
    cli = start_client(tmp_path, srv.config["port"], client_name="web1", heartbeat_interval=0.1, pong_timeout=0.5)
    procs += [cli, srv]
    sock = tmp_path / "server.sock"
    wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
    assert metric_lines(mport, "hbd_peer_up") == ['hbd_peer_up{peer="web1"} 1']
    cli.kill()  # SIGKILL: the kernel closes its socket, the server sees the end
    web1 = wait_until(lambda: (p := peers_of(sock).get("web1")) and p["state"] == "DOWN" and p)
    assert web1["reason"] == "disconnected" and web1["connected"] is None
    assert web1["last_ping"] is not None and web1["since"] >= web1["last_ping"]
    doc = status_of(sock)
    assert doc["counts"] == {"NEW": 0, "UP": 0, "LATE": 0, "DOWN": 1}
    assert metric_lines(mport, "hbd_peer_up") == ['hbd_peer_up{peer="web1"} 0']
    time.sleep(1.0)  # still there, well after its timeout
    assert peers_of(sock)["web1"]["state"] == "DOWN"


def test_a_duplicate_name_takes_over(tmp_path: Path, procs) -> None:
    out = tmp_path / "ran"
    hook = script(tmp_path, f'echo "$1 $2" >> {out}\n')
    srv = start_server(tmp_path, heartbeat_timeout=2.0, on_change=[hook])
    procs.append(srv)
    sock = tmp_path / "server.sock"
    port = srv.config["port"]
    with connect(port) as old, connect(port) as new:
        old.sendall(b"hello web1\nping\n")
        assert recv_exactly(old, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
        new.sendall(b"hello web1\nping\n")
        assert recv_exactly(new, 5) == b"pong\n"
        old.settimeout(5)
        assert old.recv(10) == b""  # the older one is closed
        new_addr = f"127.0.0.1:{new.getsockname()[1]}"
        old_addr = f"127.0.0.1:{old.getsockname()[1]}"
        srv.wait_for(rf"replaced by a newer connection from {new_addr} \(this one is from {old_addr}\)")
        doc = status_of(sock)
        assert [(p["peer"], p["state"], p["address"]) for p in doc["peers"]] == [("web1", "UP", new_addr)]
        assert [e["event"] for e in doc["recent"]] == ["up"]  # no down for a name still connected
        wait_until(lambda: out.exists() and out.read_text() == "up web1\n")
        time.sleep(0.3)
        assert out.read_text() == "up web1\n"


def test_an_unnamed_legacy_client_is_forgotten_at_once(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=0.6)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        wait_until(lambda: peers_of(sock).get(addr, {}).get("state") == "UP")
    wait_until(lambda: status_of(sock)["recent"][-1]["event"] == "down")
    assert status_of(sock)["peers"] == []
