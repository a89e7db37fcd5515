"""``hbd history`` on real store files made here, in made-up (virtual) wall-clock times."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hbd import cli
from hbd.cli import main
from hbd.state_store import ChangeRecord, PeerRecord, StateStore

ROOT = Path(__file__).resolve().parents[1]
H, DAY = 3600.0, 86400.0
NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC

# The server ran for 8 days, was down an hour (30 h to 29 h ago) and runs since (alive 5 s ago).
RUNS = [(NOW - 10 * DAY, NOW - 30 * H), (NOW - 29 * H, NOW - 5)]
CHANGES = [
    (NOW - 10 * DAY, "web1", "NEW", "UP", ""),
    (NOW - 10 * DAY, "db1", "NEW", "UP", ""),
    (NOW - 29 * H + 10, "web1", "NEW", "UP", ""),  # back 10 s after the restart
    (NOW - 29 * H + 10, "db1", "NEW", "UP", ""),
    (NOW - 3 * H, "web1", "UP", "DOWN", "timeout"),
    (NOW - 2 * H, "web1", "DOWN", "UP", ""),
    (NOW - 20 * 60, "db1", "UP", "DOWN", "connection closed"),  # still down
    (NOW - 6 * H, "late1", "NEW", "UP", ""),  # first seen 6 h ago
    (NOW - 1 * H, "late1", "UP", "LATE", "no ping for 7.5 s"),
    (NOW - 50 * 60, "late1", "LATE", "UP", ""),
]
PEERS = [
    ("web1", "10.0.0.1:4000", "UP", NOW - 2 * H, NOW - 3),
    ("db1", "10.0.0.2:4000", "DOWN", NOW - 20 * 60, NOW - 20 * 60 - 4),
    ("late1", "10.0.0.3:4000", "UP", NOW - 50 * 60, NOW - 1),
]


def make_store(state_dir: Path, changes=CHANGES, runs=RUNS, peers=PEERS, version: int | None = None) -> Path:
    """A state store written by the server's own StateStore: the changes and peers, then one open,
    start_run, alive and close per run (a restart each)."""
    state_dir.mkdir(exist_ok=True)
    store = StateStore.open(str(state_dir))
    for t, name, old, new, reason in changes:
        store.add_change(ChangeRecord(t, name, old, new, reason))
    store.add_change(ChangeRecord(NOW - H, "srv", "UP", "DOWN", "", side="client"))  # a client's link
    for name, address, state, since, last_ping in peers:
        store.put_peer(PeerRecord(name, address, state, since, last_ping, "", False, 10.0))
    store.close()
    for started, alive in runs:
        store = StateStore.open(str(state_dir))
        store.start_run(started)
        store.alive(alive)
        store.close()
    path = state_dir / "state.db"
    if version is not None:
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version = {version}")
        conn.close()
    return path


@pytest.fixture
def utc() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "UTC")
    time.tzset()
    yield
    mp.undo()
    time.tzset()


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, utc: None) -> Path:
    """server.yaml naming tmp_path/state as state_dir; the command's clock at NOW."""
    state_dir = tmp_path / "state"
    path = tmp_path / "server.yaml"
    path.write_text(f"state_dir: {state_dir}\n")
    monkeypatch.setattr(cli, "_wall", lambda: NOW)
    return path


def history(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["history", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_table(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(config.parent / "state")
    code, out, err = history(capsys, "-c", str(config))
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[0].startswith(f"history from {config.parent / 'state' / 'state.db'} at 2027-01-15 08:00:00 UTC")
    rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["web1"], ["db1"], ["late1"])}
    assert list(rows) == ["db1", "web1", "late1"]  # problems first
    # db1: down for the last 20 minutes; over 7 d, the hour and 10 s unknown are out of the sum
    # (1 - 1200 / (7 d - 3610 s) = 99.80%); over 30 d, it was first seen 10 d ago (99.86%)
    assert rows["db1"].split()[:10] == [
        "db1",
        "DOWN",
        "98.61%",
        "99.80%",
        "99.86%",
        "1",
        "20m00s",
        "20m00s",
        "1h00m",
        "20m04s",  # its last ping
    ]
    # web1: an hour down 3 h ago (23 h of 24 h: 95.83%)
    assert rows["web1"].split()[:9] == ["web1", "UP", "95.83%", "99.40%", "99.58%", "1", "1h00m", "1h00m", "1h00m"]
    # late1: LATE counts as up; before it was first seen counts nowhere
    assert rows["late1"].split()[:9] == ["late1", "UP", "100%", "100%", "100%", "0", "-", "-", "-"]
    assert "now" in rows["web1"] and "ago" in rows["db1"]
    assert "srv" not in out  # the client side's changes are not the server's peers
    header = next(line for line in lines if line.startswith("PEER"))
    timeline_at = header.index("LAST 24 H")
    assert lines[lines.index(header) + 1][timeline_at:].startswith("08:30") or "12:00" in lines[lines.index(header) + 1]
    web1 = rows["web1"][timeline_at:]
    assert len(web1) == 48 and web1.count("\u2581") == 2 and web1.endswith("\u2588" * 4)
    assert rows["late1"][timeline_at:].strip().startswith("\u2588") and "\u2586" in rows["late1"]


def test_the_json_document(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(config.parent / "state")
    code, out, _ = history(capsys, "-c", str(config), "--json", "--since", "2d")
    assert code == 0
    doc = json.loads(out)
    assert doc["now"] == NOW and doc["since_seconds"] == 2 * DAY and doc["runs_recorded"] is True
    assert doc["timeline"] == {
        "start": NOW - DAY,  # NOW is on a half hour: the last cell ends at it
        "cell_seconds": 1800.0,
        "cells": 48,
        "letters": {".": "not seen yet", "U": "UP", "L": "LATE", "D": "DOWN", "?": "UNKNOWN"},
    }
    peers = {p["peer"]: p for p in doc["peers"]}
    assert set(peers) == {"web1", "db1", "late1"}
    web1 = peers["web1"]
    assert web1["state"] == "UP" and web1["first_seen"] == NOW - 10 * DAY and web1["last_seen"] == NOW
    assert web1["windows"]["24h"] == {
        "uptime_percent": round(100 * 23 / 24, 4),
        "up_seconds": 23 * H,
        "late_seconds": 0.0,
        "down_seconds": H,
        "unknown_seconds": 0.0,
        "outages": 1,
        "longest_outage_seconds": H,
        "down_since": None,
    }
    since = web1["windows"]["since"]  # 2 d: the server's hour off and web1's 10 s as NEW are unknown
    assert (since["unknown_seconds"], since["down_seconds"], since["up_seconds"]) == (H + 10, H, 2 * DAY - 2 * H - 10)
    assert peers["db1"]["windows"]["24h"]["down_since"] == NOW - 20 * 60
    assert (
        peers["late1"]["windows"]["30d"]["up_seconds"] == 6 * H
        and peers["late1"]["windows"]["30d"]["late_seconds"] == 600
    )
    assert web1["timeline"][-6:] == "DDUUUU" and len(web1["timeline"]) == 48
    assert "changes" not in web1  # only for one peer


def test_one_peer_lists_its_outages_and_changes(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(config.parent / "state")
    code, out, _ = history(capsys, "web1", "-c", str(config), "--since", "30h")
    assert code == 0
    assert "db1" not in out and "late1" not in out
    assert "outages of web1 in the last 1d 6h:\n  2027-01-15 05:00:00 .. 2027-01-15 06:00:00  1h00m\n" in out
    changes = out.split("changes of web1 in the last 1d 6h:\n")[1].splitlines()
    assert changes == [
        "  2027-01-14 03:00:10   NEW -> UP",
        "  2027-01-15 05:00:00    UP -> DOWN  timeout",
        "  2027-01-15 06:00:00  DOWN -> UP",
    ]
    code, out, _ = history(capsys, "db1", "-c", str(config), "--json")
    doc = json.loads(out)
    [db1] = doc["peers"]
    assert db1["outages"] == [{"start": NOW - 1200, "end": NOW, "seconds": 1200.0}]
    assert [c["new"] for c in db1["changes"]] == ["UP", "DOWN"]


def test_an_unknown_peer(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(config.parent / "state")
    code, out, err = history(capsys, "nosuch", "-c", str(config))
    assert code == 1 and not out
    assert err == f"hbd: error: {config.parent / 'state' / 'state.db'}: no history of a peer named 'nosuch'\n"


def test_an_empty_store(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(config.parent / "state", changes=[], runs=[], peers=[])
    code, out, _ = history(capsys, "-c", str(config))
    assert code == 0 and "(no peers recorded)" in out
    code, out, _ = history(capsys, "-c", str(config), "--json")
    assert json.loads(out)["peers"] == [] and out.endswith('"peers": []\n}\n')


def test_a_store_without_runs_takes_the_server_as_running(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(config.parent / "state", runs=[])
    code, out, _ = history(capsys, "-c", str(config), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["runs_recorded"] is False
    assert {p["peer"]: p["windows"]["7d"]["unknown_seconds"] for p in doc["peers"]} == {"web1": 0, "db1": 0, "late1": 0}
    code, out, _ = history(capsys, "-c", str(config))
    assert "records no server runs" in out


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda d: None, "state.db: no such file: the daemon has not kept a state store there yet"),
        (lambda d: (d / "state.db").write_bytes(b"garbage " * 1000), "state.db: not a readable hbd state store"),
        (lambda d: (d / "state.db").mkdir(), "state.db: not a regular file"),
        (lambda d: make_store(d, version=9), "written by a newer hbd (schema version 9"),
        (lambda d: sqlite3.connect(d / "state.db").execute("CREATE TABLE x (y)").connection.commit(), "no changes"),
    ],
    ids=["missing", "corrupt", "directory", "newer", "foreign"],
)
def test_a_store_that_cannot_be_read_is_one_line_and_exit_1(
    config: Path, capsys: pytest.CaptureFixture[str], make, why: str
) -> None:
    state_dir = config.parent / "state"
    state_dir.mkdir()
    make(state_dir)
    code, out, err = history(capsys, "-c", str(config))
    assert code == 1 and not out
    assert err.startswith(f"hbd: error: {state_dir / 'state.db'}") and err.count("\n") == 1, err
    assert why in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("since", "why"),
    [("soon", "not a duration"), ("0", "more than 0"), ("-5m", "not a duration"), ("5y", "not a duration")],
)
def test_since_must_be_a_duration(capsys: pytest.CaptureFixture[str], since: str, why: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["history", f"--since={since}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --since:" in err and why in err


def test_since_accepts_durations() -> None:
    parser = cli.build_parser()
    for text, seconds in (("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", DAY), ("1h30m", 5400), ("600", 600)):
        assert parser.parse_args(["history", "--since", text]).since == seconds
    assert parser.parse_args(["history"]).since == 7 * DAY


def _run_history(
    state_dir: Path, *args: str, user: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``hbd history -c CONFIG`` (naming ``state_dir``) in a process of its own, its clock at NOW."""
    config = state_dir.parent / "server.yaml"
    config.write_text(f"state_dir: {state_dir}\n")
    os.chmod(config, 0o644)
    code = f"import sys, hbd.cli as c; c._wall = lambda: {NOW!r}; sys.exit(c.main(['history', *sys.argv[1:]]))"
    args = (*args, "-c", str(config))
    env = {**os.environ, "TZ": "UTC", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [*(user or []), sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_it_reads_while_the_daemon_writes(tmp_path: Path) -> None:
    """The server's store is open (WAL) and has flushed a change; another writer is in the middle of
    a batch: the reader sees what was committed, not the rest, and changes nothing in the directory."""
    make_store(tmp_path / "state")
    store = StateStore.open(str(tmp_path / "state"))
    store.start_run(NOW - 29 * H)
    store.alive(NOW - 1)
    store.add_change(ChangeRecord(NOW - 60, "new1", "NEW", "UP", ""))
    assert store.flush() is False
    store.add_change(ChangeRecord(NOW - 50, "queued", "NEW", "UP", ""))  # queued only
    writer = sqlite3.connect(tmp_path / "state" / "state.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    sql = "INSERT INTO changes (time, peer, old, new, reason, side) VALUES (?, 'new2', 'NEW', 'UP', '', 'server')"
    writer.execute(sql, (NOW - 30,))
    files = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "state").iterdir()}
    r = _run_history(tmp_path / "state", "--json")
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "state").iterdir()} == files
    writer.execute("ROLLBACK")
    writer.close()
    store.close()
    assert r.returncode == 0, r.stderr
    peers = {p["peer"] for p in json.loads(r.stdout)["peers"]}
    assert "new1" in peers and not {"new2", "queued"} & peers


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the reader as another user")
def test_a_reader_that_may_not_write_the_directory(tmp_path: Path) -> None:
    """Member of the store's group, daemon stopped (no WAL), directory not writable: still readable;
    not in the group: a one-line permission error."""
    top = Path(tempfile.mkdtemp(prefix="hbd-history-"))  # pytest's own tmp is private to root
    try:
        _as_another_user(top)
    finally:
        shutil.rmtree(top)


def _as_another_user(top: Path) -> None:
    state_dir = top / "state"
    path = make_store(state_dir)
    # A store left in WAL mode without its -wal (its daemon's close could not switch it back while a
    # reader was in): SQLite cannot open it ?mode=ro for a reader who may not create the -shm.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    conn.close()
    assert path.read_bytes()[18:20] == b"\x02\x02"  # the header says WAL
    os.chmod(top, 0o755)
    os.chown(state_dir, 0, 65534)
    os.chmod(state_dir, 0o750)
    os.chown(path, 0, 65534)
    os.chmod(path, 0o640)
    assert not (state_dir / "state.db-wal").exists()
    as_group = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = _run_history(state_dir, "--json", user=as_group)
    assert r.returncode == 0, r.stderr
    assert {p["peer"] for p in json.loads(r.stdout)["peers"]} == {"web1", "db1", "late1"}
    os.chown(state_dir, 0, 0)
    os.chmod(state_dir, 0o755)
    os.chown(path, 0, 0)
    r = _run_history(state_dir, user=as_group)
    assert r.returncode == 1 and "permission denied (-rw-r-----)" in r.stderr and r.stderr.count("\n") == 1


def test_rows_the_daemon_never_writes_are_skipped(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited file: times that are not numbers or not plausible, a peer without a name, a run
    that is text; and a remembered peer without any change is still listed."""
    path = make_store(config.parent / "state")
    conn = sqlite3.connect(path, isolation_level=None)
    sql = "INSERT INTO changes (time, peer, old, new, reason, side) VALUES (?, ?, 'UP', 'DOWN', NULL, 'server')"
    conn.executemany(sql, [(None, "web1"), ("soon", "web1"), (1e300, "web1"), (-1e300, "web1"), (NOW - 60, None)])
    conn.execute("INSERT INTO runs (started, alive) VALUES ('then', NULL)")
    conn.execute("INSERT INTO peers (name, last_ping) VALUES ('quiet', 'x')")
    conn.close()
    code, out, err = history(capsys, "-c", str(config), "--json")
    assert code == 0, err
    peers = {p["peer"]: p for p in json.loads(out)["peers"]}
    assert list(peers) == ["db1", "late1", "quiet", "web1"]  # by name, the one without changes too
    assert peers["web1"]["windows"]["24h"]["outages"] == 1 and peers["web1"]["first_seen"] == NOW - 10 * DAY
    assert peers["quiet"]["state"] == "UNKNOWN" and peers["quiet"]["last_seen"] is None
    assert peers["quiet"]["windows"]["30d"]["uptime_percent"] is None


def test_a_terminal_without_block_characters_gets_ascii(tmp_path: Path) -> None:
    make_store(tmp_path / "state")
    r = _run_history(tmp_path / "state", env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    web1 = next(line for line in r.stdout.splitlines() if line.startswith("web1"))
    assert web1.endswith("#" * 42 + "__" + "#" * 4) and "# up  + late  _ down  ? unknown" in r.stdout


def test_a_server_without_a_store_or_with_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("state_dir: null\n")
    code, out, err = history(capsys, "-c", str(config))
    assert (code, out) == (1, "") and err == f"hbd: error: {config} sets state_dir: null: the server keeps no history\n"
    config.write_text("state_dir: 7\nport: 0\n")
    code, out, err = history(capsys, "-c", str(config))
    assert code == 1 and not out and f"hbd: error: {config}:" in err and "Traceback" not in err
    code, out, err = history(capsys, "-c", str(tmp_path / "none.yaml"))
    assert code == 1 and "cannot read the file" in err


def test_while_the_server_is_stopped_now_is_unknown(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server stopped 10 minutes ago: since then nothing is known; db1's outage, open at the stop,
    ends there; last seen is the last ping the store kept."""
    make_store(config.parent / "state", runs=[(NOW - 10 * DAY, NOW - 600)])
    code, out, _ = history(capsys, "-c", str(config), "--json")
    assert code == 0
    peers = {p["peer"]: p for p in json.loads(out)["peers"]}
    assert {p["state"] for p in peers.values()} == {"UNKNOWN"}
    db1 = peers["db1"]["windows"]["24h"]
    assert (db1["unknown_seconds"], db1["down_seconds"], db1["outages"], db1["down_since"]) == (600, 600, 1, None)
    assert peers["db1"]["timeline"].endswith("UD") and peers["web1"]["timeline"].endswith("DDUUU?")
    assert peers["web1"]["last_seen"] == NOW - 3 and peers["db1"]["last_seen"] == NOW - 20 * 60 - 4
    code, out, _ = history(capsys, "-c", str(config))
    assert next(line for line in out.splitlines() if line.startswith("web1")).split()[1] == "?"


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """``hbd history | head -1`` on a store of 3000 peers (more than a pipe holds)."""
    many = [(NOW - DAY, f"host{i:04d}", "NEW", "UP", "") for i in range(3000)]
    make_store(tmp_path / "state", changes=many, peers=[])
    for args in ((), ("--json",)):
        config = tmp_path / "server.yaml"
        config.write_text(f"state_dir: {tmp_path / 'state'}\n")
        with subprocess.Popen(
            [sys.executable, "-m", "hbd", "history", "-c", str(config), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdout is not None and child.stderr is not None
            assert child.stdout.readline()
            child.stdout.close()
            err = child.stderr.read()
            assert child.wait(timeout=60) == 0 and err == "", err
