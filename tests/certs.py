"""Test certificates made with the openssl command line (Debian's ``openssl`` package).

The same commands are documented in docs/reliability.md ("A test CA with openssl").
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, check=True, capture_output=True, text=True)


NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")  # a fresh P-256 key, unencrypted


def make_ca(d: Path, name: str) -> Pair:
    if OPENSSL is None:
        pytest.skip("needs the openssl command (Debian package openssl)")
    d.mkdir(parents=True, exist_ok=True)
    _run(
        "req",
        "-x509",
        *NEW_EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-subj",
        f"/CN={name}",
        "-days",
        "30",
        cwd=d,
    )
    return Pair(str(d / f"{name}.crt"), str(d / f"{name}.key"))


def make_cert(d: Path, ca: Pair, name: str, *, server: bool, days: int = 30) -> Pair:
    """A leaf certificate signed by ``ca``; ``days=-1`` makes one that has already expired."""
    ext = d / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""
    ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}")
    _run(
        "req",
        *NEW_EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    _run(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        ca.cert,
        "-CAkey",
        ca.key,
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        str(days),
        "-extfile",
        str(ext),
        cwd=d,
    )
    return Pair(str(d / f"{name}.crt"), str(d / f"{name}.key"))
