#!/bin/sh
# Usage: mk/apt-need.sh WHAT PKG...   (WHAT names the target in messages, e.g. "make demo")
# Installs the Debian packages among PKG... that are not installed yet, with apt-get: as root directly,
# otherwise through sudo. Nothing missing: does nothing and needs neither root nor sudo. Not root and no
# sudo: says what to run instead and fails.
set -eu
what=$1; shift
missing=
for p in "$@"; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
	sudo=
elif command -v sudo >/dev/null 2>&1; then
	sudo=sudo
else
	echo "$what needs these Debian packages:$missing" >&2
	echo "run as root: apt-get install --no-install-recommends$missing   (then $what again)" >&2
	exit 1
fi
echo "$what: installing$missing"
apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300"
$apt update >/dev/null
# shellcheck disable=SC2086
$apt install -y --no-install-recommends $missing >/dev/null
# What is installed here is a tool for make's targets, not a service for this host: a unit that a package
# enabled and started on installation (Debian's prometheus, for promtool, starts a server on :9090) is
# stopped and disabled at once, so that a test or CI run leaves no daemon holding a port. Without a
# running systemd, nothing is done (in a container or a chroot, invoke-rc.d started nothing).
[ -d /run/systemd/system ] || exit 0
for p in $missing; do
	for unit in $(dpkg-query -L "$p" | sed -n 's|^/\(usr/\)\{0,1\}lib/systemd/system/\([^/@]*\.service\)$|\2|p'); do
		if [ "$(systemctl is-enabled "$unit" 2>/dev/null)" = enabled ]; then
			$sudo systemctl disable --now --quiet "$unit"
			echo "$what: stopped and disabled $unit (installed as a tool, not a service)"
		fi
	done
done
