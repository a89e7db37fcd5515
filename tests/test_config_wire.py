"""hbd.config_wire: a loaded configuration as the reload's loader process writes it and as the daemon
reads it back, a slice of peers per step; anything but what encode() writes is refused, cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hbd.config import ConfigError, load_client_config, load_server_config
from hbd.config_wire import END, MAX_ERRORS, WireError, decode, encode, encode_errors


def run(gen):
    """Drive a decode to its end: (result, steps)."""
    steps = 0
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value, steps
        steps += 1


def wire(cfg) -> bytes:
    return b"".join(encode(cfg))


def test_a_server_config_with_every_kind_of_value_comes_back_equal(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(
        '- web1\n- {name: db1, address: 10.0.0.5, timeout: 30, labels: {role: db, site: "zürich"}}\n'
        "- {name: v6, address: '2001:db8::/64'}\n"
    )
    (tmp_path / "s.yaml").write_text(
        "port: 5999\nallow: [127.0.0.0/8, '::1']\nmetrics: {port: 9101}\non_change: [/bin/true, x]\n"
        "peers_file: fleet.yaml\nstartup_grace: 5\nlog_file: null\ncontrol_socket: null\n"
        "peers: [{name: lonely, labels: {a: b}}]\n"
    )
    cfg = load_server_config(tmp_path / "s.yaml", {"host": "127.0.0.1"})
    got, steps = run(decode(wire(cfg), "server", slice_=2))
    assert got == cfg and steps == 2 and len(cfg.peers) == 4
    assert type(got.peers) is tuple and type(got.allow) is tuple and type(got.metrics) is tuple


def test_a_client_config_with_tls_and_servers_comes_back_equal(tmp_path: Path) -> None:
    from certs import make_ca, make_cert

    ca = make_ca(tmp_path, "ca")
    me = make_cert(tmp_path, ca, "me", server=False)
    (tmp_path / "c.yaml").write_text(
        "servers: [a.example, {host: b.example, port: 7000, name: b}]\nheartbeat_interval: 1.5\n"
        f"tls: {{cert: {me.cert}, key: {me.key}, ca: {ca.cert}, server_hostname: x.example}}\n"
        "log_file: null\ncontrol_socket: null\nstate_dir: null\n"
    )
    cfg = load_client_config(tmp_path / "c.yaml")
    got, steps = run(decode(wire(cfg), "client"))
    assert got == cfg and steps == 0 and cfg.tls is not None and len(cfg.servers) == 2


def test_an_invalid_file_comes_back_as_its_error_lines_and_only_so_many_of_them() -> None:
    lines = ["s.yaml: line 2: port: must be between 1 and 65535, got 99999", "s.yaml: line 3: x: unknown key"]
    with pytest.raises(ConfigError) as caught:
        run(decode(b"".join(encode_errors(lines)), "server"))
    assert caught.value.errors == lines
    many = [f"line {i}: " + "x" * 5000 for i in range(1000)]
    with pytest.raises(ConfigError) as caught:
        run(decode(b"".join(encode_errors(many)), "server"))
    assert len(caught.value.errors) == MAX_ERRORS and max(map(len, caught.value.errors)) <= 600


def good() -> list[bytes]:
    head = {"config": {"port": 5999, "path": "/s.yaml"}, "peers": 2}
    return [json.dumps(head).encode() + b"\n", b'["a",null,null,[]]\n', b'["b",[4,167772165,32],2.5,[["k","v"]]]\n']


@pytest.mark.parametrize(
    "lines, says",
    [
        (good(), "cut short"),  # no "end" line: a loader killed after its last peer
        ([*good()[:2], END + b"\n"], "cut short after 1 of 2"),
        ([*good(), END + b"\n", b"more\n"], "does not end where it should"),
        ([b"garbage\n"], "not JSON lines"),
        ([b"\xff\xfe\n"], "not JSON lines"),
        ([b"[1, 2]\n", END + b"\n"], "does not start with a configuration"),
        ([b'{"config": {"port": 1, "bogus": 2}, "peers": 0}\n', END + b"\n"], "unknown keys"),
        ([b'{"config": {"peers": []}, "peers": 0}\n', END + b"\n"], "unknown keys"),
        ([b'{"config": {}, "peers": -1}\n', END + b"\n"], "malformed first line"),
        ([b'{"config": {"tls": {"os": {"system": "x"}}}, "peers": 0}\n', END + b"\n"], "unknown object"),
        ([b'{"config": {"tls": {"tls": {"bogus": 1}}}, "peers": 0}\n', END + b"\n"], "malformed tls"),
        ([b'{"config": {"allow": [{"net": [4, 1, 99]}]}, "peers": 0}\n', END + b"\n"], "malformed address"),
        ([b'{"config": {"allow": [{"net": [4, "1", 8]}]}, "peers": 0}\n', END + b"\n"], "malformed address"),
        ([good()[0], b'["a",null,null]\n', b'["b",null,null,[]]\n', END + b"\n"], "malformed peer"),
        ([good()[0], b"[1,null,null,[]]\n", b'["b",null,null,[]]\n', END + b"\n"], "malformed peer"),
        ([good()[0], b'["a",null,true,[]]\n', b'["b",null,null,[]]\n', END + b"\n"], "malformed peer"),
        ([good()[0], b'["a",null,null,[["k",1]]]\n', b'["b",null,null,[]]\n', END + b"\n"], "malformed peer"),
        ([b'{"errors": ["x"]}\n'], "cut short"),
    ],
)
def test_anything_but_what_encode_writes_is_refused_with_a_clean_error(lines: list[bytes], says: str) -> None:
    with pytest.raises(WireError, match=says):
        run(decode(b"".join(lines), "server"))


def test_what_is_not_refused_decodes() -> None:
    cfg, _ = run(decode(b"".join([*good(), END + b"\n"]), "server"))
    assert [p.name for p in cfg.peers] == ["a", "b"] and cfg.peers[1].labels == (("k", "v"),)
    assert str(cfg.peers[1].address) == "10.0.0.5/32" and cfg.peers[1].timeout == 2.5


def test_the_same_peer_lines_again_are_not_decoded_again(tmp_path: Path) -> None:
    """A reload that changes a setting but not the fleet takes the last decode's peers (the same
    tuple, no slice of work); a changed peer, or another role, decodes afresh."""
    (tmp_path / "fleet.yaml").write_text("".join(f"- p{i}\n" for i in range(5)))
    (tmp_path / "s.yaml").write_text("peers_file: fleet.yaml\nlog_file: null\ncontrol_socket: null\n")
    first, steps = run(decode(wire(load_server_config(tmp_path / "s.yaml")), "server", slice_=2))
    assert steps == 3
    (tmp_path / "s.yaml").write_text("peers_file: fleet.yaml\nlog_file: null\ncontrol_socket: null\nport: 6001\n")
    again, steps = run(decode(wire(load_server_config(tmp_path / "s.yaml")), "server", slice_=2))
    assert steps == 0 and again.peers is first.peers and again.port == 6001
    (tmp_path / "fleet.yaml").write_text("".join(f"- p{i}\n" for i in range(4)) + "- {name: p4, timeout: 9}\n")
    changed, steps = run(decode(wire(load_server_config(tmp_path / "s.yaml")), "server", slice_=2))
    assert steps == 3 and changed.peers is not first.peers and changed.peers[4].timeout == 9.0
    assert changed.peers[:4] == first.peers[:4]


def test_a_cut_short_output_is_refused_even_with_the_last_peer_lines(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("peers: [a, b]\nlog_file: null\ncontrol_socket: null\n")
    data = wire(load_server_config(tmp_path / "s.yaml"))
    run(decode(data, "server"))
    with pytest.raises(WireError, match="cut short"):
        run(decode(data[: -len(END) - 1], "server"))
