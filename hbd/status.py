"""What the status socket answers: one JSON document per request, produced a slice at a time.

The daemon side (the head and the rows here; which rows, in what order, and the tail in
hbd.status_select) only snapshots and serialises; ``hbd status`` turns the JSON into a table
(``render``). Times in the document are wall-clock epoch seconds (converted from the monotonic
clock liveness runs on), with the daemon's own ``now`` so ages need no synchronised clocks. The
layout is documented in docs/operations.md.

With ``workers: K`` the supervisor has no peers of its own: it relays the ``peers`` reply of each
worker's private socket (``<control_socket>.<index>``, mode 0600) into one document.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from json.encoder import encode_basestring_ascii

from hbd import __version__
from hbd.control import Reply
from hbd.loop import EventLoop
from hbd.status_doc import PeerDoc, StatusDoc
from hbd.view import ClientView, DaemonView, LoopNumbers, PeerRow, ServerView, SupervisorView, Turns

SLICE = 250  # peers serialised per chunk: ~25 KB, well under a millisecond of loop time each


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


class Clock:
    """Monotonic loop time -> wall-clock epoch seconds, fixed once per request."""

    def __init__(self, loop_now: float) -> None:
        self.wall_now = time.time()
        self.offset = self.wall_now - loop_now

    def wall(self, mono: float | None) -> float | None:
        return None if mono is None else round(mono + self.offset, 3)


def head(d: DaemonView, clock: Clock) -> dict[str, object]:
    return {
        "role": d.role,
        "version": __version__,
        "pid": os.getpid(),
        "now": round(clock.wall_now, 3),
        "started": round(d.started, 3),
        "status": d.status,
        "reloads": {"ok": d.reloads_ok, "failed": d.reloads_failed, "last_error": d.last_reload_error},
        "loop": loop_doc(d.loop),
        "hooks": dict(d.hooks),
        "events": dict(d.events),
        "recent": [{**e._asdict(), "time": round(e.time, 3)} for e in d.recent],
    }


def loop_doc(loop: LoopNumbers, turns: Turns | None = None) -> dict[str, object]:
    """The loop's lag, stalls and turn histogram (``turns``: instead of the loop's own)."""
    return {
        "lag_ms": round(loop.lag * 1000, 3),
        "max_lag_ms": round(loop.max_lag * 1000, 3),
        "stalls": loop.stalls,
        "turns": turns_doc(turns or loop.turns),
    }


def turns_doc(t: Turns) -> dict[str, object]:
    """Turn durations: how many turns took at most each bound (cumulative, as in the metrics), the
    count, sum and longest, and how many took over 100 ms (every peer waited that long)."""
    le: dict[str, int] = {}
    total = 0
    for bound, n in zip([*(f"{b * 1000:g}" for b in t.bounds), "+Inf"], t.counts, strict=True):
        total += n
        le[bound] = total
    return {
        "count": total,
        "sum_ms": round(t.sum * 1000, 3),
        "max_ms": round(t.max * 1000, 3),
        "over_100ms": t.over(0.1) if 0.1 in t.bounds else None,
        "le_ms": le,
    }


# -- server ------------------------------------------------------------------------------------------
def server_head(view: ServerView | SupervisorView, clock: Clock) -> dict[str, object]:
    doc = {**head(view.daemon, clock), "listen": view.listen, "config": view.config._asdict()}
    if view.counts is not None:
        doc["counts"] = dict(view.counts)
    return doc


def peer_doc(row: PeerRow, clock: Clock) -> dict[str, object]:
    wall = clock.wall
    doc: dict[str, object] = {
        "peer": row.peer,
        "name": row.name,
        "address": row.address,
        "state": row.state,
        "connected": wall(row.connected),
        "last_ping": wall(row.last_ping),
        "pings": row.pings,
        "timeout": row.timeout,
        "interval": row.interval,
    }
    if row.worker is not None:
        doc["worker"] = row.worker
    if row.since is not None:  # a registry's row (issue 12)
        doc.update(
            {
                "since": wall(row.since),
                "reason": row.reason,
                "expected": bool(row.expected),
                "flapping": "flapping" in row.flags,
                "silenced_until": row.silenced_until,
                "labels": dict(row.labels),
                "uptime_24h": None if row.uptime_24h is None else round(row.uptime_24h, 3),
                "outages": row.outages or 0,
                "down_seconds": round(row.down_seconds or 0.0, 3),
            }
        )
    return doc


def peer_json(row: PeerRow, clock: Clock) -> str:
    """``_dumps(peer_doc(row, clock))``, written directly: a full listing at 100,000 peers is that
    many rows, and the dict and the encoder's walk of it were half of a worker's CPU per row
    (tests/test_status.py checks that both write the same text, for any row)."""
    off = clock.offset
    pings, worker = row.pings, row.worker
    text = (
        f'{{"peer":{_str(row.peer)},"name":{_opt_str(row.name)},"address":{_str(row.address)},'
        f'"state":{_str(row.state)},"connected":{_time(row.connected, off)},'
        f'"last_ping":{_time(row.last_ping, off)},'
        f'"pings":{int.__repr__(pings) if pings.__class__ is int else _num(pings)},"timeout":{_num(row.timeout)},'
        f'"interval":{_num(row.interval)}'
    )
    if worker is not None:
        text += f',"worker":{int.__repr__(worker) if worker.__class__ is int else _num(worker)}'
    if row.since is not None:
        uptime = row.uptime_24h
        text += (
            f',"since":{_time(row.since, off)},"reason":{_opt_str(row.reason)},'
            f'"expected":{"true" if row.expected else "false"},'
            f'"flapping":{"true" if "flapping" in row.flags else "false"},'
            f'"silenced_until":{_num(row.silenced_until)},"labels":{_dumps(dict(row.labels)) if row.labels else "{}"},'
            f'"uptime_24h":{_num(None if uptime is None else round(uptime, 3))},"outages":{_num(row.outages or 0)},'
            f'"down_seconds":{_num(round(row.down_seconds or 0.0, 3))}'
        )
    return text + "}"


def _time(mono: float | None, offset: float) -> str:
    """``_num(clock.wall(mono))`` in one call (three per row)."""
    if mono is None:
        return "null"
    v = round(mono + offset, 3)
    if v - v == 0.0:  # finite
        return float.__repr__(v)
    raise ValueError(f"Out of range float values are not JSON compliant: {v!r}")


_str = encode_basestring_ascii  # what json.dumps writes for a string (ensure_ascii)


def _opt_str(v: str | None) -> str:
    return "null" if v is None else _str(v)


def _num(v: float | None) -> str:
    """A number as json.dumps writes it (``allow_nan=False``: an infinity or NaN is a ValueError)."""
    if v is None:
        return "null"
    if v.__class__ is float:
        if not -_INF < v < _INF:
            raise ValueError(f"Out of range float values are not JSON compliant: {v!r}")
        return float.__repr__(v)
    if v is True or v is False:
        return "true" if v else "false"
    return int.__repr__(int(v))


_INF = float("inf")


def server_peers(view: ServerView, clock: Clock) -> Iterator[str]:
    """Comma-separated peer objects, SLICE at a time, as the view produces its rows."""
    return _rows_chunks(view.peers, clock)


def _rows_chunks(peers: Iterable[PeerRow], clock: Clock) -> Iterator[str]:
    rows = iter(peers)
    while chunk := [peer_json(row, clock) for row in islice(rows, SLICE)]:
        yield ",".join(chunk)


def peers_fragment(view: ServerView) -> Reply:
    """A worker's answer to the supervisor: just its peers, comma-separated."""
    clock = Clock(view.daemon.now)
    first = True
    for chunk in server_peers(view, clock):
        yield (chunk if first else "," + chunk).encode()
        first = False


def supervisor_head(view: SupervisorView, clock: Clock) -> dict[str, object]:
    """The supervisor's document without its peers: the server's head, its workers, and the loop turns
    of every process together (as in the metrics)."""
    doc = server_head(view, clock)
    doc["workers"] = [
        {"index": w.index, "pid": w.pid, "clients": w.clients, "late": w.late}
        | ({"loop": loop_doc(w.numbers.loop)} if w.numbers is not None else {})
        for w in view.workers
    ]
    turns = view.daemon.loop.turns
    for w in view.workers:
        if w.numbers is not None:
            turns = turns.plus(w.numbers.loop.turns)
    doc["loop"] = loop_doc(view.daemon.loop, turns)
    return doc


class _Relay:
    """A non-blocking ``peers`` request (or ``request``) to one worker socket; ``take()`` returns bytes, b"" at the
    end, or None when nothing has arrived yet (``wake`` is called when something does)."""

    def __init__(self, loop: EventLoop, path: str, wake: Callable[[], None], request: bytes = b"peers\n") -> None:
        self.loop = loop
        self.wake = wake
        self.buf: list[bytes] = []
        self.eof = False
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        try:
            self.sock.connect(path)
            self.sock.send(request)  # a fresh unix socket always takes a short line whole
        except OSError:
            self.close()  # that worker is restarting: its peers are missing from this reply
            self.eof = True
            return
        loop.add_reader(self.sock, self._on_read)

    def _on_read(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.buf.append(data)
            if sum(map(len, self.buf)) > 1 << 20:
                self.loop.remove_reader(self.sock)  # backpressure: resume when taken
        else:
            self.eof = True
            self.close()
        self.wake()

    def take(self) -> bytes | None:
        if self.buf:
            data = b"".join(self.buf)
            self.buf = []
            if self.sock is not None and not self.eof:
                self.loop.add_reader(self.sock, self._on_read)
            return data
        return b"" if self.eof else None

    def chunks(self) -> Iterator[bytes | None]:
        """What arrives, chunk by chunk (None: nothing yet) up to the end; closed when done or dropped."""
        try:
            while (chunk := self.take()) != b"":
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.loop.forget(self.sock)
            self.sock.close()
            self.sock = None


# -- client ------------------------------------------------------------------------------------------
def client_document(view: ClientView) -> Reply:
    now = view.daemon.now
    clock = Clock(now)
    wall = clock.wall
    servers = []
    for row in view.links:
        rtt = row.rtt
        servers.append(
            {
                "peer": row.peer,
                "name": row.name,
                "address": row.address,
                "state": row.state,
                "since": wall(row.since),
                "link": row.link,
                "last_pong": wall(row.last_pong),
                "rtt_ms": {
                    "last": _ms(rtt.last),
                    "avg": _ms(rtt.sum / rtt.count) if rtt.count else None,
                    "max": _ms(rtt.max) if rtt.count else None,
                },
                "pings": row.pings,
                "pongs": rtt.count,
                "pong_timeouts": row.timeouts,
                "connects": row.connects,
                "retries": row.retries,
                "outstanding": row.outstanding,
                "next_attempt_in": round(max(row.next_attempt - now, 0.0), 3) if row.next_attempt is not None else None,
            }
        )
    doc = {
        **head(view.daemon, clock),
        "name": view.name,
        "config": view.config._asdict(),
        "servers": servers,
    }
    yield (_dumps(doc) + "\n").encode()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# -- the table (``hbd status``) ------------------------------------------------------------------------
_ORDER = {"DEAD": 0, "DOWN": 0, "LATE": 1, "NEW": 2, "UP": 3}


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _since(p: PeerDoc, now: float) -> str:
    since = p.get("since")
    return age(now - since) if since is not None else "-"


def _flags(p: PeerDoc, now: float) -> str:
    """A registry row's flags: silenced (and for how long), flapping, expected; a DOWN peer's reason."""
    flags = []
    until = p.get("silenced_until")
    if until is not None:
        flags.append(f"silenced {age(until - now)}")
    if p.get("flapping"):
        flags.append("flapping")
    if p.get("expected"):
        flags.append("expected")
    text = ",".join(flags)
    reason = p.get("reason")
    if p["state"] == "DOWN" and reason:
        text = f"{text} ({reason})" if text else f"({reason})"
    return text or "-"


def _uptime(p: PeerDoc) -> str:
    """This server process's accounting (``hbd history`` reads the whole record): "-" before a change."""
    u = p.get("uptime_24h")
    return "-" if u is None else f"{u:.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def render(doc: StatusDoc, recent: int = 10) -> str:
    """The human-readable status for one daemon's document (``status_doc.parse_document`` checked it)."""
    now = doc["now"]
    lines = [f"hbd-{doc['role']} {doc['version']} (pid {doc['pid']}), up {age(now - doc['started'])}: {doc['status']}"]
    cfg = doc["config"]
    more: list[str] = []
    if doc["role"] == "server":
        peers = doc["peers"]
        registry = doc.get("registry", "counts" in doc)  # a registry's peers (issue 12): SINCE, FLAGS, DOWN
        counts = doc.get("counts")
        if counts is None:  # a daemon that counts nothing: what it listed
            counts = {s: sum(1 for p in peers if p["state"] == s) for s in ("UP", "LATE", "NEW", "DOWN")}
        total = sum(counts.values())
        where = f"listening on {doc['listen']}" if doc["listen"] else "not listening"
        workers = f", {doc['workers']} workers" if doc["workers"] else ""
        noun = "peer" if registry else "client"
        lines.append(
            f"{where}{workers}; heartbeat_timeout {cfg.get('heartbeat_timeout', 0):g} s; "
            f"{total} {noun}{'s' if total != 1 else ''}: "
            f"{counts.get('UP', 0)} up, {counts.get('LATE', 0)} late, {counts.get('NEW', 0)} new"
            + (f", {counts.get('DOWN', 0)} down" if registry else "")
        )
        flt = doc.get("filter")
        matched = doc.get("matched", len(peers))
        if flt is not None and (flt["state"] is not None or flt["peer"] is not None):
            what = [f"state {','.join(flt['state'])}"] if flt["state"] is not None else []
            what += [f"peer {flt['peer']}"] if flt["peer"] is not None else []
            lines.append(f"{matched} match{'es' if matched != 1 else ''} {'; '.join(what)}")
        if matched > len(peers):
            more.append(
                f"... {matched - len(peers)} more matched, not shown (the first {len(peers)} in this order are): "
                "--limit N shows more, --all every one"
            )
        rows = [
            [
                p["name"] or "-",
                p["address"],
                p["state"],
                *([_since(p, now)] if registry else []),
                age(now - p["connected"]) if p["connected"] is not None else "-",
                age(now - p["last_ping"]) + " ago" if p["last_ping"] is not None else "never",
                str(p["pings"]),
                f"{p['timeout']:g}s",
                *([_uptime(p), _flags(p, now)] if registry else []),
            ]
            for p in sorted(peers, key=lambda p: (_ORDER.get(p["state"], 9), p["name"] or "~", p["address"]))
        ]
        header = ["PEER", "ADDRESS", "STATE", "CONNECTED", "LAST PING", "PINGS", "TIMEOUT"]
        if registry:
            header = [*header[:3], "SINCE", *header[3:], "UPTIME 24h", "FLAGS"]
    else:
        servers = doc["servers"]
        name = f"client_name {doc['name']}; " if doc["name"] else ""
        lines.append(
            f"{name}heartbeat_interval {cfg.get('heartbeat_interval', 0):g} s; "
            f"pong_timeout {cfg.get('pong_timeout', 0):g} s; {len(servers)} "
            f"server{'s' if len(servers) != 1 else ''}"
        )
        rows = []
        for s in servers:
            rtt = s["rtt_ms"]
            note = s["link"] if s["link"] != "up" else ""
            if "next_attempt_in" in s:
                note = f"retry {s['retries']} in {s['next_attempt_in']:.1f}s"
            rows.append(
                [
                    s["name"] or "-",
                    s["address"],
                    s["state"],
                    age(now - s["since"]) if s["since"] else "-",
                    age(now - s["last_pong"]) + " ago" if s["last_pong"] is not None else "never",
                    "/".join(f"{v:.1f}" if v is not None else "-" for v in (rtt["last"], rtt["avg"], rtt["max"])),
                    str(s["pong_timeouts"]),
                    note,
                ]
            )
        header = ["SERVER", "ADDRESS", "STATE", "SINCE", "LAST PONG", "RTT ms (last/avg/max)", "TIMEOUTS", ""]
    lines.append("")
    lines.extend(_table(header, rows) if rows else ["(no peers)"])
    lines.extend(more)
    events = doc["recent"][-recent:]
    if events and recent:
        lines.append("")
        lines.append("recent changes:")
        for e in events:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            why = f"  {e['reason']}" if e["reason"] else ""
            who = e["peer"] if e["peer"] == e["address"] else f"{e['peer']} ({e['address']})"
            lines.append(f"  {when}  {e['event'].upper():<4}  {who}{why}")
    return "\n".join(lines) + "\n"
