"""``hbd silence PEER DURATION [--reason TEXT]``, ``hbd unsilence PEER`` and ``hbd silences [--json]``:
one request each to the server's status socket (as ``hbd status`` asks it: same -s/-c options, same
permissions). A bad argument is exit 2 with a one-line reason, before anything is sent."""

from __future__ import annotations

import argparse
import json
import sys

from hbd.ask import ask, socket_of
from hbd.silencing import Silence, check_peer, check_reason, check_seconds, until_text
from hbd.status import _table  # the table `hbd status` prints

EXIT_USAGE = 2


def run(args: argparse.Namespace) -> int:
    try:
        request = _request(args)
    except ValueError as exc:
        print(f"hbd {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = socket_of(args, "server")
    doc = ask(path, json.dumps(request, ensure_ascii=False), args.timeout) if path is not None else None
    if doc is None:
        return 1
    try:
        return _show(args, doc)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"hbd: error: {path}: not a {args.command} reply: {exc!r:.200}", file=sys.stderr)
        return 1


def _request(args: argparse.Namespace) -> dict[str, object]:
    """The JSON request, its fields checked as the daemon will check them."""
    if args.command == "silences":
        return {"request": "silences"}
    peer = check_peer(args.peer)
    if args.command == "unsilence":
        return {"request": "unsilence", "peer": peer}
    seconds = check_seconds(args.duration)  # "2h", "90" or "1d"; at most 365d
    return {"request": "silence", "peer": peer, "seconds": seconds, "reason": check_reason(args.reason)}


def _show(args: argparse.Namespace, doc: dict) -> int:
    if args.command == "silence":
        s = Silence.from_json(doc["silence"])
        why = f" ({s.reason})" if s.reason else ""
        print(f"hbd: {s.peer} is silenced until {until_text(s.until, s.created)}{why}")
        return 0
    if args.command == "unsilence":
        if not doc["removed"]:
            print(f"hbd: error: {doc['unsilence']} is not silenced", file=sys.stderr)
            return 1
        print(f"hbd: {doc['unsilence']} is no longer silenced")
        return 0
    silences = [Silence.from_json(item) for item in doc["silences"]]
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    if not silences:
        print("(no silences)")
        return 0
    now = float(doc["now"])
    rows = [[s.peer, until_text(s.until, now), s.reason or "-"] for s in sorted(silences, key=lambda s: s.until)]
    print("\n".join(_table(["PEER", "UNTIL", "REASON"], rows)))
    return 0
