"""Optional TLS: the ``tls:`` config section, SSL contexts, and a non-blocking handshake driver.

Everything stays on the one selectors loop: sockets are wrapped with ``do_handshake_on_connect``
off, and ``Handshake`` retries ``do_handshake()`` whenever the socket becomes readable or writable.
The caller owns the handshake timeout (a loop timer), so closing a connection cancels it the usual
way. Plain TCP stays the default; nothing here is imported on the plain path's hot loop.
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hbd.durations import parse_duration
from hbd.loop import EventLoop
from hbd.quote import cut, show

# The first byte of every TLS connection: a handshake record (ClientHello).
TLS_HANDSHAKE_RECORD = 0x16
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

_SERVER_KEYS = ("cert", "key", "ca", "require_client_cert", "handshake_timeout", "name_from")
NAME_FROM = ("greeting", "certificate")
_CLIENT_KEYS = ("ca", "cert", "key", "server_hostname", "verify", "handshake_timeout")


@dataclass(frozen=True)
class TLSConfig:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    require_client_cert: bool = False  # server only
    server_hostname: str | None = None  # client only; default: the host connected to
    verify: bool = True  # client only: check the server's certificate and name
    handshake_timeout: float = 5.0
    # server only: a peer's identity is its greeting's name, or its certificate's (CN, else the
    # first DNS SAN; a greeting naming another is refused)
    name_from: str = "greeting"


# -- config parsing (called by hbd.config; raises ValueError naming the sub-key) ------------------
def parse_server_tls(value: object) -> TLSConfig | None:
    cfg = _parse(value, _SERVER_KEYS)
    if cfg is None:
        return None
    problems = []
    if not cfg.cert or not cfg.key:
        problems.append("cert and key are both required for a TLS server")
    if cfg.require_client_cert and not cfg.ca:
        problems.append("require_client_cert: needs ca (the CA that signs client certificates)")
    if cfg.name_from == "certificate" and not cfg.require_client_cert:
        problems.append(
            "name_from: certificate needs require_client_cert: true (a client without a certificate would have no name)"
        )
    _raise(problems)
    _try_context(lambda: server_context(cfg))
    return cfg


def parse_client_tls(value: object) -> TLSConfig | None:
    cfg = _parse(value, _CLIENT_KEYS)
    if cfg is None:
        return None
    if bool(cfg.cert) != bool(cfg.key):
        _raise(["cert and key go together (a client certificate needs its key)"])
    _try_context(lambda: client_context(cfg))
    return cfg


def _parse(value: Any, keys: tuple[str, ...]) -> TLSConfig | None:
    if value is None or value is False:
        return None  # plain TCP
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping with {', '.join(keys)}, or null for plain TCP; got {_show(value)}")
    problems: list[str] = []
    out: dict[str, Any] = {}
    for k in value:
        if k not in keys:
            problems.append(f"{k}: unknown key (known keys: {', '.join(keys)})")
    for k in ("cert", "key", "ca"):
        if k in keys and value.get(k) is not None:
            path = value[k]
            if not isinstance(path, str) or not path:
                problems.append(f"{k}: must be a file path, got {_show(path)}")
                continue
            why = _unreadable(path)
            if why:
                problems.append(f"{k}: cannot read {cut(path, 200)}: {why}")
                continue
            out[k] = os.path.abspath(path)
    for k in ("require_client_cert", "verify"):
        if k in keys and k in value:
            if not isinstance(value[k], bool):
                problems.append(f"{k}: must be true or false, got {_show(value[k])}")
            else:
                out[k] = value[k]
    if "server_hostname" in keys and value.get("server_hostname") is not None:
        name = value["server_hostname"]
        if not isinstance(name, str) or not name.strip():
            problems.append(f"server_hostname: must be a host name, got {_show(name)}")
        else:
            out["server_hostname"] = name.strip()
    if "name_from" in keys and "name_from" in value:
        if value["name_from"] not in NAME_FROM:
            problems.append(f"name_from: must be one of {', '.join(NAME_FROM)}, got {_show(value['name_from'])}")
        else:
            out["name_from"] = value["name_from"]
    if "handshake_timeout" in value:
        t = value["handshake_timeout"]
        if isinstance(t, str):
            try:
                t = parse_duration(t)  # "5s", like every other seconds key
            except ValueError:
                pass  # reported below with the value as given
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 300:
            problems.append(
                f"handshake_timeout: must be seconds between 0 and 300, got {_show(value['handshake_timeout'])}"
            )
        else:
            out["handshake_timeout"] = float(t)
    _raise(problems)
    return TLSConfig(**out)


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


MAX_PEM_BYTES = 1024 * 1024  # a certificate chain or key file; more is not a PEM file we want


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be a certificate or key file, or None. Never blocks: a FIFO, a device
    or a directory is refused before the ssl module would read it (for ever, or without end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return "it is a directory"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size > MAX_PEM_BYTES:
            return f"too large ({st.st_size} bytes, at most {MAX_PEM_BYTES})"
        os.read(fd, 1)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
    return None


def _try_context(build: Callable[[], ssl.SSLContext]) -> None:
    """Load the files now, so a bad PEM or a key that does not match is a config error."""
    try:
        build()
    except (ssl.SSLError, OSError, ValueError) as exc:
        # ssl.SSLError has .reason; a plain OSError (the file vanished, a directory) has only .strerror
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ValueError(f"cannot load the certificate files: {cut(str(why), 120)}") from None


_show = show


# -- contexts ---------------------------------------------------------------------------------------
def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.num_tickets = 0  # heartbeat links are long-lived: session tickets are wasted bytes
    assert cfg.cert and cfg.key
    ctx.load_cert_chain(cfg.cert, cfg.key)
    if cfg.ca:
        ctx.load_verify_locations(cfg.ca)  # only this CA vouches for clients, not the system store
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.verify:
        if cfg.ca:
            ctx.load_verify_locations(cfg.ca)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert and cfg.key:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    return ctx


# -- the handshake ------------------------------------------------------------------------------------
class Handshake:
    """Drives ``do_handshake()`` of a non-blocking SSLSocket from the loop's readiness events."""

    __slots__ = ("done", "failed", "loop", "sock")

    def __init__(
        self, loop: EventLoop, sock: ssl.SSLSocket, done: Callable[[], None], failed: Callable[[str], None]
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.done = done
        self.failed = failed

    def step(self) -> None:
        loop, sock = self.loop, self.sock
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            loop.remove_writer(sock)
            loop.add_reader(sock, self.step)
            return
        except ssl.SSLWantWriteError:
            loop.remove_reader(sock)
            loop.add_writer(sock, self.step)
            return
        except (ssl.SSLError, OSError) as exc:
            loop.remove_reader(sock)
            loop.remove_writer(sock)
            self.failed(describe(exc))
            return
        loop.remove_reader(sock)
        loop.remove_writer(sock)
        self.done()


_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "UNKNOWN_PROTOCOL",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LAYER_FAILURE",
    "UNEXPECTED_RECORD",
}


def describe(exc: BaseException) -> str:
    """A TLS failure in words an operator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message or exc.reason}"
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return (
            "the peer closed the connection without a TLS goodbye (does it speak TLS? does it accept our certificate?)"
        )
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate (require_client_cert is on)"
    if reason in _NOT_TLS:
        return f"not TLS ({reason.lower().replace('_', ' ')}): a plain-TCP peer on a TLS port?"
    if reason and "ALERT" in reason:
        # The peer refused the handshake and said why, e.g. TLSV1_ALERT_UNKNOWN_CA, CERTIFICATE_EXPIRED.
        what = reason.lower().replace("_", " ").replace("sslv3 alert ", "").replace("tlsv13 alert ", "")
        return f"the peer rejected the handshake: {what.replace('tlsv1 alert ', '')}"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError):
        return f"connection error: {exc.strerror or exc}"
    return f"TLS error: {reason or exc}"


def peer_name(sock: ssl.SSLSocket) -> str | None:
    """The CN of the verified peer certificate, for log lines."""
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    subject: Any = (cert or {}).get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def certificate_name(sock: ssl.SSLSocket) -> str | None:
    """The name a verified peer certificate gives its holder (``tls.name_from: certificate``): its
    CN, else its first DNS subjectAltName."""
    name = peer_name(sock)
    if name is not None:
        return name
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    sans: Any = (cert or {}).get("subjectAltName", ())
    for kind, value in sans:
        if kind == "DNS":
            return str(value)
    return None
