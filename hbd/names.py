"""Listen addresses (the server's port, the metrics endpoint) resolved in bounded time, and the one
helper that binds a TCP listener to them.

An IP address needs no lookup. A host name is looked up on a short-lived thread that the caller
waits for at most RESOLVE_TIMEOUT: a reload runs on the event loop, and a DNS server that does not
answer must not hold it (glibc retries for up to 30 s). Every failure is an OSError with a reason.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading

from hbd.early import start_quiet
from hbd.errors import BindError as BindError  # re-exported: where callers import it from

RESOLVE_TIMEOUT = 0.1  # seconds a listen host name may take to resolve; an IP address takes none
MAX_PENDING = 4  # lookups still running in the background (a DNS that hangs): refuse more

_pending = 0
_lock = threading.Lock()


def bind_tcp(host: str, port: int, backlog: int | None = 16, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket bound to ``host``:``port`` and listening (``backlog`` None: bound
    only, to check that the address can be had). ``reuse_port``: several processes share the port
    (the workers) and the kernel spreads the connections over them. Raises BindError."""
    try:
        family, stype, proto, _, addr = listen_info(host, port)  # a host name: bounded wait
        sock = socket.socket(family, stype, proto)
    except OSError as exc:
        raise BindError(f"cannot resolve listen address {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def listen_info(host: str, port: int, timeout: float = RESOLVE_TIMEOUT) -> tuple:
    """The first (family, type, proto, canonname, sockaddr) to listen on ``host``:``port``."""
    global _pending
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return _lookup(host, port, socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    result: list = []

    def work() -> None:
        global _pending
        try:
            result.append(_lookup(host, port, socket.AI_PASSIVE))
        except OSError as exc:
            result.append(exc)
        with _lock:
            _pending -= 1

    with _lock:
        if _pending >= MAX_PENDING:
            raise OSError(errno.EAGAIN, f"cannot resolve {host}: earlier lookups have not answered yet")
        _pending += 1
    thread = threading.Thread(target=work, name=f"resolve {host}", daemon=True)
    start_quiet(thread)  # signals are the loop's
    thread.join(timeout)  # /etc/hosts or a cache answers in ~1 ms
    if not result:
        raise OSError(errno.ETIMEDOUT, f"resolving {host} took more than {timeout:g} s (an IP address needs no lookup)")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def _lookup(host: str, port: int, flags: int) -> tuple:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)[0]
    except ValueError as exc:  # UnicodeError: a name the IDNA codec refuses (empty or long label)
        raise OSError(errno.EINVAL, f"invalid host name {host[:60]!r}: {exc}") from None
