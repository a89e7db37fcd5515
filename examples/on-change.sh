#!/bin/sh
# An on_change hook for hbd: one syslog/journal line per state change, at a priority that fits it
# (down: err, late: warning, up: notice), tagged hbd-on-change:
#   journalctl -t hbd-on-change -p warning       # every peer that went late or down
# Install it and point the daemon at it (see "State-change hooks" in docs/operations.md):
#   install -m 755 /usr/share/doc/hbd/examples/on-change.sh /usr/local/bin/hbd-on-change
#   # /etc/hbd/server.yaml (or client.yaml):   on_change: /usr/local/bin/hbd-on-change
#   systemctl reload hbd-server
# hbd runs it as `on-change.sh EVENT PEER ADDRESS ROLE` with HBD_* variables in the environment, as
# the service user inside the unit's sandbox, never waits for it and kills it after hook_timeout.
set -u
event=${1:?usage: on-change.sh EVENT PEER ADDRESS ROLE} peer=${2:?} address=${3:?} role=${4:?}
# The server reports on its clients, the client on its servers.
if [ "$role" = server ]; then what=client; else what=server; fi
case $event in
down) prio=daemon.err text="is DOWN (${HBD_REASON:-no reason given})" ;;
late) prio=daemon.warning text="is LATE (silent for ${HBD_SILENT_MS:-?} ms)" ;;
up) prio=daemon.notice text="is UP${HBD_RTT_MS:+ (rtt $HBD_RTT_MS ms)}" ;;
*) prio=daemon.notice text="changed: $event" ;;
esac
[ "$peer" = "$address" ] || text="($address) $text"
exec logger -t hbd-on-change -p "$prio" -- "hbd $role: $what $peer $text${HBD_PREVIOUS:+, was $HBD_PREVIOUS}"
