"""The Debian package under a real systemd: install the built .deb in a booted bookworm guest and drive the
units with systemctl, the way an operator does. Needs root and systemd-nspawn (see tests/systemd_guest.py);
the tests run in file order against one guest, and the last one purges the package.

    /usr/bin/python3 -m pytest -m systemd tests/test_systemd.py      # or: make systemd-test
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

try:
    from . import systemd_guest as sg
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import systemd_guest as sg

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]  # a cold first run builds rootfs and .deb

SERVER_YAML = "/etc/hbd/server.yaml"
CLIENT_YAML = "/etc/hbd/client.yaml"
UNITS = ("hbd-server", "hbd-client")
# Fast, deterministic failures for the tests; the packaged unit's values are for production.
DROP_IN = """[Unit]
StartLimitIntervalSec=0
[Service]
WatchdogSec=2
RestartSec=100ms
TimeoutAbortSec=2
"""


PORT = sg.free_port()


# -- helpers ---------------------------------------------------------------------------------------
def set_keys(text: str, **keys: object) -> str:
    """Replace top-level `key: ...` lines of a YAML text (or append them), keeping everything else."""
    for key, value in keys.items():
        line = f"{key}: {value}"
        text, n = re.subn(rf"(?m)^{key}:.*$", line, text)
        if not n:
            text = text.rstrip("\n") + f"\n{line}\n"
    return text


def ping(port: int = PORT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"ping\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
        return data


def silent_client_lifetime(port: int = PORT, limit: float = 10.0) -> float:
    """Connect, say nothing, and time how long the server keeps us (until EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        t0 = time.monotonic()
        while s.recv(64):
            pass
        return time.monotonic() - t0


def text_of(entry: dict) -> str:
    msg = entry.get("MESSAGE", "")
    return msg if isinstance(msg, str) else bytes(msg).decode(errors="replace")  # non-UTF-8 comes as a list


def daemon_entries(guest: sg.Guest, unit: str, after: str, max_priority: int = 7) -> list[dict]:
    """Journal lines the daemon itself wrote (not systemd's about it), as `journalctl -u UNIT -p N` shows."""
    return [e for e in guest.journal(after, unit) if e.get("_PID") != "1" and int(e.get("PRIORITY", 6)) <= max_priority]


def is_active(guest: sg.Guest, unit: str) -> bool:
    return guest.show(unit, "ActiveState") == "active"


def ensure_running(guest: sg.Guest, *units: str) -> None:
    for unit in units:
        if not is_active(guest, unit):
            guest.run("systemctl", "reset-failed", unit, check=False)
            guest.run("systemctl", "start", unit)


def reload_server(guest: sg.Guest, ok: bool = True) -> list[dict]:
    """systemctl reload (ExecReload=hbd reload: it returns after the daemon's verdict, and fails when the
    file is rejected), then the daemon's verdict as logged."""
    cur = guest.cursor()
    out = guest.run("systemctl", "reload", "hbd-server", check=False)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    done = re.compile(r"\breload(ed| failed)\b")
    return sg.wait_for(
        "the daemon's reload result in the journal",
        lambda: [e for e in daemon_entries(guest, "hbd-server", cur) if done.search(text_of(e))],
    )


def status_json(guest: sg.Guest, role: str = "server") -> dict:
    return json.loads(guest.run("hbd", "status", role, "--json").stdout)


def server_config(guest: sg.Guest, **keys: object) -> None:
    """Apply server settings: rewrite the conffile and reload when anything changed."""
    old = guest.read(SERVER_YAML)
    new = set_keys(old, **keys)
    if new != old:
        guest.write(SERVER_YAML, new)
        if is_active(guest, "hbd-server"):
            assert not any(e.get("EVENT") == "reload-failed" or "failed" in text_of(e) for e in reload_server(guest))


# -- the guest -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deb():
    reason = sg.unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the real-systemd tests, but: {reason}")  # a skip would hide the hole
    if reason:
        pytest.skip(reason)
    return sg.prepare()


@pytest.fixture(scope="module")
def newer_deb(deb, tmp_path_factory):
    return sg.repack_newer(deb, tmp_path_factory.mktemp("upgrade"))


@pytest.fixture(scope="module")
def guest(deb, newer_deb):
    with sg.booted(f"--bind-ro={deb.parent}:/dist", f"--bind-ro={newer_deb.parent}:/upgrade") as g:
        g.run("dpkg", "-i", f"/dist/{deb.name}")
        # What the operator sees right after installing, before the tests touch anything.
        g.after_install = {u: (g.show(u, "UnitFileState"), g.show(u, "ActiveState")) for u in UNITS}
        for unit in UNITS:
            g.run("mkdir", "-p", f"/etc/systemd/system/{unit}.service.d")
            g.write(f"/etc/systemd/system/{unit}.service.d/test.conf", DROP_IN)
        g.run("systemctl", "daemon-reload")
        g.write(SERVER_YAML, set_keys(g.read(SERVER_YAML), port=PORT, heartbeat_timeout=30))
        g.write(
            CLIENT_YAML,
            set_keys(
                g.read(CLIENT_YAML),
                host="127.0.0.1",
                port=PORT,
                heartbeat_interval=0.5,
                pong_timeout=2,
                reconnect_attempts=0,
            ),
        )
        yield g


# -- 0. the package --------------------------------------------------------------------------------
def test_install_leaves_units_disabled_and_stopped(guest):
    # Policy (README, "Enable policy"): installed, not enabled, not started; the operator configures first.
    for unit in UNITS:
        assert guest.after_install[unit] == ("disabled", "inactive"), unit


def test_install_creates_system_user_conffiles_and_man_page(guest, deb):
    user = guest.run("getent", "passwd", "_hbd").stdout.split(":")
    assert int(user[2]) < 1000 and user[6].strip() == "/usr/sbin/nologin"
    conffiles = guest.run("dpkg-query", "-W", "-f=${Conffiles}", "hbd").stdout
    assert SERVER_YAML in conffiles and CLIENT_YAML in conffiles
    guest.run("test", "-s", "/usr/share/man/man1/hbd.1.gz")
    version = deb.name.split("_")[1]
    assert version in guest.run("hbd", "--version").stdout


# -- 7. static checks of the packaged units ---------------------------------------------------------
@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_output(guest, unit):
    # --man=no: the minimal guest has no man-db to resolve Documentation=man:hbd(1); the page itself is
    # checked above. Any output fails, since bad keys or values only warn (rc 0).
    out = guest.run("systemd-analyze", "verify", "--man=no", f"/lib/systemd/system/{unit}.service", check=False)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_at_most_2(guest, unit):
    out = guest.run(
        "systemd-analyze",
        "security",
        "--offline=yes",
        "--threshold=20",  # 0-100 scale
        f"/lib/systemd/system/{unit}.service",
        check=False,
    )
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout).group(1))
    assert out.returncode == 0 and score <= 2.0, out.stdout[-2000:]


# -- 1. start ----------------------------------------------------------------------------------------
def test_start_returns_after_ready_and_port_answers(guest):
    guest.run("systemctl", "start", "hbd-server")
    # Type=notify: start returned only after READY=1, so the listener answers now, with no retry.
    assert (guest.show("hbd-server", "ActiveState"), guest.show("hbd-server", "SubState")) == (
        "active",
        "running",
    )
    assert ping() == b"pong\n"
    assert guest.show("hbd-server", "StatusText")
    pid = guest.show("hbd-server", "MainPID")
    status = dict(line.split(":", 1) for line in guest.read(f"/proc/{pid}/status").splitlines() if ":" in line)
    uid = guest.run("id", "-u", "_hbd").stdout.strip()
    assert status["Uid"].split()[:2] == [uid, uid]
    assert status["NoNewPrivs"].strip() == "1" and int(status["CapEff"], 16) == 0


# -- 2. the client -------------------------------------------------------------------------------------
def test_client_links_up_and_server_journal_shows_it(guest):
    ensure_running(guest, "hbd-server")
    cur = guest.cursor()
    guest.run("systemctl", "start", "hbd-client")
    status = sg.wait_for(
        "hbd-client STATUS= saying the link is up",
        lambda: (s := guest.show("hbd-client", "StatusText")) and re.search(r"\bup\b", s) and s,
    )
    assert f"127.0.0.1:{PORT}" in status
    joined = sg.wait_for(
        "a server journal line with PEER= for the client",
        lambda: [e for e in daemon_entries(guest, "hbd-server", cur) if e.get("PEER", "").startswith("127.0.0.1:")],
    )
    assert joined[0]["PRIORITY"] == "6"
    sg.wait_for(
        "the server's STATUS= counting 1 client",
        lambda: re.search(r"\b1 clients?\b", guest.show("hbd-server", "StatusText")),
    )

    def history() -> dict | None:
        r = guest.run("hbd", "history", "-c", "/etc/hbd/client.yaml", "--json", check=False)
        return doc if r.returncode == 0 and (doc := json.loads(r.stdout))["peers"] else None

    # the client's StateDirectory= (the server's /var/lib/hbd): its own store, its link's history in it
    doc = sg.wait_for("hbd history of the client's store listing its link", history)
    assert doc["daemon"] == "client" and doc["store"] == "/var/lib/hbd/client.db"
    assert doc["peers"][0]["peer"] == f"127.0.0.1:{PORT}" and doc["peers"][0]["state"] == "UP"
    assert guest.sh("stat -c '%U %G %a' /var/lib/hbd /var/lib/hbd/client.db").stdout.split() == [
        *("_hbd", "_hbd", "750"),
        *("_hbd", "_hbd", "640"),
    ]


# -- 3. reload ---------------------------------------------------------------------------------------
def test_reload_applies_new_heartbeat_timeout_in_place(guest):
    ensure_running(guest, "hbd-server")
    server_config(guest, heartbeat_timeout=30)
    pid = guest.show("hbd-server", "MainPID")
    server_config(guest, heartbeat_timeout=1)
    assert is_active(guest, "hbd-server") and guest.show("hbd-server", "MainPID") == pid
    # In effect: a silent client is now dropped after ~1 s (it was 30 s before the reload).
    assert 0.8 <= silent_client_lifetime() < 3.0


def test_reload_with_broken_yaml_keeps_old_config_and_logs_the_line(guest):
    ensure_running(guest, "hbd-server")
    server_config(guest, heartbeat_timeout=1)
    good = guest.read(SERVER_YAML)
    pid = guest.show("hbd-server", "MainPID")
    lines = good.splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if line.startswith("heartbeat_timeout:"))
    lines[lineno - 1] = "heartbeat_timeout: 5: oops"  # a YAML syntax error on a known line
    guest.write(SERVER_YAML, "\n".join(lines) + "\n")
    cur = guest.cursor()
    try:
        reload_server(guest, ok=False)  # systemctl reload exits non-zero
        assert is_active(guest, "hbd-server") and guest.show("hbd-server", "MainPID") == pid
        errors = "\n".join(text_of(e) for e in daemon_entries(guest, "hbd-server", cur, 3))
        assert "server.yaml" in errors and re.search(rf"(line {lineno}\b|:{lineno}\b)", errors), errors
        # The reason where the operator looks: systemctl status (its journal excerpt and STATUS=).
        status = guest.run("systemctl", "status", "--no-pager", "-n", "20", "hbd-server", check=False).stdout
        assert "reload failed" in status and re.search(rf"(line {lineno}\b|:{lineno}\b)", status), status
        assert guest.show("hbd-server", "ReloadResult") == "exit-code"
        # hbd reload's own lines (ExecReload=) are errors too, not info lines of the unit's stderr.
        assert [
            e
            for e in daemon_entries(guest, "hbd-server", cur, 3)
            if e.get("SYSLOG_IDENTIFIER") == "hbd" and "reload failed" in text_of(e)
        ]
        assert 0.8 <= silent_client_lifetime() < 3.0  # still the old heartbeat_timeout (1), not 5
    finally:
        guest.write(SERVER_YAML, good)
        reload_server(guest)


def test_reload_with_invalid_value_names_the_key(guest):
    ensure_running(guest, "hbd-server")
    good = guest.read(SERVER_YAML)
    guest.write(SERVER_YAML, set_keys(good, heartbeat_timeout=-1))
    cur = guest.cursor()
    try:
        reload_server(guest, ok=False)
        assert is_active(guest, "hbd-server")
        errors = "\n".join(text_of(e) for e in daemon_entries(guest, "hbd-server", cur, 3))
        assert "heartbeat_timeout" in errors, errors
    finally:
        guest.write(SERVER_YAML, good)
        reload_server(guest)


def test_reload_returns_only_after_the_daemon_applied_it(guest):
    ensure_running(guest, "hbd-server")
    for timeout in (7, 3, 30):
        guest.write(SERVER_YAML, set_keys(guest.read(SERVER_YAML), heartbeat_timeout=timeout))
        cur = guest.cursor()
        guest.run("systemctl", "reload", "hbd-server")
        # No waiting: when systemctl returns, the daemon runs the new configuration.
        assert status_json(guest)["config"]["heartbeat_timeout"] == timeout
        # And systemd called the reload done only after the daemon had done it (journal order).
        entries = guest.journal(cur, "hbd-server")
        applied = next(i for i, e in enumerate(entries) if e.get("EVENT") == "reloaded")
        done = next(i for i, e in enumerate(entries) if e.get("_PID") == "1" and "Reloaded" in text_of(e))
        assert applied < done, [text_of(e) for e in entries]


def test_reload_by_hand_with_kill_hup_still_works(guest):
    ensure_running(guest, "hbd-server")
    guest.write(SERVER_YAML, set_keys(guest.read(SERVER_YAML), heartbeat_timeout=9))
    guest.run("systemctl", "kill", "-s", "SIGHUP", "--kill-who=main", "hbd-server")
    sg.wait_for("the new heartbeat_timeout", lambda: status_json(guest)["config"]["heartbeat_timeout"] == 9)
    assert is_active(guest, "hbd-server")
    server_config(guest, heartbeat_timeout=30)


# -- 4. watchdog -------------------------------------------------------------------------------------
def test_frozen_main_loop_is_killed_by_watchdog_and_restarted(guest):
    ensure_running(guest, "hbd-server")
    restarts, pid = int(guest.show("hbd-server", "NRestarts")), guest.show("hbd-server", "MainPID")
    cur = guest.cursor()
    guest.run("systemctl", "kill", "-s", "SIGSTOP", "--kill-who=main", "hbd-server")
    sg.wait_for(
        "systemd to restart the frozen hbd-server",
        lambda: (
            int(guest.show("hbd-server", "NRestarts")) > restarts
            and is_active(guest, "hbd-server")
            and guest.show("hbd-server", "MainPID") not in ("0", pid)
        ),
        timeout=15,
    )
    # faulthandler writes the stack of the hung loop's thread alone (hbd.cli): journald may still be
    # taking in the dump when the restart is done, so wait for its lines too
    loop_frame = re.compile(r'File ".*/hbd/loop\.py", line \d+')

    def messages_of_the_hang() -> list[str]:
        return [text_of(e) for e in guest.journal(cur, "hbd-server")]

    try:  # generous: journald in the guest takes the dump in slowly while the whole suite runs beside it
        sg.wait_for(
            "the hung loop's stack in the journal",
            lambda: any(loop_frame.search(m) for m in messages_of_the_hang()),
            timeout=30,
        )
    except AssertionError as exc:  # say what the journal did have, for the next one to read
        raise AssertionError(f"{exc}; its last lines: {messages_of_the_hang()[-40:]}") from None
    messages = messages_of_the_hang()
    assert any("Watchdog timeout" in m for m in messages), messages
    # systemd follows SIGABRT with SIGCONT, so faulthandler runs and leaves the stack of the hung loop.
    assert any("most recent call first" in m for m in messages), messages
    assert any(re.search(r'File ".*/hbd/loop\.py", line \d+', m) for m in messages), messages
    assert ping() == b"pong\n"


# -- 5. where log lines go -------------------------------------------------------------------------
def test_client_timeout_goes_to_journal_with_peer_and_to_log_file_info_does_not(guest):
    ensure_running(guest, "hbd-server")
    server_config(guest, heartbeat_timeout=1)
    cur = guest.cursor()
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        peer = f"127.0.0.1:{s.getsockname()[1]}"
        s.sendall(b"ping\n")
        assert s.recv(64) == b"pong\n"
        while s.recv(64):  # then silence, until the server gives up on us
            pass
    problems = sg.wait_for(
        f"a warning/error with PEER={peer}",
        lambda: [
            e for e in daemon_entries(guest, "hbd-server", cur) if e.get("PEER") == peer and int(e["PRIORITY"]) <= 4
        ],
    )
    log_file = sg.wait_for(
        "the problem in /var/log/hbd/*.log",
        lambda: (t := guest.sh("cat /var/log/hbd/*.log", check=False).stdout) and peer in t and t,
    )
    assert text_of(problems[0]) in log_file
    entries = daemon_entries(guest, "hbd-server", cur)
    info = [text_of(e) for e in entries if e.get("PRIORITY") == "6" and peer in text_of(e)]
    assert info and not [m for m in info if m in log_file]  # "connected" reaches the journal only
    # Exactly once: the structured entry, not a second copy through stdout/stderr.
    assert not [e for e in entries if e.get("_TRANSPORT") == "stdout" and peer in text_of(e)]


def test_journal_names_the_call_site_and_journalctl_x_explains_a_peer_down(guest):
    ensure_running(guest, "hbd-server")
    server_config(guest, heartbeat_timeout=1)
    cur = guest.cursor()
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        s.sendall(b"ping\n")
        assert s.recv(64) == b"pong\n"
        while s.recv(64):  # silent until the server declares us down and closes
            pass
    down = sg.wait_for(
        "the server's peer-down entry",
        lambda: [e for e in daemon_entries(guest, "hbd-server", cur) if e.get("EVENT") == "dead"],
    )[0]
    assert down["MESSAGE_ID"] == "09010e11864e480da4335f47854b5474"
    # The real call site: the server's reporting room writes the peer lines, not the logging module.
    assert down["CODE_FILE"].endswith("/hbd/server_report.py") and down["CODE_FUNC"] == "changed", down
    assert int(down["CODE_LINE"]) > 0
    # The package's catalog was compiled at install (systemd's dpkg trigger runs journalctl --update-catalog).
    out = guest.run("journalctl", "-x", "-u", "hbd-server", "--no-pager", "-n", "200").stdout
    assert "Subject: hbd: peer" in out and "is down" in out and "heartbeat_timeout" in out, out[-3000:]


# -- 8. permanent failures, ordering, what the client says ------------------------------------------
def test_config_error_at_start_fails_once_with_78_and_err_in_the_journal(guest):
    guest.run("systemctl", "stop", *UNITS)
    good = guest.read(SERVER_YAML)
    guest.write(SERVER_YAML, set_keys(good, heartbeat_timeout="-5"))
    cur = guest.cursor()
    try:
        out = guest.run("systemctl", "start", "hbd-server", check=False)
        assert out.returncode != 0
        time.sleep(1.5)  # RestartSec=100ms (drop-in): a restart loop would have restarted by now
        state = {p: guest.show("hbd-server", p) for p in ("ActiveState", "Result", "NRestarts", "ExecMainStatus")}
        assert state == {"ActiveState": "failed", "Result": "exit-code", "NRestarts": "0", "ExecMainStatus": "78"}
        errors = [e for e in daemon_entries(guest, "hbd-server", cur, 3) if "heartbeat_timeout" in text_of(e)]
        assert errors and errors[0]["SYSLOG_IDENTIFIER"] == "hbd-server" and errors[0]["PRIORITY"] == "3", errors
        # As the operator asks it (no cursor: journalctl 252 mishandles --after-cursor with matches).
        err = guest.run("journalctl", "-u", "hbd-server", "-p", "err", "--no-pager", "-n", "50").stdout
        assert "heartbeat_timeout" in err and "hbd-server[" in err, err
        assert "heartbeat_timeout" in guest.read("/var/log/hbd/server.log")
    finally:
        guest.write(SERVER_YAML, good)
        guest.run("systemctl", "reset-failed", "hbd-server", check=False)


def test_client_that_gave_up_stays_stopped_with_79(guest):
    guest.run("systemctl", "stop", *UNITS)
    good = guest.read(CLIENT_YAML)
    guest.write(CLIENT_YAML, set_keys(good, reconnect_attempts=1, reconnect_delay=0.1, reconnect_max_delay=0.2))
    try:
        guest.run("systemctl", "start", "hbd-client")
        sg.wait_for("hbd-client to give up", lambda: guest.show("hbd-client", "ActiveState") == "failed")
        time.sleep(1.5)  # RestartSec=100ms: it would be running again by now
        state = {p: guest.show("hbd-client", p) for p in ("ActiveState", "NRestarts", "ExecMainStatus")}
        assert state == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "79"}
    finally:
        guest.write(CLIENT_YAML, good)
        guest.run("systemctl", "reset-failed", "hbd-client", check=False)


def test_client_status_says_down_why_and_when_it_retries(guest):
    guest.run("systemctl", "stop", *UNITS)
    guest.run("systemctl", "start", "hbd-client")
    try:
        status = sg.wait_for(
            "the client's STATUS= for a dead server",
            lambda: (s := guest.show("hbd-client", "StatusText")) and "DOWN" in s and s,
        )
        pattern = rf"127\.0\.0\.1:{PORT} DOWN \(connection refused\), (retry in [\d.]+ s|connecting)"
        assert re.search(pattern, status), status
    finally:
        guest.run("systemctl", "stop", "hbd-client")


def test_client_reload_fails_on_a_broken_file_and_succeeds_on_a_good_one(guest):
    ensure_running(guest, "hbd-client")
    good = guest.read(CLIENT_YAML)
    guest.write(CLIENT_YAML, set_keys(good, pong_timeout=-3))
    try:
        out = guest.run("systemctl", "reload", "hbd-client", check=False)
        assert out.returncode != 0 and is_active(guest, "hbd-client")
        status = guest.run("systemctl", "status", "--no-pager", "-n", "20", "hbd-client", check=False).stdout
        assert "reload failed" in status and "pong_timeout" in status, status
    finally:
        guest.write(CLIENT_YAML, good)
    guest.run("systemctl", "reload", "hbd-client")
    assert "last reload failed" not in guest.show("hbd-client", "StatusText")
    guest.run("systemctl", "stop", "hbd-client")


def test_client_unit_starts_after_the_server(guest):
    assert "hbd-server.service" in guest.show("hbd-client", "After").split()
    assert "hbd-server.service" not in guest.show("hbd-client", "Requires").split()
    guest.run("systemctl", "stop", *UNITS)
    # One transaction with both, as at boot (`systemctl start A B` makes one per unit, and a job already
    # running is not held back by one queued later).
    guest.write("/etc/systemd/system/hbd-test-both.target", "[Unit]\nWants=hbd-client.service hbd-server.service\n")
    guest.run("systemctl", "daemon-reload")
    cur = guest.cursor()
    guest.run("systemctl", "start", "hbd-test-both.target")
    entries = guest.journal(cur)
    started = next(
        i
        for i, e in enumerate(entries)
        if e.get("UNIT") == "hbd-server.service" and e.get("_PID") == "1" and "Started" in text_of(e)
    )
    starting = next(
        i
        for i, e in enumerate(entries)
        if e.get("UNIT") == "hbd-client.service" and e.get("_PID") == "1" and "Starting" in text_of(e)
    )
    assert started < starting  # the client began once the server was ready (Type=notify)
    time.sleep(1)
    client = [text_of(e) for e in daemon_entries(guest, "hbd-client", cur)]
    assert not [m for m in client if "refused" in m], client


# -- 6. stop, upgrade, purge -------------------------------------------------------------------------
def test_stop_is_clean(guest):
    ensure_running(guest, *UNITS)
    cur = guest.cursor()
    guest.run("systemctl", "stop", *UNITS)
    for unit in UNITS:
        state = {p: guest.show(unit, p) for p in ("ActiveState", "Result", "ExecMainStatus")}
        assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, unit
        messages = [text_of(e) for e in guest.journal(cur, unit)]
        assert any("Deactivated successfully" in m for m in messages), messages
        assert not [m for m in messages if "SIGKILL" in m or "Killing" in m], messages


def test_upgrade_keeps_edited_conffile_and_restarts_only_the_running_unit(guest, newer_deb):
    ensure_running(guest, "hbd-server")
    guest.run("systemctl", "stop", "hbd-client")
    edited, pid = guest.read(SERVER_YAML), guest.show("hbd-server", "MainPID")
    assert f"port: {PORT}" in edited
    guest.run("dpkg", "-i", f"/upgrade/{newer_deb.name}")
    assert newer_deb.name.split("_")[1] in guest.run("dpkg-query", "-W", "-f=${Version}", "hbd").stdout
    assert guest.read(SERVER_YAML) == edited
    assert not guest.sh("ls /etc/hbd | grep -v '[.]yaml$'", check=False).stdout  # no .dpkg-new/-dist
    sg.wait_for(
        "hbd-server restarted by the upgrade",
        lambda: is_active(guest, "hbd-server") and guest.show("hbd-server", "MainPID") not in ("0", pid),
    )
    assert ping() == b"pong\n"
    assert guest.show("hbd-client", "ActiveState") == "inactive"  # not running before: not started


def test_purge_stops_units_and_removes_leftovers(guest):
    ensure_running(guest, *UNITS)
    guest.run("systemctl", "enable", "hbd-server")
    guest.run("test", "-d", "/var/log/hbd")
    guest.run("test", "-d", "/var/lib/hbd")  # the server's StateDirectory=
    guest.run("dpkg", "--purge", "hbd")
    for unit in UNITS:
        assert guest.show(unit, "ActiveState") != "active", unit
    assert guest.run("pgrep", "-u", "_hbd", check=False).returncode == 1  # nothing of hbd still runs
    for path in (
        "/var/log/hbd",
        "/run/hbd",
        "/var/lib/hbd",
        "/etc/hbd",
        "/lib/systemd/system/hbd-server.service",
        "/etc/systemd/system/multi-user.target.wants/hbd-server.service",
    ):
        assert guest.run("test", "-e", path, check=False).returncode == 1, path
    with pytest.raises(OSError):
        ping()
