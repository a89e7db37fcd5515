"""workers: K — one peer registry, in the supervisor, fed by the workers (real processes, real sockets):
status, hooks and takeovers are the same as with one process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import time
import urllib.request
from pathlib import Path

from daemons import connect, free_port, recv_exactly, start_client, start_server
from helpers import peers_of, status_of, wait_until

from hbd.control import query
from hbd.status import render
from hbd.status_doc import parse_document


def scrape(port: int) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode().splitlines()


def hook(tmp_path: Path) -> tuple[str, Path]:
    """A hook that writes "EVENT PEER PARENT-PID" per run."""
    out = tmp_path / "ran"
    path = tmp_path / "hook.sh"
    path.write_text(f'#!/bin/sh\necho "$1 $2 $PPID" >> {out}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path), out


def runs(out: Path) -> list[list[str]]:
    return [line.split() for line in out.read_text().splitlines()] if out.exists() else []


def start(tmp_path: Path, workers: int = 2, **cfg):
    srv = start_server(tmp_path, workers=workers, **cfg)
    if workers > 1:
        srv.wait_for(rf"hbd-server INFO +{workers} workers listening")
    return srv


def on_each_worker(port: int, sock: Path, n: int = 16) -> dict[int, socket.socket]:
    """One connection (no greeting yet) served by each worker, found through the status rows."""
    socks = [connect(port) for _ in range(n)]
    by_addr = {f"127.0.0.1:{s.getsockname()[1]}": s for s in socks}
    rows = wait_until(lambda: [p for p in status_of(sock)["peers"] if p["address"] in by_addr] or None)
    wait_until(lambda: len(rows := [p for p in status_of(sock)["peers"] if p["address"] in by_addr]) == n and rows)
    rows = [p for p in status_of(sock)["peers"] if p["address"] in by_addr]
    chosen: dict[int, socket.socket] = {}
    for p in rows:
        chosen.setdefault(p["worker"], by_addr[p["address"]])
    for s in socks:
        if s not in chosen.values():
            s.close()
    assert len(chosen) == 2, rows  # 16 connections all on one worker: the kernel did not spread them
    return chosen


def test_a_name_on_two_workers_is_one_peer_and_the_newer_connection_takes_over(tmp_path: Path, procs) -> None:
    script, out = hook(tmp_path)
    srv = start(tmp_path, heartbeat_timeout=3.0, on_change=[script])
    procs.append(srv)
    sock = tmp_path / "server.sock"
    first, second = on_each_worker(srv.config["port"], sock).values()
    first.sendall(b"hello web1\nping\n")
    assert recv_exactly(first, 5) == b"pong\n"
    wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
    second.sendall(b"hello web1\nping\n")
    assert recv_exactly(second, 5) == b"pong\n"
    first.settimeout(5)
    assert first.recv(10) == b""  # the supervisor's registry closed it, on the other worker
    srv.wait_for(r"hbd-server/\d WARNING +closing client web1 .*replaced by a newer connection")
    doc = status_of(sock)
    rows = [p for p in doc["peers"] if p["peer"] == "web1"]
    assert len(rows) == 1 and rows[0]["state"] == "UP"
    assert rows[0]["address"] == f"127.0.0.1:{second.getsockname()[1]}"
    assert rows[0]["since"] is not None and rows[0]["expected"] is False
    assert doc["counts"] == {"NEW": 0, "UP": 1, "LATE": 0, "DOWN": 0}
    time.sleep(0.5)
    assert [r[:2] for r in runs(out)] == [["up", "web1"]]  # no down for a name still connected
    second.close()
    web1 = wait_until(lambda: (p := peers_of(sock).get("web1")) and p["state"] == "DOWN" and p)
    assert web1["reason"] == "disconnected" and web1["connected"] is None and "worker" not in web1
    wait_until(lambda: len(runs(out)) == 2)
    assert [r[:2] for r in runs(out)] == [["up", "web1"], ["down", "web1"]]
    assert {int(r[2]) for r in runs(out)} == {srv.pid}  # the hooks ran in the supervisor


def test_a_killed_client_is_down_once_and_its_hook_runs_once_in_the_supervisor(tmp_path: Path, procs) -> None:
    script, out = hook(tmp_path)
    srv = start(tmp_path, heartbeat_timeout=0.6, on_change=[script])
    cli = start_client(tmp_path, srv.config["port"], client_name="db1", heartbeat_interval=0.1, pong_timeout=0.5)
    procs += [cli, srv]
    sock = tmp_path / "server.sock"
    wait_until(lambda: peers_of(sock).get("db1", {}).get("state") == "UP")
    cli.kill()
    db1 = wait_until(lambda: (p := peers_of(sock).get("db1")) and p["state"] == "DOWN" and p)
    assert db1["reason"] == "disconnected" and db1["last_ping"] is not None
    time.sleep(1.0)
    assert peers_of(sock)["db1"]["state"] == "DOWN"
    assert [r[:2] for r in runs(out)] == [["up", "db1"], ["down", "db1"]]
    assert {int(r[2]) for r in runs(out)} == {srv.pid}
    assert status_of(sock)["events"]["down"] == 1


def test_a_dead_workers_peers_are_down_then_up_again_on_the_others(tmp_path: Path, procs) -> None:
    srv = start(tmp_path, heartbeat_timeout=2.0)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    conns = on_each_worker(srv.config["port"], sock)
    for w, s in conns.items():
        s.sendall(f"hello w{w}\nping\n".encode())
        assert recv_exactly(s, 5) == b"pong\n"
    wait_until(lambda: all(peers_of(sock).get(f"w{w}", {}).get("state") == "UP" for w in conns))
    victim = next(p for p in status_of(sock)["workers"] if p["index"] == 1)
    os.kill(victim["pid"], 9)
    w1 = wait_until(lambda: (p := peers_of(sock).get("w1")) and p["state"] == "DOWN" and p)
    assert w1["reason"] == "worker died"
    assert peers_of(sock)["w2"]["state"] == "UP"
    with connect(srv.config["port"]) as again:  # its client reconnects (to whichever worker takes it)
        again.sendall(b"hello w1\nping\n")
        assert recv_exactly(again, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("w1", {}).get("state") == "UP")


def scenario(tmp_path: Path, procs, workers: int) -> dict:
    """web1 connected, db1 gone, an unnamed client connected: the status document's peers and counts."""
    srv = start(tmp_path, name=f"server{workers}", workers=workers, heartbeat_timeout=2.0)
    procs.append(srv)
    sock = tmp_path / f"server{workers}.sock"
    port = srv.config["port"]
    web1, db1, legacy = connect(port), connect(port), connect(port)
    web1.sendall(b"hello web1 0.5\nping\n")
    db1.sendall(b"hello db1\nping\n")
    legacy.sendall(b"ping")
    for s, n in ((web1, 5), (db1, 5), (legacy, 4)):
        assert len(recv_exactly(s, n)) == n
    # UP as the registry has it: a worker's row carries the registry's fields once its mark came (orders go
    # at most every FLUSH_GAP, later on a loaded machine), and the document below must not beat it
    wait_until(
        lambda: len(rows := peers_of(sock)) == 3 and all(p["state"] == "UP" and "reason" in p for p in rows.values())
    )
    db1.close()
    wait_until(lambda: peers_of(sock).get("db1", {}).get("state") == "DOWN")
    doc = status_of(sock)
    web1.close()
    legacy.close()
    keep = ("name", "state", "reason", "expected", "flapping", "silenced_until", "labels", "pings", "timeout")
    peers = {
        ("legacy" if p["name"] is None else p["peer"]): {k: p[k] for k in keep}
        | {"connected": p["connected"] is not None, "since": p["since"] is not None}
        for p in doc["peers"]
    }
    return {"counts": doc["counts"], "peers": peers}


def test_status_is_the_same_for_one_process_and_two_workers(tmp_path: Path, procs) -> None:
    one = scenario(tmp_path, procs, 1)
    two = scenario(tmp_path, procs, 2)
    assert one == two
    assert one["counts"] == {"NEW": 0, "UP": 2, "LATE": 0, "DOWN": 1}
    assert one["peers"]["db1"]["reason"] == "disconnected" and not one["peers"]["db1"]["connected"]


def marked(row: dict) -> dict | None:
    """The row once its worker has the registry's mark for it (the worker shows the connection's
    first ping at once; the mark follows from the supervisor, at the end of its loop turn)."""
    return row if "uptime_24h" in row else None


def test_status_shows_the_uptime_of_a_peer_a_worker_holds(tmp_path: Path, procs) -> None:
    """The registry is the supervisor's, the connection a worker's: its row (relayed from the worker)
    carries the registry's accounting, as in one process (UPTIME 24h, outages, down time)."""
    srv = start(tmp_path, name="up2", workers=2, heartbeat_timeout=2.0)
    procs.append(srv)
    sock = tmp_path / "up2.sock"
    port = srv.config["port"]
    web1 = connect(port)
    web1.sendall(b"hello web1\nping\n")
    assert recv_exactly(web1, 5) == b"pong\n"
    row = wait_until(lambda: (p := peers_of(sock).get("web1")) and p["state"] == "UP" and marked(p))
    assert "worker" in row and row["uptime_24h"] == 100.0 and row["outages"] == 0 and row["down_seconds"] == 0.0
    web1.close()
    wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "DOWN")
    with connect(port) as again:  # back, on whichever worker: down for a while in its last 24 h
        again.sendall(b"hello web1\nping\n")
        assert recv_exactly(again, 5) == b"pong\n"
        row = wait_until(lambda: (p := peers_of(sock).get("web1")) and p["state"] == "UP" and marked(p))
        assert "worker" in row and 0 < row["uptime_24h"] < 100.0, row
        assert row["outages"] == 1 and row["down_seconds"] > 0
        text = render(parse_document(status_of(sock)))
    line = next(line for line in text.splitlines() if line.startswith("web1 "))
    assert re.search(r" \d+\.\d\d% ", line), line  # the UPTIME 24h column, not "-"


def metric_scenario(tmp_path: Path, procs, workers: int) -> list[str]:
    """web1 connected, db1 gone: the per-peer series (last pings' values left out)."""
    mport = free_port()
    metrics = {"host": "127.0.0.1", "port": mport}
    srv = start(tmp_path, name=f"m{workers}", workers=workers, heartbeat_timeout=2.0, metrics=metrics)
    procs.append(srv)
    sock = tmp_path / f"m{workers}.sock"
    web1, db1 = connect(srv.config["port"]), connect(srv.config["port"])
    web1.sendall(b"hello web1\nping\n")
    db1.sendall(b"hello db1\nping\n")
    assert recv_exactly(web1, 5) == recv_exactly(db1, 5) == b"pong\n"
    wait_until(lambda: peers_of(sock).get("db1", {}).get("state") == "UP")
    db1.close()
    wait_until(lambda: peers_of(sock).get("db1", {}).get("state") == "DOWN")
    lines = [line for line in scrape(mport) if line.startswith(("hbd_peer", "hbd_peers{"))]
    web1.close()
    last = [line for line in lines if line.startswith("hbd_peer_last_ping")]
    assert len(last) == 2  # web1 (connected: relayed from its worker) and db1 (down: the supervisor's own)
    down = [line for line in lines if line.startswith("hbd_peer_down_seconds_total")]  # how long: timing
    values = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in down}
    assert values["db1"] > 0 and values["web1"] == 0.0
    return sorted(line.rsplit(" ", 1)[0] if line in last or line in down else line for line in lines)


def test_metrics_are_the_same_for_one_process_and_two_workers(tmp_path: Path, procs) -> None:
    one = metric_scenario(tmp_path, procs, 1)
    two = metric_scenario(tmp_path, procs, 2)
    assert one == two
    assert 'hbd_peer_up{peer="web1"} 1' in two and 'hbd_peer_up{peer="db1"} 0' in two
    assert 'hbd_peers{state="DOWN"} 1' in two


def test_an_expected_peer_never_seen_is_down_and_its_hook_runs_once(tmp_path: Path, procs, capsys) -> None:
    from hbd.cli import main

    script, out = hook(tmp_path)
    peers = [{"name": "db1", "timeout": 1.0, "labels": {"rack": "r1"}}, "web1"]
    # (a grace that a start on a loaded machine cannot use up before the first look: 1.5 s could)
    srv = start(tmp_path, heartbeat_timeout=10.0, peers=peers, startup_grace=3.0, on_change=[script])
    procs.append(srv)
    sock = tmp_path / "server.sock"
    assert {p: r["state"] for p, r in peers_of(sock).items()} == {"db1": "NEW", "web1": "NEW"}
    with connect(srv.config["port"]) as s:
        s.sendall(b"hello web1\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        # (its worker's row shows the registry's view once the mark arrived: orders go at most every FLUSH_GAP)
        wait_until(lambda: (p := peers_of(sock)["web1"])["state"] == "UP" and p.get("expected") is True)
        db1 = wait_until(lambda: (p := peers_of(sock)["db1"]) and p["state"] == "DOWN" and p)
        assert (db1["reason"], db1["expected"], db1["labels"]) == ("never connected", True, {"rack": "r1"})
        web1 = peers_of(sock)["web1"]
        assert web1["expected"] is True and "worker" in web1  # a worker's row, with the registry's mark
        assert status_of(sock)["counts"] == {"NEW": 0, "UP": 1, "LATE": 0, "DOWN": 1}
        capsys.readouterr()
        assert main(["status", "-s", str(sock)]) == 0
        table = capsys.readouterr().out
        assert "2 workers" in table and "2 peers: 1 up, 0 late, 0 new, 1 down" in table, table
        assert any(line.startswith("db1 ") and "expected (never connected)" in line for line in table.splitlines())
        time.sleep(1.0)
    assert sorted(r[:2] for r in runs(out)) == [["down", "db1"], ["up", "web1"]]


def test_silences_work_over_the_supervisors_socket(tmp_path: Path, procs, capsys) -> None:
    from hbd.cli import main

    script, out = hook(tmp_path)
    srv = start(tmp_path, heartbeat_timeout=1.0, on_change=[script])
    procs.append(srv)
    sock = tmp_path / "server.sock"
    with connect(srv.config["port"]) as s:
        s.sendall(b"hello web1\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web1", {}).get("state") == "UP")
        assert main(["silence", "web1", "1h", "--reason", "kernel update", "-s", str(sock)]) == 0
        # the worker holding it shows the silence (the supervisor's mark came down its pipe)
        wait_until(lambda: peers_of(sock)["web1"]["silenced_until"] is not None)
        assert "worker" in peers_of(sock)["web1"]
    web1 = wait_until(lambda: (p := peers_of(sock).get("web1")) and p["state"] == "DOWN" and p)
    assert web1["silenced_until"] > time.time() + 3500
    capsys.readouterr()
    assert main(["silences", "-s", str(sock), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["peer"], x["reason"]) for x in listed["silences"]] == [("web1", "kernel update")]
    time.sleep(0.5)
    assert [r[:2] for r in runs(out)] == [["up", "web1"]]  # no down hook while silenced
    assert srv.count(r"WARNING.*web1") == 0, srv.output()  # its worker logged its end at info
    assert main(["unsilence", "web1", "-s", str(sock)]) == 0
    assert peers_of(sock)["web1"]["silenced_until"] is None


def test_down_peers_and_silences_outlive_a_restart_of_the_supervisor(tmp_path: Path, procs) -> None:
    from hbd.cli import main

    state = tmp_path / "state"
    state.mkdir()
    common = {"heartbeat_timeout": 2.0, "state_dir": str(state)}
    srv = start(tmp_path, **common)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    with connect(srv.config["port"]) as s:
        s.sendall(b"hello web2\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: peers_of(sock).get("web2", {}).get("state") == "UP")
    wait_until(lambda: peers_of(sock).get("web2", {}).get("state") == "DOWN")
    assert main(["silence", "web3", "2h", "--reason", "rack move", "-s", str(sock)]) == 0
    assert srv.stop() == 0
    srv2 = start(tmp_path, name="server2", **common)
    procs.append(srv2)
    sock2 = tmp_path / "server2.sock"
    web2 = peers_of(sock2)["web2"]
    assert (web2["state"], web2["reason"]) == ("DOWN", "disconnected")
    silences = json.loads(query(str(sock2), '{"request": "silences"}'))["silences"]
    assert [(x["peer"], x["reason"]) for x in silences] == [("web3", "rack move")]


def test_a_connect_storm_loses_no_report(tmp_path: Path, procs) -> None:
    # 1,500 peers greeting while the supervisor does not read (stopped: as a busy one would be) fill
    # the workers' 64 KB pipes: their reports wait in the workers, none is dropped (a lost one
    # would leave a peer wrong for ever).
    n = 1500
    srv = start(tmp_path, heartbeat_timeout=120.0, max_clients=10000)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    socks = []
    srv.signal(signal.SIGSTOP)
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", srv.config["port"]))
            s.sendall(f"hello h{i}\nping\n".encode())
            socks.append(s)
        for s in socks:
            assert recv_exactly(s, 5) == b"pong\n"  # the workers serve on
        srv.signal(signal.SIGCONT)
        wait_until(lambda: status_of(sock)["counts"]["UP"] == n, timeout=30)
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: status_of(sock)["counts"]["DOWN"] == n, timeout=30)
    assert status_of(sock)["events"] == {"up": n, "late": 0, "down": n, "flapping": 0, "stable": 0}


def hook_scenario(tmp_path: Path, procs, workers: int) -> list[dict[str, str]]:
    """An expected peer never seen, a named one up then gone: the hooks' environments (times and
    ports left out)."""
    out = tmp_path / f"env{workers}"
    out.mkdir()
    path = tmp_path / f"hook{workers}.sh"
    path.write_text(f'#!/bin/sh\nenv | grep "^HBD_" | sort > {out}/$(date +%s%N)\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    peers = [{"name": "db1", "timeout": 1.0, "labels": {"rack": "r1"}}, {"name": "web1", "labels": {"rack": "r2"}}]
    srv = start(
        tmp_path, name=f"h{workers}", workers=workers, heartbeat_timeout=10.0, peers=peers, on_change=[str(path)]
    )
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"hello web1\nping\n")
        assert recv_exactly(s, 5) == b"pong\n"
        wait_until(lambda: len(list(out.iterdir())) == 2)  # up web1, down db1 (never connected)
    wait_until(lambda: len(list(out.iterdir())) == 3)  # down web1
    time.sleep(0.3)
    runs = []
    for f in sorted(out.iterdir()):
        env = dict(line.split("=", 1) for line in f.read_text().splitlines())
        for varying in ("HBD_ADDRESS", "HBD_TIME", "HBD_SINCE"):  # ports and times
            env.pop(varying)
        runs.append(env)
    return sorted(runs, key=lambda e: (e["HBD_PEER"], e["HBD_EVENT"]))


def test_hooks_are_the_same_for_one_process_and_two_workers(tmp_path: Path, procs) -> None:
    one = hook_scenario(tmp_path, procs, 1)
    two = hook_scenario(tmp_path, procs, 2)
    assert one == two
    assert [(e["HBD_PEER"], e["HBD_EVENT"], e["HBD_EXPECTED"], e["HBD_LABEL_RACK"]) for e in two] == [
        ("db1", "down", "1", "r1"),
        ("web1", "down", "1", "r2"),
        ("web1", "up", "1", "r2"),
    ]
    assert [(e["HBD_PREVIOUS"], e["HBD_REASON"]) for e in two] == [
        ("new", "never connected"),
        ("up", "disconnected"),
        ("new", "first ping"),
    ]
