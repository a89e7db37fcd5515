"""YAML configuration -> frozen dataclasses, with every error naming the file, line, key and reason.

Loading never starts anything, so the daemons can validate a new file completely on SIGHUP and keep
running the old configuration when it is invalid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import ipaddress
import os
import re
import shlex
import shutil
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hbd import peers_config
from hbd.access import Network, parse_allow
from hbd.durations import DAY, seconds_value
from hbd.durations import parse_duration as parse_duration  # re-exported: the one duration parser
from hbd.errors import ConfigError as ConfigError  # re-exported: where callers import it from
from hbd.peers_config import ExpectedPeer as ExpectedPeer  # re-exported: part of ServerConfig
from hbd.protocol import NAME_PATTERN
from hbd.quote import cut, quote, show
from hbd.tls import TLSConfig, parse_client_tls, parse_server_tls

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_SERVER_CONFIG = "/etc/hbd/server.yaml"
DEFAULT_CLIENT_CONFIG = "/etc/hbd/client.yaml"
DEFAULT_SERVER_SOCKET = "/run/hbd/server.sock"  # /run/hbd is the units' RuntimeDirectory=
DEFAULT_CLIENT_SOCKET = "/run/hbd/client.sock"
DEFAULT_STATE_DIR = "/var/lib/hbd"  # the units' StateDirectory=

# Bounds on what a configuration file may cost to load, whatever it holds (it is read on SIGHUP by
# the running daemon, in its reload's loader process: hbd.reload_child): a real file is a
# few KB and a few levels deep.
MAX_CONFIG_BYTES = 64 * 1024  # ~1000 servers; parsing this much takes ~0.1 s on a slow machine
MAX_DEPTH = 32  # nesting of lists and mappings, aliases expanded
MAX_NODES = 50_000  # values in the document, aliases expanded (a YAML "billion laughs" stops here)
MAX_ERRORS = 20  # error lines reported for one file
MAX_ERROR_LINE = 500  # characters per error line
# peers_file: a fleet's list of expected peers, read with the same loader and its own bounds.
MAX_PEERS_FILE_BYTES = peers_config.MAX_PEERS_FILE_BYTES
MAX_PEERS_FILE_DEPTH = 8  # {peers: [{labels: {k: v}}]} is 4 levels
MAX_PEERS_FILE_NODES = 2_000_000  # 100,000 entries of ~20 values each, aliases expanded


# -- typed converters: value -> converted value, or raise ValueError(reason) ----------------------
KNOWN_KEYS_SHOWN = 240  # characters of the known keys' list an unknown key's error shows


def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {quote(value)}")
        return value

    return convert


def _slice_us(value: Any) -> int:
    """Microseconds of CPU slice to ask the kernel for (hbd.cpu_slice), or 0 for its default."""
    us = _integer(0, 100_000)(value)
    if 0 < us < 100:
        raise ValueError(f"must be 0 (the kernel's default) or between 100 and 100000, got {quote(value)}")
    return us


def _seconds(value: Any) -> float:
    """Seconds (a number or a duration such as ``90s``, ``2h``), positive, at most a day."""
    return seconds_value(value)


def _seconds_upto(hi: float) -> Callable[[Any], float]:
    return lambda value: seconds_value(value, hi)


def _optional_seconds(value: Any) -> float | None:
    return None if value is None else seconds_value(value)


def _dir_path(value: Any) -> str | None:
    """A directory path, or null for none; a relative one is resolved against the config file's
    directory when the file is loaded."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\0" in value:
        raise ValueError(f"must be a directory path or null, got {_show(value)}")
    return value


def _file_path(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\0" in value or value.endswith("/"):
        raise ValueError(f"must be a file path or null, got {_show(value)}")
    return value


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _host(value: Any) -> str:
    """An IP address or a host name (RFC 1123 labels; ``_`` is tolerated as resolvers do): checked
    here, so that a name the resolver cannot even encode (``127.0.0..1``) is a configuration error
    rather than an exception at start, reload or connect."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a host name or IP address, got {_show(value)}")
    host = value.strip()
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not host.isascii() or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(
            "must be an IP address or a host name (dot-separated labels of 1-63 letters, digits, - or _, "
            f"at most 253 characters), got {quote(host)}"
        )
    if all(label.isdigit() for label in labels):
        raise ValueError(f"is not a valid IP address, got {quote(host)}")
    return host


def _log_file(value: Any) -> str | None:
    if value is None or value == "":
        return None  # no error log file: terminal or journald only
    if not isinstance(value, str):
        raise ValueError(f"must be a file path or null, got {_show(value)}")
    if value.endswith("/"):
        raise ValueError(f"must be a file path, not a directory: {quote(value)}")
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


_NAME = re.compile(NAME_PATTERN)


def _name(value: Any) -> str | None:
    """A peer name as the greeting carries it; ``%H`` stands for this machine's short host name."""
    if value is None:
        return None
    if isinstance(value, str) and "%H" in value:
        value = value.replace("%H", socket.gethostname().split(".")[0])
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"must be 1-64 of the characters A-Z a-z 0-9 . _ : @ -, starting with a letter or digit, got {_show(value)}"
        )
    return value


# -- keys of the operator's surface (status socket, metrics, hooks, several servers) --------------
MAX_SOCKET_PATH = 96  # sun_path holds 107 bytes; room is left for the temporary name used to bind


def _socket_path(value: Any) -> str | None:
    if value is None or value == "":
        return None  # no control socket
    if not isinstance(value, str) or value.endswith("/"):
        raise ValueError(f"must be a socket file path or null, got {_show(value)}")
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise ValueError(f"must be at most {MAX_SOCKET_PATH} bytes long (a unix socket path), got {len(value)}")
    return value


def _endpoint(value: Any) -> tuple[str, int] | None:
    """``{host, port}`` for the metrics listener; host defaults to 127.0.0.1 (not exposed)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= {"host", "port"} or "port" not in value:
        raise ValueError(f"must be a mapping with port and optionally host, or null, got {_show(value)}")
    return _host(value.get("host", "127.0.0.1")), _PORT(value["port"])


def _command(value: Any) -> tuple[str, ...] | None:
    """A hook command: a list of arguments, or a string split like a shell would (but run without one)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {quote(value)} into arguments: {exc}") from None
    elif isinstance(value, list) and all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in value):
        argv = [str(a) for a in value]
    else:
        raise ValueError(f"must be a command (a list of arguments or a string), got {_show(value)}")
    if not argv or not argv[0]:
        raise ValueError("must name a program, got an empty command")
    program = argv[0]
    if "/" in program:
        if not os.path.isfile(program) or not os.access(program, os.X_OK):
            raise ValueError(f"{program} is not an executable file")
    elif shutil.which(program) is None:
        raise ValueError(f"{program} is not found in PATH (give the full path)")
    return tuple(argv)


@dataclass(frozen=True)
class ServerEntry:
    """One item of the client's ``servers:`` list; port None means the top-level ``port``."""

    host: str
    port: int | None = None
    name: str | None = None


def _servers(value: Any) -> tuple[ServerEntry, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a list of servers ({{host, port, name}}), got {_show(value)}")
    entries = []
    for i, item in enumerate(value, 1):
        if isinstance(item, str):
            item = {"host": item}
        if not isinstance(item, dict) or "host" not in item or not set(item) <= {"host", "port", "name"}:
            raise ValueError(f"item {i} must be a mapping with host and optionally port and name, got {_show(item)}")
        try:
            entries.append(
                ServerEntry(
                    _host(item["host"]),
                    _PORT(item["port"]) if "port" in item else None,
                    _name(item.get("name")),
                )
            )
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return tuple(entries)


_show = show


_PORT = _integer(1, 65535)


@dataclass(frozen=True)
class _DaemonConfig:
    """Keys both daemons have."""

    log_level: str = field(default="info", metadata={"conv": _log_level})
    metrics: tuple[str, int] | None = field(default=None, metadata={"conv": _endpoint})
    on_change: tuple[str, ...] | None = field(default=None, metadata={"conv": _command})
    hook_timeout: float = field(default=10.0, metadata={"conv": _seconds})
    hook_max_concurrent: int = field(default=4, metadata={"conv": _integer(1, 1000)})
    hook_max_queued: int = field(default=100, metadata={"conv": _integer(0, 100_000)})
    cpu_slice_us: int = field(default=0, metadata={"conv": _slice_us})  # hbd.cpu_slice; 0: the kernel's
    path: str = field(default="", metadata={"internal": True})


@dataclass(frozen=True)
class ServerConfig(_DaemonConfig):
    host: str = field(default="0.0.0.0", metadata={"conv": _host})
    port: int = field(default=54321, metadata={"conv": _PORT})
    heartbeat_timeout: float = field(default=10.0, metadata={"conv": _seconds})
    max_interval: float = field(default=60.0, metadata={"conv": _seconds})  # longest interval a greeting counts
    max_clients: int = field(default=10000, metadata={"conv": _integer(1, 1_000_000)})
    backlog: int = field(default=4096, metadata={"conv": _integer(1, 65535)})
    workers: int = field(default=1, metadata={"conv": _integer(1, 64)})
    tls: TLSConfig | None = field(default=None, metadata={"conv": parse_server_tls})
    allow: tuple[Network, ...] | None = field(default=None, metadata={"conv": parse_allow})
    log_file: str | None = field(default="/var/log/hbd/server.log", metadata={"conv": _log_file})
    control_socket: str | None = field(default=DEFAULT_SERVER_SOCKET, metadata={"conv": _socket_path})
    # The peer registry (issue 12): who should be alive, and how their states are judged and kept.
    peers: tuple[ExpectedPeer, ...] = field(default=(), metadata={"late": True})  # peers: and peers_file:, merged
    peers_file: str | None = field(default=None, metadata={"conv": _file_path})  # absolute once loaded
    forget_after: float = field(default=7 * DAY, metadata={"conv": _seconds_upto(365 * DAY)})
    startup_grace: float | None = field(default=None, metadata={"conv": _optional_seconds})  # None: the timeout
    unexpected: str = field(default="allow", metadata={"conv": _choice("allow", "warn", "reject")})
    rise: int = field(default=1, metadata={"conv": _integer(1, 100)})
    flap_threshold: int = field(default=5, metadata={"conv": _integer(2, 1000)})
    flap_window: float = field(default=300.0, metadata={"conv": _seconds})
    max_peers: int = field(default=10000, metadata={"conv": _integer(1, 1_000_000)})
    state_dir: str | None = field(default=DEFAULT_STATE_DIR, metadata={"conv": _dir_path})  # absolute once loaded
    history_days: int = field(default=30, metadata={"conv": _integer(1, 3650)})  # changes older than this are pruned


@dataclass(frozen=True)
class ClientConfig(_DaemonConfig):
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
    servers: tuple[ServerEntry, ...] = field(default=(), metadata={"conv": _servers})
    log_file: str | None = field(default="/var/log/hbd/client.log", metadata={"conv": _log_file})
    control_socket: str | None = field(default=DEFAULT_CLIENT_SOCKET, metadata={"conv": _socket_path})
    # The history of the server links (store_file.CLIENT_DB_NAME in it: never the server's file)
    state_dir: str | None = field(default=DEFAULT_STATE_DIR, metadata={"conv": _dir_path})  # absolute once loaded
    history_days: int = field(default=30, metadata={"conv": _integer(1, 3650)})  # changes older than this are pruned


def _check_client(cfg: dict[str, Any], given: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Rules between keys; a key that is itself invalid is missing from ``cfg`` and skipped.
    ``given`` holds the keys the file (or the command line) actually set."""
    problems = []
    if cfg.get("servers") and "host" in given:
        problems.append(("host", "cannot be combined with servers; list every server under servers"))
    if cfg.get("servers") and "port" in cfg:
        seen: set[tuple[str, int]] = set()
        names: set[str] = set()
        for s in cfg["servers"]:
            key = (s.host, s.port or cfg["port"])
            if key in seen:
                problems.append(("servers", f"{s.host}:{key[1]} is listed twice"))
            if s.name is not None and s.name in names:
                problems.append(("servers", f"the name {s.name} is used twice"))
            seen.add(key)
            names.add(s.name or "")
    if "pong_timeout" in cfg and "heartbeat_interval" in cfg and cfg["pong_timeout"] <= cfg["heartbeat_interval"]:
        problems.append(
            (
                "pong_timeout",
                f"must be greater than heartbeat_interval ({cfg['heartbeat_interval']:g} s), "
                f"got {cfg['pong_timeout']:g}",
            )
        )
    if cfg.keys() >= {"reconnect_max_delay", "reconnect_delay"} and cfg["reconnect_max_delay"] < cfg["reconnect_delay"]:
        problems.append(
            (
                "reconnect_max_delay",
                f"must be at least reconnect_delay ({cfg['reconnect_delay']:g} s), got {cfg['reconnect_max_delay']:g}",
            )
        )
    return problems


_CROSS_CHECKS: dict[type, Callable[[dict[str, Any], frozenset[str]], list[tuple[str, str]]]] = {
    ClientConfig: _check_client,
}


def load_server_config(path: str | Path, overrides: Mapping[str, object] | None = None) -> ServerConfig:
    return _load(ServerConfig, Path(path), overrides or {})


def load_client_config(path: str | Path, overrides: Mapping[str, object] | None = None) -> ClientConfig:
    return _load(ClientConfig, Path(path), overrides or {})


def config_role(path: str | Path) -> str:
    """Which daemon a configuration file is for, "server" or "client", from its keys (``hbd history
    -c FILE`` reads that daemon's store): a key only a client has (servers, heartbeat_interval, ...)
    and none only a server has makes it a client's. A file of shared keys only (host, port, state_dir
    ...) is a client's if its name starts with "client", else a server's. ConfigError if it cannot be
    read or parsed."""
    with _collector_off():
        try:
            data, _, _ = _parse(_read(Path(path)))
        except ConfigError as exc:
            raise ConfigError([f"{path}: {e}" for e in exc.errors]) from None
    keys = {k for k in data if isinstance(k, str)} if isinstance(data, dict) else set()
    server = {f.name for f in dataclasses.fields(ServerConfig)}
    client = {f.name for f in dataclasses.fields(ClientConfig)}
    if keys & (client - server) and not keys & (server - client):
        return "client"
    if keys & (server - client):
        return "server"
    return "client" if Path(path).name.startswith("client") else "server"


def _load(cls: type, path: Path, overrides: Mapping[str, object]) -> Any:
    with _collector_off():
        result = _validate(cls, path, overrides)
    if isinstance(result, list):  # error lines: a bounded number of bounded lines
        if len(result) > MAX_ERRORS:
            result = [*result[:MAX_ERRORS], f"{path}: ... and {len(result) - MAX_ERRORS} more errors"]
        raise ConfigError([cut(e, MAX_ERROR_LINE) for e in result])
    return result


def _validate(cls: type, path: Path, overrides: Mapping[str, object]) -> Any:
    """The config object, or the list of error lines."""
    try:
        text = _read(path)
        data, lines, items = _parse(text)
    except ConfigError as exc:
        return [f"{path}: {e}" for e in exc.errors]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return [f"{path}: the top level must be a mapping of keys to values, got {_show(data)}"]
    data = {**data, **overrides}

    def where(key: str) -> str:
        line = lines.get(key)
        key = cut(key)
        return f"{path}: line {line}: {key}" if line else f"{path}: {key}"

    errors: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values: dict[str, Any] = {}
    known = ", ".join(sorted(fields))
    if len(known) > KNOWN_KEYS_SHOWN:  # an error line stays short (test_config_hostile); hbd(1) has them all
        known = known[: known.rfind(", ", 0, KNOWN_KEYS_SHOWN)] + ", ... (all in hbd(1))"
    for key in data:
        if not isinstance(key, str) or key not in fields:
            errors.append(f"{where(str(key))}: unknown key (known keys: {known})")
    for name, f in fields.items():
        if name not in data or f.metadata.get("late"):
            values[name] = f.default
            continue
        try:
            values[name] = f.metadata["conv"](data[name])
        except ValueError as exc:
            errors.append(f"{where(name)}: {exc}")
        except Exception as exc:  # a value no converter foresaw: still an error line, never a traceback
            errors.append(f"{where(name)}: invalid value {_show(data[name])} ({type(exc).__name__})")
    for key, reason in _CROSS_CHECKS.get(cls, lambda *_: [])(values, frozenset(map(str, data))):
        errors.append(f"{where(key)}: {reason}")
    if cls is ServerConfig:
        errors.extend(_registry_keys(values, data, path, lines, items, where))
    elif values.get("state_dir"):
        values["state_dir"] = os.path.abspath(path.parent / values["state_dir"])
    if errors:
        return errors
    return cls(**values, path=str(path))


def _registry_keys(
    values: dict[str, Any],
    data: dict[str, Any],
    path: Path,
    lines: dict[str, int],
    items: dict[str | None, list[int]],
    where: Callable[[str], str],
) -> list[str]:
    """The server's ``peers`` (from ``peers:`` and ``peers_file:``, merged) and its paths resolved
    against the config file's directory; error lines for what is wrong."""
    errors: list[str] = []
    base = path.parent
    for key in ("peers_file", "state_dir"):
        if values.get(key):
            values[key] = os.path.abspath(base / values[key])
    peers, problems = peers_config.parse_peers(data.get("peers"), items.get("peers", []))
    for line, reason in problems:
        errors.append(f"{path}: line {line}: peers: {reason}" if line else f"{where('peers')}: {reason}")
    listed = {p.name: i for i, p in enumerate(peers)}
    owner = {peers_config.network_key(p.address): p.name for p in peers if p.address is not None}
    peers_file = values.get("peers_file")
    if peers_file and "peers_file" in data:
        more, file_errors = _read_peers_file(Path(peers_file))
        errors.extend(file_errors)
        lines_of = items.get("peers", [])
        if not peers:  # nothing to merge with: the common case of a fleet's file
            peers, more = [peer for peer, _ in more], []
        for peer, line in more:
            at = f"{peers_file}: line {line}" if line else peers_file
            if peer.name in listed:
                i = listed[peer.name]
                there = f"line {lines_of[i]}" if i < len(lines_of) else "peers"
                errors.append(f"{at}: {peer.name} is also listed in {path} ({there})")
            elif peer.address is not None and peers_config.network_key(peer.address) in owner:
                other = owner[peers_config.network_key(peer.address)]
                errors.append(f"{at}: {peer.name}: address {peer.address} is also {other}'s")
            else:
                listed[peer.name] = len(peers)
                peers.append(peer)
    values["peers"] = tuple(peers)
    if "max_peers" in values and len(peers) > values["max_peers"]:
        key = "max_peers" if "max_peers" in data else ("peers_file" if peers_file else "peers")
        errors.append(f"{where(key)}: {len(peers)} expected peers are more than max_peers ({values['max_peers']})")
    return errors


_PeersFile = tuple[list[tuple[ExpectedPeer, int | None]], list[str]]
# The last peers_file read and what it gave: a reload re-reads the file, and when its text has not
# changed (most reloads) skips the parse, which takes seconds for 100,000 entries.
_last_peers_file: tuple[Path, str, _PeersFile] | None = None


def _read_peers_file(path: Path) -> _PeersFile:
    """The peers of a ``peers_file`` (a list, or a mapping with ``peers:``) with each one's line,
    and error lines naming that file. Same reader as the config file, with bounds of its own."""
    global _last_peers_file
    try:
        text = _read(path, MAX_PEERS_FILE_BYTES)
    except ConfigError as exc:
        return [], [f"{path}: {e}" for e in exc.errors]
    last = _last_peers_file
    if last is not None and last[0] == path and last[1] == text:
        return list(last[2][0]), list(last[2][1])
    result = _parse_peers_file(path, text)
    _last_peers_file = (path, text, result)
    return list(result[0]), list(result[1])


def _parse_peers_file(path: Path, text: str) -> _PeersFile:
    try:
        data, _, items = _parse(text, MAX_PEERS_FILE_DEPTH, MAX_PEERS_FILE_NODES)
    except ConfigError as exc:
        return [], [f"{path}: {e}" for e in exc.errors]
    lines = items.get(None, [])
    if data is None:
        return [], []  # an empty file (or only comments): nobody yet
    if isinstance(data, dict) and set(data) == {"peers"}:
        data, lines = data["peers"], items.get("peers", [])
    if not isinstance(data, list):
        return [], [f"{path}: must hold a list of peers, or a mapping with just peers: (a list), got {_show(data)}"]
    peers, problems = peers_config.parse_peers(data, lines)
    drop_in_slices(data)  # (the document's own list: nothing else holds it)
    errors = [f"{path}: line {line}: {reason}" if line else f"{path}: {reason}" for line, reason in problems]
    if errors:
        return [], errors
    return [(p, lines[i] if i < len(lines) else None) for i, p in enumerate(peers)], []


def read_document(path: str | Path) -> object:
    """The file's YAML document with the loader's bounds (size, kind of file, nesting, aliases), or
    None if it cannot be read or parsed: for a second look at a file already found invalid."""
    try:
        with _collector_off():
            return _parse(_read(Path(path)))[0]
    except ConfigError:
        return None


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    """A large document builds many objects and no cycles: collecting garbage meanwhile only costs
    time (half of it for a 100,000-entry peers_file). Only ever in a process's main thread before it
    serves anything (start-up, ``hbd check-config``, a reload's loader process: hbd.reload_child):
    never while a daemon's loop runs, which it would stop the collector for."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _read(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The file's text; refuses anything but a regular file of at most ``max_bytes``, without
    ever blocking (a FIFO, /dev/zero, a socket or a directory is an error, not a hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError([f"cannot read the file: {_reason(exc)}"]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([f"cannot read the file: not a regular file ({_file_kind(st.st_mode)})"])
        if st.st_size > max_bytes:
            raise ConfigError([f"too large: {st.st_size} bytes (at most {max_bytes})"])
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:  # st_size can be wrong (a file growing, /proc)
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise ConfigError([f"too large: more than {max_bytes} bytes"])
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {_reason(exc)}"]) from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})"]) from None


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or cut(str(exc), 80)


def _file_kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a plain file"


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~4x faster


def _parse(
    text: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES
) -> tuple[Any, dict[str, int], dict[str | None, list[int]]]:
    """YAML text -> (data, top-level key -> line, list -> its items' lines), with bounded cost:
    nesting and the number of values (aliases expanded) are checked before any Python object is
    built. The lists whose items' lines are given: the document itself (key None) if it is a list,
    and each top-level key's value that is a list."""
    try:
        depth = values = 0
        aliases = False
        for event in yaml.parse(text, Loader=_Loader):  # a flat stream: never recursive
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                values += 1
                if depth > max_depth:
                    line = event.start_mark.line + 1 if event.start_mark else 0
                    raise ConfigError([f"line {line}: nested deeper than {max_depth} levels"])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent):
                values += 1
            elif isinstance(event, yaml.AliasEvent):
                aliases = True
            if values > max_nodes:
                line = event.start_mark.line + 1 if event.start_mark else 0
                raise ConfigError([f"line {line}: more than {max_nodes} values"])
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, {}, {}
            if aliases:  # without any, the values were counted above
                _check_size(node, max_depth, max_nodes)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc)]) from None
    except (RecursionError, MemoryError):
        raise ConfigError([f"too complex (at most {max_depth} levels and {max_nodes} values)"]) from None
    except ConfigError:
        raise
    except Exception as exc:  # e.g. a date like 2024-02-30, an integer of 5000 digits
        raise ConfigError([f"invalid value: {cut(str(exc), 80)}"]) from None
    lines: dict[str, int] = {}
    items: dict[str | None, list[int]] = {}
    if isinstance(node, yaml.SequenceNode):
        items[None] = [item.start_mark.line + 1 for item in node.value]
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                lines[k.value] = k.start_mark.line + 1
                if isinstance(v, yaml.SequenceNode):
                    items[k.value] = [item.start_mark.line + 1 for item in v.value]
                    drop_in_slices(v.value)
    if isinstance(node, yaml.SequenceNode):
        drop_in_slices(node.value)
    return data, lines, items


DROP_SLICE = 1000  # items freed per step by drop_in_slices()


def drop_in_slices(items: list[Any]) -> None:
    """Empty a big list a slice at a time. Freeing 100,000 parsed peers in one go is one C call of
    tens of ms (more on a loaded machine) in one call: a stall for whatever else the process runs
    (it was the daemon's loop, when reloads parsed in a thread)."""
    while items:
        del items[-DROP_SLICE:]


def _check_size(root: yaml.Node, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Refuse a document whose values, aliases expanded, exceed ``max_nodes`` or ``max_depth``. An alias
    costs nothing to parse but everything to walk: 9 aliases to 9 aliases... is a billion values."""
    scalar = yaml.ScalarNode
    if isinstance(root, scalar):
        return
    done: dict[int, tuple[int, int]] = {}  # id(collection) -> (values in it and below, depth)
    open_: set[int] = set()
    stack: list[yaml.Node] = [root]
    while stack:  # depth-first, without recursion; each collection is summed once however often aliased
        node = stack[-1]
        nid = id(node)
        if nid in done:
            stack.pop()
            continue
        kids = _children(node)
        if nid not in open_:
            open_.add(nid)
            for kid in kids:
                if isinstance(kid, scalar) or id(kid) in done:
                    continue
                if id(kid) in open_:
                    raise ConfigError([f"line {kid.start_mark.line + 1}: an alias refers to a value containing it"])
                stack.append(kid)
            continue
        stack.pop()
        size, depth = 1, 1
        for kid in kids:
            if isinstance(kid, scalar):
                size += 1
                depth = max(depth, 2)
            else:
                n, d = done[id(kid)]
                size += n
                depth = max(depth, d + 1)
        if size > max_nodes or depth > max_depth:
            what = f"more than {max_nodes} values" if size > max_nodes else f"nested deeper than {max_depth} levels"
            raise ConfigError([f"line {node.start_mark.line + 1}: {what} once aliases are expanded"])
        done[nid] = (size, depth)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = cut(getattr(exc, "problem", None) or str(exc), 120)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
    return f"invalid YAML: {problem}"
