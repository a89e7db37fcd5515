"""A loaded configuration as lines of JSON: how a reload's loader process (hbd.reload_child) hands
the validated configuration back to the daemon (hbd.reload_process).

The parse and validation of a 100,000-entry peers_file take seconds of CPU: in a thread of the daemon
they held the GIL away from the loop, so they run in a process of their own, and what comes back must
be cheap to read on the loop and read a slice at a time. The output is:

- a first line, ``{"errors": [...]}`` (the file is invalid: the lines the daemon reports, as
  ``hbd check-config`` would) or ``{"config": {...}, "peers": N}``: every key but ``peers``;
- then N lines, one per expected peer: ``[name, address, timeout, labels]`` with the address as
  ``[version, network as an integer, prefix length]`` (cheap to rebuild, no parse of text);
- a last line, ``"end"``: output cut short (a loader killed or crashed) is never taken for a config.

Only data crosses (JSON: never a pickle); ``decode`` rebuilds the configuration's own types from it and
nothing else, and refuses anything it does not expect (WireError: the reload fails, cleanly).

A reload mostly changes a setting, not the fleet: when the peer lines are byte for byte those of the
last decode, that decode's peers are taken again (a digest of the lines, one hash call) instead of
being rebuilt 1,000 a turn (0.7 s of the loop's CPU at 100,000 peers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
from collections.abc import Generator, Iterator
from typing import Any

from hbd.access import Network
from hbd.config import ClientConfig, ServerConfig, ServerEntry
from hbd.errors import ConfigError, HbdError
from hbd.peers_config import ExpectedPeer
from hbd.tls import TLSConfig

DECODE_SLICE = 1000  # peers decoded per step (about 7 µs each)
MAX_ERRORS = 25  # error lines taken from the loader (hbd.config reports at most 21)
MAX_ERROR_LINE = 600
END = b'"end"'
CLASSES: dict[str, type[ServerConfig] | type[ClientConfig]] = {"server": ServerConfig, "client": ClientConfig}
_OBJECTS: dict[str, type[TLSConfig] | type[ServerEntry]] = {"tls": TLSConfig, "server": ServerEntry}
# The last peers decoded, by the digest of their lines: (role, digest, peers)
_last_peers: tuple[str, bytes, tuple[ExpectedPeer, ...]] | None = None


class WireError(HbdError):
    """The loader's output is not what encode() writes."""


# -- the loader's side -----------------------------------------------------------------------------
def encode(cfg: ServerConfig | ClientConfig) -> Iterator[bytes]:
    """The lines (each ending in a newline) for ``cfg``."""
    values = {f.name: _enc(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "peers"}
    peers: tuple[ExpectedPeer, ...] = getattr(cfg, "peers", ())
    yield _line({"config": values, "peers": len(peers)})
    for p in peers:
        yield _line([p.name, _net(p.address) if p.address is not None else None, p.timeout, p.labels])
    yield END + b"\n"


def encode_errors(errors: list[str]) -> Iterator[bytes]:
    yield _line({"errors": errors})
    yield END + b"\n"


def _line(value: object) -> bytes:
    # Not ASCII-escaped: as long as the file's own text, whatever its script
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _net(net: Network) -> list[int]:
    return [net.version, int(net.network_address), net.prefixlen]


def _enc(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return [_enc(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return {"net": _net(value)}
    for tag, cls in _OBJECTS.items():
        if isinstance(value, cls):
            return {tag: {f.name: _enc(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise TypeError(f"cannot encode a {type(value).__name__}")


# -- the daemon's side -------------------------------------------------------------------------------
def decode(data: bytes, role: str, slice_: int = DECODE_SLICE) -> Generator[None, None, ServerConfig | ClientConfig]:
    """The configuration in ``data``, rebuilt a slice of peers per step (``yield``); ConfigError with
    the loader's lines for an invalid file, WireError for output that is not encode()'s."""
    cls = CLASSES[role]
    end = data.find(b"\n")
    head = _json(data[:end] if end >= 0 else data)
    if isinstance(head, dict) and set(head) == {"errors"} and isinstance(head["errors"], list):
        lines = [e[:MAX_ERROR_LINE] for e in head["errors"][:MAX_ERRORS] if isinstance(e, str)]
        if not lines or not data.endswith(b"\n" + END + b"\n"):
            raise WireError("the loader's output is cut short or malformed")
        raise ConfigError(lines)
    if not (isinstance(head, dict) and set(head) == {"config", "peers"}):
        raise WireError("the loader's output does not start with a configuration")
    count, values = head["peers"], head["config"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(values, dict):
        raise WireError("the loader's output has a malformed first line")
    names = {f.name for f in dataclasses.fields(cls)}
    if not set(values) <= names - {"peers"} or (count and "peers" not in names):
        raise WireError(f"the loader's output has unknown keys for a {role}: {sorted(set(values) - names)[:5]}")
    fields: dict[str, Any] = {k: _dec(v) for k, v in values.items()}
    if "peers" in names and (same := _same_peers(data, end + 1, role, count)) is not None:
        fields["peers"] = same
        return _config(cls, fields)
    peers: list[ExpectedPeer] = []
    pos = end + 1
    while len(peers) < count:
        for _ in range(min(slice_, count - len(peers))):
            nl = data.find(b"\n", pos)
            if nl < 0 or data[pos:nl] == END:
                raise WireError(f"the loader's output is cut short after {len(peers)} of {count} peers")
            peers.append(_peer(_json(data[pos:nl])))
            pos = nl + 1
        yield
    if data[pos:] != END + b"\n":
        raise WireError(f"the loader's output {'is cut short' if pos >= len(data) else 'does not end where it should'}")
    if "peers" in names:
        fields["peers"] = tuple(peers)
        _remember(data, end + 1, role, fields["peers"])
    return _config(cls, fields)


def _config(cls: type[ServerConfig] | type[ClientConfig], fields: dict[str, Any]) -> ServerConfig | ClientConfig:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise WireError(f"the loader's output does not make a configuration: {exc}") from None


def _digest(data: bytes, start: int) -> bytes | None:
    """The digest of the peer lines from ``start`` to the "end" line; None if there is no such line."""
    stop = len(data) - len(END) - 1
    if stop < start or not data.endswith(b"\n" + END + b"\n"):
        return None
    return hashlib.blake2b(memoryview(data)[start:stop], digest_size=16).digest()


def _same_peers(data: bytes, start: int, role: str, count: int) -> tuple[ExpectedPeer, ...] | None:
    """The last decode's peers if these lines are the ones it decoded."""
    last = _last_peers
    if last is None or last[0] != role or len(last[2]) != count or count == 0:
        return None
    return last[2] if _digest(data, start) == last[1] else None


def _remember(data: bytes, start: int, role: str, peers: tuple[ExpectedPeer, ...]) -> None:
    global _last_peers
    digest = _digest(data, start)
    _last_peers = (role, digest, peers) if digest is not None and peers else None


_DECODER = json.JSONDecoder()


def _json(line: bytes) -> Any:
    try:
        return _DECODER.decode(line.decode())  # (json.loads would first guess the encoding of each line)
    except ValueError:  # (UnicodeDecodeError is one)
        raise WireError("the loader's output is not JSON lines") from None


def _dec(value: object) -> Any:
    if isinstance(value, list):
        return tuple(_dec(v) for v in value)
    if isinstance(value, dict):
        if len(value) != 1:
            raise WireError("the loader's output holds a malformed object")
        ((tag, body),) = value.items()
        if tag == "net":
            return _network(body)
        cls = _OBJECTS.get(tag)
        if cls is None or not isinstance(body, dict):
            raise WireError(f"the loader's output holds an unknown object {tag[:40]!r}")
        try:
            return cls(**{k: _dec(v) for k, v in body.items()})
        except TypeError as exc:
            raise WireError(f"the loader's output holds a malformed {tag}: {exc}") from None
    return value


def _network(body: object) -> Network:
    if isinstance(body, list) and len(body) == 3 and all(type(x) is int for x in body):
        version, number, prefix = body
        try:
            if version == 4:
                return ipaddress.IPv4Network((number, prefix))
            if version == 6:
                return ipaddress.IPv6Network((number, prefix))
        except ValueError:
            pass
    raise WireError("the loader's output holds a malformed address")


def _peer(item: object) -> ExpectedPeer:
    if isinstance(item, list) and len(item) == 4:
        name, address, timeout, labels = item
        if (
            isinstance(name, str)
            and (timeout is None or (isinstance(timeout, int | float) and not isinstance(timeout, bool)))
            and isinstance(labels, list)
            and all(type(kv) is list and len(kv) == 2 and type(kv[0]) is str and type(kv[1]) is str for kv in labels)
        ):
            net = _network(address) if address is not None else None
            seconds = None if timeout is None else float(timeout)
            return ExpectedPeer(name, net, seconds, tuple((k, v) for k, v in labels))
    raise WireError("the loader's output holds a malformed peer")
