#!/usr/bin/env bash
# hbd's harness for a real systemd (bookworm, 252) without a host systemd: a debootstrapped rootfs booted by
# systemd-nspawn (own PID/mount/UTS/IPC/cgroup ns, the host's netns), driven with nsenter. Adapted from the
# team's shared tool; used by .ci/systemd-prepare.sh and tests/systemd_guest.py. Needs root.
#   source .ci/sd-container.sh; sd_tools; sd_rootfs; sd_up --bind-ro=$PWD/dist:/dist; sd_exec systemctl ...; sd_down
# `bash .ci/sd-container.sh` boots the guest once and tears it down: a smoke test of the machine.
set -euo pipefail
SD_NAME=${SD_NAME:-hbdtest}                      # also the cgroup name: unique per concurrent container
SD_WORK=${SD_WORK:-/tmp/hbd-systemd}
SD_ROOTFS=${SD_ROOTFS:-$SD_WORK/rootfs}  # template; never written to (booted --volatile=overlay)
SD_PKGS=${SD_PKGS:-systemd,systemd-sysv,dbus,procps,libnss-systemd,python3,python3-systemd,python3-yaml}
SD_MIRROR=${SD_MIRROR:-http://deb.debian.org/debian}
export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=${SYSTEMD_NSPAWN_UNIFIED_HIERARCHY:-1}  # guest sees pure cgroup v2
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then SD_CGS=/sys/fs/cgroup/$SD_NAME  # pure v2 host
else SD_CGS="/sys/fs/cgroup/unified/$SD_NAME /sys/fs/cgroup/systemd/$SD_NAME"; fi      # hybrid host
mkdir -p "$SD_WORK"
el() { awk "BEGIN{printf \"%.2f\", $EPOCHREALTIME - $1}"; }   # seconds since $1
alive() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1); [ -n "$s" ] && [ "$s" != Z ]; }

sd_tools() {
  command -v systemd-nspawn >/dev/null && command -v debootstrap >/dev/null && command -v nsenter >/dev/null \
    && return 0
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)  # waits for another apt
  echo "installing systemd-container debootstrap util-linux (systemd-nspawn, nsenter)"
  "${apt[@]}" update >/dev/null && "${apt[@]}" install -y --no-install-recommends \
    systemd-container debootstrap util-linux >/dev/null
}

sd_rootfs() {        # built once per machine, rebuilt when SD_PKGS changes
  [ "$(cat "$SD_ROOTFS/.sd-ok" 2>/dev/null)" = "$SD_PKGS" ] && return 0
  ( flock 9; _sd_rootfs_build ) 9>"$SD_WORK/rootfs.lock"   # two runs must not debootstrap at once
}

_sd_rootfs_build() {
  [ "$(cat "$SD_ROOTFS/.sd-ok" 2>/dev/null)" = "$SD_PKGS" ] && return 0   # the other run built it
  rm -rf "$SD_ROOTFS.tmp"; mkdir -p "$SD_WORK/debs"
  debootstrap --variant=minbase --include="$SD_PKGS" --cache-dir="$SD_WORK/debs" \
      bookworm "$SD_ROOTFS.tmp" "$SD_MIRROR" >"$SD_WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$SD_WORK/debootstrap.log"; return 1; }
  chroot "$SD_ROOTFS.tmp" apt-get clean
  echo "$SD_NAME" >"$SD_ROOTFS.tmp/etc/hostname"
  chroot "$SD_ROOTFS.tmp" systemctl mask -q console-getty.service apt-daily.timer \
      apt-daily-upgrade.timer e2scrub_all.timer dpkg-db-backup.timer
  echo "$SD_PKGS" >"$SD_ROOTFS.tmp/.sd-ok"; rm -rf "$SD_ROOTFS"; mv "$SD_ROOTFS.tmp" "$SD_ROOTFS"
}

sd_exec() {          # run a command inside the container; no TTY/stdin needed
  nsenter --target "$(cat "$SD_WORK/leader.pid")" --mount --uts --ipc --net --pid --cgroup -- \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

sd_up() {            # extra args go to systemd-nspawn, e.g. --bind-ro=/src:/src
  sd_down
  local cg nspid leader= st= deadline=$((SECONDS + 90))
  for cg in $SD_CGS; do mkdir -p "$cg"; done
  ( for cg in $SD_CGS; do echo "$BASHPID" >"$cg/cgroup.procs"; done
    exec systemd-nspawn --quiet --directory="$SD_ROOTFS" --boot --machine="$SD_NAME" \
      --register=no --keep-unit --link-journal=no --console=read-only --volatile=overlay "$@"
  ) </dev/null >"$SD_WORK/console.log" 2>&1 &
  nspid=$!; echo "$nspid" >"$SD_WORK/nspawn.pid"
  until [ "$st" = running ] || [ "$st" = degraded ]; do
    if [ $SECONDS -ge $deadline ] || ! alive "$nspid"; then
      echo "container did not boot:" >&2; tail -30 "$SD_WORK/console.log" >&2; return 1; fi
    sleep 0.1
    leader=$(tr -d ' ' <"/proc/$nspid/task/$nspid/children" 2>/dev/null) || true
    [ -n "$leader" ] && [ "$(cat "/proc/$leader/comm" 2>/dev/null)" = systemd ] || continue
    echo "$leader" >"$SD_WORK/leader.pid"
    st=$(sd_exec timeout 30 systemctl is-system-running --wait 2>/dev/null) || true
  done
}

sd_down() {          # idempotent; ends only processes that are in this container's cgroups
  local nspid leader cg p _
  nspid=$(cat "$SD_WORK/nspawn.pid" 2>/dev/null) || nspid=
  leader=$(cat "$SD_WORK/leader.pid" 2>/dev/null) || leader=
  if [ -n "$nspid" ] && [ "$(cat "/proc/$nspid/comm" 2>/dev/null)" = systemd-nspawn ]; then
    kill -TERM "$nspid"          # nspawn forwards it as an orderly poweroff (SIGRTMIN+3) to the guest
    for _ in $(seq 150); do alive "$nspid" || break; sleep 0.1; done
  fi
  for cg in $SD_CGS; do [ -d "$cg" ] || continue   # what is still in our cgroups (hung guest, killed nspawn) is ours
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      p=$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | tr '\n' ' ')
      [ -z "${p// }" ] && break
      kill -KILL $p 2>/dev/null || true; sleep 0.2
    done
    find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  for p in /run/systemd/nspawn/locks/inode-*; do   # image lock files nobody holds (see /proc/locks)
    [ -e "$p" ] && ! grep -q ":${p##*:} " /proc/locks && rm -f "$p"; done
  rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/locks /run/systemd/nspawn 2>/dev/null || true
  rm -f "$SD_WORK/nspawn.pid" "$SD_WORK/leader.pid"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  trap sd_down EXIT; trap 'exit 130' INT TERM
  t=$EPOCHREALTIME; sd_tools; sd_rootfs; echo "tools + rootfs: $(el "$t") s, $(du -sh "$SD_ROOTFS" | cut -f1)"
  t=$EPOCHREALTIME; sd_up; echo "boot: $(el "$t") s, guest: $(sd_exec systemctl is-system-running)"
  t=$EPOCHREALTIME; sd_down; echo "teardown: $(el "$t") s"
fi
