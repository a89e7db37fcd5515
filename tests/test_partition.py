"""Network partitions: server and client in two network namespaces joined by a veth pair.

Needs root and iproute2 (``ip netns``). Addresses are link-local (169.254.77.0/30) inside namespaces
the test creates and deletes; nothing is routed anywhere else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from daemons import start_client, start_server
from helpers import report

IP = shutil.which("ip")
SERVER_ADDR, CLIENT_ADDR = "169.254.77.1", "169.254.77.2"


@dataclass
class Net:
    srv_ns: str
    cli_ns: str
    srv_if: str
    cli_if: str

    def exec(self, ns: str) -> list[str]:
        return [IP or "ip", "netns", "exec", ns]

    def link(self, side: str, state: str) -> None:
        ns, dev = (self.srv_ns, self.srv_if) if side == "server" else (self.cli_ns, self.cli_if)
        _ip("-n", ns, "link", "set", dev, state)


def _ip(*args: str) -> None:
    subprocess.run([IP or "ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    if IP is None:
        pytest.skip("needs the ip command (Debian package iproute2)")
    tag = str(os.getpid())[-6:]
    n = Net(f"hbd-srv-{tag}", f"hbd-cli-{tag}", f"hs{tag}", f"hc{tag}")
    try:
        _ip("netns", "add", n.srv_ns)
        _ip("netns", "add", n.cli_ns)
        _ip("link", "add", n.srv_if, "netns", n.srv_ns, "type", "veth", "peer", "name", n.cli_if, "netns", n.cli_ns)
        for ns, dev, addr in ((n.srv_ns, n.srv_if, SERVER_ADDR), (n.cli_ns, n.cli_if, CLIENT_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in (n.srv_ns, n.cli_ns):
            subprocess.run([IP, "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    yield n
    for ns in (n.srv_ns, n.cli_ns):
        subprocess.run([IP, "netns", "del", ns], capture_output=True)  # takes the veth pair with it


SERVER_CFG = {"host": SERVER_ADDR, "heartbeat_timeout": 1.0}
CLIENT_CFG = {
    "host": SERVER_ADDR,
    "heartbeat_interval": 0.2,
    "pong_timeout": 0.6,
    "receive_timeout": 1.0,
    "reconnect_delay": 0.2,
    "reconnect_max_delay": 1.0,
}


def logged_at(line: str) -> float:
    """The wall-clock time a daemon stamped on its log line (millisecond resolution)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _seconds(line: str, after: str) -> float:
    m = re.search(after + r"(\d+\.\d+) s", line)
    assert m, line
    return float(m.group(1))


@pytest.mark.slow
def test_partition_is_detected_on_both_sides_and_heals(tmp_path: Path, net: Net, procs) -> None:
    srv = start_server(tmp_path, wrap=net.exec(net.srv_ns), **SERVER_CFG)
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"], wrap=net.exec(net.cli_ns), **CLIENT_CFG)
    procs.append(cli)
    for _ in range(3):
        cli.wait_for("pong from", after=cli.mark())
    cmark, smark = cli.mark(), srv.mark()
    net.link("client", "down")  # every packet between them is now dropped, with no FIN or RST
    cut = time.time()  # after the command (starting `ip` can take a while on a cold cache); wall clock,
    # to compare with the daemons' own log timestamps rather than when this busy process read them
    _, line_cli = cli.wait_for(r"WARNING .*lost: no pong within 0\.6 s", after=cmark, timeout=5)
    _, line_srv = srv.wait_for(r"WARNING .*timed out: silent for", after=smark, timeout=5)
    t_cli, t_srv = logged_at(line_cli), logged_at(line_srv)
    unanswered = _seconds(line_cli, "ping unanswered for ")
    silent = _seconds(line_srv, "silent for ")
    time.sleep(1.0)  # partitioned for a while: the client's reconnects fail
    hmark = cli.mark()
    net.link("client", "up")
    heal = time.time()
    _, line = cli.wait_for(r"INFO .*connected to 169\.254\.77\.1", after=hmark, timeout=1.0 + 3)
    t_up = logged_at(line)
    cli.wait_for("pong from", after=hmark)
    report(
        "network partition (veth link down)",
        [
            f"client: link declared dead {t_cli - cut:.3f} s after the cut; ping unanswered {unanswered:.3f} s "
            f"(pong_timeout 0.6 s, interval 0.2 s)",
            f"server: client closed {t_srv - cut:.3f} s after the cut; silent {silent:.3f} s (heartbeat_timeout 1 s)",
            f"client reconnected {t_up - heal:.3f} s after the partition healed (reconnect_max_delay 1 s)",
        ],
    )
    assert unanswered <= 0.6 + 0.1, line_cli
    assert silent <= 1.0 + 0.1, line_srv
    # From the cut: the last answered ping may be up to one interval old (+ output pipe slack).
    assert t_cli - cut <= 0.2 + 0.6 + 0.1 + 0.1, t_cli - cut
    assert t_srv - cut <= 1.0 + 0.1 + 0.1, t_srv - cut
    assert t_up - heal <= 1.0 + 1.0


@pytest.mark.slow
def test_server_host_vanishes_without_fin_or_rst(tmp_path: Path, net: Net, procs) -> None:
    """Half-open: the server's host drops off the network and its process dies there; the client's
    socket still looks established. It must notice by itself, then find the rebooted server."""
    srv = start_server(tmp_path, wrap=net.exec(net.srv_ns), **SERVER_CFG)
    procs.append(srv)
    port = srv.config["port"]
    cli = start_client(tmp_path, port, wrap=net.exec(net.cli_ns), **CLIENT_CFG)
    procs.append(cli)
    cli.wait_for("pong from")
    cmark = cli.mark()
    net.link("server", "down")
    gone = time.time()
    srv.kill()  # its kernel's FIN/RST go nowhere: the link is down
    _, line = cli.wait_for(r"WARNING .*lost: no pong within 0\.6 s", after=cmark, timeout=5)
    t_cli = logged_at(line)
    unanswered = _seconds(line, "ping unanswered for ")
    assert unanswered <= 0.7, line
    assert "server closed the connection" not in cli.output()[len(cli.output()) - 2000 :]
    srv2 = start_server(tmp_path, name="server2", wrap=net.exec(net.srv_ns), port=port, **SERVER_CFG)
    procs.append(srv2)
    net.link("server", "up")
    back = time.time()
    _, up_line = cli.wait_for(r"INFO .*connected to 169\.254\.77\.1", after=cmark, timeout=5)
    t_up = logged_at(up_line)
    cli.wait_for("pong from", after=cli.mark())
    report(
        "half-open: the server host vanishes (link down, process killed)",
        [
            f"client: link declared dead {t_cli - gone:.3f} s later; "
            f"ping unanswered {unanswered:.3f} s (pong_timeout 0.6 s)",
            f"client reconnected {t_up - back:.3f} s after the host came back",
        ],
    )
