"""The server's expected peers: ``peers:`` in server.yaml and the list in ``peers_file:``.

Pure conversion: YAML data (already read and bounded by hbd.config) plus each item's line ->
``ExpectedPeer`` records and (line, reason) errors. An item is a name, or a mapping
``{name, address, timeout, labels}``; hbd.config merges the two lists and names the file.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hbd.access import Network
from hbd.durations import seconds_value
from hbd.protocol import NAME_PATTERN
from hbd.quote import quote, show

MAX_PEERS_FILE_BYTES = 4 * 1024 * 1024  # ~100,000 entries with an address and a label or two
MAX_ENTRIES = 100_000  # peers in one list
MAX_LABELS = 16  # per peer: each is a label on every one of its series
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 128
ITEM_KEYS = ("name", "address", "timeout", "labels")
# `peer` is the series' own label; `job` and `instance` are the scrape's target labels; `__` is
# reserved by Prometheus.
RESERVED_LABELS = frozenset({"peer", "job", "instance"})

_NAME = re.compile(NAME_PATTERN)
_LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class ExpectedPeer:
    """A peer the server expects to be alive."""

    name: str
    address: Network | None = None  # a legacy client that never greets is matched by its source address
    timeout: float | None = None  # None: the server's heartbeat_timeout
    labels: tuple[tuple[str, str], ...] = ()  # copied onto its metrics (and hooks' HBD_LABEL_<KEY>)


Problem = tuple[int | None, str]  # (line, reason)


def parse_peers(value: object, lines: Sequence[int]) -> tuple[list[ExpectedPeer], list[Problem]]:
    """A ``peers`` list -> its peers and its problems; ``lines[i]`` is item i's line (or missing).
    Duplicates within the list are problems; an empty list or null is no peers."""
    if value is None:
        return [], []
    if not isinstance(value, list):
        return [], [(None, f"must be a list of peer names or {{name, address, timeout, labels}}, got {show(value)}")]
    if len(value) > MAX_ENTRIES:
        return [], [(None, f"more than {MAX_ENTRIES} peers ({len(value)})")]
    peers: list[ExpectedPeer] = []
    problems: list[Problem] = []
    first: dict[str, int] = {}  # name -> index of its first item
    addresses: dict[tuple[int, int, int], str] = {}  # network (as numbers: hashing a Network is slow) -> name
    for i, item in enumerate(value):
        line = lines[i] if i < len(lines) else None
        try:
            peer = parse_item(item)
        except ValueError as exc:
            problems.append((line, f"item {i + 1}: {exc}"))
            continue
        if peer.name in first:
            j = first[peer.name]
            at = f" (line {lines[j]})" if j < len(lines) else ""
            problems.append((line, f"item {i + 1}: {peer.name} is listed twice, first as item {j + 1}{at}"))
            continue
        if peer.address is not None:
            key = network_key(peer.address)
            if key in addresses:
                other = addresses[key]
                problems.append((line, f"item {i + 1}: {peer.name}: address {peer.address} is also {other}'s"))
                continue
            addresses[key] = peer.name
        first[peer.name] = i
        peers.append(peer)
    return peers, problems


def network_key(net: Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


def parse_item(item: object) -> ExpectedPeer:
    if isinstance(item, str):
        return ExpectedPeer(_name(item))
    if not isinstance(item, dict) or "name" not in item:
        raise ValueError(f"must be a peer name or a mapping with name (and address, timeout, labels), got {show(item)}")
    unknown = [k for k in item if k not in ITEM_KEYS]
    if unknown:
        raise ValueError(f"{quote(unknown[0])}: unknown key (known keys: {', '.join(ITEM_KEYS)})")
    name = _name(item["name"])
    try:
        address = _address(item["address"]) if item.get("address") is not None else None
        timeout = seconds_value(item["timeout"]) if item.get("timeout") is not None else None
        labels = _labels(item["labels"]) if item.get("labels") is not None else ()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return ExpectedPeer(name, address, timeout, labels)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            "name: must be 1-64 of the characters A-Z a-z 0-9 . _ : @ -, starting with a letter or digit "
            f"(as a client_name), got {show(value)}"
        )
    return value


def _address(value: Any) -> Network:
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"address: must be an IP address or a network such as 10.0.0.0/24, got {show(value)}")
    try:  # the common case, a plain IPv4 address, three times faster than ip_network()
        return ipaddress.IPv4Network(socket.inet_pton(socket.AF_INET, value))
    except OSError:
        pass
    try:
        return ipaddress.ip_network(value.strip())  # strict: 10.0.0.5/24 is a typo, not a network
    except ValueError:
        pass
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"address: not an IP address or network: {quote(value)}") from None
    raise ValueError(f"address: {quote(value)} has host bits set (a network is written like 10.0.0.0/24)")


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError(f"labels: must be a mapping of label names to values, got {show(value)}")
    if len(value) > MAX_LABELS:
        raise ValueError(f"labels: at most {MAX_LABELS} labels, got {len(value)}")
    out: dict[str, str] = {}
    upper: dict[str, str] = {}
    for key, raw in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key) or len(key) > MAX_LABEL_KEY:
            raise ValueError(
                f"labels: {quote(key)} is not a label name (letters, digits and _, not starting with a "
                f"digit, at most {MAX_LABEL_KEY} characters)"
            )
        if key in RESERVED_LABELS or key.startswith("__"):
            raise ValueError(f"labels: {key} is reserved (peer, job, instance and names starting with __)")
        if key.upper() in upper:  # hooks see HBD_LABEL_<KEY>: env and ENV would be one variable
            raise ValueError(f"labels: {upper[key.upper()]} and {key} differ only in case")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise ValueError(f"labels: {key}: must be a string, got {show(raw)}")
        text = str(raw)
        if len(text) > MAX_LABEL_VALUE:
            raise ValueError(f"labels: {key}: at most {MAX_LABEL_VALUE} characters, got {len(text)}")
        if _CONTROL.search(text):
            raise ValueError(f"labels: {key}: control characters are not allowed, got {quote(text)}")
        upper[key.upper()] = key
        out[key] = text
    return tuple(sorted(out.items()))
