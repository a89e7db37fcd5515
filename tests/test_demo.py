"""`make demo` (mk/demo.sh) and the targets' package installer (mk/apt-need.sh), run as a user runs them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from daemons import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree in which demo.sh finds hbd and etc/, with its demo-logs/ away from the checkout's."""
    (tmp_path / "mk").mkdir()
    shutil.copy(ROOT / "mk" / "demo.sh", tmp_path / "mk" / "demo.sh")
    for name in ("hbd", "etc"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_demo_on_a_taken_port_says_so_in_one_line_and_starts_nothing(tree: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = subprocess.run(
            ["sh", str(tree / "mk" / "demo.sh"), PY, str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"make demo: cannot use port {port} on 127.0.0.1 (Address already in use); "
        "try another one: make demo PORT=54322"
    ]


def test_demo_runs_both_and_ctrl_c_stops_them_quietly(tree: Path) -> None:
    port = free_port()
    # A new session stands for the terminal: Ctrl-C is SIGINT to the whole foreground process group.
    p = subprocess.Popen(
        ["sh", str(tree / "mk" / "demo.sh"), PY, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out = ""
        deadline = time.monotonic() + 20
        assert p.stdout is not None
        while "pong from" not in out:
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline, out
            out += line
        assert out.index("listening on") < out.index("hbd-client INFO    connected")  # client after server
        os.killpg(p.pid, signal.SIGINT)
        rest, _ = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out += rest
    assert p.returncode == 0, out
    assert "hbd-client stopped" in out and "hbd-server stopped" in out
    assert "Terminated" not in out and "Traceback" not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as an unprivileged user")
def test_apt_need_without_root_or_sudo(request: pytest.FixtureRequest) -> None:
    # No sudo on PATH, not root: a missing package gets the command to run as root instead of
    # "sudo: not found"; with nothing missing, nothing is needed at all.
    path = Path(tempfile.mkdtemp(prefix="hbd-apt-need-"))  # tmp_path's parents are root's alone
    path.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(path))
    for tool in ("sh", "dpkg-query", "grep", "id"):
        (path / tool).symlink_to(shutil.which(tool))
    script = str(ROOT / "mk" / "apt-need.sh")

    def run(*pkgs: str) -> subprocess.CompletedProcess[str]:
        cmd = [shutil.which("runuser") or "runuser", "-u", "nobody", "--", str(path / "sh"), script, "make demo"]
        return subprocess.run([*cmd, *pkgs], env={"PATH": str(path)}, capture_output=True, text=True, timeout=30)

    missing = run("python3", "hbd-no-such-package")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "run as root: apt-get install --no-install-recommends hbd-no-such-package" in missing.stderr
    assert "sudo" not in missing.stderr
    present = run("python3")
    assert (present.returncode, present.stdout, present.stderr) == (0, "", "")
