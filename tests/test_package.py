"""The Debian package's version has one source, debian/changelog: a changelog entry alone versions the
dist-info and `hbd --version`, and the build fails when anything else tries to set it. Builds the binary
package from a copy of the tree (DEB_BUILD_OPTIONS=nocheck: about 10 s per build)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from hbd import __version__

ROOT = Path(__file__).resolve().parents[1]
# Slow, but with no timing to disturb: under xdist not queued behind the slow load tests (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("package-build")]


def test_checkout_version_is_the_changelogs() -> None:
    top = (ROOT / "debian" / "changelog").read_text().split("\n", 1)[0]
    assert top.startswith(f"hbd ({__version__}) ")


def _source_copy(dest: Path) -> Path:
    if shutil.which("dpkg-buildpackage") is None or shutil.which("dh") is None:
        pytest.skip("needs the package's build dependencies (`make deb` installs them)")
    if subprocess.run(["dpkg-checkbuilddeps", "-B"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("build dependencies missing (`make deb` installs them)")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if files.returncode:
        pytest.skip("needs a git checkout (to copy only the tracked tree)")
    src = dest / "hbd-src"
    src.mkdir()
    with tarfile.open(dest / "src.tar", "w") as tar:
        for name in files.stdout.decode().split("\0"):
            if name and (ROOT / name).exists():
                tar.add(ROOT / name, arcname=name, recursive=False)
    with tarfile.open(dest / "src.tar") as tar:
        tar.extractall(src)
    return src


def _bump(src: Path, version: str) -> None:
    """What `dch -v VERSION` does to the changelog: a new top entry."""
    changelog = src / "debian" / "changelog"
    entry = (
        f"hbd ({version}) unstable; urgency=medium\n\n  * Test release.\n\n"
        " -- hbd test <test@hbd.invalid>  Thu, 26 Nov 2026 12:00:00 +0000\n\n"
    )
    changelog.write_text(entry + changelog.read_text())


def _build(src: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", DEB_BUILD_OPTIONS="nocheck")
    return subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_changelog_entry_alone_versions_the_package(tmp_path: Path) -> None:
    src = _source_copy(tmp_path)
    _bump(src, "9.8.7")
    out = _build(src)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(tmp_path / "hbd_9.8.7_all.deb"), str(root)], check=True)
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    assert [p.name for p in site.glob("hbd-*.dist-info")] == ["hbd-9.8.7.dist-info"]
    r = subprocess.run(
        ["/usr/bin/python3", str(root / "usr" / "bin" / "hbd"), "--version"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.stdout.strip() == "hbd 9.8.7", r.stderr


def test_the_build_fails_when_another_version_creeps_in(tmp_path: Path) -> None:
    src = _source_copy(tmp_path)
    _bump(src, "9.8.7")
    pyproject = src / "pyproject.toml"  # a static version next to the changelog's: must not build
    text = pyproject.read_text()
    assert 'dynamic = ["version"]' in text
    pyproject.write_text(text.replace('dynamic = ["version"]', 'version = "0.0.1"'))
    out = _build(src)
    assert out.returncode != 0
    assert "version mismatch: debian/changelog says 9.8.7; package: hbd-0.0.1.dist-info" in out.stdout + out.stderr
