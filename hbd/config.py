"""YAML configuration -> frozen dataclasses, with every error naming the file, line, key and reason.

Loading never starts anything, so the daemons can validate a new file completely on SIGHUP and keep
running the old configuration when it is invalid.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import shlex
import shutil
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hbd.access import Network, parse_allow
from hbd.errors import ConfigError as ConfigError  # re-exported: where callers import it from
from hbd.protocol import NAME_PATTERN
from hbd.quote import cut, quote, show
from hbd.tls import TLSConfig, parse_client_tls, parse_server_tls

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_SERVER_CONFIG = "/etc/hbd/server.yaml"
DEFAULT_CLIENT_CONFIG = "/etc/hbd/client.yaml"
DEFAULT_SERVER_SOCKET = "/run/hbd/server.sock"  # /run/hbd is the units' RuntimeDirectory=
DEFAULT_CLIENT_SOCKET = "/run/hbd/client.sock"

# Bounds on what a configuration file may cost to load, whatever it holds (it is read on SIGHUP by
# the running daemon, from the event loop): a real file is a few KB and a few levels deep.
MAX_CONFIG_BYTES = 64 * 1024  # ~1000 servers; parsing this much takes ~0.1 s on a slow machine
MAX_DEPTH = 32  # nesting of lists and mappings, aliases expanded
MAX_NODES = 50_000  # values in the document, aliases expanded (a YAML "billion laughs" stops here)
MAX_ERRORS = 20  # error lines reported for one file
MAX_ERROR_LINE = 500  # characters per error line


# -- typed converters: value -> converted value, or raise ValueError(reason) ----------------------
def _integer(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {quote(value)}")
        return value

    return convert


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds, got {_show(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {quote(value)}")
    if value > 86400:
        raise ValueError(f"must be at most 86400 seconds, got {quote(value)}")
    return float(value)


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


def load_server_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServerConfig:
    return _load(ServerConfig, Path(path), overrides or {})


def load_client_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ClientConfig:
    return _load(ClientConfig, Path(path), overrides or {})


def _load(cls: type, path: Path, overrides: dict[str, Any]) -> Any:
    result = _validate(cls, path, overrides)
    if isinstance(result, list):  # error lines: a bounded number of bounded lines
        if len(result) > MAX_ERRORS:
            result = [*result[:MAX_ERRORS], f"{path}: ... and {len(result) - MAX_ERRORS} more errors"]
        raise ConfigError([cut(e, MAX_ERROR_LINE) for e in result])
    return result


def _validate(cls: type, path: Path, overrides: dict[str, Any]) -> Any:
    """The config object, or the list of error lines."""
    try:
        text = _read(path)
        data, lines = _parse(text)
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
    for key in data:
        if not isinstance(key, str) or key not in fields:
            errors.append(f"{where(str(key))}: unknown key (known keys: {known})")
    for name, f in fields.items():
        if name not in data:
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
    if errors:
        return errors
    return cls(**values, path=str(path))


def read_document(path: str | Path) -> Any:
    """The file's YAML document with the loader's bounds (size, kind of file, nesting, aliases), or
    None if it cannot be read or parsed: for a second look at a file already found invalid."""
    try:
        return _parse(_read(Path(path)))[0]
    except ConfigError:
        return None


def _read(path: Path) -> str:
    """The file's text; refuses anything but a regular file of at most MAX_CONFIG_BYTES, without
    ever blocking (a FIFO, /dev/zero, a socket or a directory is an error, not a hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError([f"cannot read the file: {_reason(exc)}"]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError([f"cannot read the file: not a regular file ({_file_kind(st.st_mode)})"])
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"too large: {st.st_size} bytes (at most {MAX_CONFIG_BYTES})"])
        data = b""
        while len(data) <= MAX_CONFIG_BYTES:  # st_size can be wrong (a file growing, /proc)
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError([f"too large: more than {MAX_CONFIG_BYTES} bytes"])
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


def _parse(text: str) -> tuple[Any, dict[str, int]]:
    """YAML text -> (data, top-level key -> line), with bounded cost: nesting and the number of
    values (aliases expanded) are checked before any Python object is built."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):  # a flat stream: never recursive
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else 0
                    raise ConfigError([f"line {line}: nested deeper than {MAX_DEPTH} levels"])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, {}
            _check_size(node)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc)]) from None
    except (RecursionError, MemoryError):
        raise ConfigError([f"too complex (at most {MAX_DEPTH} levels and {MAX_NODES} values)"]) from None
    except ConfigError:
        raise
    except Exception as exc:  # e.g. a date like 2024-02-30, an integer of 5000 digits
        raise ConfigError([f"invalid value: {cut(str(exc), 80)}"]) from None
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return data, lines


def _check_size(root: yaml.Node) -> None:
    """Refuse a document whose values, aliases expanded, exceed MAX_NODES or MAX_DEPTH. An alias
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
        if size > MAX_NODES or depth > MAX_DEPTH:
            what = f"more than {MAX_NODES} values" if size > MAX_NODES else f"nested deeper than {MAX_DEPTH} levels"
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
