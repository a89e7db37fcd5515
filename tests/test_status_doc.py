"""The status document as ``hbd status`` reads it: documents the daemons write parse and render;
foreign or malformed ones are a clear error naming the field, never a traceback; new keys pass."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from helpers import status_document

from hbd import status
from hbd.cli import main
from hbd.status_doc import StatusDocError, parse_document
from hbd.view import (
    ClientSettings,
    ClientView,
    DaemonView,
    LinkRow,
    LoopNumbers,
    PeerRow,
    RecentEvent,
    Rtt,
    ServerCounters,
    ServerSettings,
    ServerView,
)


def _daemon(role: str) -> DaemonView:
    return DaemonView(
        role=role,
        now=1000.0,
        started=1_700_000_000.0,
        status="fine",
        reloads_ok=0,
        reloads_failed=0,
        last_reload_error=None,
        loop=LoopNumbers(0.0, 0.0, 0),
        hooks={},
        events={},
        recent=(RecentEvent(1_700_000_100.0, "down", "web2", "10.0.0.2:4000", "UP", "silent for 10 s"),),
    )


def server_doc() -> dict:
    row = PeerRow("web1", "web1", "10.0.0.7:4000", "UP", 990.0, 999.0, 12, 10.0, 2.0)
    view = ServerView(_daemon("server"), "0.0.0.0:7000", ServerSettings(10.0, 100, 1), ServerCounters(), [row])
    return status_document(view)


def client_doc() -> dict:
    rtt = Rtt((0.001, 0.01), (1, 0, 0), 0.0005, 1, 0.0005, 0.0005)
    row = LinkRow("db", "db", "10.0.0.9:7000", "DOWN", 995.0, "waiting", None, rtt, 3, 1, 2, 1, 0, 1003.0)
    view = ClientView(_daemon("client"), "web1", ClientSettings(2.0, 5.0, 0), (row,))
    return json.loads(b"".join(status.client_document(view)))


def test_the_documents_the_daemons_write_parse_and_render() -> None:
    srv = parse_document(server_doc())
    assert srv["role"] == "server" and srv["peers"][0]["address"] == "10.0.0.7:4000"
    assert srv["config"]["heartbeat_timeout"] == 10.0
    shown = status.render(srv)
    assert "web1" in shown and "listening on 0.0.0.0:7000" in shown and "web2 (10.0.0.2:4000)  silent for 10 s" in shown
    cli = parse_document(client_doc())
    assert cli["role"] == "client" and cli["servers"][0].get("next_attempt_in") == 3.0
    assert "retry 1 in 3.0s" in status.render(cli)


def test_new_optional_keys_are_accepted() -> None:
    doc = server_doc()
    doc["counts"] = {"UP": 1, "DOWN": 0}
    doc["peers"][0].update(since=1.0, reason="first ping", expected=True, flapping=False, silenced_until=None)
    doc["peers"][0]["labels"] = {"rack": "a1"}
    doc["history"] = {"anything": ["a later daemon adds"]}
    assert parse_document(doc)["peers"][0]["state"] == "UP"


def test_a_selection_parses_and_renders_counts_first_and_what_the_limit_left_out() -> None:
    doc = server_doc()
    doc.update(
        counts={"NEW": 0, "UP": 90, "LATE": 3, "DOWN": 7},
        matched=10,
        registry=True,
        filter={"state": ["LATE", "DOWN"], "peer": "web*", "limit": 1},
    )
    doc["peers"][0].update(state="DOWN", since=990.0, reason="disconnected")
    parsed = parse_document(doc)
    assert parsed["matched"] == 10 and parsed["filter"] == {"state": ["LATE", "DOWN"], "peer": "web*", "limit": 1}
    lines = status.render(parsed).splitlines()
    assert lines[1].endswith("100 peers: 90 up, 3 late, 0 new, 7 down")  # every peer, not the rows shown
    assert lines[2] == "10 matches state LATE,DOWN; peer web*"
    assert lines[-4].startswith("... 9 more matched, not shown")  # right after the table
    for bad, message in (({"limit": "1"}, "filter.limit: expected a whole number"), (5, "filter: expected an object")):
        with pytest.raises(StatusDocError, match=message):
            parse_document({**doc, "filter": bad})
    with pytest.raises(StatusDocError, match="matched: expected a whole number"):
        parse_document({**doc, "matched": None})


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: [d], "the reply: expected an object, got a list"),
        (lambda d: {**d, "role": "toaster"}, "role: expected server or client, got 'toaster'"),
        (lambda d: {k: v for k, v in d.items() if k != "now"}, "now: missing"),
        (lambda d: {**d, "pid": "12"}, "pid: expected a whole number, got a string"),
        (lambda d: {**d, "peers": {"web1": {}}}, "peers: expected a list, got an object"),
        (lambda d: {**d, "peers": [*d["peers"], 5]}, "peers[1]: expected an object, got a number"),
        (lambda d: {**d, "peers": [{**d["peers"][0], "address": 5}]}, "peers[0].address: expected a string"),
        (lambda d: {**d, "peers": [{**d["peers"][0], "timeout": True}]}, "peers[0].timeout: expected a number"),
        (lambda d: {**d, "recent": [{"time": 1.0}]}, "recent[0].event: missing"),
    ],
)
def test_a_malformed_document_is_a_clear_error(mangle, message: str) -> None:
    with pytest.raises(StatusDocError) as err:
        parse_document(mangle(server_doc()))
    assert message in str(err.value)


def test_a_malformed_link_row_names_its_field() -> None:
    doc = client_doc()
    doc["servers"][0]["rtt_ms"] = {"last": "fast"}
    with pytest.raises(StatusDocError, match=r"servers\[0\]\.rtt_ms\.last: expected a number, got a string"):
        parse_document(doc)


def test_hbd_status_on_a_foreign_socket_says_so_without_a_traceback(tmp_path: Path, capsys) -> None:
    path = str(tmp_path / "foreign.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b'{"role": "server", "version": "9", "pid": 1, "now": 5, "started": 1, "status": ""}\n')

    t = threading.Thread(target=answer)
    t.start()
    try:
        assert main(["status", "-s", path]) == 1
    finally:
        t.join(10)
        listener.close()
    err = capsys.readouterr().err
    assert err.strip() == f"hbd: error: {path}: not a status reply: peers: missing"
