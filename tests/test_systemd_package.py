"""What the Debian package ships around the daemons, checked in a real systemd (see tests/systemd_guest.py):
the autopkgtest in debian/tests, the documentation and example hook in /usr/share/doc/hbd, and error logs
that group adm can read. Needs root and systemd-nspawn, like tests/test_systemd.py; this module boots its own
guest.

    /usr/bin/python3 -m pytest -m systemd tests/test_systemd_package.py
"""

from __future__ import annotations

import re
import socket

import pytest

try:
    from . import systemd_guest as sg
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import systemd_guest as sg

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

DOC = "/usr/share/doc/hbd"


@pytest.fixture(scope="module")
def guest():
    with sg.installed(f"--bind-ro={sg.ROOT / 'debian' / 'tests'}:/autopkgtest") as g:
        yield g


def test_autopkgtest_service(guest):
    # debian/tests/control: the one test, run as autopkgtest would (as root, in a booted system).
    control = (sg.ROOT / "debian" / "tests" / "control").read_text()
    assert re.search(r"(?m)^Tests: service$", control) and "needs-root" in control
    out = guest.run("/autopkgtest/service", check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[-1] == "ok"


def test_docs_and_example_hook_are_shipped(guest):
    for name in (
        "README.md",
        "README.Debian",
        "docs/operations.md",
        "docs/prometheus.md",
        "docs/protocol.md",
        "docs/reliability.md",
        "docs/performance.md",
        "bench/results/full.png",
        "examples/on-change.sh",
        "examples/prometheus/hbd-rules.yml",
        "copyright",
    ):
        guest.run("test", "-s", f"{DOC}/{name}")
    assert (sg.ROOT / "docs" / "operations.md").read_text() == guest.read(f"{DOC}/docs/operations.md")
    rules = "examples/prometheus/hbd-rules.yml"  # uncompressed, where docs/prometheus.md says
    assert (sg.ROOT / rules).read_text() == guest.read(f"{DOC}/{rules}")
    guest.run("test", "-x", f"{DOC}/examples/on-change.sh")


def test_error_logs_are_readable_by_group_adm_only(guest):
    port = sg.free_port()
    guest.sh(f"sed -i 's/^host: .*/host: 127.0.0.1/; s/^port: .*/port: {port}/' /etc/hbd/server.yaml")
    guest.run("systemctl", "start", "hbd-server")
    try:
        assert guest.run("stat", "-c", "%a %U:%G", "/var/log/hbd").stdout.split() == ["2750", "_hbd:adm"]
        # the log file is opened at start; a warning (a client timing out) is not needed for this
        assert guest.run("stat", "-c", "%a %U:%G", "/var/log/hbd/server.log").stdout.split() == ["640", "_hbd:adm"]
        guest.run("useradd", "--no-create-home", "--groups", "adm", "carol")
        guest.run("useradd", "--no-create-home", "dave")
        guest.run("runuser", "-u", "carol", "--", "cat", "/var/log/hbd/server.log")
        denied = guest.run("runuser", "-u", "dave", "--", "cat", "/var/log/hbd/server.log", check=False)
        assert denied.returncode == 1 and "Permission denied" in denied.stderr
    finally:
        guest.run("systemctl", "stop", "hbd-server")


def test_example_hook_logs_state_changes_from_the_sandbox(guest):
    port = sg.free_port()
    guest.run("install", "-m", "755", f"{DOC}/examples/on-change.sh", "/usr/local/bin/hbd-on-change")
    guest.sh(
        f"sed -i 's/^host: .*/host: 127.0.0.1/; s/^port: .*/port: {port}/; "
        "s|^on_change: .*|on_change: /usr/local/bin/hbd-on-change|' /etc/hbd/server.yaml"
    )
    guest.run("hbd", "check-config", "server", "-c", "/etc/hbd/server.yaml")
    cur = guest.cursor()
    guest.run("systemctl", "start", "hbd-server")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping\n")
            assert s.recv(64) == b"pong\n"
            peer = f"127.0.0.1:{s.getsockname()[1]}"
            lines = sg.wait_for(
                "the hook's journal line",
                lambda: [e for e in guest.journal(cur) if e.get("SYSLOG_IDENTIFIER") == "hbd-on-change"],
            )
        assert lines[0]["MESSAGE"] == f"hbd server: client {peer} is UP, was new", lines
        assert lines[0]["PRIORITY"] == "5"
    finally:
        guest.run("systemctl", "stop", "hbd-server")
