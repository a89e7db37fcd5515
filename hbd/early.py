"""Signals before the event loop runs: caught from the very first line hbd runs (hbd.entry), before
the heavy imports and before the configuration is read. Until the loop takes them over, a SIGHUP is
remembered (the daemon reloads once it runs) and the other signals whose default action would kill
hbd (USR1, USR2, ALRM...) are ignored.

Apart from hbd.entry so that the daemons can ask ``take_hup()`` without importing the entry point
(which imports the command line, which imports the daemons).
"""

from __future__ import annotations

import signal

# Signals that mean nothing to hbd (or nothing before the loop runs) but would kill it by default.
# They are caught with a Python handler, not SIG_IGN: an exec'd hook then gets the default back.
STRAY_SIGNALS = tuple(
    s
    for s in (
        getattr(signal, n, None)
        for n in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGSTKFLT")
    )
    if s is not None
)
# Every signal a daemon's loop handles. The supervisor blocks them across fork() (hbd/worker_pool.py) and the
# worker keeps them blocked until run() has installed its own handlers.
LOOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, *STRAY_SIGNALS})

_hup_pending = False


def _early(signum: int, frame: object) -> None:
    global _hup_pending
    if signum == signal.SIGHUP:
        _hup_pending = True


def catch_signals() -> None:
    """Install the start-up handlers (main thread only; elsewhere this does nothing)."""
    try:
        for signum in (signal.SIGHUP, *STRAY_SIGNALS):
            signal.signal(signum, _early)
    except ValueError:  # not the main thread: signals are not ours to catch
        pass


def take_hup() -> bool:
    """True once if a SIGHUP arrived before the daemon's loop took the signal over."""
    global _hup_pending
    pending, _hup_pending = _hup_pending, False
    return pending
