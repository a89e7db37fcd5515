"""The peer registry in a real server process: what `hbd status` (the status socket's JSON) and the
metrics show, and which hooks run, with real clients, signals and sockets on 127.0.0.1."""

from __future__ import annotations

import json
import stat
import time
import urllib.request
from pathlib import Path

from daemons import connect, free_port, recv_exactly, start_client, start_server
from helpers import peers_of, status_of, wait_until

from hbd.control import query

http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
    srv = start_server(tmp_path, heartbeat_timeout=0.6, forget_after="3s", metrics={"host": "127.0.0.1", "port": mport})
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
    wait_until(lambda: "web1" not in peers_of(sock))  # forgotten after forget_after
    assert time.time() - web1["since"] >= 3.0 - 0.05
    assert metric_lines(mport, "hbd_peer_up") == []


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


def test_an_expected_peer_that_never_connects_is_down_at_its_grace_and_its_hook_ran_once(tmp_path: Path, procs) -> None:
    out = tmp_path / "ran"
    hook = script(tmp_path, f'echo "$1 $2 $HBD_REASON $HBD_EXPECTED $HBD_LABEL_RACK $HBD_SINCE" >> {out}\n')
    mport = free_port()
    srv = start_server(
        tmp_path,
        heartbeat_timeout=5.0,
        startup_grace=0.5,
        peers=[{"name": "db1", "labels": {"rack": "r1"}}],
        on_change=[hook],
        metrics={"host": "127.0.0.1", "port": mport},
    )
    procs.append(srv)
    sock = tmp_path / "server.sock"
    db1 = wait_until(lambda: (p := peers_of(sock).get("db1")) and p["state"] == "DOWN" and p)
    assert db1["reason"] == "never connected" and db1["expected"] is True and db1["labels"] == {"rack": "r1"}
    wait_until(lambda: out.exists() and out.read_text())
    time.sleep(1.0)  # and no second run
    [line] = out.read_text().splitlines()
    event, peer, r1, r2, expected, rack, since = line.split(" ")
    assert (event, peer, f"{r1} {r2}", expected, rack) == ("down", "db1", "never connected", "1", "r1")
    assert abs(float(since) - db1["since"]) < 0.01
    assert metric_lines(mport, "hbd_peer_up") == ['hbd_peer_up{peer="db1",rack="r1"} 0']
    assert metric_lines(mport, "hbd_peer_expected") == ['hbd_peer_expected{peer="db1",rack="r1"} 1']


def test_an_expected_legacy_client_is_matched_by_its_address(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=2.0, peers=[{"name": "db1", "address": "127.0.0.1"}])
    procs.append(srv)
    sock = tmp_path / "server.sock"
    assert peers_of(sock)["db1"]["state"] == "NEW"
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")  # a bare ping: no greeting, no name
        assert recv_exactly(s, 4) == b"pong"
        db1 = wait_until(lambda: (p := peers_of(sock).get("db1")) and p["state"] == "UP" and p)
        assert db1["address"] == f"127.0.0.1:{s.getsockname()[1]}" and db1["expected"] is True
        assert list(peers_of(sock)) == ["db1"]


def test_a_silenced_peer_going_down_runs_no_hook_and_shows_its_silence(tmp_path: Path, procs, capsys) -> None:
    from hbd.cli import main

    out = tmp_path / "ran"
    hook = script(tmp_path, f'echo "$1 $2" >> {out}\n')
    srv = start_server(tmp_path, heartbeat_timeout=1.0, on_change=[hook])
    procs.append(srv)
    sock = tmp_path / "server.sock"
    assert main(["silence", "web1", "1h", "--reason", "kernel update", "-s", str(sock)]) == 0
    with connect(srv.config["port"]) as s:
        s.sendall(b"hello web1\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
    web1 = wait_until(lambda: (p := peers_of(sock).get("web1")) and p["state"] == "DOWN" and p)
    assert web1["silenced_until"] is not None and web1["silenced_until"] > time.time() + 3500
    assert [e["event"] for e in status_of(sock)["recent"]] == ["up", "down"]  # counted and shown
    capsys.readouterr()
    assert main(["status", "-s", str(sock)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("web1 "))
    assert "silenced 59m" in row or "silenced 1h" in row
    time.sleep(0.5)
    assert not out.exists()  # no hook ran, not even for its up
    assert srv.count(r"WARNING.*web1") == 0, srv.output()  # logged at info


def test_a_spoofed_name_is_refused_under_name_from_certificate(tmp_path: Path, procs) -> None:
    import ssl

    from certs import make_ca, make_cert

    d = tmp_path / "pki"
    ca = make_ca(d, "ca")
    server, client = make_cert(d, ca, "server", server=True), make_cert(d, ca, "web1", server=False)
    tls = {
        "cert": server.cert,
        "key": server.key,
        "ca": ca.cert,
        "require_client_cert": True,
        "name_from": "certificate",
    }
    srv = start_server(tmp_path, heartbeat_timeout=2.0, tls=tls)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    ctx = ssl.create_default_context(cafile=ca.cert)
    ctx.load_cert_chain(client.cert, client.key)
    with ctx.wrap_socket(connect(srv.config["port"]), server_hostname="127.0.0.1") as s:
        s.sendall(b"hello db1\nping\n")  # its certificate says web1
        try:
            assert s.recv(10) == b""  # closed, no pong
        except (ssl.SSLError, OSError):
            pass
    srv.wait_for(r"WARNING .*name mismatch: it greeted as db1, its certificate names web1")
    assert "db1" not in peers_of(sock)
    with ctx.wrap_socket(connect(srv.config["port"]), server_hostname="127.0.0.1") as s:
        s.sendall(b"hello web1\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
    with ctx.wrap_socket(connect(srv.config["port"]), server_hostname="127.0.0.1") as s:
        s.sendall(b"ping\n")  # no greeting: the certificate names it
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
    assert set(peers_of(sock)) == {"web1"}


def test_silences_and_down_peers_survive_kill_9_and_a_peer_back_in_time_gets_no_down(tmp_path: Path, procs) -> None:
    from hbd.cli import main

    state = tmp_path / "state"
    state.mkdir()
    out = tmp_path / "ran"
    hook = script(tmp_path, f'echo "$1 $2 $HBD_REASON" >> {out}\n')
    port = free_port()
    common = {"port": port, "heartbeat_timeout": 3.0, "state_dir": str(state), "on_change": [hook]}
    srv = start_server(tmp_path, **common)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    cli = start_client(
        tmp_path, port, client_name="web1", heartbeat_interval=0.2, reconnect_delay=0.1, reconnect_max_delay=0.2
    )
    procs.append(cli)
    with connect(port) as s:
        s.sendall(b"hello web2\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web2", {}).get("state") == "UP")
    wait_until(lambda: peers_of(sock).get("web2", {}).get("state") == "DOWN")
    wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
    assert main(["silence", "web3", "2h", "--reason", "rack move", "-s", str(sock)]) == 0
    time.sleep(1.0)  # written by the store's timer (every 0.5 s)
    srv.kill()  # SIGKILL: nothing is written at exit
    out.write_text("")  # the hooks of the first life are done with

    srv2 = start_server(tmp_path, name="server2", **common)
    procs.append(srv2)
    sock2 = tmp_path / "server2.sock"
    peers = peers_of(sock2)
    assert peers["web2"]["state"] == "DOWN" and peers["web2"]["reason"] == "disconnected"
    assert peers["web1"]["state"] in ("NEW", "UP")  # waiting for it, a grace of its timeout
    silences = json.loads(query(str(sock2), '{"request": "silences"}'))["silences"]
    assert [(s["peer"], s["reason"]) for s in silences] == [("web3", "rack move")]
    wait_until(lambda: peers_of(sock2)["web1"]["state"] == "UP")  # the client reconnected in time
    time.sleep(3.5)  # past its grace
    assert peers_of(sock2)["web1"]["state"] == "UP"
    assert "down web1" not in out.read_text()
