"""``hbd status`` with a filter against real daemons: the daemon applies it (``select``), the CLI shows
the counts first and says how many more matched; old and new sides fail clearly on what they do not
know; and big replies are bounded in number and memory whatever their readers do."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from daemons import connect, recv_exactly, start_server
from helpers import wait_until

from hbd import commands, status_select
from hbd.cli import main
from hbd.control import HIGH_WATER, RequestServer, UnixListener, query
from hbd.loop import EventLoop
from hbd.status_doc import parse_document
from hbd.status_filter import StatusFilter
from hbd.view import (
    DaemonView,
    LoopNumbers,
    PeerRow,
    PeerSource,
    ServerCounters,
    ServerSettings,
    ServerView,
    SupervisorView,
)


def _select(sock: Path, **fields: object) -> dict:
    return json.loads(query(str(sock), json.dumps({"request": "select", **fields})))


def _peers(port: int, names: list[str]) -> dict[str, socket.socket]:
    socks = {}
    for name in names:
        s = connect(port)
        s.sendall(f"hello {name}\nping".encode())
        socks[name] = s
    for s in socks.values():
        assert recv_exactly(s, 4) == b"pong"
    return socks


def test_the_daemon_filters_and_the_cli_shows_counts_first(tmp_path: Path, procs, capsys) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=30)
    procs.append(srv)
    sock = tmp_path / "server.sock"
    socks = _peers(srv.config["port"], ["web1", "web2", "web3", "web4", "db1", "db2"])
    for name in ("web3", "db2"):
        socks.pop(name).close()
    wait_until(lambda: _select(sock, state=["DOWN"])["matched"] == 2)

    doc = _select(sock, state=["DOWN"], limit=100)
    assert sorted(p["peer"] for p in doc["peers"]) == ["db2", "web3"]
    assert doc["counts"] == {"NEW": 0, "UP": 4, "LATE": 0, "DOWN": 2} or doc["counts"]["DOWN"] == 2
    assert doc["filter"] == {"state": ["DOWN"], "peer": None, "limit": 100} and doc["registry"] is True
    doc = _select(sock, peer="web*", limit=2)  # the first two in the table's order: DOWN first
    assert [p["peer"] for p in doc["peers"]] == ["web3", "web1"] and doc["matched"] == 4
    assert _select(sock, peer="127.0.0.*", state=["UP"])["matched"] == 4  # an address glob
    assert _select(sock, peer="nobody")["peers"] == []

    assert main(["status", "-s", str(sock), "--state", "down,late", "web*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "6 peers: 4 up, 0 late, 0 new, 2 down" in lines[1]  # every peer, whatever the filter
    assert lines[2] == "1 match state LATE,DOWN; peer web*"
    rows = [line.split()[0] for line in lines[lines.index("") + 2 :] if line and not line.startswith(" ")]
    assert rows[0] == "web3" and "db2" not in rows and "web1" not in rows

    assert main(["status", "-s", str(sock), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "... 3 more matched, not shown (the first 3 in this order are): --limit N shows more, --all" in out
    assert main(["status", "-s", str(sock), "web1", "--recent", "0"]) == 0  # a lone argument that is no role: PEER
    out = capsys.readouterr().out
    assert "\nweb1 " in out and "web2" not in out

    assert main(["status", "-s", str(sock), "--state", "down", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["matched"] == 2 and len(doc["peers"]) == 2 and doc["counts"]["UP"] == 4
    assert main(["status", "-s", str(sock), "--all", "--json"]) == 0  # the whole document, as before filters
    assert len(json.loads(capsys.readouterr().out)["peers"]) == 6

    # what a side does not know fails clearly instead of returning everything
    assert json.loads(query(str(sock), '{"request": "select", "label": "x"}'))["error"].startswith(
        "select: unknown field 'label'"
    )
    assert "takes no arguments" in json.loads(query(str(sock), '{"request": "status", "state": ["DOWN"]}'))["error"]
    assert main(["status", "-s", str(sock), "--limit", "100000"]) == 2
    assert "--all lists every match" in capsys.readouterr().err
    assert main(["status", "-s", str(sock), "--state", "gone"]) == 2
    assert "state: expected some of" in capsys.readouterr().err
    for s in socks.values():
        s.close()


def test_workers_merge_their_first_rows_in_order(tmp_path: Path, procs, capsys) -> None:
    srv = start_server(tmp_path, workers=2, heartbeat_timeout=30)
    procs.append(srv)
    srv.wait_for("2 workers listening")
    sock = tmp_path / "server.sock"
    names = [f"w{i:02d}" for i in range(30)]
    socks = _peers(srv.config["port"], names)
    for name in ("w05", "w17", "w29"):
        socks.pop(name).close()
    wait_until(lambda: _select(sock, state=["DOWN"])["matched"] == 3)
    wait_until(lambda: _select(sock, state=["UP"])["matched"] == 27)
    doc = _select(sock, limit=5)
    assert [(p["peer"], p["state"]) for p in doc["peers"]] == [
        ("w05", "DOWN"),
        ("w17", "DOWN"),
        ("w29", "DOWN"),
        ("w00", "UP"),
        ("w01", "UP"),
    ]
    assert doc["matched"] == 30 and doc["counts"]["UP"] == 27 and len(doc["workers"]) == 2
    assert {p.get("worker") for p in doc["peers"] if p["state"] == "UP"} <= {1, 2}
    doc = _select(sock, peer="w1*", limit=0)  # every match, relayed as it comes
    assert sorted(p["peer"] for p in doc["peers"]) == [f"w1{i}" for i in range(10)] and doc["matched"] == 10
    assert main(["status", "-s", str(sock), "--limit", "2"]) == 0
    assert "... 28 more matched" in capsys.readouterr().out
    for s in socks.values():
        s.close()


def _fake_daemon(tmp_path: Path, reply: bytes) -> tuple[str, threading.Thread, socket.socket, list[bytes]]:
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    asked: list[bytes] = []

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            asked.append(conn.recv(1000))
            conn.sendall(reply)

    t = threading.Thread(target=answer)
    t.start()
    return path, t, listener, asked


def test_a_daemon_from_before_filters_refuses_select_and_the_cli_says_what_to_do(tmp_path: Path, capsys) -> None:
    old = b"""{"error": "unknown command 'select'; try: status, metrics, reload, silences"}\n"""
    path, t, listener, asked = _fake_daemon(tmp_path, old)
    try:
        assert main(["status", "-s", path, "--state", "down"]) == 1
    finally:
        t.join(10)
        listener.close()
    assert json.loads(asked[0]) == {"request": "select", "limit": 100, "state": ["DOWN"]}
    err = capsys.readouterr().err
    assert "older than status filters" in err and "hbd status --all, without --state or PEER" in err


def test_plain_all_sends_the_old_request(tmp_path: Path, capsys) -> None:
    reply = b'{"role": "server", "version": "9", "pid": 1, "now": 5, "started": 1, "status": "", "peers": []}\n'
    path, t, listener, asked = _fake_daemon(tmp_path, reply)
    try:
        assert main(["status", "-s", path, "--all"]) == 0
    finally:
        t.join(10)
        listener.close()
    assert asked == [b"status\n"]
    assert "0 clients" in capsys.readouterr().out


def test_big_replies_are_bounded_in_number_and_unread_ones_in_memory(tmp_path: Path) -> None:
    """MAX_BIG readers that never read hold their slots with at most a buffer's worth produced each;
    one more is told "busy" while they are fresh, and evicts the longest-stalled once it has taken
    nothing for STALLED seconds; a closed one gives its slot back."""
    loop = EventLoop()
    listener = UnixListener(str(tmp_path / "c.sock"))
    produced = [0] * 10
    now = [0.0]
    big = commands.BigReplies(clock=lambda: now[0])

    def reply(n: int):
        for _ in range(10_000):  # 100 MB if it were all made
            produced[n] += 1
            yield b"x" * 10_000

    def handler(request: bytes, wake):
        return big.counted(reply(int(request)), commands._busy)

    server = RequestServer(loop, listener.sock, handler)

    def ask(n: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(listener.path)
        s.sendall(b"%d\n" % n)
        s.setblocking(False)
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            loop.run_once(0.01)
        return s

    readers = [ask(n) for n in range(commands.MAX_BIG)]
    assert big.running == commands.MAX_BIG
    extra = ask(commands.MAX_BIG)
    extra.setblocking(True)
    extra.settimeout(5)
    assert b"busy" in extra.recv(1000)  # every slot was resumed just now
    for n in range(commands.MAX_BIG):  # unread: each made only what fits the buffers
        assert 0 < produced[n] * 10_000 < HIGH_WATER + 1_000_000, produced
    made = produced[0]
    now[0] += commands.STALLED + 0.1  # none of them has taken anything since
    late = ask(commands.MAX_BIG + 1)
    assert big.running == commands.MAX_BIG and produced[commands.MAX_BIG + 1] > 0  # it got a slot
    got, end = 0, time.monotonic() + 5
    while time.monotonic() < end:  # the evicted one's reader gets what was made, then EOF
        loop.run_once(0.001)
        try:
            chunk = readers[0].recv(1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += len(chunk)
    else:
        raise AssertionError("the evicted reply did not end")
    assert produced[0] == made and got <= made * 10_000  # nothing more was made for it
    readers[1].close()
    end = time.monotonic() + 2
    while time.monotonic() < end and big.running == commands.MAX_BIG:
        loop.run_once(0.01)
    assert big.running == commands.MAX_BIG - 1  # its generator was closed: the slot is free
    server.close()  # closes the others: every slot back
    assert big.running == 0
    for s in [*readers, extra, late]:
        s.close()
    listener.remove()
    loop.close()


def _view_heard_after_its_head(supervises: bool) -> ServerView | SupervisorView:
    """A view made at loop time 1000 whose one peer pinged at 1000.5, after the view (a row is read
    when a scan reaches it, turns later at 100,000 peers)."""
    daemon = DaemonView("server", 1000.0, 1_700_000_000.0, "", 0, 0, None, LoopNumbers(0.0, 0.0, 0), {}, {}, ())
    row = PeerRow("web1", "web1", "10.0.0.7:4000", "UP", 990.0, 1000.5, 12, 10.0, 2.0)
    source = PeerSource(1, lambda i: ("web1", "10.0.0.7:4000", "UP"), lambda i: row)
    settings = ServerSettings(10.0, 100, 2 if supervises else 1)
    if supervises:
        return SupervisorView(daemon, "0.0.0.0:7000", settings, (), sources=(source,))
    return ServerView(daemon, "0.0.0.0:7000", settings, ServerCounters(), [row], sources=(source,))


def test_every_time_in_a_document_is_at_or_before_its_now() -> None:
    """``now`` ends a server's document, taken once every row has been read: a peer heard while the
    document was being made never shows a ping after it (an age below zero)."""
    loop = EventLoop(clock=lambda: 1000.6)
    try:
        for supervises in (False, True):
            view = _view_heard_after_its_head(supervises)
            if isinstance(view, SupervisorView):
                reply = status_select.supervisor_select(view, StatusFilter(), loop, None, lambda: None)
            else:
                reply = status_select.server_select(view, StatusFilter(), loop, lambda: None)
            doc = json.loads(b"".join(c for c in reply if c))
            [peer] = doc["peers"]
            assert peer["connected"] < peer["last_ping"] <= doc["now"]
            assert doc["now"] - peer["last_ping"] == pytest.approx(0.1, abs=0.002)
            assert doc["now"] - doc["started"] > 0 and parse_document(doc)["peers"][0]["name"] == "web1"
    finally:
        loop.close()
