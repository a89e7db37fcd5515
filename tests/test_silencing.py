"""Silences over the status socket: ``hbd silence``, ``hbd unsilence``, ``hbd silences`` (real CLI
processes) against a real control socket served in this process with a fake Silencing, the wire
format and its bounds, and a daemon that keeps no silences."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemons import ROOT, start_client

from hbd import commands
from hbd.control import RequestServer, UnixListener
from hbd.loop import EventLoop
from hbd.silencing import NO_SILENCES, Silence, check_peer, check_reason, check_seconds, until_text


class FakeSilencing:
    """Plays the registry: keeps silences in a dict; ``refuse`` names peers it will not silence."""

    def __init__(self) -> None:
        self.table: dict[str, Silence] = {}
        self.calls: list[tuple] = []
        self.refuse: set[str] = set()

    def silence(self, peer: str, seconds: float, reason: str) -> Silence | str:
        self.calls.append(("silence", peer, seconds, reason))
        if peer in self.refuse:
            return f"{peer} is not a known peer"
        now = time.time()
        self.table[peer] = Silence(peer, now + seconds, reason, now)
        return self.table[peer]

    def unsilence(self, peer: str) -> bool:
        self.calls.append(("unsilence", peer))
        return self.table.pop(peer, None) is not None

    def silences(self) -> list[Silence]:
        return list(self.table.values())


class FakeDaemon:
    """The part of Operated the silence requests use."""

    def __init__(self, silencing: FakeSilencing | None) -> None:
        self.silencing = silencing


class ControlSocket:
    """A status socket served by commands.answer on a loop this test turns."""

    def __init__(self, path: Path, silencing: FakeSilencing | None) -> None:
        self.loop = EventLoop()
        self.listener = UnixListener(str(path))
        self.path = str(path)
        daemon = FakeDaemon(silencing)
        self.server = RequestServer(
            self.loop, self.listener.sock, lambda req, wake: commands.answer(daemon, self.path, req, wake, 0)
        )

    def hbd(self, *args: str, env: dict | None = None, user: int | None = None) -> subprocess.CompletedProcess:
        """Run ``hbd ARGS`` in a process of its own while this loop serves its request."""
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "hbd", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TZ": "UTC", **(env or {})},
        )
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            self.loop.run_once(max_wait=0.02)
        out, err = proc.communicate(timeout=10)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def raw(self, request: bytes) -> dict:
        """Send ``request`` as it is and return the JSON reply."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.path)
            s.sendall(request)
            s.setblocking(False)
            data = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.loop.run_once(max_wait=0.01)
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:  # closed with some of a too long request unread
                    break
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def close(self) -> None:
        self.server.close()
        self.listener.remove()


@pytest.fixture
def fake() -> FakeSilencing:
    return FakeSilencing()


@pytest.fixture
def control(tmp_path: Path, fake: FakeSilencing):
    c = ControlSocket(tmp_path / "server.sock", fake)
    yield c
    c.close()


# -- the checks both ends apply ----------------------------------------------------------------------
def test_request_field_checks() -> None:
    assert check_peer("web1") == "web1" and check_peer("10.0.0.1:4242") == "10.0.0.1:4242"
    for bad in ("", "a b", "-x", "x" * 65, 7, None):
        with pytest.raises(ValueError, match="PEER must be a peer's name"):
            check_peer(bad)
    assert (check_seconds("2h"), check_seconds(90), check_seconds("365d")) == (7200.0, 90.0, 365 * 86400.0)
    with pytest.raises(ValueError, match=r"DURATION must be at most 31536000 seconds \(365d\), got '366d'"):
        check_seconds("366d")
    with pytest.raises(ValueError, match="DURATION must be a positive number of seconds"):
        check_seconds(0)
    with pytest.raises(ValueError, match="DURATION must be a number of seconds or a duration"):
        check_seconds(True)
    assert (
        check_reason(None) == "" and check_reason("kernel update, ticket #42 — ok") == "kernel update, ticket #42 — ok"
    )
    assert len(check_reason("x" * 200)) == 200
    with pytest.raises(ValueError, match="at most 200 characters, got 201"):
        check_reason("x" * 201)
    for bad in ("a\nb", "a\x1b[31mb", "tab\there", "a\u2028b", "\x85"):
        with pytest.raises(ValueError, match="control characters"):
            check_reason(bad)


def test_silence_record_round_trip_and_until_text(monkeypatch) -> None:
    s = Silence("web1", 1_800_007_140.5, "kernel", 1_800_000_000.0)
    assert Silence.from_json(json.loads(json.dumps(s.to_json()))) == s
    for bad in (None, [], {"peer": "x"}, {**s.to_json(), "until": "soon"}, {**s.to_json(), "until": True}):
        with pytest.raises(ValueError):
            Silence.from_json(bad)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert until_text(1_800_007_140.5, 1_800_000_000.0) == "2027-01-15 09:59:00 (in 1h 59m)"
        assert until_text(1_800_000_000.0, 1_800_000_001.0).endswith("(ended)")
    finally:
        monkeypatch.undo()
        time.tzset()


# -- the command line against a real control socket ---------------------------------------------------
def test_silence_list_and_unsilence(control: ControlSocket, fake: FakeSilencing) -> None:
    r = control.hbd("silence", "web1", "2h", "--reason", "kernel update", "-s", control.path)
    assert r.returncode == 0, r.stderr
    assert fake.calls == [("silence", "web1", 7200.0, "kernel update")]
    until = fake.table["web1"].until
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until))
    assert r.stdout == f"hbd: web1 is silenced until {stamp} (in 2h) (kernel update)\n"
    control.hbd("silence", "db1", "90", "-s", control.path)
    fake.table["web1"] = Silence("web1", time.time() + 7170, "kernel update", time.time())

    r = control.hbd("silences", "-s", control.path)
    assert r.returncode == 0, r.stderr
    header, first, second = r.stdout.splitlines()
    assert header.split() == ["PEER", "UNTIL", "REASON"]
    assert first.startswith("db1 ") and re.search(r"\(in 1m \d+s\)", first), first
    assert first.rstrip().endswith("  -")  # no reason
    until = fake.table["web1"].until
    assert second.startswith("web1") and time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until)) in second
    assert "(in 1h 59m)" in second and second.endswith("kernel update")
    assert header.index("UNTIL") == first.index(first.split()[1]) == second.index(second.split()[1])

    r = control.hbd("silences", "--json", "-s", control.path)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and abs(doc["now"] - time.time()) < 30
    assert {s["peer"]: s["reason"] for s in doc["silences"]} == {"web1": "kernel update", "db1": ""}
    assert set(doc["silences"][0]) == {"peer", "until", "reason", "created"}

    r = control.hbd("unsilence", "web1", "-s", control.path)
    assert (r.returncode, r.stdout) == (0, "hbd: web1 is no longer silenced\n")
    r = control.hbd("unsilence", "web1", "-s", control.path)
    assert (r.returncode, r.stderr) == (1, "hbd: error: web1 is not silenced\n")
    control.hbd("unsilence", "db1", "-s", control.path)
    r = control.hbd("silences", "-s", control.path)
    assert (r.returncode, r.stdout) == (0, "(no silences)\n")


def test_the_daemons_refusal_is_the_commands_error(control: ControlSocket, fake: FakeSilencing) -> None:
    fake.refuse.add("ghost")
    r = control.hbd("silence", "ghost", "1d", "-s", control.path)
    assert r.returncode == 1 and r.stderr == f"hbd: error: {control.path}: ghost is not a known peer\n"


def test_the_socket_from_the_config_file(control: ControlSocket, tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(f"control_socket: {control.path}\n")
    assert control.hbd("silence", "web1", "30m", "-c", str(cfg)).returncode == 0
    cfg.write_text("control_socket: null\n")
    r = control.hbd("silences", "-c", str(cfg))
    assert r.returncode == 1 and r.stderr == f"hbd: error: {cfg} sets no control_socket\n"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["silence", "web1", "2x"], "DURATION must be a number of seconds or a duration such as 90s, 30m, 2h or 1d"),
        (["silence", "web1", "0s"], "DURATION must be a positive number of seconds, got '0s'"),
        (["silence", "web1", "400d"], "DURATION must be at most 31536000 seconds (365d), got '400d'"),
        (["silence", "web 1", "1h"], "PEER must be a peer's name"),
        (["silence", "web1", "1h", "--reason", "a\nb"], "the reason may not hold control characters"),
        (["silence", "web1", "1h", "--reason", "r" * 201], "the reason may have at most 200 characters, got 201"),
        (["unsilence", "a/b"], "PEER must be a peer's name"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(control: ControlSocket, fake: FakeSilencing, args, reason) -> None:
    r = control.hbd(*args, "-s", control.path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"hbd {args[0]}: error: ") and reason in r.stderr
    assert fake.calls == []  # nothing was sent


def test_argparse_errors_exit_2(control: ControlSocket) -> None:
    for args in (["silence", "web1"], ["unsilence"], ["silences", "extra"], ["silence", "a", "1h", "--bogus"]):
        assert control.hbd(*args).returncode == 2


# -- the wire: one JSON line, bounded, every field checked by the daemon -----------------------------------
@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"request": "silence", "peer": "web1", "seconds": 0}\n', "DURATION must be a positive number"),
        (b'{"request": "silence", "peer": "web1", "seconds": 1e400}\n', "DURATION must be a positive number"),
        (b'{"request": "silence", "peer": "web1", "seconds": "2h", "reason": 5}\n', "the reason must be text"),
        (b'{"request": "silence", "peer": "web1", "seconds": 60, "reason": "a\\nb"}\n', "control characters"),
        (b'{"request": "silence", "peer": "web1"}\n', 'silence needs "seconds"'),
        (b'{"request": "silence", "peer": ["web1"], "seconds": 60}\n', "PEER must be a peer's name"),
        (b'{"request": "unsilence"}\n', "PEER must be a peer's name"),
        (b'{"request": "silence", "peer": "web1", \n', "not a JSON request"),
        (b'{"request": "silence", "peer": "w\xffeb1", "seconds": 60}\n', "not a JSON request"),
        (b"[" * 600 + b"\n", "unknown command"),
        (b"{" * 600 + b"\n", "not a JSON request"),
        (b'{"peer": "web1"}\n', 'a JSON request is an object with "request": COMMAND'),
        (b'{"request": "frobnicate"}\n', "unknown command 'frobnicate'"),
        (b"silence web1 2h\n", "PEER must be a peer's name"),  # words carry no fields: JSON only
    ],
)
def test_the_daemon_checks_every_field(control: ControlSocket, fake: FakeSilencing, line: bytes, error: str) -> None:
    assert error in control.raw(line)["error"]
    assert fake.calls == []


def test_a_request_is_bounded(control: ControlSocket, fake: FakeSilencing) -> None:
    big = json.dumps({"request": "silence", "peer": "web1", "seconds": 60, "reason": "x" * 5000}).encode()
    assert control.raw(big + b"\n") == {"error": "request too long"}
    big = json.dumps({"request": "silence", "peer": "web1", "seconds": 60, "reason": "x" * 2000}).encode()
    assert "at most 200 characters" in control.raw(big + b"\n")["error"]
    reason = "é" * 200  # the longest reason, two bytes a character, fits the 1 KiB line
    line = json.dumps(
        {"request": "silence", "peer": "p" * 64, "seconds": 31536000.0, "reason": reason}, ensure_ascii=False
    )
    assert control.raw(line.encode() + b"\n")["silence"]["reason"] == reason
    assert fake.calls == [("silence", "p" * 64, 31536000.0, reason)]


def test_silences_as_a_plain_word(control: ControlSocket, fake: FakeSilencing) -> None:
    fake.silence("web1", 60, "")
    doc = control.raw(b"silences\n")
    assert [s["peer"] for s in doc["silences"]] == ["web1"]


def test_many_silences_are_sent_in_slices(control: ControlSocket, fake: FakeSilencing) -> None:
    for i in range(1000):
        fake.silence(f"web{i}", 3600, "rack move")
    doc = control.raw(b'{"request": "silences"}\n')
    assert len(doc["silences"]) == 1000 and doc["silences"][999]["peer"] == "web999"


# -- who may ask, and who keeps no silences -----------------------------------------------------------------
def test_a_daemon_without_silences_says_so(tmp_path: Path) -> None:
    c = ControlSocket(tmp_path / "c.sock", None)
    try:
        for args in (["silence", "web1", "1h"], ["unsilence", "web1"], ["silences"], ["silences", "--json"]):
            r = c.hbd(*args, "-s", c.path)
            assert (r.returncode, r.stderr) == (1, f"hbd: error: {c.path}: {NO_SILENCES}\n")
    finally:
        c.close()


def test_the_client_daemon_keeps_no_silences(tmp_path: Path, procs) -> None:
    from daemons import free_port

    cli = start_client(tmp_path, free_port())
    procs.append(cli)
    cli.wait_for("status socket")
    r = subprocess.run(
        [sys.executable, "-m", "hbd", "silence", "web1", "1h", "-s", cli.config["control_socket"]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 1 and r.stderr.strip().endswith(f": {NO_SILENCES}"), r.stderr


def test_permission_is_the_status_sockets(fake: FakeSilencing) -> None:
    """Whoever may not connect to the status socket (mode 0660) may not silence either."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the command as another user")
    sockdir = Path(tempfile.mkdtemp(prefix="hbd-silence-"))  # reachable for another user, unlike tmp_path
    try:
        os.chmod(sockdir, 0o755)
        c = ControlSocket(sockdir / "server.sock", fake)
        try:
            r = c.hbd("silence", "web1", "1h", "-s", c.path, user=65534)
            assert r.returncode == 1 and "Permission denied" in r.stderr and "_hbd" in r.stderr, r.stderr
            assert fake.calls == []
            os.chmod(c.path, 0o666)  # whoever can reach it may: the same rule as hbd status
            assert c.hbd("silence", "web1", "1h", "-s", c.path, user=65534).returncode == 0
        finally:
            c.close()
    finally:
        import shutil

        shutil.rmtree(sockdir, ignore_errors=True)
