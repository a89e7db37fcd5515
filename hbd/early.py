"""Signals before the event loop runs: caught from the very first line hbd runs (hbd.entry), before
the heavy imports and before the configuration is read. Until the loop takes them over, a SIGHUP is
remembered (the daemon reloads once it runs) and the other signals whose default action would kill
hbd (USR1, USR2, ALRM...) are ignored.

Apart from hbd.entry so that the daemons can ask ``take_hup()`` without importing the entry point
(which imports the command line, which imports the daemons).
"""

from __future__ import annotations

import signal
import threading

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


# Faults a thread causes itself (its own bad access or arithmetic): left unblocked in helper threads,
# so the fault handler (hbd.cli) reports the thread that faulted instead of the process dying mute
FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})


def start_quiet(thread: threading.Thread) -> None:
    """Start a helper thread (the store's writer, a name lookup) with every signal but FAULTS blocked
    (a thread inherits its creator's mask): signals are the loop's. A signal sent to the process
    (SIGTERM, SIGHUP, the watchdog's SIGABRT) is then always taken by the loop's own thread. A
    fault dump then shows where the loop hung, and not a helper thread that had nothing to do with it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - FAULTS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
