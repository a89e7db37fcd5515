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
