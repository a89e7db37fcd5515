#!/usr/bin/env bash
# What the real-systemd tests (tests/test_systemd.py) need, on a fresh Debian 12 machine as root:
# systemd-nspawn + debootstrap, the cached bookworm rootfs, and dist/hbd_<version>_all.deb.
# Idempotent, and about 0 s when everything is in place. `make test` (and so .ci/run) calls it as root before
# pytest; the systemd tests call it too (tests/systemd_guest.py prepare()).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source .ci/sd-container.sh
# Test modules on several pytest-xdist workers call this at once (a stale .deb after a commit, when
# pytest is run without `make test`): one builds, the others wait here and find it in place.
exec 8>"$SD_WORK/prepare.lock"
flock 8
t0=$SECONDS
sd_tools
# debootstrap (network-bound) and the package build (CPU-bound) do not depend on each other: overlap them.
sd_rootfs & rootfs=$!
if ! make -s -f mk/deb.mk deb >"$SD_WORK/deb-build.log" 2>&1; then
  tail -40 "$SD_WORK/deb-build.log" >&2; echo "make deb failed (log: $SD_WORK/deb-build.log)" >&2
  wait "$rootfs" || true; exit 1
fi
wait "$rootfs"
echo "systemd test prerequisites ready in $((SECONDS - t0)) s: $(ls dist/hbd_*_all.deb | tail -1), $SD_ROOTFS"
