import os
import socket
from pathlib import Path

import pytest

from hbd import notify
from hbd.notify import Notifier


@pytest.fixture(params=["python-systemd", "built-in"])
def impl(request, monkeypatch):
    if request.param == "built-in":
        monkeypatch.setattr(notify, "_sd_daemon", None)
    elif notify._sd_daemon is None:
        pytest.skip("python-systemd is not installed")
    return request.param


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s


def test_messages_reach_the_socket(tmp_path: Path, monkeypatch, impl) -> None:
    path = str(tmp_path / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with listen(path) as s:
        n = Notifier()
        n.ready("3 clients")
        assert s.recv(100) == b"READY=1\nSTATUS=3 clients"
        n.reloading()
        msg = s.recv(100).decode()
        assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
        n.status("x")
        n.status("x")  # unchanged: not sent again
        n.stopping()
        assert s.recv(100) == b"STATUS=x"
        assert s.recv(100) == b"STOPPING=1"
        n.close()


def test_a_manager_that_went_away_raises_nothing(tmp_path: Path, monkeypatch, impl) -> None:
    """Nobody listens on NOTIFY_SOCKET any more: STOPPING=1 (sent from the SIGTERM handler) must not
    raise, or the daemon carries on instead of stopping."""
    path = str(tmp_path / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    listen(path).close()  # the socket file stays, nobody reads it: connection refused
    n = Notifier()
    n.ready()
    n.stopping()
    n.close()


def test_abstract_socket(monkeypatch) -> None:
    monkeypatch.setattr(notify, "_sd_daemon", None)
    name = f"hbd-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    n.watchdog()
    assert s.recv(100) == b"WATCHDOG=1"
    s.close()
    n.close()


def test_watchdog_interval() -> None:
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval == 2.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 2.0
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval is None  # not for us
    assert Notifier({}).watchdog_interval is None


def test_without_notify_socket_nothing_happens() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready()
    n.stopping()
