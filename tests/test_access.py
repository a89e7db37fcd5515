"""The server's allow list: CIDR parsing, matching, and closing others at accept."""

import signal
import time
from pathlib import Path

import pytest
from daemons import connect, recv_exactly, start_server

from hbd.access import AllowList, parse_allow
from hbd.config import ConfigError, load_server_config
from hbd.logs import PeerLogLimiter


def test_matching() -> None:
    allow = AllowList(parse_allow(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]))
    assert allow.allows("10.1.2.3") and allow.allows("192.0.2.7")
    assert not allow.allows("192.0.2.8") and not allow.allows("127.0.0.1")
    assert allow.allows("2001:db8::1") and not allow.allows("2001:db9::1")
    assert allow.allows("::ffff:10.9.9.9")  # IPv4 client on a dual-stack listener
    assert allow.allows("2001:db8::1%eth0")
    assert not allow.allows("not-an-ip")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("allow: []\n", "line 1: allow: must be a list of addresses or networks"),
        ("allow: [10.0.0.0/33, fish]\n", "line 1: allow: not an address or network: '10.0.0.0/33', 'fish'"),
        ("allow: 7\n", "allow: must be a list"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_server_config(p)
    assert expected in info.value.errors[0]


def test_a_single_address_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("allow: 127.0.0.1\n")
    assert [str(n) for n in load_server_config(p).allow] == ["127.0.0.1/32"]


def test_others_are_closed_at_accept_and_logged_rate_limited(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, allow=["10.0.0.0/8", "192.0.2.0/24"])
    procs.append(srv)
    srv.wait_for(r"listening on .*allow 2 networks")
    for _ in range(20):
        with connect(srv.config["port"]) as s:
            s.settimeout(2)
            s.sendall(b"ping")
            t0 = time.monotonic()
            try:
                assert s.recv(10) == b""  # closed before a byte was read: no pong
            except ConnectionResetError:
                pass  # closed with our ping unread: the kernel answers with RST
            assert time.monotonic() - t0 < 0.5
    srv.wait_for(r"WARNING .*denied 127\.0\.0\.1:\d+: not in the allow list")
    time.sleep(0.2)
    assert srv.count("denied") == 5, srv.output()  # the limiter's burst, the rest suppressed
    assert srv.count("connected") == 0


def test_allowed_sources_ping_and_a_reload_can_evict(tmp_path: Path, procs) -> None:
    srv = start_server(tmp_path, allow=["127.0.0.0/8"], heartbeat_timeout=5)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        srv.write_config({**srv.config, "allow": ["10.0.0.0/8"]})
        srv.signal(signal.SIGHUP)
        srv.wait_for(r"WARNING .*closing client 127\.0\.0\.1:\d+: no longer in the allow list")
        s.settimeout(2)
        assert s.recv(10) == b""


def test_limiter_reports_what_it_suppressed_once() -> None:
    lim = PeerLogLimiter(burst=2, interval=10.0)
    assert [lim.check("a", "denied", 0.0) for _ in range(5)] == [True, True, False, False, False]
    assert lim.expired(5.0) == []  # window still open
    assert [(s.kind, s.lines, s.source) for s in lim.expired(10.0)] == [("denied", 3, "a")]
    assert lim.expired(11.0) == []  # reported once
    assert lim.check("a", "denied", 12.0)
    assert lim.expired(30.0) == []  # and not again
