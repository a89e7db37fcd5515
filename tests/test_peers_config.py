"""The registry's config keys (issue 12): durations, expected peers (``peers:``, ``peers_file:``),
forget_after & co, state_dir and tls.name_from."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import make_ca, make_cert

from hbd import peers_config
from hbd.config import (
    MAX_PEERS_FILE_BYTES,
    ConfigError,
    ExpectedPeer,
    ServerConfig,
    load_client_config,
    load_server_config,
    parse_duration,
)
from hbd.durations import describe


def write(tmp_path: Path, text: str, name: str = "server.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    return info.value.errors


def one_error(tmp_path: Path, text: str, about: str = "server.yaml") -> str:
    """The one error of loading ``text`` as server.yaml, which names the file ``about``."""
    errors = errors_of(write(tmp_path, text))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path / about}: ")
    return errors[0]


# -- durations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("90", 90),
        ("0.5", 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(f" {text} ") == seconds


@pytest.mark.parametrize("text", ["", "x", "-1", "1w", "1 h", "h", "1h-5m", "nan", "inf", "1e3", "\uff11", "9" * 50])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a duration .*90s, 30m, 2h or 1d"):
        parse_duration(text)


def test_describe() -> None:
    assert [describe(s) for s in (0, 59, 61, 3600, 7140, 90061, 604800)] == [
        "0s",
        "59s",
        "1m 1s",
        "1h",
        "1h 59m",
        "1d 1h",
        "7d",
    ]


def test_every_seconds_key_takes_a_duration_with_its_old_bounds(tmp_path: Path) -> None:
    s = load_server_config(write(tmp_path, "heartbeat_timeout: 2m\nhook_timeout: 30s\nmax_interval: '90'\n"))
    assert (s.heartbeat_timeout, s.hook_timeout, s.max_interval) == (120.0, 30.0, 90.0)
    c = load_client_config(write(tmp_path, "heartbeat_interval: 500\npong_timeout: 10m\nreconnect_max_delay: 1m\n"))
    assert (c.heartbeat_interval, c.pong_timeout, c.reconnect_max_delay) == (500.0, 600.0, 60.0)
    err = one_error(tmp_path, "heartbeat_timeout: 2d\n")
    assert "line 1: heartbeat_timeout: must be at most 86400 seconds (1d), got '2d'" in err
    assert "must be a positive number of seconds, got '0s'" in one_error(tmp_path, "heartbeat_timeout: 0s\n")
    assert "such as 90s, 30m, 2h or 1d, got str '2 weeks'" in one_error(tmp_path, "hook_timeout: 2 weeks\n")


# -- the registry's plain keys ------------------------------------------------------------------------
def test_registry_defaults(tmp_path: Path) -> None:
    s = load_server_config(write(tmp_path, ""))
    assert (s.peers, s.peers_file, s.forget_after, s.startup_grace) == ((), None, 604800.0, None)
    assert (s.unexpected, s.rise, s.flap_threshold, s.flap_window, s.max_peers) == ("allow", 1, 5, 300.0, 10000)
    assert s.state_dir == "/var/lib/hbd" and ServerConfig().state_dir == "/var/lib/hbd"


def test_registry_keys_valid(tmp_path: Path) -> None:
    s = load_server_config(
        write(
            tmp_path,
            "forget_after: 30d\nstartup_grace: 5m\nunexpected: reject\nrise: 3\nflap_threshold: 10\n"
            "flap_window: 600\nmax_peers: 50\nstate_dir: state\n",
        )
    )
    assert (s.forget_after, s.startup_grace, s.unexpected, s.rise) == (30 * 86400.0, 300.0, "reject", 3)
    assert (s.flap_threshold, s.flap_window, s.max_peers) == (10, 600.0, 50)
    assert s.state_dir == str(tmp_path / "state")  # relative: to the config file's directory
    assert load_server_config(write(tmp_path, "state_dir: null\nstartup_grace: null\n")).state_dir is None
    assert load_server_config(write(tmp_path, "state_dir: /srv/hbd\n")).state_dir == "/srv/hbd"
    assert load_server_config(write(tmp_path, "unexpected: warn\nforget_after: 365d\n")).unexpected == "warn"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("forget_after: 0", "line 1: forget_after: must be a positive number of seconds, got 0"),
        ("forget_after: 366d", "forget_after: must be at most 31536000 seconds (365d), got '366d'"),
        ("forget_after: soon", "forget_after: must be a number of seconds or a duration"),
        ("startup_grace: -5", "startup_grace: must be a positive number of seconds, got -5"),
        ("startup_grace: 2d", "startup_grace: must be at most 86400 seconds"),
        ("unexpected: deny", "unexpected: must be one of allow, warn, reject, got str 'deny'"),
        ("unexpected: null", "unexpected: must be one of allow, warn, reject, got nothing (null)"),
        ("rise: 0", "rise: must be between 1 and 100, got 0"),
        ("rise: 101", "rise: must be between 1 and 100, got 101"),
        ("rise: 1.5", "rise: must be an integer, got float 1.5"),
        ("flap_threshold: 1", "flap_threshold: must be between 2 and 1000, got 1"),
        ("flap_threshold: 1001", "flap_threshold: must be between 2 and 1000, got 1001"),
        ("flap_window: 0", "flap_window: must be a positive number of seconds, got 0"),
        ("flap_window: 2d", "flap_window: must be at most 86400 seconds"),
        ("max_peers: 0", "max_peers: must be between 1 and 1000000, got 0"),
        ("max_peers: true", "max_peers: must be an integer, got bool True"),
        ("state_dir: 5", "state_dir: must be a directory path or null, got int 5"),
        ("peers_file: [a]", "peers_file: must be a file path or null, got list ['a']"),
        ("peers_file: /etc/hbd/", "peers_file: must be a file path or null"),
    ],
)
def test_registry_keys_invalid(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_error(tmp_path, text + "\n")


# -- tls.name_from ----------------------------------------------------------------------------------------
def test_tls_name_from(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki", "ca")
    srv = make_cert(tmp_path / "pki", ca, "server", server=True)
    tls = f"tls: {{cert: {srv.cert}, key: {srv.key}, ca: {ca.cert}"
    s = load_server_config(write(tmp_path, tls + "}\n"))
    assert s.tls is not None and s.tls.name_from == "greeting"
    s = load_server_config(write(tmp_path, tls + ", require_client_cert: true, name_from: certificate}\n"))
    assert s.tls is not None and s.tls.name_from == "certificate"
    err = one_error(tmp_path, tls + ", name_from: certificate}\n")
    assert "line 1: tls: name_from: certificate needs require_client_cert: true" in err
    err = one_error(tmp_path, tls + ", require_client_cert: true, name_from: cn}\n")
    assert "tls: name_from: must be one of greeting, certificate, got str 'cn'" in err
    assert load_server_config(write(tmp_path, tls + ", handshake_timeout: 2s}\n")).tls.handshake_timeout == 2.0
    assert "handshake_timeout: must be seconds between 0 and 300, got str '6m'" in one_error(
        tmp_path, tls + ", handshake_timeout: 6m}\n"
    )
    with pytest.raises(ConfigError, match="name_from: unknown key"):  # the client has no such key
        load_client_config(write(tmp_path, "tls: {name_from: certificate}\n", "client.yaml"))


# -- peers: ------------------------------------------------------------------------------------------------
PEERS = """\
port: 5000
peers:
  - web1
  - name: db1
    address: 10.0.0.5
  - {name: legacy, address: 10.1.0.0/24, timeout: 2m, labels: {site: fra1, rack: 12}}
  - name: v6
    address: "2001:db8::1"
"""


def test_peers_names_and_mappings(tmp_path: Path) -> None:
    s = load_server_config(write(tmp_path, PEERS))
    assert s.peers == (
        ExpectedPeer("web1"),
        ExpectedPeer("db1", ipaddress.ip_network("10.0.0.5/32")),
        ExpectedPeer("legacy", ipaddress.ip_network("10.1.0.0/24"), 120.0, (("rack", "12"), ("site", "fra1"))),
        ExpectedPeer("v6", ipaddress.ip_network("2001:db8::1/128")),
    )
    assert load_server_config(write(tmp_path, "peers: []\n")).peers == ()
    assert load_server_config(write(tmp_path, "peers: null\n")).peers == ()


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("'a b'", "item 2: name: must be 1-64 of the characters A-Z a-z 0-9 . _ : @ -"),
        ("-x", "item 2: name: must be 1-64 of the characters"),
        ("'" + "a" * 65 + "'", "item 2: name: must be 1-64"),
        ("'%H'", "item 2: name: must be 1-64"),  # %H is the client's own host name, never a peer's
        ("12", "item 2: must be a peer name or a mapping with name"),
        ("{address: 10.0.0.1}", "item 2: must be a peer name or a mapping with name"),
        ("{name: x, adress: 10.0.0.1}", "item 2: 'adress': unknown key (known keys: name, address, timeout, labels)"),
        ("{name: x, address: 10.0.0.256}", "item 2: x: address: not an IP address or network: '10.0.0.256'"),
        ("{name: x, address: web1.example}", "item 2: x: address: not an IP address or network"),
        ("{name: x, address: 10.0.0.5/24}", "item 2: x: address: '10.0.0.5/24' has host bits set"),
        ("{name: x, address: 10.0.0.0/33}", "item 2: x: address: not an IP address or network"),
        ("{name: x, address: 7}", "item 2: x: address: must be an IP address or a network"),
        ("{name: x, timeout: 0}", "item 2: x: must be a positive number of seconds, got 0"),
        ("{name: x, timeout: 2d}", "item 2: x: must be at most 86400 seconds"),
        ("{name: x, timeout: later}", "item 2: x: must be a number of seconds or a duration"),
        ("{name: x, labels: [a]}", "item 2: x: labels: must be a mapping of label names to values"),
        ("{name: x, labels: {peer: a}}", "item 2: x: labels: peer is reserved"),
        ("{name: x, labels: {instance: a}}", "item 2: x: labels: instance is reserved"),
        ("{name: x, labels: {__name__: a}}", "item 2: x: labels: __name__ is reserved"),
        ("{name: x, labels: {1st: a}}", "item 2: x: labels: '1st' is not a label name"),
        ("{name: x, labels: {a-b: a}}", "item 2: x: labels: 'a-b' is not a label name"),
        ("{name: x, labels: {" + "k" * 65 + ": a}}", "item 2: x: labels: 'kkkkkkkk"),
        ("{name: x, labels: {env: a, ENV: b}}", "item 2: x: labels: env and ENV differ only in case"),
        ("{name: x, labels: {a: true}}", "item 2: x: labels: a: must be a string, got bool True"),
        ("{name: x, labels: {a: null}}", "item 2: x: labels: a: must be a string, got nothing (null)"),
        ("{name: x, labels: {a: '" + "v" * 129 + "'}}", "item 2: x: labels: a: at most 128 characters, got 129"),
        ('{name: x, labels: {a: "x\\ny"}}', "item 2: x: labels: a: control characters are not allowed"),
        (
            "{name: x, labels: {" + ", ".join(f"l{i}: v" for i in range(17)) + "}}",
            "item 2: x: labels: at most 16 labels, got 17",
        ),
    ],
)
def test_peers_item_errors_name_the_item_line(tmp_path: Path, item: str, expected: str) -> None:
    err = one_error(tmp_path, f"port: 1\npeers:\n  - ok\n  - {item}\n")
    assert f"line 4: peers: {expected}" in err


def test_peers_labels_limits_are_inclusive(tmp_path: Path) -> None:
    labels = ", ".join(f"l{i}: '{'v' * 128}'" for i in range(16))
    (peer,) = load_server_config(write(tmp_path, f"peers: [{{name: x, labels: {{{labels}}}}}]\n")).peers
    assert len(peer.labels) == 16


def test_peers_duplicates(tmp_path: Path) -> None:
    err = one_error(tmp_path, "peers:\n  - web1\n  - db1\n  - {name: web1}\n")
    assert "line 4: peers: item 3: web1 is listed twice, first as item 1 (line 2)" in err
    err = one_error(tmp_path, "peers:\n  - {name: a, address: 10.0.0.1}\n  - {name: b, address: 10.0.0.1/32}\n")
    assert "line 3: peers: item 2: b: address 10.0.0.1/32 is also a's" in err


def test_peers_must_be_a_list(tmp_path: Path) -> None:
    assert "line 1: peers: must be a list of peer names" in one_error(tmp_path, "peers: web1\n")
    assert "line 1: peers: must be a list" in one_error(tmp_path, "peers: {web1: 1}\n")


def test_every_bad_item_is_reported_and_the_rest_of_the_file_too(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, "peers: ['a b', 'c d']\nrise: 0\n"))
    assert len(errors) == 3 and "rise" in errors[0]


def test_more_expected_peers_than_max_peers(tmp_path: Path) -> None:
    err = one_error(tmp_path, "max_peers: 2\npeers: [a, b, c]\n")
    assert "line 1: max_peers: 3 expected peers are more than max_peers (2)" in err
    assert load_server_config(write(tmp_path, "max_peers: 3\npeers: [a, b, c]\n")).max_peers == 3


# -- peers_file: -------------------------------------------------------------------------------------------
def test_peers_file_relative_to_the_config_file_and_merged(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    write(conf, "- web2\n- {name: db2, address: 10.0.0.9, labels: {site: ams}}\n", "fleet.yaml")
    s = load_server_config(write(conf, "peers: [web1]\npeers_file: fleet.yaml\n"))
    assert s.peers_file == str(conf / "fleet.yaml")
    assert [p.name for p in s.peers] == ["web1", "web2", "db2"]
    assert s.peers[2].labels == (("site", "ams"),)
    write(conf, "peers:\n  - web3\n", "fleet.yaml")  # the {peers: list} form
    s = load_server_config(write(conf, "peers_file: fleet.yaml\n"))
    assert [p.name for p in s.peers] == ["web3"]  # and a load reads it anew (as a reload does)
    assert load_server_config(write(conf, "peers_file: null\n")).peers == ()
    write(conf, "# nobody yet\n", "fleet.yaml")  # an empty file: no peers
    assert load_server_config(write(conf, "peers_file: fleet.yaml\n")).peers == ()
    write(conf, "web1: {}\n", "fleet.yaml")
    err = one_error(conf, "peers_file: fleet.yaml\n", "fleet.yaml")
    assert err.endswith("must hold a list of peers, or a mapping with just peers: (a list), got dict {'web1': {}}")


def test_peers_file_errors_name_that_file_and_line(tmp_path: Path) -> None:
    fleet = write(tmp_path, "# fleet\n- web1\n-  'bad name'\n- {name: db1, address: nope}\n", "fleet.yaml")
    errors = errors_of(write(tmp_path, "peers_file: fleet.yaml\n"))
    assert errors == [
        f"{fleet}: line 3: item 2: name: must be 1-64 of the characters A-Z a-z 0-9 . _ : @ -, starting with a "
        "letter or digit (as a client_name), got str 'bad name'",
        f"{fleet}: line 4: item 3: db1: address: not an IP address or network: 'nope'",
    ]
    fleet.write_text("peers: [a]\nrise: 2\n")
    assert f"{fleet}: must hold a list of peers, or a mapping with just peers:" in one_error(
        tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml"
    )
    fleet.write_text("- a\n- [unclosed\n")
    assert one_error(tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml").startswith(
        f"{fleet}: line 3, column 1: invalid YAML"
    )
    fleet.unlink()
    assert (
        one_error(tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml")
        == f"{fleet}: cannot read the file: No such file or directory"
    )
    fleet.mkdir()
    assert "not a regular file (a directory)" in one_error(tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml")


def test_a_duplicate_across_peers_and_peers_file(tmp_path: Path) -> None:
    fleet = write(tmp_path, "- web2\n- web1\n", "fleet.yaml")
    path = write(tmp_path, "port: 1\npeers:\n  - web1\npeers_file: fleet.yaml\n")
    (err,) = errors_of(path)
    assert err == f"{fleet}: line 2: web1 is also listed in {path} (line 3)"
    fleet.write_text("- {name: web2, address: 10.0.0.1}\n")
    (err,) = errors_of(write(tmp_path, "peers: [{name: web1, address: 10.0.0.1}]\npeers_file: fleet.yaml\n"))
    assert err == f"{fleet}: line 1: web2: address 10.0.0.1/32 is also web1's"
    fleet.write_text("- web2\n- web2\n")
    (err,) = errors_of(write(tmp_path, "peers_file: fleet.yaml\n"))
    assert err == f"{fleet}: line 2: item 2: web2 is listed twice, first as item 1 (line 1)"


def test_a_huge_peers_file_is_refused_unread(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    with open(fleet, "w") as f:
        f.write("- a\n" + "# " + "x" * 1000 + "\n")
        f.truncate(MAX_PEERS_FILE_BYTES + 1)  # sparse: costs no disk, and must not be read
    started = time.monotonic()
    err = one_error(tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml")
    assert err == f"{fleet}: too large: {MAX_PEERS_FILE_BYTES + 1} bytes (at most {MAX_PEERS_FILE_BYTES})"
    assert time.monotonic() - started < 1.0


def test_a_peers_file_alias_bomb_is_refused(tmp_path: Path) -> None:
    bomb = "\n".join(
        ["a: &a [" + ", ".join(["x"] * 9) + "]"]
        + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
        + ["peers: *i", ""]
    )
    write(tmp_path, bomb, "fleet.yaml")
    started = time.monotonic()
    err = one_error(tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml")
    assert "more than 2000000 values once aliases are expanded" in err
    assert time.monotonic() - started < 5.0


def test_the_entry_limit(tmp_path: Path) -> None:
    write(tmp_path, "[" + ", ".join(["a"] * 100_001) + "]\n", "fleet.yaml")
    assert "fleet.yaml: more than 100000 peers (100001)" in one_error(
        tmp_path, "peers_file: fleet.yaml\n", "fleet.yaml"
    )


def test_the_server_yaml_keeps_its_own_bound(tmp_path: Path) -> None:
    """peers: inline stays under server.yaml's 64 KiB: a fleet's list belongs in peers_file."""
    text = "peers:\n" + "".join(f"  - web{i:05d}\n" for i in range(6000))
    assert "too large" in one_error(tmp_path, text)


def test_100000_peers_load_in_bounded_time(tmp_path: Path) -> None:
    """The largest peers_file allowed (every entry with an address, every tenth with a label) loads
    in a few seconds of CPU; the bound here is generous (a shared, loaded machine)."""
    lines = []
    for i in range(100_000):
        a, b = divmod(i, 250)
        labels = f", labels: {{site: s{i % 7}}}" if i % 10 == 0 else ""
        lines.append(f"- {{name: w{i:05d}, address: 10.{a // 250}.{a % 250}.{b}{labels}}}\n")
    text = "".join(lines)
    assert len(text) <= MAX_PEERS_FILE_BYTES
    write(tmp_path, text, "fleet.yaml")
    started, cpu = time.monotonic(), time.process_time()
    s = load_server_config(write(tmp_path, "max_peers: 100000\npeers_file: fleet.yaml\n"))
    took, cpu = time.monotonic() - started, time.process_time() - cpu
    print(f"\n100,000 peers ({len(text)} bytes) loaded in {took:.2f} s ({cpu:.2f} s CPU)")
    assert len(s.peers) == 100_000 and s.peers[-1].name == "w99999" and s.peers[10].labels == (("site", "s3"),)
    assert cpu < 30.0


def test_yaml_round_trip_of_a_generated_peers_file(tmp_path: Path) -> None:
    """What an inventory script would write (yaml.safe_dump of a mapping) loads as written."""
    doc = {"peers": [{"name": f"h{i}", "address": f"192.0.2.{i}", "timeout": "30s"} for i in range(1, 50)]}
    write(tmp_path, yaml.safe_dump(doc), "fleet.yaml")
    s = load_server_config(write(tmp_path, "peers_file: fleet.yaml\n"))
    assert len(s.peers) == 49 and s.peers[0].timeout == 30.0


def test_a_reload_rereads_the_peers_file_and_skips_the_parse_when_unchanged(tmp_path: Path, monkeypatch) -> None:
    from hbd import config

    fleet = write(tmp_path, "- web1\n", "fleet.yaml")
    path = write(tmp_path, "peers_file: fleet.yaml\n")
    parsed: list[Path] = []
    real = config._parse_peers_file
    monkeypatch.setattr(config, "_parse_peers_file", lambda p, t: parsed.append(p) or real(p, t))
    assert [p.name for p in load_server_config(path).peers] == ["web1"]
    assert [p.name for p in load_server_config(path).peers] == ["web1"]
    assert len(parsed) == 1  # the same text: the same peers, without parsing it again
    fleet.write_text("- web1\n- web2\n")
    assert [p.name for p in load_server_config(path).peers] == ["web1", "web2"]
    fleet.write_text("- web1\n- 'bad one'\n")
    assert "fleet.yaml: line 2: item 2: name" in errors_of(path)[0]
    assert "fleet.yaml: line 2: item 2: name" in errors_of(path)[0]  # the errors are kept too
    assert len(parsed) == 3


def test_the_shipped_example_peers_file_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "peers.yaml"
    s = load_server_config(write(tmp_path, f"peers_file: {example}\n"))
    assert [p.name for p in s.peers][:3] == ["web1", "web2", "web3"] and len(s.peers) == 6
    assert s.peers[-1].address == ipaddress.ip_network("198.51.100.0/28")


def test_a_load_pauses_the_collector_and_leaves_it_on(tmp_path: Path, monkeypatch) -> None:
    """The collector is paused over a load (it only slows the build of many objects without cycles)
    and on again after. A load never runs beside a daemon's loop (a reload's is in a loader process:
    hbd.reload_child), so what it built being young costs no loop turn a long collection."""
    import gc

    write(
        tmp_path, "".join(f"- {{name: w{i}, address: 10.0.{i // 250}.{i % 250}}}\n" for i in range(5000)), "fleet.yaml"
    )
    path = write(tmp_path, "peers_file: fleet.yaml\n")
    collecting: list[bool] = []
    parse = peers_config.parse_peers

    def watched(*args: Any) -> Any:
        collecting.append(gc.isenabled())
        return parse(*args)

    assert gc.isenabled()
    monkeypatch.setattr(peers_config, "parse_peers", watched)
    s = load_server_config(path)
    assert gc.isenabled() and len(s.peers) == 5000
    assert collecting == [False, False]  # paused over both lists' parse (peers: and the file's)
