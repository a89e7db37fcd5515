import socket
from pathlib import Path

import pytest

from hbd.config import ClientConfig, ConfigError, ServerConfig, ServerEntry, load_client_config, load_server_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def errors_of(loader, path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loader(path)
    return info.value.errors


def test_shipped_defaults_are_valid_and_match_the_code() -> None:
    s = load_server_config(ROOT / "etc/server.yaml")
    c = load_client_config(ROOT / "etc/client.yaml")
    assert (s.host, s.port, s.heartbeat_timeout) == ("0.0.0.0", 54321, 10.0)
    assert (c.heartbeat_interval, c.pong_timeout, c.reconnect_attempts) == (2.0, 5.0, 0)
    defaults = {k: v for k, v in vars(ServerConfig()).items() if k != "path"}
    assert {k: v for k, v in vars(s).items() if k != "path"} == defaults
    defaults = {k: v for k, v in vars(ClientConfig()).items() if k != "path"}
    assert {k: v for k, v in vars(c).items() if k != "path"} == defaults


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_server_config(write(tmp_path, "")).port == 54321


def test_fractions_are_accepted(tmp_path: Path) -> None:
    c = load_client_config(write(tmp_path, "heartbeat_interval: 0.2\npong_timeout: 0.5\n"))
    assert (c.heartbeat_interval, c.pong_timeout) == (0.2, 0.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: 0", "line 1: port: must be between 1 and 65535, got 0"),
        ("port: 65536", "line 1: port: must be between 1 and 65535, got 65536"),
        ("port: '80'", "line 1: port: must be an integer, got str '80'"),
        ("port: true", "line 1: port: must be an integer, got bool True"),
        ("host: x\nheartbeat_timeout: 0", "line 2: heartbeat_timeout: must be a positive number of seconds, got 0"),
        ("heartbeat_timeout: -1", "heartbeat_timeout: must be a positive number of seconds, got -1"),
        ("heartbeat_timeout: ten", "heartbeat_timeout: must be a number of seconds or a duration such as 90s"),
        ("heartbeat_timeout: .nan", "heartbeat_timeout: must be a positive number of seconds, got nan"),
        ("max_clients: 0", "max_clients: must be between 1 and 1000000, got 0"),
        ("log_level: loud", "log_level: must be one of debug, info, warning, error, got str 'loud'"),
        ("log_file: 3", "log_file: must be a file path or null, got int 3"),
        (
            "prot: 1",
            "line 1: prot: unknown key (known keys: allow, backlog, control_socket, cpu_slice_us, flap_threshold",
        ),
        ("host: ''", "host: must be a host name or IP address"),
        (
            "cpu_slice_us: 50",
            "line 1: cpu_slice_us: must be 0 (the kernel's default) or between 100 and 100000, got 50",
        ),
        ("cpu_slice_us: 0.3", "cpu_slice_us: must be an integer, got float 0.3"),
    ],
)
def test_server_errors_name_file_line_key_and_reason(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text + "\n")
    errors = errors_of(load_server_config, path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: ")
    assert expected in errors[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "heartbeat_interval: 2\npong_timeout: 2",
            "line 2: pong_timeout: must be greater than heartbeat_interval (2 s), got 2",
        ),
        ("heartbeat_interval: 6", "pong_timeout: must be greater than heartbeat_interval (6 s), got 5"),
        ("reconnect_attempts: -1", "reconnect_attempts: must be between 0 and 1000000, got -1"),
        (
            "reconnect_delay: 5\nreconnect_max_delay: 1",
            "reconnect_max_delay: must be at least reconnect_delay (5 s), got 1",
        ),
        ("receive_timeout: 0", "receive_timeout: must be a positive number of seconds, got 0"),
        ("wire: json", "wire: must be one of bare, line, got str 'json'"),
        ("client_name: 'a b'", "client_name: must be 1-64 of the characters A-Z a-z 0-9 . _ : @ -"),
        ("client_name: wëb", "client_name: must be 1-64 of the characters"),  # the server would refuse it
        ("host: a\nservers: [b]", "line 1: host: cannot be combined with servers"),
        ("servers: []", "servers: must be a list of servers"),
        ("servers: [{port: 1}]", "servers: item 1 must be a mapping with host"),
        ("servers: [{host: a, port: 0}]", "servers: item 1: must be between 1 and 65535, got 0"),
        ("servers: [{host: a, nick: x}]", "servers: item 1 must be a mapping with host"),
        ("servers: [{host: a, name: 'x y'}]", "servers: item 1: must be 1-64 of the characters"),
        ("servers: [a, {host: a, port: 54321}]", "servers: a:54321 is listed twice"),
        ("servers: [{host: a, name: n}, {host: b, name: n}]", "servers: the name n is used twice"),
        ("metrics: {host: x}", "metrics: must be a mapping with port and optionally host"),
        ("metrics: 9100", "metrics: must be a mapping with port"),
        ("on_change: /nonexistent/hook", "on_change: /nonexistent/hook is not an executable file"),
        ("on_change: no-such-hook-program", "on_change: no-such-hook-program is not found in PATH"),
        ("on_change: []", "on_change: must name a program"),
        ("on_change: 'sh -c \"unclosed'", "on_change: cannot split"),
        ("hook_max_concurrent: 0", "hook_max_concurrent: must be between 1 and 1000, got 0"),
        ("cpu_slice_us: 100001", "cpu_slice_us: must be between 0 and 100000, got 100001"),
        ("control_socket: /run/hbd/", "control_socket: must be a socket file path or null"),
        ("control_socket: /" + "x" * 100, "control_socket: must be at most 96 bytes long"),
    ],
)
def test_client_errors(tmp_path: Path, text: str, expected: str) -> None:
    errors = errors_of(load_client_config, write(tmp_path, text + "\n"))
    assert len(errors) == 1
    assert expected in errors[0]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of(load_server_config, write(tmp_path, "port: 0\nheartbeat_timeout: 0\nbogus: 1\n"))
    assert len(errors) == 3


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 1\nhost: [unclosed\n")
    (err,) = errors_of(load_server_config, path)
    assert err.startswith(f"{path}: line ")
    assert "invalid YAML" in err


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    (err,) = errors_of(load_server_config, write(tmp_path, "- a\n- b\n"))
    assert "top level must be a mapping" in err


def test_missing_file(tmp_path: Path) -> None:
    (err,) = errors_of(load_server_config, tmp_path / "nope.yaml")
    assert err == f"{tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory"


def test_overrides_win_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 1000\n")
    assert load_server_config(path, {"port": 2000}).port == 2000
    with pytest.raises(ConfigError):
        load_server_config(path, {"port": 0})


def test_operator_keys(tmp_path: Path) -> None:
    c = load_client_config(
        write(
            tmp_path,
            """
port: 7000
servers:
  - db1.example
  - {host: 10.0.0.2, port: 7001, name: backup}
metrics: {port: 9101}
on_change: /bin/echo "two words" x
control_socket: null
client_name: "%H-hb"
""",
        )
    )
    assert c.servers == (ServerEntry("db1.example"), ServerEntry("10.0.0.2", 7001, "backup"))
    from hbd.client import Client, Target

    assert Client.targets(c) == [Target("db1.example", 7000), Target("10.0.0.2", 7001, "backup")]
    assert c.metrics == ("127.0.0.1", 9101) and c.control_socket is None
    assert c.on_change == ("/bin/echo", "two words", "x")
    assert c.client_name == socket.gethostname().split(".")[0] + "-hb"
    s = load_server_config(write(tmp_path, "on_change: [sh, -c, 'echo $1']\nmetrics: {host: '::', port: 9100}\n"))
    assert s.on_change == ("sh", "-c", "echo $1") and s.metrics == ("::", 9100)
    assert (s.control_socket, s.hook_timeout, s.hook_max_concurrent, s.hook_max_queued) == (
        "/run/hbd/server.sock",
        10.0,
        4,
        100,
    )
