"""YAML configuration -> frozen dataclasses, with every error naming the file, line, key and reason.

Loading never starts anything, so the daemons can validate a new file completely on SIGHUP and keep
running the old configuration when it is invalid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hbd.access import Network, parse_allow
from hbd.tls import TLSConfig, parse_client_tls, parse_server_tls

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_SERVER_CONFIG = "/etc/hbd/server.yaml"
DEFAULT_CLIENT_CONFIG = "/etc/hbd/client.yaml"


class ConfigError(Exception):
    """A configuration file is invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# -- typed converters: value -> converted value, or raise ValueError(reason) ----------------------
def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return convert


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds, got {_show(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value}")
    if value > 86400:
        raise ValueError(f"must be at most 86400 seconds, got {value}")
    return float(value)


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a host name or IP address, got {_show(value)}")
    return value.strip()


def _log_file(value: Any) -> str | None:
    if value is None or value == "":
        return None  # no error log file: terminal or journald only
    if not isinstance(value, str):
        raise ValueError(f"must be a file path or null, got {_show(value)}")
    if value.endswith("/"):
        raise ValueError(f"must be a file path, not a directory: {value}")
    return value


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {_show(value)}")
    return value.lower()


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {_show(value)}")
        return value

    return convert


def _name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable() or " " in value:
        raise ValueError(f"must be a name of 1-64 printable characters without spaces, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


_PORT = _integer(1, 65535)


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="0.0.0.0", metadata={"conv": _host})
    port: int = field(default=54321, metadata={"conv": _PORT})
    heartbeat_timeout: float = field(default=10.0, metadata={"conv": _seconds})
    max_clients: int = field(default=10000, metadata={"conv": _integer(1, 1_000_000)})
    backlog: int = field(default=4096, metadata={"conv": _integer(1, 65535)})
    workers: int = field(default=1, metadata={"conv": _integer(1, 64)})
    tls: TLSConfig | None = field(default=None, metadata={"conv": parse_server_tls})
    allow: tuple[Network, ...] | None = field(default=None, metadata={"conv": parse_allow})
    log_file: str | None = field(default="/var/log/hbd/server.log", metadata={"conv": _log_file})
    log_level: str = field(default="info", metadata={"conv": _log_level})
    path: str = field(default="", metadata={"internal": True})


@dataclass(frozen=True)
class ClientConfig:
    host: str = field(default="127.0.0.1", metadata={"conv": _host})
    port: int = field(default=54321, metadata={"conv": _PORT})
    reconnect_attempts: int = field(default=0, metadata={"conv": _integer(0, 1_000_000)})
    reconnect_delay: float = field(default=1.0, metadata={"conv": _seconds})
    reconnect_max_delay: float = field(default=30.0, metadata={"conv": _seconds})
    heartbeat_interval: float = field(default=2.0, metadata={"conv": _seconds})
    pong_timeout: float = field(default=5.0, metadata={"conv": _seconds})
    receive_timeout: float = field(default=5.0, metadata={"conv": _seconds})
    wire: str = field(default="bare", metadata={"conv": _choice("bare", "line")})
    client_name: str | None = field(default=None, metadata={"conv": _name})
    tls: TLSConfig | None = field(default=None, metadata={"conv": parse_client_tls})
    log_file: str | None = field(default="/var/log/hbd/client.log", metadata={"conv": _log_file})
    log_level: str = field(default="info", metadata={"conv": _log_level})
    path: str = field(default="", metadata={"internal": True})


def _check_client(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """Rules between keys; a key that is itself invalid is missing from ``cfg`` and skipped."""
    problems = []
    if "pong_timeout" in cfg and "heartbeat_interval" in cfg and cfg["pong_timeout"] <= cfg["heartbeat_interval"]:
        problems.append((
            "pong_timeout",
            f"must be greater than heartbeat_interval ({cfg['heartbeat_interval']:g} s), "
            f"got {cfg['pong_timeout']:g}",
        ))
    if cfg.keys() >= {"reconnect_max_delay", "reconnect_delay"} and cfg["reconnect_max_delay"] < cfg["reconnect_delay"]:
        problems.append((
            "reconnect_max_delay",
            f"must be at least reconnect_delay ({cfg['reconnect_delay']:g} s), got {cfg['reconnect_max_delay']:g}",
        ))
    return problems


_CROSS_CHECKS: dict[type, Callable[[dict[str, Any]], list[tuple[str, str]]]] = {ClientConfig: _check_client}


def load_server_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServerConfig:
    return _load(ServerConfig, Path(path), overrides or {})


def load_client_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ClientConfig:
    return _load(ClientConfig, Path(path), overrides or {})


def _load(cls: type, path: Path, overrides: dict[str, Any]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read the file: {reason}"]) from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {_yaml_error(exc)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys to values, got {_show(data)}"])
    data = {**data, **overrides}

    def where(key: str) -> str:
        line = lines.get(key)
        return f"{path}: line {line}: {key}" if line else f"{path}: {key}"

    errors: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    for key in data:
        if not isinstance(key, str) or key not in fields:
            known = ", ".join(sorted(fields))
            errors.append(f"{where(str(key))}: unknown key (known keys: {known})")
    for name, f in fields.items():
        if name not in data:
            values[name] = f.default
            continue
        try:
            values[name] = f.metadata["conv"](data[name])
        except ValueError as exc:
            errors.append(f"{where(name)}: {exc}")
    for key, reason in _CROSS_CHECKS.get(cls, lambda _: [])(values):
        errors.append(f"{where(key)}: {reason}")
    if errors:
        raise ConfigError(errors)
    return cls(**values, path=str(path))


def _key_lines(text: str) -> dict[str, int]:
    """Top-level key -> 1-based line number, for error messages."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
    return f"invalid YAML: {problem}"
