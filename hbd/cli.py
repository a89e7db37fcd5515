"""Command line: ``hbd server``, ``hbd client``, ``hbd check-config``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hbd import __version__
from hbd.config import (
    DEFAULT_CLIENT_CONFIG,
    DEFAULT_SERVER_CONFIG,
    ConfigError,
    load_client_config,
    load_server_config,
)

LOADERS = {"server": load_server_config, "client": load_client_config}
DEFAULTS = {"server": DEFAULT_SERVER_CONFIG, "client": DEFAULT_CLIENT_CONFIG}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbd",
        description="hbd: heartbeat daemon. A TCP server that answers ping with pong and closes silent "
        "clients, and a client that pings servers and reconnects when a link dies.",
        epilog="Signals: SIGHUP reloads the configuration (an invalid file keeps the old one running); "
        "SIGTERM or SIGINT stops cleanly.",
    )
    parser.add_argument("--version", action="version", version=f"hbd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for role, what in (("server", "run the heartbeat server"), ("client", "run the heartbeat client")):
        p = sub.add_parser(role, help=what, description=f"{what.capitalize()} in the foreground.")
        _config_arg(p, role)
        p.add_argument("--host", help="override host from the config")
        p.add_argument("--port", type=int, help="override port from the config")
        p.add_argument("--log-file", metavar="PATH", help="override log_file from the config ('' for none)")
    p = sub.add_parser("check-config", help="validate a configuration file",
                       description="Validate a configuration file: exit 0 if valid, else print every "
                       "error (file, line, key, reason) and exit 1.")
    p.add_argument("role", choices=("server", "client"), help="which daemon the file is for")
    _config_arg(p, None)
    return parser


def _config_arg(p: argparse.ArgumentParser, role: str | None) -> None:
    default = f" (default {DEFAULTS[role]})" if role else " (default /etc/hbd/ROLE.yaml)"
    p.add_argument("-c", "--config", metavar="FILE", help=f"configuration file{default}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    role = args.role if args.command == "check-config" else args.command
    path = args.config or DEFAULTS[role]
    overrides = {k: v for k in ("host", "port", "log_file") if (v := getattr(args, k, None)) is not None}
    try:
        config = LOADERS[role](path, overrides)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"hbd: error: {line}", file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(f"{path}: OK")
        return 0
    if role == "server" and config.workers > 1:
        from hbd.workers import Supervisor as Daemon
    elif role == "server":
        from hbd.server import Server as Daemon
    else:
        from hbd.client import Client as Daemon  # type: ignore[assignment]
    return Daemon(config, overrides=overrides).run()
