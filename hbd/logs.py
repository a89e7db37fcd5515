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
import sys
import time
from pathlib import Path
from typing import Any

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


class LogSetupError(Exception):
    pass


def fields(**values: Any) -> dict[str, Any]:
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

    def __init__(self, filename: str, report: Any) -> None:
        super().__init__(filename, maxBytes=FILE_MAX_BYTES, backupCount=FILE_BACKUPS, encoding="utf-8")
        self._report = report
        self._broken_since: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._broken_since is not None:
            if time.monotonic() - self._broken_since < REOPEN_AFTER:
                return
            self._broken_since = None
            self._report(logging.INFO, f"retrying the log file {self.baseFilename}")
        try:
            if self.stream is not None and self._gone():
                self.stream.close()  # deleted or moved away: writing on would lose the line
                self.stream = None  # type: ignore[assignment]
            if self.stream is None:
                self.stream = self._open()
            if self.shouldRollover(record):
                self.doRollover()
            logging.FileHandler.emit(self, record)
            self.flush()
        except Exception as exc:  # disk full, directory deleted, permissions changed...
            self._fail(exc)

    def _gone(self) -> bool:
        """True when our open file is no longer the one at baseFilename (deleted, rotated away)."""
        try:
            st = os.stat(self.baseFilename)
        except OSError:
            return True
        fst = os.fstat(self.stream.fileno())
        return (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino)

    def handleError(self, record: logging.LogRecord) -> None:
        self._fail(sys.exc_info()[1])

    def _fail(self, exc: BaseException | None) -> None:
        if self._broken_since is None:
            self._report(
                logging.ERROR,
                f"cannot write the log file {self.baseFilename}: {exc}; "
                f"still running, retrying in {REOPEN_AFTER:g} s",
            )
        self._broken_since = time.monotonic()
        try:
            if self.stream is not None:
                self.stream.close()
        except OSError:
            pass
        self.stream = None  # type: ignore[assignment]


class Logging:
    """Owns hbd's handlers; ``configure()`` is called at start and on every reload."""

    def __init__(self, identifier: str, *, journald: bool | None = None) -> None:
        self.identifier = identifier
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

    def _open_file(self, path: str) -> ResilientFileHandler:
        try:
            parent = Path(path).parent
            if not parent.exists() and not parent.is_symlink():
                parent.mkdir(parents=True)  # convenient when run by hand; systemd makes /var/log/hbd
            handler = ResilientFileHandler(path, self._report)
        except OSError as exc:
            raise LogSetupError(f"cannot open the log file {path}: {exc.strerror or exc}") from None
        handler.setFormatter(logging.Formatter(LOG_FORMAT.format(identifier=self.identifier), DATE_FORMAT))
        return handler

    def _report(self, level: int, message: str) -> None:
        """A problem with the log file itself: tell journald/stderr only, never the file."""
        self.main.handle(log.makeRecord(LOGGER, level, __file__, 0, message, None, None))

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
            _journal.send(f"error: {line}", PRIORITY="3", SYSLOG_IDENTIFIER=identifier, EVENT="start-failed",
                          CODE_FILE=__file__, CODE_FUNC="report_start_errors")
    else:
        prefix = "<3>" if journald else ""  # journald reads the priority from the prefix
        for line in lines:
            print(f"{prefix}hbd: error: {line}", file=sys.stderr)
    if not log_file:
        return
    # Root by hand does not create it: a root-owned file in /var/log/hbd would stop the service (as _hbd)
    # from opening it later.
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if journald or os.geteuid() != 0 else 0)
    try:
        with open(os.open(log_file, flags, 0o640), "a", encoding="utf-8") as f:
            now = time.time()
            stamp = f"{time.strftime(DATE_FORMAT, time.localtime(now))}.{int(now % 1 * 1000):03d}"
            for line in lines:
                f.write(f"{stamp} {identifier} ERROR   {line}\n")
    except OSError:
        pass  # nowhere better to say it: the terminal/journal has it


class PeerLogLimiter:
    """Rate limit for log lines a peer can cause: at most ``burst`` per ``interval`` per source
    address; the rest are counted and reported as "suppressed N" with the next line allowed."""

    def __init__(self, burst: int = 5, interval: float = 10.0, max_sources: int = 10000) -> None:
        self.burst = burst
        self.interval = interval
        self.max_sources = max_sources
        self._windows: dict[str, list[float | int]] = {}  # source -> [window start, count, suppressed]

    def check(self, source: str, now: float) -> tuple[bool, int]:
        """Return (log this line?, lines suppressed since the last one logged for this source)."""
        w = self._windows.get(source)
        if w is None or now - w[0] >= self.interval:
            suppressed = int(w[2]) if w is not None else 0
            if len(self._windows) >= self.max_sources:
                self._prune(now)
            self._windows[source] = [now, 1, 0]
            return True, suppressed
        if w[1] < self.burst:
            w[1] += 1
            return True, 0
        w[2] += 1
        return False, 0

    def expired(self, now: float) -> list[tuple[str, int]]:
        """Sources whose window has ended with lines suppressed: (source, count), each reported once."""
        out = []
        for source, w in self._windows.items():
            if w[2] and now - w[0] >= self.interval:
                out.append((source, int(w[2])))
                w[2] = 0
        return out

    def _prune(self, now: float) -> None:
        stale = [s for s, w in self._windows.items() if now - w[0] >= self.interval]
        for s in stale:
            del self._windows[s]
        if len(self._windows) >= self.max_sources:  # under a flood from many sources: start over
            self._windows.clear()
