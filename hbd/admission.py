"""Who may connect to the server: the allow list and the TLS context, loaded from a configuration
(at start and on every reload, so that new certificates are read)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hbd.access import AllowList
from hbd.config import ServerConfig
from hbd.connection import Connection
from hbd.daemon import StartError

if TYPE_CHECKING:
    import ssl


def shut_out(
    conns: list[Connection], tls_turned_on: bool, allow: AllowList | None
) -> list[tuple[Connection, str, str]]:
    """The connections that a reload's settings no longer admit: (connection, why, event)."""
    out = []
    for conn in conns:
        if allow is not None and not allow.allows(conn.source.strip("[]")):
            out.append((conn, "no longer in the allow list", "denied"))
        elif tls_turned_on and type(conn) is Connection:  # a plain one, now that TLS is required
            out.append((conn, "TLS is now required", "tls-required"))
    return out


def load_security(cfg: ServerConfig) -> tuple[ssl.SSLContext | None, AllowList | None]:
    """The TLS context (None: plain TCP) and allow list (None: everyone); raises StartError."""
    context = None
    if cfg.tls is not None:
        from hbd import tls  # only with TLS: the plain path loads none of it

        try:
            context = tls.server_context(cfg.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise StartError(f"tls: cannot load the certificate files: {exc}") from None
    return context, AllowList(cfg.allow) if cfg.allow else None
