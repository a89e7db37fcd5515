"""Where log lines go: the terminal, journald, and a size-rotating file for warnings and errors.

- Run by hand: every line goes to stderr, timestamped and readable.
- Under systemd (JOURNAL_STREAM names our stderr): every line goes to journald exactly once, with
  its priority and structured fields (PEER=..., EVENT=...); nothing is duplicated through stderr.
- Always (when ``log_file`` is set): warnings and errors also go to a size-rotating file. If the
  file stops being writable (disk full, directory removed) hbd keeps running, says so once, and
  tries to reopen the file later.

Log calls attach journald fields with ``extra={"fields": {...}}`` (see ``fields()``). In the journal
each line names its real call site (CODE_FILE/CODE_LINE/CODE_FUNC), and hbd's own events carry a
MESSAGE_ID that the shipped catalog (systemd/hbd.catalog) explains under ``journalctl -x``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hbd.errors import LogSetupError as LogSetupError  # re-exported: where callers import it from

try:  # python-systemd is optional: without it hbd logs to stderr, which journald also captures
    from systemd import journal as _journal
except ImportError:  # pragma: no cover - depends on the machine
    _journal = None

LOGGER = "hbd"
LOG_FORMAT = "%(asctime)s.%(msecs)03d {identifier} %(levelname)-7s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
FILE_MAX_BYTES = 10 * 1024 * 1024
FILE_BACKUPS = 5
REOPEN_AFTER = 30.0  # seconds between attempts to reopen a log file that failed

# EVENT -> MESSAGE_ID (fixed for good: the catalog and operators' filters use them).
MESSAGE_ID_PEER_UP = "4bcc48b795fd4a5cbd2e1ae9a91c4fed"
MESSAGE_ID_PEER_LATE = "99a25e5b634b475c82a4a103db35b8cf"
MESSAGE_ID_PEER_DOWN = "09010e11864e480da4335f47854b5474"
MESSAGE_ID_RELOAD_FAILED = "602b364036c342178d930a301717e81e"
MESSAGE_ID_RELOADED = "174894cc30da44ca8d1f6302ceac85cc"
MESSAGE_ID_GAVE_UP = "3daae44b5a194eda94414d284defef2a"
MESSAGE_IDS = {
    "up": MESSAGE_ID_PEER_UP,  # server: a late client pings again
    "back": MESSAGE_ID_PEER_UP,  # client: a late server answers again
    "late": MESSAGE_ID_PEER_LATE,
    "dead": MESSAGE_ID_PEER_DOWN,  # server: a client timed out
    "down": MESSAGE_ID_PEER_DOWN,  # client: a link was lost
    "reload-failed": MESSAGE_ID_RELOAD_FAILED,
    "reloaded": MESSAGE_ID_RELOADED,
    "gave-up": MESSAGE_ID_GAVE_UP,
}

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

log = logging.getLogger(LOGGER)


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call: structured journald fields (upper-case names)."""
    return {"fields": {k.upper(): v for k, v in values.items() if v is not None}}


def _priority(levelno: int) -> int:
    return _SYSLOG_PRIORITY.get(levelno, 6 if levelno < logging.WARNING else 3)


def under_journald() -> bool:
    """True when our stderr is connected to journald (systemd sets JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalHandler(logging.Handler):
    """Sends each record to journald with PRIORITY, SYSLOG_IDENTIFIER and the record's fields."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            extra = getattr(record, "fields", None) or {}
            message_id = MESSAGE_IDS.get(extra.get("EVENT"))  # type: ignore[arg-type]
            if message_id is not None:
                extra = {"MESSAGE_ID": message_id, **extra}
            # The record's call site: left to itself, send() would name this very line.
            code = {"CODE_FILE": record.pathname, "CODE_LINE": record.lineno}
            if record.funcName:
                code["CODE_FUNC"] = record.funcName
            _journal.send(
                self.format(record),
                PRIORITY=str(_priority(record.levelno)),
                SYSLOG_IDENTIFIER=self.identifier,
                **code,
                **{k: str(v) for k, v in extra.items()},
            )
        except Exception:
            self.handleError(record)


class PriorityPrefixFormatter(logging.Formatter):
    """stderr under journald without python-systemd: "<4>message" sets the journald priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_priority(record.levelno)}>{super().format(record)}"


class ResilientFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file that survives write failures: report once, keep running, reopen later."""

    def __init__(
        self, filename: str, report: Callable[[int, str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(filename, maxBytes=FILE_MAX_BYTES, backupCount=FILE_BACKUPS, encoding="utf-8")
        self._report = report
        self._clock = clock  # decides when to retry a broken file; tests pass virtual time
        self._broken_since: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._broken_since is not None:
            if self._clock() - self._broken_since < REOPEN_AFTER:
                return
            self._broken_since = None
            self._report(logging.INFO, f"retrying the log file {self.baseFilename}")
        try:
            if self.stream is not None and self._gone():
                self.stream.close()  # deleted or moved away: writing on would lose the line
                self.stream = None
            if self.stream is None:
                self.stream = self._open()
            if self.shouldRollover(record):
                self.doRollover()
            logging.FileHandler.emit(self, record)
            self.flush()
        except Exception as exc:  # disk full, directory deleted, permissions changed...
            self._fail(exc)

    def reopen(self) -> None:
        """Close the file and open baseFilename again now (SIGUSR2; also retries a broken file)."""
        self._broken_since = None
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = None
            self.stream = self._open()
        except Exception as exc:
            self._fail(exc)

    def _gone(self) -> bool:
        """True when our open file is no longer the one at baseFilename (deleted, rotated away)."""
        try:
            st = os.stat(self.baseFilename)
        except OSError:
            return True
        if self.stream is None:
            return True
        fst = os.fstat(self.stream.fileno())
        return (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino)

    def handleError(self, record: logging.LogRecord) -> None:
        self._fail(sys.exc_info()[1])

    def _fail(self, exc: BaseException | None) -> None:
        if self._broken_since is None:
            self._report(
                logging.ERROR,
                f"cannot write the log file {self.baseFilename}: {exc}; still running, retrying in {REOPEN_AFTER:g} s",
            )
        self._broken_since = self._clock()
        try:
            if self.stream is not None:
                self.stream.close()
        except OSError:
            pass
        self.stream = None


class Logging:
    """Owns hbd's handlers; ``configure()`` is called at start and on every reload."""

    def __init__(
        self, identifier: str, *, journald: bool | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.identifier = identifier
        self.clock = clock  # the log file's retry timer
        if journald is None:
            journald = under_journald()
        self.journald = journald
        self.file_handler: ResilientFileHandler | None = None
        self.log_file: str | None = None
        log.propagate = False
        log.setLevel(logging.DEBUG)
        for h in list(log.handlers):
            log.removeHandler(h)
        if journald and _journal is not None:
            self.main: logging.Handler = JournalHandler(identifier)
            self.main.setFormatter(logging.Formatter("%(message)s"))
        elif journald:
            self.main = logging.StreamHandler(sys.stderr)
            self.main.setFormatter(PriorityPrefixFormatter("%(message)s"))
        else:
            self.main = logging.StreamHandler(sys.stderr)
            self.main.setFormatter(logging.Formatter(LOG_FORMAT.format(identifier=identifier), DATE_FORMAT))
        log.addHandler(self.main)

    def configure(self, level: str, log_file: str | None) -> None:
        """Apply a level and a log file (raises LogSetupError, changing nothing, if the file
        cannot be opened for appending)."""
        self.commit(level, log_file, self.prepare(log_file))

    def prepare(self, log_file: str | None) -> ResilientFileHandler | None:
        """Open the file handler a new configuration needs (the current one if unchanged)."""
        if log_file == self.log_file:
            return self.file_handler
        return self._open_file(log_file) if log_file else None

    def discard(self, handler: ResilientFileHandler | None) -> None:
        """Close a handler from prepare() that will not be committed."""
        if handler is not None and handler is not self.file_handler:
            handler.close()

    def commit(self, level: str, log_file: str | None, handler: ResilientFileHandler | None) -> None:
        lvl = getattr(logging, level.upper())
        log.setLevel(lvl)  # below-level calls then cost one comparison, not a record
        self.main.setLevel(lvl)
        if handler is not self.file_handler:
            if self.file_handler is not None:
                log.removeHandler(self.file_handler)
                self.file_handler.close()
            if handler is not None:
                log.addHandler(handler)
            self.file_handler = handler
        self.log_file = log_file
        if handler is not None:
            handler.setLevel(max(lvl, logging.WARNING))  # the file holds problems only

    def reopen(self) -> None:
        """Reopen the log file (logrotate moved it away: SIGUSR2); nothing without one."""
        if self.file_handler is not None:
            self.file_handler.reopen()

    def _open_file(self, path: str) -> ResilientFileHandler:
        try:
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                mode = stat.S_IFREG
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISDIR(mode):  # open() would block or fail
                raise LogSetupError(f"cannot open the log file {path}: not a regular file")
            parent = Path(path).parent
            if not parent.exists() and not parent.is_symlink():
                parent.mkdir(parents=True)  # convenient when run by hand; systemd makes /var/log/hbd
            handler = ResilientFileHandler(path, self._report, self.clock)
        except OSError as exc:
            raise LogSetupError(f"cannot open the log file {path}: {exc.strerror or exc}") from None
        handler.setFormatter(logging.Formatter(LOG_FORMAT.format(identifier=self.identifier), DATE_FORMAT))
        return handler

    def _report(self, level: int, message: str) -> None:
        """A problem with the log file itself: tell journald/stderr only, never the file."""
        self.main.handle(log.makeRecord(LOGGER, level, __file__, 0, message, (), None))

    def close(self) -> None:
        for h in list(log.handlers):
            log.removeHandler(h)
            try:
                h.flush()
                h.close()
            except (OSError, ValueError):  # stderr already gone: nothing left to flush to
                pass


def report_start_errors(identifier: str, lines: list[str], log_file: str | None) -> None:
    """Errors from before the daemon's logging exists (an invalid configuration at start): on a
    terminal ``hbd: error: ...`` lines as ever; under journald at priority err under the daemon's
    identifier (not stdout's "hbd" at info); and in the log file when it can be opened."""
    journald = under_journald()
    if journald and _journal is not None:
        for line in lines:
            _journal.send(
                f"error: {line}",
                PRIORITY="3",
                SYSLOG_IDENTIFIER=identifier,
                EVENT="start-failed",
                CODE_FILE=__file__,
                CODE_FUNC="report_start_errors",
            )
    else:
        prefix = "<3>" if journald else ""  # journald reads the priority from the prefix
        for line in lines:
            print(f"{prefix}hbd: error: {line}", file=sys.stderr)
    if not log_file:
        return
    # Root by hand does not create it: a root-owned file in /var/log/hbd would stop the service (as _hbd)
    # from opening it later.
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if journald or os.geteuid() != 0 else 0)
    flags |= os.O_NONBLOCK  # a FIFO without a reader is an error (ENXIO), not a hang
    try:
        with open(os.open(log_file, flags, 0o640), "a", encoding="utf-8") as f:
            now = time.time()
            stamp = f"{time.strftime(DATE_FORMAT, time.localtime(now))}.{int(now % 1 * 1000):03d}"
            for line in lines:
                f.write(f"{stamp} {identifier} ERROR   {line}\n")
    except OSError:
        pass  # nowhere better to say it: the terminal/journal has it


PEER_BURST = 5  # lines per source address and kind of line per window
PEER_KIND_BURST = 10  # lines per kind of line per window, all sources together
PEER_TOTAL_BURST = 30  # peer-caused lines per window, all sources and kinds together
PEER_INTERVAL = 10.0  # the window, seconds


@dataclass(frozen=True)
class Suppressed:
    """What the limiter held back of one kind of line in one window."""

    kind: str
    lines: int
    sources: int  # distinct sources (a lower bound past the limiter's max_sources)
    source: str | None  # the source, when there was only one
    interval: float


class PeerLogLimiter:
    """Rate limit for log lines a peer can cause (sans-I/O: ``now`` comes in, decisions go out).

    A line is logged only while three fixed windows of ``interval`` seconds all have room: its
    source address and kind (``burst``), its kind from every source (``kind_burst``) and all
    peer-caused lines together (``total_burst``). So one noisy host cannot drown the others, and
    many hosts together (250 loopback addresses, a botnet) cannot fill the disk either. What is
    held back is counted per kind and reported by ``expired()`` once that kind's window is over,
    as one summary per kind: N lines from M sources.
    """

    def __init__(
        self,
        burst: int = PEER_BURST,
        interval: float = PEER_INTERVAL,
        max_sources: int = 10000,
        kind_burst: int = PEER_KIND_BURST,
        total_burst: int = PEER_TOTAL_BURST,
    ) -> None:
        self.burst = burst
        self.kind_burst = kind_burst
        self.total_burst = total_burst
        self.interval = interval
        self.max_sources = max_sources
        self._windows: dict[tuple[str, str], list[float]] = {}  # (source, kind) -> [start, count]
        self._kinds: dict[str, _KindWindow] = {}
        self._total = [float("-inf"), 0.0]  # [start, count]
        self._ready: list[Suppressed] = []  # summaries of windows that ended, not yet collected

    def check(self, source: str, kind: str, now: float) -> bool:
        """Log this line? (If not, it is counted for the kind's summary.)"""
        kw = self._kinds.get(kind)
        if kw is None or now - kw.start >= self.interval:
            if kw is not None:
                self._close(kw, kind)
            kw = self._kinds[kind] = _KindWindow(now)
        total = self._total
        if now - total[0] >= self.interval:
            total[0], total[1] = now, 0
        if kw.logged < self.kind_burst and total[1] < self.total_burst:  # else: no per-source work at all
            key = (source, kind)
            w = self._windows.get(key)
            if w is None or now - w[0] >= self.interval:
                if w is None and len(self._windows) >= self.max_sources:
                    self._prune(now)
                w = self._windows[key] = [now, 0]
            if w[1] < self.burst:
                w[1] += 1
                kw.logged += 1
                total[1] += 1
                return True
        kw.suppressed += 1
        if len(kw.sources) < self.max_sources:
            kw.sources.add(source)
        return False

    def expired(self, now: float) -> list[Suppressed]:
        """Summaries of the windows that have ended with lines held back, each reported once."""
        for kind, kw in list(self._kinds.items()):
            if now - kw.start >= self.interval:
                del self._kinds[kind]
                self._close(kw, kind)
        out, self._ready = self._ready, []
        return out

    def _close(self, kw: _KindWindow, kind: str) -> None:
        if kw.suppressed:
            only = next(iter(kw.sources)) if len(kw.sources) == 1 else None
            self._ready.append(Suppressed(kind, kw.suppressed, len(kw.sources), only, self.interval))

    def _prune(self, now: float) -> None:
        stale = [k for k, w in self._windows.items() if now - w[0] >= self.interval]
        for k in stale:
            del self._windows[k]
        if len(self._windows) >= self.max_sources:  # under a flood from many sources: start over
            self._windows.clear()


class _KindWindow:
    __slots__ = ("logged", "sources", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0
        self.sources: set[str] = set()


class PeerLog:
    """Logs the lines a peer can cause through one ``PeerLogLimiter`` shared by the whole daemon
    (server lines, hook failures, resolve errors...); ``flush()`` writes the summaries."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, limiter: PeerLogLimiter | None = None) -> None:
        self.clock = clock
        self.limiter = limiter if limiter is not None else PeerLogLimiter()

    def log(
        self, level: int, source: str, msg: str, *args: object, event: str, stacklevel: int = 2, **extra: object
    ) -> bool:
        """Log ``msg % args`` unless the limit for ``source`` and ``event`` is reached; True if logged.
        ``stacklevel`` as for logging: the default names our caller as the line's call site (CODE_FILE)."""
        if not log.isEnabledFor(level):
            return False
        if not self.limiter.check(source, event, self.clock()):
            return False
        log.log(level, msg, *args, extra=fields(event=event, **extra), stacklevel=stacklevel)
        return True

    def flush(self) -> None:
        """Log one summary per kind of line held back in a window that has ended."""
        for s in self.limiter.expired(self.clock()):
            if s.source is not None:
                log.warning(
                    "suppressed %d %r lines caused by %s in the last %g s",
                    s.lines,
                    s.kind,
                    s.source,
                    s.interval,
                    extra=fields(peer=s.source, event="suppressed", kind=s.kind),
                )
            else:
                log.warning(
                    "suppressed %d %r lines from %d%s sources in the last %g s",
                    s.lines,
                    s.kind,
                    s.sources,
                    "+" if s.sources >= self.limiter.max_sources else "",
                    s.interval,
                    extra=fields(event="suppressed", kind=s.kind, sources=s.sources),
                )
