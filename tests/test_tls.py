"""TLS and mTLS between real hbd processes; certificates made with the openssl command line."""

import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import yaml
from certs import Pair, make_ca, make_cert
from daemons import connect, recv_exactly, start_client, start_server

from hbd.config import ConfigError, load_client_config, load_server_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Pair]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    other = make_ca(d, "otherca")
    return {
        "ca": ca,
        "other": other,
        "server": make_cert(d, ca, "server", server=True),
        "client": make_cert(d, ca, "client1", server=False),
        "stranger": make_cert(d, other, "stranger", server=False),
        "expired": make_cert(d, ca, "expired", server=False, days=-1),
    }


def server_tls(pki, **kw) -> dict:
    return {
        "cert": pki["server"].cert,
        "key": pki["server"].key,
        "ca": pki["ca"].cert,
        "require_client_cert": True,
        "handshake_timeout": 1,
        **kw,
    }


def client_tls(pki, who: str | None = "client", **kw) -> dict:
    out = {"ca": pki["ca"].cert, "handshake_timeout": 1, **kw}
    if who:
        out |= {"cert": pki[who].cert, "key": pki[who].key}
    return out


def tls_socket(port: int, pki, who: str | None = "client") -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=pki["ca"].cert)
    if who:
        ctx.load_cert_chain(pki[who].cert, pki[who].key)
    return ctx.wrap_socket(connect(port), server_hostname="127.0.0.1")


def test_mtls_client_with_the_right_certificate_pings(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki))
    procs.append(srv)
    srv.wait_for(r"listening on .*TLS with client certificates")
    cli = start_client(tmp_path, srv.config["port"], tls=client_tls(pki))
    procs.append(cli)
    for _ in range(3):
        cli.wait_for(r"INFO .*pong from 127\.0\.0\.1:\d+ in", after=cli.mark())
    srv.wait_for(r"INFO .*client 127\.0\.0\.1:\d+ connected \(TLS, certificate CN=client1\)")
    assert cli.count("lost") == 0 and srv.count("WARNING") == 0


def test_framing_over_tls(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki))
    procs.append(srv)
    with tls_socket(srv.config["port"], pki) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        s.sendall(b"pi")
        time.sleep(0.05)
        s.sendall(b"ng\npingping\n")
        assert recv_exactly(s, 14) == b"pong\npongpong\n"


@pytest.mark.parametrize(
    ("who", "server_line"),
    [
        (None, r"no client certificate \(require_client_cert is on\)"),
        ("stranger", r"certificate rejected: unable to get local issuer certificate"),
        ("expired", r"certificate rejected: certificate has expired"),
    ],
    ids=["no-cert", "other-ca", "expired"],
)
def test_mtls_rejects_bad_client_certificates(tmp_path: Path, procs, pki, who, server_line) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki))
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"], tls=client_tls(pki, who), reconnect_delay=0.5)
    procs.append(cli)
    srv.wait_for(r"WARNING .*TLS handshake with 127\.0\.0\.1:\d+ failed: " + server_line)
    # The client learns it too (TLS 1.3 finishes the client's side first, so it may be the first read).
    cli.wait_for(r"WARNING .*(TLS handshake failed|lost): .*(the peer rejected the handshake|without a TLS goodbye)")
    assert cli.count("pong from") == 0
    assert "connected (TLS" not in srv.output()


def test_plain_tcp_client_against_the_tls_port(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki))
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"])  # no tls section: plain TCP
    procs.append(cli)
    srv.wait_for(
        r"WARNING .*TLS handshake with 127\.0\.0\.1:\d+ failed: not TLS \(it sent b'ping'\): "
        r"a plain-TCP client on the TLS port\?"
    )
    cli.wait_for(r"WARNING .*lost: server closed the connection")
    assert cli.count("pong from") == 0


def test_tls_client_against_a_plain_server(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path)
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"], tls=client_tls(pki))
    procs.append(cli)
    cli.wait_for(r"WARNING .*TLS handshake failed: the peer closed the connection without a TLS goodbye")
    srv.wait_for(r"WARNING .*closing client 127\.0\.0\.1:\d+: unexpected bytes b'\\x16")


def test_client_rejects_a_server_certificate_from_another_ca(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki, require_client_cert=False))
    procs.append(srv)
    tls = client_tls(pki, None) | {"ca": pki["other"].cert}
    cli = start_client(tmp_path, srv.config["port"], tls=tls)
    procs.append(cli)
    cli.wait_for(
        r"WARNING .*TLS handshake failed: certificate rejected: "
        r"(unable to get local issuer certificate|self-signed certificate in certificate chain)"
    )


def test_client_checks_the_server_name(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki, require_client_cert=False))
    procs.append(srv)
    cli = start_client(tmp_path, srv.config["port"], tls=client_tls(pki, None, server_hostname="hbd.example"))
    procs.append(cli)
    cli.wait_for(r"WARNING .*TLS handshake failed: certificate rejected: Hostname mismatch")


def test_handshake_timeout_closes_a_stalled_handshake(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, tls=server_tls(pki, handshake_timeout=0.5), heartbeat_timeout=5)
    procs.append(srv)
    with connect(srv.config["port"]) as s:
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        t0 = time.monotonic()
        s.settimeout(3)
        assert s.recv(10) == b""
        took = time.monotonic() - t0
    assert 0.45 <= took <= 0.7, took
    srv.wait_for(r"WARNING .*failed: no TLS handshake within handshake_timeout \(0\.5 s\)")


def test_tls_optional_client_cert_and_silence_rule(tmp_path: Path, procs, pki) -> None:
    """Without require_client_cert a client needs no certificate; the silence rule is unchanged."""
    srv = start_server(tmp_path, tls=server_tls(pki, require_client_cert=False), heartbeat_timeout=0.5)
    procs.append(srv)
    with tls_socket(srv.config["port"], pki, None) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
        t0 = time.monotonic()
        s.settimeout(3)
        assert s.recv(10) == b""
        assert time.monotonic() - t0 <= 0.6
    srv.wait_for(r"timed out: silent for 0\.5")


def test_reload_turns_tls_on_and_closes_plain_clients(tmp_path: Path, procs, pki) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=5)
    procs.append(srv)
    port = srv.config["port"]
    with connect(port) as s:
        s.sendall(b"ping")
        recv_exactly(s, 4)
        srv.write_config({**srv.config, "tls": server_tls(pki)})
        srv.signal(signal.SIGHUP)
        srv.wait_for("closing client .*: TLS is now required")
        s.settimeout(2)
        assert s.recv(10) == b""
    with tls_socket(port, pki) as t:
        t.sendall(b"ping")
        assert recv_exactly(t, 4) == b"pong"


def test_tls_config_errors_name_the_key(tmp_path: Path, pki) -> None:
    def errors(loader, text: str) -> list[str]:
        p = tmp_path / "c.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError) as info:
            loader(p)
        return info.value.errors

    missing = tmp_path / "nope.crt"
    (e,) = errors(load_server_config, f"tls:\n  cert: {missing}\n  key: {pki['server'].key}\n")
    assert f"line 1: tls: cert: cannot read {missing}: No such file or directory" in e
    (e,) = errors(load_server_config, f"tls:\n  cert: {pki['server'].cert}\n")
    assert "tls: cert and key are both required" in e
    (e,) = errors(load_server_config, f"tls:\n  cert: {pki['server'].cert}\n  key: {pki['client'].key}\n")
    assert "tls: cannot load the certificate files: KEY_VALUES_MISMATCH" in e
    (e,) = errors(
        load_server_config,
        f"tls:\n  cert: {pki['server'].cert}\n  key: {pki['server'].key}\n  require_client_cert: yes please\n",
    )
    assert "require_client_cert: must be true or false" in e
    (e,) = errors(load_client_config, "tls:\n  certificate: x\n")
    assert "tls: certificate: unknown key" in e
    (e,) = errors(load_client_config, "tls: [1]\n")
    assert "tls: must be a mapping" in e
    cfg = load_client_config(_write(tmp_path, "tls:\n  verify: false\n"))
    assert cfg.tls is not None and cfg.tls.verify is False


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ok.yaml"
    p.write_text(text)
    return p


def test_no_tls_section_means_plain_tcp(tmp_path: Path) -> None:
    assert load_server_config(_write(tmp_path, "port: 1234\n")).tls is None
    assert socket  # plain TCP is covered by the rest of the suite


# -- certificate files that cannot be loaded are configuration errors (issue 15, point 15) -------------
def _bad_cert(tmp_path: Path, pki, case: str) -> tuple[dict, str]:
    """A tls section whose files cannot be used, and the error expected for it."""
    bad = tmp_path / f"bad-{case}"
    good = {"cert": pki["server"].cert, "key": pki["server"].key}
    if case == "directory":
        bad.mkdir()
        return {**good, "cert": str(bad)}, r"tls: cert: cannot read .*: it is a directory"
    if case == "missing":
        return {**good, "key": str(bad)}, r"tls: key: cannot read .*: No such file or directory"
    if case == "garbage":
        bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        return {**good, "cert": str(bad)}, r"tls: cannot load the certificate files: \S+"
    if case == "mismatch":
        return {**good, "key": pki["client"].key}, r"tls: cannot load the certificate files: KEY_VALUES_MISMATCH"
    if case == "fifo":
        os.mkfifo(bad)
        return {**good, "cert": str(bad)}, r"tls: cert: cannot read .*: not a regular file"
    if case == "dev-zero":
        bad.symlink_to("/dev/zero")
        return {**good, "key": str(bad)}, r"tls: key: cannot read .*: not a regular file"
    raise AssertionError(case)


TLS_CASES = ["directory", "missing", "garbage", "mismatch", "fifo", "dev-zero"]


@pytest.mark.parametrize("case", TLS_CASES)
def test_unusable_certificate_files_are_config_errors(tmp_path: Path, pki, case: str) -> None:
    section, expected = _bad_cert(tmp_path, pki, case)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"tls": section}))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_server_config(p)
    assert time.monotonic() - t0 < 1.0  # a FIFO or /dev/zero is refused, never read
    (e,) = info.value.errors
    assert re.search(expected, e), e
    p.write_text(yaml.safe_dump({"tls": {**section, "ca": pki["ca"].cert}}))
    with pytest.raises(ConfigError):
        load_client_config(p)


def test_a_plain_oserror_while_loading_is_a_config_error() -> None:
    """The file can vanish between the check and the load: ssl then raises a plain OSError, which
    has no .reason (this used to be an AttributeError, a traceback instead of an error line)."""
    from hbd import tls

    def vanished():
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(ValueError, match="cannot load the certificate files: No such file or directory"):
        tls._try_context(vanished)


@pytest.mark.parametrize("case", TLS_CASES)
def test_reload_with_unusable_certificates_keeps_serving(tmp_path: Path, procs, pki, case: str) -> None:
    srv = start_server(tmp_path, heartbeat_timeout=5)
    procs.append(srv)
    section, _ = _bad_cert(tmp_path, pki, case)
    srv.write_config({**srv.config, "tls": section})
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"reload failed: still running with the previous configuration")
    with connect(srv.config["port"]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"pong"
    assert "Traceback" not in srv.output()
