"""A real systemd for tests/test_systemd.py: Debian bookworm's systemd booted as PID 1 of a systemd-nspawn
container (.ci/sd-container.sh), driven from the host with nsenter. The guest shares the host's network
namespace, so host-side sockets reach guest services on 127.0.0.1. Needs root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / ".ci" / "sd-container.sh"
PREPARE = ROOT / ".ci" / "systemd-prepare.sh"
SD_WORK = Path(os.environ.get("SD_WORK", "/tmp/hbd-systemd"))
GUEST_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def unavailable() -> str | None:
    """Why the real-systemd tests cannot run here, or None. Missing tools are no reason: as root,
    prepare() installs them (systemd-container, debootstrap, util-linux for nsenter)."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn and nsenter); `make test` as root runs these, CI does"
    return None


def prepare() -> Path:
    """Tools, rootfs and .deb, installed or built when missing or stale (about 0 s when all is in place);
    returns the .deb."""
    out = subprocess.run(
        ["bash", str(PREPARE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{PREPARE.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    debs = sorted((ROOT / "dist").glob("hbd_*_all.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise RuntimeError("no dist/hbd_*_all.deb after .ci/systemd-prepare.sh")
    return debs[-1]


def repack_newer(deb: Path, outdir: Path) -> Path:
    """The same package with a higher version (VERSION+test1), to exercise the real upgrade path."""
    root = outdir / "root"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(root)], check=True)
    control = root / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"(?m)^Version: (\S+)$", text).group(1)
    control.write_text(text.replace(f"Version: {version}", f"Version: {version}+test1"))
    out = outdir / f"hbd_{version}+test1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(out)], check=True, capture_output=True)
    return out


def _harness(cmd: str, timeout: float = 120) -> None:
    subprocess.run(
        ["bash", "-c", f'source "{HARNESS}" && {cmd}'], stdin=subprocess.DEVNULL, check=True, timeout=timeout
    )


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 10.0, every: float = 0.05) -> Any:
    """Poll probe() until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class Guest:
    def __init__(self) -> None:
        self.leader = (SD_WORK / "leader.pid").read_text().strip()

    def run(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", "-t", self.leader, "-m", "-u", "-i", "-n", "-p", "-C", "--", *args]
        out = subprocess.run(
            cmd, env=GUEST_ENV, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and out.returncode:
            raise AssertionError(f"guest: {' '.join(args)} -> rc {out.returncode}\n{out.stdout}{out.stderr}")
        return out

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'cat >"$1"', "sh", path, input=text)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", unit, "-P", prop).stdout.strip()

    def cursor(self) -> str:
        """The journal's current position: pass it to journal(after=...) to see only what follows."""
        out = self.run("journalctl", "-n0", "--show-cursor", "--no-pager").stdout
        return out.strip().rsplit("-- cursor: ", 1)[-1]

    def journal(self, after: str, unit: str | None = None) -> list[dict[str, Any]]:
        """Entries after a cursor() as dicts (journalctl -o json), optionally only those of one unit.

        Filtering happens here, not with -u/-p: journalctl 252 combines --after-cursor with matches wrongly
        and drops the first matching entry.
        """
        out = self.run("journalctl", "--no-pager", "-o", "json", f"--after-cursor={after}").stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        if unit:
            name = unit if "." in unit else f"{unit}.service"
            entries = [e for e in entries if name in (e.get("_SYSTEMD_UNIT"), e.get("UNIT"))]
        return entries


@contextlib.contextmanager
def booted(*nspawn_args: str) -> Iterator[Guest]:
    """Boot a fresh guest (one at a time per machine), yield it, and always tear it down."""
    SD_WORK.mkdir(parents=True, exist_ok=True)
    # A SIGTERM (CI stopping the run) must unwind through the teardown, not leave a guest behind.
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    with open(SD_WORK / "guest.lock", "w") as lock:
        wait_for("another run's guest to end (guest.lock)", lambda: _try_lock(lock), timeout=600, every=0.5)
        try:
            _harness("sd_up " + " ".join(f"'{a}'" for a in nspawn_args))
            yield Guest()
        finally:
            with contextlib.suppress(Exception):  # keep the guest's journal: it dies with the guest
                log = Guest().run("journalctl", "-b", "--no-pager", "-o", "short-precise", check=False)
                (SD_WORK / "guest-journal.txt").write_text(log.stdout + log.stderr)
            _harness("sd_down")
            signal.signal(signal.SIGTERM, old_term)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # pytest then stops the session and still runs fixture teardowns


def _try_lock(f: Any) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def free_port() -> int:
    """A TCP port free on the host, and so in the guest, which shares our network namespace; below
    the kernel's ephemeral range, so that no connection the other tests (run beside these) open can
    take it as its local port while the guest's daemon is to listen there (one such collision failed
    every hbd-server start of a guest in a parallel `make test`). Chosen at random, tried by binding."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in 20000-{low}")


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 20001)


@contextlib.contextmanager
def installed(*nspawn_args: str) -> Iterator[Guest]:
    """A booted guest with the package installed (the .deb bound at /dist). Where the guest cannot run
    this fails under CI and skips elsewhere, with the reason."""
    reason = unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the real-systemd tests, but: {reason}")
    if reason:
        pytest.skip(reason)
    deb = prepare()
    with booted(f"--bind-ro={deb.parent}:/dist", *nspawn_args) as g:
        g.run("dpkg", "-i", f"/dist/{deb.name}")
        yield g
