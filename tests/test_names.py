"""hbd.names.bind_tcp: the one way hbd binds a TCP listener (server, workers, metrics)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hbd.names import BindError, bind_tcp

PACKAGE = Path(__file__).resolve().parent.parent / "hbd"


def test_listens_non_blocking_and_reports_a_taken_port() -> None:
    sock = bind_tcp("127.0.0.1", 0, 4)
    try:
        port = sock.getsockname()[1]
        assert not sock.getblocking()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens
        with pytest.raises(BindError, match=rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use"):
            bind_tcp("127.0.0.1", port)
    finally:
        sock.close()


def test_reuse_port_shares_the_port_and_no_backlog_only_binds() -> None:
    first = bind_tcp("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    try:
        probe = bind_tcp("127.0.0.1", port, None, reuse_port=True)  # what the supervisor checks
        with pytest.raises(OSError):
            probe.accept()  # bound, not listening
        probe.close()
        second = bind_tcp("127.0.0.1", port, reuse_port=True)  # a second worker
        second.close()
    finally:
        first.close()


def test_an_unresolvable_host_is_a_bind_error() -> None:
    with pytest.raises(BindError, match=r"cannot resolve listen address nosuchhost\.invalid:1: "):
        bind_tcp("nosuchhost.invalid", 1)


def test_no_other_module_binds_tcp_itself() -> None:
    """One bind helper: the socket options of a TCP listener are set in hbd/names.py only."""
    others = [p.name for p in PACKAGE.glob("*.py") if p.name != "names.py" and "socket.SO_REUSE" in p.read_text()]
    assert others == []
