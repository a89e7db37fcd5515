"""Command line: ``hbd server``, ``hbd client``, ``hbd check-config``, ``hbd status``, ``hbd reload``,
``hbd silence``, ``hbd unsilence``, ``hbd silences``, ``hbd history``."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hbd import __version__
from hbd.config import (
    DEFAULT_CLIENT_CONFIG,
    DEFAULT_CLIENT_SOCKET,
    DEFAULT_SERVER_CONFIG,
    DEFAULT_SERVER_SOCKET,
    ClientConfig,
    ConfigError,
    ServerConfig,
    config_role,
    load_client_config,
    load_server_config,
    parse_duration,
    read_document,
)
from hbd.status_filter import DEFAULT_LIMIT, MAX_LIMIT

if TYPE_CHECKING:
    from hbd.daemon import Daemon

LOADERS: dict[str, Callable[..., ServerConfig | ClientConfig]] = {
    "server": load_server_config,
    "client": load_client_config,
}
DEFAULTS = {"server": DEFAULT_SERVER_CONFIG, "client": DEFAULT_CLIENT_CONFIG}
DEFAULT_SOCKETS = {"server": DEFAULT_SERVER_SOCKET, "client": DEFAULT_CLIENT_SOCKET}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hbd",
        description="hbd: heartbeat daemon. A TCP server that answers ping with pong and closes silent "
        "clients, and a client that pings servers and reconnects when a link dies.",
        epilog="Signals: SIGHUP reloads the configuration (an invalid file keeps the old one running); "
        "SIGUSR1 logs a status line; SIGUSR2 reopens the log file; SIGTERM or SIGINT stops cleanly.",
    )
    parser.add_argument("--version", action="version", version=f"hbd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for role, what in (("server", "run the heartbeat server"), ("client", "run the heartbeat client")):
        p = sub.add_parser(role, help=what, description=f"{what.capitalize()} in the foreground.")
        _config_arg(p, role)
        p.add_argument("--host", help="override host from the config")
        p.add_argument("--port", type=int, help="override port from the config")
        p.add_argument("--log-file", metavar="PATH", help="override log_file from the config ('' for none)")
        p.add_argument("--control-socket", metavar="PATH", help="override control_socket from the config ('' for none)")
    p = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file: exit 0 if valid, else print every "
        "error (file, line, key, reason) and exit 1.",
    )
    p.add_argument("role", choices=("server", "client"), help="which daemon the file is for")
    _config_arg(p, None)
    p = sub.add_parser(
        "status",
        help="show a running daemon's peers",
        description="Ask a running daemon for its peers through its status socket and print "
        "the counts by state, then a table of the first --limit peers that match (problems first), "
        "or the JSON document. The server applies the filter itself. Without ROLE or -s: the server's "
        "socket if it exists, else the client's. Exit 1 if the daemon cannot be reached.",
    )
    p.add_argument("role", nargs="?", metavar="ROLE", help="which daemon to ask: server or client")
    p.add_argument(
        "peer",
        nargs="?",
        metavar="PEER",
        help="only the peers whose name or address matches this name or glob (web*, 10.0.0.*); "
        "a lone argument that is not server or client is PEER",
    )
    p.add_argument(
        "--state",
        metavar="STATES",
        help="only peers in these states, comma-separated: DOWN,LATE,NEW,UP (any case)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show at most N peers, problems first (default {DEFAULT_LIMIT}, at most {MAX_LIMIT}; 0: all)",
    )
    p.add_argument("--all", action="store_true", help="show every matching peer (the same as --limit 0)")
    p.add_argument("-s", "--socket", metavar="PATH", help="the status socket (default /run/hbd/ROLE.sock)")
    p.add_argument("-c", "--config", metavar="FILE", help="take control_socket from this configuration file")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON document instead of a table")
    p.add_argument("--recent", type=int, default=10, metavar="N", help="show the last N state changes (default 10)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="give up after this long")
    p = sub.add_parser(
        "reload",
        help="reload a running daemon and wait for its verdict",
        description="Ask a running daemon to reload its configuration through its status socket "
        "and wait for the answer: exit 0 when the new configuration is applied, 1 when it is "
        "rejected (the reasons go to stderr) or the daemon cannot be asked. Without a reachable "
        "socket and with --pid: validate the file here, send SIGHUP and exit 0/1 by that "
        "validation alone (the daemon's own verdict is then only in its log). The units' "
        "ExecReload= runs it.",
    )
    p.add_argument(
        "role", nargs="?", choices=("server", "client"), default="server", help="which daemon (default server)"
    )
    p.add_argument(
        "-s",
        "--socket",
        metavar="PATH",
        help="the status socket (default: control_socket of -c, else /run/hbd/ROLE.sock)",
    )
    p.add_argument(
        "-c", "--config", metavar="FILE", help="the daemon's configuration file (default /etc/hbd/ROLE.yaml)"
    )
    p.add_argument(
        "--pid",
        type=int,
        metavar="PID",
        help="the daemon's process (systemd: $MAINPID): the socket "
        "must belong to it, and without a socket it gets SIGHUP",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up waiting for the answer after this long (default 30)",
    )
    p = sub.add_parser(
        "silence",
        help="silence a peer for maintenance",
        description="Ask the running server to silence PEER for DURATION (90s, 30m, 2h, 1d, or seconds): "
        "it is still tracked and shown, its state changes are logged at info and its hooks do not run "
        "until the silence ends. A new silence of the peer replaces its old one.",
    )
    p.add_argument("peer", metavar="PEER", help="the peer's name")
    p.add_argument("duration", metavar="DURATION", help="how long: 90s, 30m, 2h, 1d (at most 365d)")
    p.add_argument("--reason", metavar="TEXT", default="", help="why (shown with the silence; at most 200 characters)")
    _socket_args(p)
    p = sub.add_parser("unsilence", help="end a peer's silence", description="End PEER's silence now.")
    p.add_argument("peer", metavar="PEER", help="the peer's name")
    _socket_args(p)
    p = sub.add_parser(
        "silences",
        help="list the silences in force",
        description="List the running server's silences: PEER, UNTIL (local time) and REASON.",
    )
    p.add_argument("--json", action="store_true", help="print the server's JSON document instead of a table")
    _socket_args(p)
    p = sub.add_parser(
        "history",
        help="show the peers' uptime and outages from the state store",
        description="Read the server's state store (state_dir of its configuration) read-only, while the "
        "server runs or not (a client's configuration: the client's store, its server links), and show "
        "per peer: uptime over the last 24 h, 7 d and 30 d (time UP or LATE "
        "over the time known; time the server was not running is shown apart as unknown), the outages "
        "of the last DURATION (count, total, longest), when it was last seen and a timeline of the last "
        "24 h. With PEER: that peer's outages and changes too. Exit 1 if the store cannot be read.",
    )
    p.add_argument("peer", nargs="?", metavar="PEER", help="show this peer only, with its outages and changes")
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"the server's or the client's configuration, for state_dir (default {DEFAULT_SERVER_CONFIG})",
    )
    p.add_argument(
        "--since",
        type=_since,
        default=DEFAULT_SINCE,
        metavar="DURATION",
        help="count outages (and list a peer's changes) over this long, such as 90s, 30m, 2h or 1d (default 7d)",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as a JSON document")
    return parser


def _socket_args(p: argparse.ArgumentParser) -> None:
    """-s/-c/--timeout of the commands that ask the server (silence, unsilence, silences)."""
    p.add_argument("-s", "--socket", metavar="PATH", help="the server's status socket (default /run/hbd/server.sock)")
    p.add_argument("-c", "--config", metavar="FILE", help="take control_socket from this server configuration file")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="give up after this long (default 10)"
    )


DEFAULT_SINCE = 7 * 86400.0
MAX_SINCE = 3650 * 86400.0


def _since(text: str) -> float:
    """--since: a duration, more than zero (argparse reports the ValueError's words)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < seconds <= MAX_SINCE:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3650d, got {text!r}")
    return seconds


def _config_arg(p: argparse.ArgumentParser, role: str | None) -> None:
    default = f" (default {DEFAULTS[role]})" if role else " (default /etc/hbd/ROLE.yaml)"
    p.add_argument("-c", "--config", metavar="FILE", help=f"configuration file{default}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return status(args)
    if args.command == "reload":
        return reload(args)
    if args.command in ("silence", "unsilence", "silences"):
        from hbd import silence_cli

        return silence_cli.run(args)
    if args.command == "history":
        return history(args)
    if args.command in ("server", "client"):
        _enable_faulthandler()
    role = args.role if args.command == "check-config" else args.command
    path = args.config or DEFAULTS[role]
    overrides = {
        k: v for k in ("host", "port", "log_file", "control_socket") if (v := getattr(args, k, None)) is not None
    }
    try:
        config = LOADERS[role](path, overrides)
    except ConfigError as exc:
        if args.command == "check-config":
            for line in exc.errors:
                print(f"hbd: error: {line}", file=sys.stderr)
            return 1
        from hbd.daemon import EXIT_CONFIG
        from hbd.logs import report_start_errors

        report_start_errors(f"hbd-{role}", exc.errors, _start_log_file(role, path, overrides))
        return EXIT_CONFIG  # permanent: the units do not restart on it
    if args.command == "check-config":
        print(f"{path}: OK")
        return 0
    daemon: Daemon
    if isinstance(config, ServerConfig) and config.workers > 1:
        from hbd.workers import Supervisor

        daemon = Supervisor(config, overrides=overrides)
    elif isinstance(config, ServerConfig):
        from hbd.server import Server

        daemon = Server(config, overrides=overrides)
    else:
        from hbd.client import Client

        daemon = Client(config, overrides=overrides)
    return daemon.run()


def _enable_faulthandler() -> None:
    """A fatal signal (the watchdog's SIGABRT, SIGSEGV...) dumps the Python stack of the thread it hit to
    stderr, which is the journal under systemd: a hung loop shows where it hung. That thread is the
    loop's for a signal sent to the process, since every helper thread blocks those (hbd.early.start_quiet), and the
    faulting one for a fault. Only that thread's stack: systemd sends SIGCONT right after the
    watchdog's SIGABRT, so the other threads run again while the handler would walk their frames. A
    dump of the store's writer first (the newer thread) once crashed that way before the loop's stack
    was written ("Fatal Python error: Segmentation fault" after the writer's first frame)."""
    try:
        faulthandler.enable(file=sys.stderr, all_threads=False)
    except (AttributeError, ValueError, OSError):  # stderr is not a real file (tests capture it)
        pass


def _start_log_file(role: str, path: str, overrides: dict) -> str | None:
    """Where an invalid configuration is reported: --log-file, else the file's own log_file if that much
    of it reads, else the default."""
    if "log_file" in overrides:
        return overrides["log_file"] or None
    default = (ServerConfig if role == "server" else ClientConfig).log_file
    doc = read_document(path)  # never hangs or explodes, whatever the path names and holds
    value = doc.get("log_file", default) if isinstance(doc, dict) else default
    if value is None:
        return None  # log_file: null
    return value if isinstance(value, str) and value else default


def reload(args: argparse.Namespace) -> int:
    """``hbd reload``: ask the daemon to reload over its status socket, wait for applied/rejected."""
    from hbd.control import server_pid

    path = args.config or DEFAULTS[args.role]
    config, errors = None, []
    if args.config or not args.socket or args.pid:  # for the socket's path, or to judge without a socket
        try:
            config = LOADERS[args.role](path)
        except ConfigError as exc:
            errors = exc.errors  # the daemon will reject it too; it still gets asked, so it logs the reason
    if args.socket:
        candidates = [args.socket]
    else:
        # The running daemon listens where the *current* config said; the new file may name another
        # socket or not read at all: try its socket, then the default.
        candidates = [c for c in (config.control_socket if config else None, DEFAULT_SOCKETS[args.role]) if c]
        if config is not None and config.control_socket is None:
            candidates = []  # control_socket: null: no socket to ask
    problems, mismatched = [], False
    for candidate in dict.fromkeys(candidates):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(args.timeout)
                s.connect(candidate)
                pid = server_pid(s)
                if args.pid and pid and pid != args.pid:
                    problems.append(f"{candidate}: belongs to pid {pid}, not {args.pid}")
                    mismatched = True
                    continue
                s.sendall(b"reload\n")
                reply = _read_reply(s)
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                _error(
                    f"hbd: error: {candidate}: no answer within {args.timeout:g} s; the reload may still "
                    "be applied (see the daemon's log)"
                )
                return 1
            problems.append(f"{candidate}: {exc.strerror or exc}")
            continue
        try:
            doc = json.loads(reply)
        except ValueError:
            _error(f"hbd: error: {candidate}: no answer to the reload (the daemon stopped?)")
            return 1
        if "error" in doc:
            _error(f"hbd: error: {candidate}: {doc['error']}")
            return 1
        if doc.get("reload") == "ok":
            print(f"hbd: {path}: reloaded")
            return 0
        for line in doc.get("errors") or ["rejected"]:
            _error(f"hbd: error: reload failed: {line}")
        _error("hbd: error: still running with the previous configuration")
        return 1
    if not args.pid or mismatched:  # a socket of another process: something is off, signal nobody
        where = "; ".join(problems) or f"{path} sets no control_socket"
        for line in errors:  # what the daemon would say, as far as this side can tell
            _error(f"hbd: error: {line}")
        hint = "" if args.pid else " (--pid PID sends SIGHUP instead)"
        _error(f"hbd: error: cannot ask the daemon to reload: {where}{hint}")
        return 1
    # No socket to ask: SIGHUP as `kill -HUP` would, judged by this validation alone.
    try:
        os.kill(args.pid, signal.SIGHUP)
    except OSError as exc:
        _error(f"hbd: error: cannot signal pid {args.pid}: {exc.strerror or exc}")
        return 1
    if errors:
        for line in errors:
            _error(f"hbd: error: reload failed: {line}")
        _error("hbd: error: still running with the previous configuration")
        return 1
    print(
        f"hbd: {path} is valid; sent SIGHUP to pid {args.pid} (no status socket: the daemon's verdict "
        "is only in its log)",
        file=sys.stderr,
    )
    return 0


def _error(line: str) -> None:
    """An error line of `hbd reload`: under systemd (ExecReload=) its stderr is the journal, where the
    "<3>" prefix makes it priority err."""
    from hbd.logs import under_journald

    print(f"<3>{line}" if under_journald() else line, file=sys.stderr)


def _read_reply(s: socket.socket, limit: int = 1 << 20) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def status(args: argparse.Namespace) -> int:
    """``hbd status``: one request to a status socket, printed as a table or as JSON. With a filter
    or a limit (the default), the ``select`` request: the daemon picks the rows."""
    from hbd import status as st
    from hbd.ask import ask, socket_of
    from hbd.status_doc import StatusDocError, parse_document
    from hbd.status_filter import FilterError, StatusFilter, parse_states

    if args.role not in (None, "server", "client"):
        if args.peer is not None:
            print(f"hbd: error: ROLE is server or client, got {args.role!r}", file=sys.stderr)
            return 2
        args.role, args.peer = None, args.role  # hbd status web1
    try:
        states = parse_states(args.state) if args.state is not None else None
        flt = StatusFilter(states, args.peer, 0 if args.all else args.limit)
    except FilterError as exc:
        hint = "; --all lists every match" if "limit" in str(exc) else ""
        print(f"hbd: error: {exc}{hint}", file=sys.stderr)
        return 2
    path = socket_of(args, args.role)
    request = "status" if flt.everything else json.dumps(flt.to_request())
    doc = ask(path, request, args.timeout, _explain) if path is not None else None
    if doc is None:
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    try:
        parsed = parse_document(doc)
    except StatusDocError as exc:
        print(f"hbd: error: {path}: not a status reply: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(st.render(parsed, recent=max(args.recent, 0)))
    return 0


def _explain(error: str) -> str:
    """A daemon's refusal of ``select``, as the operator can act on it."""
    if error.startswith("unknown command 'select'"):
        return (
            "this daemon is older than status filters (select) and can only send its whole status: "
            "hbd status --all, without --state or PEER"
        )
    return error


def _wall() -> float:
    """Wall-clock now for ``hbd history`` (tests replace it: virtual time)."""
    import time

    return time.time()


def _state_dir(config_path: str) -> tuple[str | None, str]:
    """The daemon's state_dir (None: it keeps no store) and which daemon the file is for ("server" or
    "client": config_role); ConfigError if the file is invalid."""
    role = config_role(config_path)
    loader = load_client_config if role == "client" else load_server_config
    return loader(config_path).state_dir, role


def history(args: argparse.Namespace) -> int:
    """``hbd history``: uptime and outages per peer (a client's: per server link), from the state
    store of the daemon the configuration is for (read-only)."""
    from hbd import history_report as hr
    from hbd.history import WINDOWS
    from hbd.history_reader import HistoryError, HistoryStore, store_path

    path = args.config or DEFAULT_SERVER_CONFIG
    try:
        state_dir, role = _state_dir(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"hbd: error: {line}", file=sys.stderr)
        return 1
    if state_dir is None:
        print(f"hbd: error: {path} sets state_dir: null: the {role} keeps no history", file=sys.stderr)
        return 1
    now = _wall()
    since = now - max(args.since, *WINDOWS.values())  # as far back as any number needs
    try:
        with HistoryStore(store_path(state_dir, role), role) as store:
            report = hr.build(
                store.path,
                store.histories(since, args.peer),
                store.runs(since, now),
                store.last_pings(args.peer),
                store.first_seen(args.peer),
                now,
                args.since,
                detail=args.peer is not None,
                daemon=role,
            )
    except HistoryError as exc:
        print(f"hbd: error: {exc}", file=sys.stderr)
        return 1
    if args.peer is not None and not report.peers:
        print(f"hbd: error: {report.path}: no history of a peer named {args.peer!r}", file=sys.stderr)
        return 1
    try:
        if args.json:
            sys.stdout.writelines(hr.chunks(report))
        else:
            ascii_only = hr.needs_ascii(getattr(sys.stdout, "encoding", None))
            sys.stdout.write(hr.render(report, hr.ASCII if ascii_only else hr.BLOCKS))
        sys.stdout.flush()
    except BrokenPipeError:  # `hbd history | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
    return 0
