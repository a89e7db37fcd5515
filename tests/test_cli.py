import os
import subprocess
import sys
from pathlib import Path

from hbd import __version__
from hbd.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hbd", *args], capture_output=True, text=True, cwd=ROOT, timeout=20)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hbd {__version__}"


def test_help_lists_commands_and_signals() -> None:
    r = run("--help")
    assert r.returncode == 0
    for word in ("server", "client", "check-config", "status", "SIGHUP"):
        assert word in r.stdout
    r = run("server", "--help")
    assert "/etc/hbd/server.yaml" in r.stdout and "--config" in r.stdout


def test_check_config_ok(capsys) -> None:
    assert main(["check-config", "server", "-c", str(ROOT / "etc/server.yaml")]) == 0
    assert main(["check-config", "client", "--config", str(ROOT / "etc/client.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_prints_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 0\nheartbeat_interval: 9\nwhat: 1\n")
    r = run("check-config", "client", "-c", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"hbd: error: {bad}: ") for line in lines)
    assert "pong_timeout: must be greater than heartbeat_interval (9 s)" in r.stderr


def test_missing_default_config_is_a_clear_error(tmp_path: Path) -> None:
    r = run("server", "-c", str(tmp_path / "none.yaml"), "--log-file", "")
    assert r.returncode == 78  # EX_CONFIG: permanent, the units do not restart on it
    assert "cannot read the file: No such file or directory" in r.stderr and "Traceback" not in r.stderr


def test_invalid_config_at_start_exits_78_and_reaches_the_log_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    log_file = tmp_path / "client.log"
    bad.write_text(f"port: 0\nlog_file: {log_file}\n")
    if os.geteuid() == 0:  # root by hand appends to an existing file, never creates one (see logs.py)
        r = run("client", "-c", str(bad))
        assert r.returncode == 78 and not log_file.exists()
        log_file.touch()
    r = run("client", "-c", str(bad))
    assert r.returncode == 78
    assert r.stderr.startswith(f"hbd: error: {bad}: ") and "port" in r.stderr
    text = log_file.read_text()  # the file named in the invalid config, since it could be opened
    assert "hbd-client ERROR" in text and f"{bad}: " in text and "port" in text
    (tmp_path / "other.log").touch()
    r = run("client", "-c", str(bad), "--log-file", str(tmp_path / "other.log"))
    assert r.returncode == 78 and "port" in (tmp_path / "other.log").read_text()


def test_start_error_under_journald_is_priority_err_under_the_daemon_identifier(tmp_path, monkeypatch) -> None:
    from hbd import logs

    sent = []
    monkeypatch.setattr(logs, "_journal", type("J", (), {"send": staticmethod(lambda m, **kw: sent.append((m, kw)))}))
    monkeypatch.setattr(logs, "under_journald", lambda: True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: 0\n")
    assert main(["server", "-c", str(bad), "--log-file", ""]) == 78
    assert sent and all(kw["PRIORITY"] == "3" and kw["SYSLOG_IDENTIFIER"] == "hbd-server" for _, kw in sent)
    assert "port" in sent[0][0]


def test_bad_usage_exits_2() -> None:
    assert run("frobnicate").returncode == 2
