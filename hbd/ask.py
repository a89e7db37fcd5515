"""The commands' side of the status socket (``hbd status``, ``hbd silence`` ...): which socket to ask,
and one request there with its errors printed as the operator can act on them (blocking: for the CLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from hbd.config import DEFAULT_CLIENT_SOCKET, DEFAULT_SERVER_SOCKET, ConfigError, load_client_config, load_server_config

DEFAULT_SOCKETS = {"server": DEFAULT_SERVER_SOCKET, "client": DEFAULT_CLIENT_SOCKET}


def socket_of(args: argparse.Namespace, role: str | None) -> str | None:
    """The status socket to ask: -s, else the control_socket of -c (a ``role`` file, server if
    None), else ROLE's default (without a role: the server's if it exists, else the client's).
    None once the reason there is none has been printed."""
    path: str | None = args.socket
    if path is None and args.config:
        try:
            load = load_client_config if role == "client" else load_server_config
            path = load(args.config).control_socket
        except ConfigError as exc:
            for line in exc.errors:
                print(f"hbd: error: {line}", file=sys.stderr)
            return None
        if path is None:
            print(f"hbd: error: {args.config} sets no control_socket", file=sys.stderr)
            return None
    if path is None:
        roles = [role] if role else ["server", "client"]
        candidates = [DEFAULT_SOCKETS[r] for r in roles]
        path = next((c for c in candidates if os.path.exists(c)), candidates[0])
    return path


def ask(
    path: str, request: str, timeout: float, explain: Callable[[str], str] | None = None
) -> dict[str, object] | None:
    """Send one request to a status socket and return its JSON reply; None once an error
    (unreachable, no permission, an error reply: through ``explain`` if given) has been printed."""
    from hbd.control import query

    try:
        reply = query(path, request, timeout=timeout)
        doc = json.loads(reply)
        if not isinstance(doc, dict):
            raise ValueError(f"got {type(doc).__name__}")
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
            hint = " (is the daemon running? -s names another socket)"
        elif isinstance(exc, PermissionError):
            hint = " (the socket is mode 0660: run as root or as a member of the daemon's group, e.g. _hbd)"
        print(f"hbd: error: {path}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return None
    except ValueError as exc:
        print(f"hbd: error: {path}: not a status reply: {exc}", file=sys.stderr)
        return None
    if "error" in doc:
        error = str(doc["error"])
        print(f"hbd: error: {path}: {explain(error) if explain else error}", file=sys.stderr)
        return None
    return doc
