"""The status document as ``hbd status`` reads it: typed shapes and a validating parse.

The CLI renders JSON it read from a socket, which may be another version's daemon or not hbd at
all: ``parse_document`` checks every field the table needs and returns typed documents, or raises
``StatusDocError`` naming the field (``servers[2].address: expected a string, got 5``) instead of
a KeyError traceback. Keys it does not know are ignored, so daemons may add fields (a registry's
``since``, ``reason``, ``expected``, ``flapping``, ``silenced_until``, ``labels``, ``counts``, ...)
without breaking older CLIs; what the table shows is taken from the keys below only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, NotRequired, TypedDict, TypeVar

from hbd.errors import HbdError

T = TypeVar("T")


class StatusDocError(HbdError):
    """A reply that is not a status document hbd status can show."""


class EventDoc(TypedDict):
    time: float
    event: str
    peer: str
    address: str
    reason: str | None


class HeadDoc(TypedDict):
    """What every daemon's document starts with."""

    version: str
    pid: int
    now: float
    started: float
    status: str
    config: dict[str, float]  # the numeric settings shown (heartbeat_timeout, pong_timeout, ...)
    recent: list[EventDoc]


class PeerDoc(TypedDict):
    """One client of a server."""

    name: str | None
    address: str
    state: str
    connected: float | None
    last_ping: float | None
    pings: int
    timeout: float
    # a registry's peer (issue 12): the SINCE and FLAGS columns
    since: NotRequired[float | None]
    reason: NotRequired[str | None]
    expected: NotRequired[bool]
    flapping: NotRequired[bool]
    silenced_until: NotRequired[float | None]
    uptime_24h: NotRequired[float | None]  # this process's accounting (hbd.peer_uptime)


class FilterDoc(TypedDict):
    """The filter a ``select`` reply was made for (hbd.status_filter), as the daemon echoes it."""

    state: list[str] | None  # None: every state
    peer: str | None  # a name or glob; None: every peer
    limit: int  # 0: every match


class ServerDoc(HeadDoc):
    role: Literal["server"]
    listen: str | None
    workers: int  # how many worker processes (0: one process)
    peers: list[PeerDoc]  # the rows the filter kept (at most its limit)
    counts: NotRequired[dict[str, int]]  # every peer by state (a registry's; else those of the connections)
    matched: NotRequired[int]  # peers the filter matched: more than len(peers) when the limit cut the list
    filter: NotRequired[FilterDoc]  # a daemon from before filters sends neither
    registry: NotRequired[bool]  # its peers are a registry's (SINCE, FLAGS, DOWN); before filters: "counts" said so


class RttDoc(TypedDict):
    last: float | None
    avg: float | None
    max: float | None


class LinkDoc(TypedDict):
    """One server of a client."""

    name: str | None
    address: str
    state: str
    link: str
    since: float | None
    last_pong: float | None
    rtt_ms: RttDoc
    pong_timeouts: int
    retries: int
    next_attempt_in: NotRequired[float]


class ClientDoc(HeadDoc):
    role: Literal["client"]
    name: str | None
    servers: list[LinkDoc]


StatusDoc = ServerDoc | ClientDoc


# -- the parse -----------------------------------------------------------------------------------------
def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise StatusDocError(f"{where or 'the reply'}: expected an object, got {_kind(value)}")
    return value


def _get(d: Mapping[str, object], key: str, where: str) -> object:
    if key not in d:
        raise StatusDocError(f"{where}{key}: missing")
    return d[key]


def _str(d: Mapping[str, object], key: str, where: str) -> str:
    value = _get(d, key, where)
    if not isinstance(value, str):
        raise StatusDocError(f"{where}{key}: expected a string, got {_kind(value)}")
    return value


def _opt_str(d: Mapping[str, object], key: str, where: str) -> str | None:
    return None if d.get(key) is None else _str(d, key, where)


def _num(d: Mapping[str, object], key: str, where: str) -> float:
    value = _get(d, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StatusDocError(f"{where}{key}: expected a number, got {_kind(value)}")
    return float(value)


def _opt_num(d: Mapping[str, object], key: str, where: str) -> float | None:
    return None if d.get(key) is None else _num(d, key, where)


def _int(d: Mapping[str, object], key: str, where: str) -> int:
    value = _get(d, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StatusDocError(f"{where}{key}: expected a whole number, got {_kind(value)}")
    return value


def _list(d: Mapping[str, object], key: str, where: str, item: Callable[[object, str], T]) -> list[T]:
    value = _get(d, key, where)
    if not isinstance(value, list):
        raise StatusDocError(f"{where}{key}: expected a list, got {_kind(value)}")
    return [item(v, f"{where}{key}[{i}].") for i, v in enumerate(value)]


def _event(raw: object, where: str) -> EventDoc:
    d = _object(raw, where.rstrip("."))
    return {
        "time": _num(d, "time", where),
        "event": _str(d, "event", where),
        "peer": _str(d, "peer", where),
        "address": _str(d, "address", where),
        "reason": _opt_str(d, "reason", where),
    }


def _peer(raw: object, where: str) -> PeerDoc:
    d = _object(raw, where.rstrip("."))
    doc: PeerDoc = {
        "name": _opt_str(d, "name", where),
        "address": _str(d, "address", where),
        "state": _str(d, "state", where),
        "connected": _opt_num(d, "connected", where),
        "last_ping": _opt_num(d, "last_ping", where),
        "pings": _int(d, "pings", where),
        "timeout": _num(d, "timeout", where),
    }
    if "since" in d:  # a registry's peer
        doc["since"] = _opt_num(d, "since", where)
        doc["reason"] = _opt_str(d, "reason", where)
        doc["silenced_until"] = _opt_num(d, "silenced_until", where)
        doc["expected"] = d.get("expected") is True
        doc["flapping"] = d.get("flapping") is True
        if "uptime_24h" in d:  # a server from before issue 13 sends none
            doc["uptime_24h"] = _opt_num(d, "uptime_24h", where)
    return doc


def _counts(d: Mapping[str, object]) -> dict[str, int]:
    raw = d.get("counts")
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _filter(raw: object) -> FilterDoc:
    d = _object(raw, "filter")
    state = d.get("state")
    return {
        "state": [str(x) for x in state] if isinstance(state, list) else None,
        "peer": _opt_str(d, "peer", "filter."),
        "limit": _int(d, "limit", "filter.") if "limit" in d else 0,
    }


def _link(raw: object, where: str) -> LinkDoc:
    d = _object(raw, where.rstrip("."))
    rtt = _object(_get(d, "rtt_ms", where), f"{where}rtt_ms")
    doc: LinkDoc = {
        "name": _opt_str(d, "name", where),
        "address": _str(d, "address", where),
        "state": _str(d, "state", where),
        "link": _str(d, "link", where),
        "since": _opt_num(d, "since", where),
        "last_pong": _opt_num(d, "last_pong", where),
        "rtt_ms": {
            "last": _opt_num(rtt, "last", f"{where}rtt_ms."),
            "avg": _opt_num(rtt, "avg", f"{where}rtt_ms."),
            "max": _opt_num(rtt, "max", f"{where}rtt_ms."),
        },
        "pong_timeouts": _int(d, "pong_timeouts", where),
        "retries": _int(d, "retries", where),
    }
    next_attempt = _opt_num(d, "next_attempt_in", where)
    if next_attempt is not None:
        doc["next_attempt_in"] = next_attempt
    return doc


def _config(d: Mapping[str, object]) -> dict[str, float]:
    """The numeric settings; a missing or odd ``config`` shows as zeros, not as an error."""
    cfg = d.get("config")
    if not isinstance(cfg, dict):
        return {}
    return {k: float(v) for k, v in cfg.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def parse_document(raw: object) -> StatusDoc:
    """A decoded JSON status reply -> a typed document; StatusDocError says what does not fit."""
    d = _object(raw, "")
    role = _str(d, "role", "")
    if role not in ("server", "client"):
        raise StatusDocError(f"role: expected server or client, got {role!r}")
    head: HeadDoc = {
        "version": _str(d, "version", ""),
        "pid": _int(d, "pid", ""),
        "now": _num(d, "now", ""),
        "started": _num(d, "started", ""),
        "status": _str(d, "status", ""),
        "config": _config(d),
        "recent": _list(d, "recent", "", _event) if "recent" in d else [],
    }
    if role == "server":
        workers = d.get("workers")
        server: ServerDoc = {
            **head,
            "role": "server",
            "listen": _opt_str(d, "listen", ""),
            "workers": len(workers) if isinstance(workers, list) else 0,
            "peers": _list(d, "peers", "", _peer),
        }
        if "counts" in d:
            server["counts"] = _counts(d)
        if "matched" in d:
            server["matched"] = _int(d, "matched", "")
        if "filter" in d:
            server["filter"] = _filter(d["filter"])
        if isinstance(d.get("registry"), bool):
            server["registry"] = d["registry"] is True
        return server
    return {**head, "role": "client", "name": _opt_str(d, "name", ""), "servers": _list(d, "servers", "", _link)}
