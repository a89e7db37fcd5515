"""sd_notify: READY, RELOADING (+MONOTONIC_USEC), STOPPING, WATCHDOG and STATUS messages.

Uses python-systemd's ``systemd.daemon.notify`` when it is installed and speaks the datagram
protocol directly otherwise, so hbd runs the same with or without it. Without NOTIFY_SOCKET
(run by hand) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

try:
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the machine
    _sd_daemon = None


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> None:
        if self.address is None:
            return
        addr = self.address
        if addr.startswith("@"):  # abstract namespace socket
            addr = "\0" + addr[1:]
        try:
            if _sd_daemon is not None and os.environ.get("NOTIFY_SOCKET") == self.address:
                _sd_daemon.notify(message)  # raises too (ConnectionRefusedError) when nobody listens
                return
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), addr)
        except OSError:
            pass  # the manager went away; nothing useful to do from inside the daemon (STOPPING must still stop)

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload (systemd >= 253) match the reload; older ignore it.
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        if text != self._last_status:  # only changes cross the socket
            self._last_status = text
            self.send(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
