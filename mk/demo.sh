#!/bin/sh
# `make demo` (mk/demo.sh [PYTHON [PORT]]): an hbd server and an hbd client on 127.0.0.1:PORT in this terminal; Ctrl-C stops both.
# The client starts only once this server listens: if the port is taken, one line says so and nothing runs.
set -u
cd "$(dirname "$0")/.."
PY=${1:-/usr/bin/python3}
PORT=${2:-54321}
logs=demo-logs
mkdir -p "$logs"

"$PY" - "$PORT" <<'PYEOF' || exit 1
import socket, sys
port = sys.argv[1]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
try:
    s.bind(("127.0.0.1", int(port)))
except (OSError, ValueError, OverflowError) as exc:
    sys.exit(f"make demo: cannot use port {port} on 127.0.0.1 ({getattr(exc, 'strerror', None) or exc}); "
             "try another one: make demo PORT=54322")
PYEOF

echo "hbd demo: server and client on 127.0.0.1:$PORT; errors also go to $logs/. Ctrl-C stops both."
echo "          in another terminal: $PY -m hbd status -s $logs/server.sock   (or client.sock)"
srv= cli=
stop() {  # both get SIGTERM, on which they exit 0 (so no shell reports "Terminated"); wait for them
	trap '' INT TERM
	for p in $cli $srv; do kill -TERM "$p" 2>/dev/null; done
	for p in $cli $srv; do wait "$p" 2>/dev/null; done
}
finish() { stop; exit "$1"; }
# Ctrl-C ends the demo: a normal end (exit 0), which make passes over without an "Interrupt" line.
trap 'finish 0' INT TERM

"$PY" -m hbd server -c etc/server.yaml --host 127.0.0.1 --port "$PORT" --log-file "$logs/server.log" \
	--control-socket "$logs/server.sock" &
srv=$!
# Its status socket answers once its loop runs, that is once it listens; if it cannot start, it exits.
tries=0
until "$PY" -m hbd status -s "$logs/server.sock" >/dev/null 2>&1; do
	if ! kill -0 "$srv" 2>/dev/null; then
		wait "$srv"; echo "make demo: the server did not start (its error is above)" >&2; exit 1
	fi
	tries=$((tries + 1))
	[ "$tries" -le 100 ] || { echo "make demo: the server did not answer within 10 s" >&2; finish 1; }
	sleep 0.1
done
"$PY" -m hbd client -c etc/client.yaml --host 127.0.0.1 --port "$PORT" --log-file "$logs/client.log" \
	--control-socket "$logs/client.sock" &
cli=$!
wait "$cli"  # until the client ends by itself, or Ctrl-C (the trap runs then)
finish $?
