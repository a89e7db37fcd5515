import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from hbd import logs
from hbd.logs import Logging, PeerLogLimiter, Suppressed, fields, log, under_journald


class FakeJournal:
    """Stands in for journald, which does not run on the test host (the systemd tests use the real one)."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, message: str, **kw: str) -> None:
        self.sent.append({"MESSAGE": message, **kw})


@pytest.fixture
def fresh():
    made: list[Logging] = []
    yield made
    for lg in made:
        lg.close()


def test_terminal_gets_everything_file_gets_problems_only(tmp_path: Path, capsys, fresh) -> None:
    lg = Logging("hbd-test", journald=False)
    fresh.append(lg)
    lg.configure("info", str(tmp_path / "x.log"))
    log.debug("not shown")
    log.info("client joined")
    log.warning("client late")
    log.error("client timed out")
    err = capsys.readouterr().err
    assert "hbd-test INFO    client joined" in err and "client timed out" in err and "not shown" not in err
    text = (tmp_path / "x.log").read_text()
    assert "client late" in text and "client timed out" in text and "joined" not in text


def test_journald_gets_each_line_once_with_priority_and_fields(monkeypatch, capsys, tmp_path: Path, fresh) -> None:
    fake = FakeJournal()
    monkeypatch.setattr(logs, "_journal", fake)
    lg = Logging("hbd-server", journald=True)
    fresh.append(lg)
    lg.configure("info", str(tmp_path / "x.log"))
    log.info("client joined", extra=fields(peer="10.0.0.1:5000", event="connected"))
    log.error("client timed out", extra=fields(peer="10.0.0.1:5000", rtt_ms=None))
    assert [(m["MESSAGE"], m["PRIORITY"]) for m in fake.sent] == [("client joined", "6"), ("client timed out", "3")]
    assert fake.sent[0]["PEER"] == "10.0.0.1:5000" and fake.sent[0]["EVENT"] == "connected"
    assert fake.sent[0]["SYSLOG_IDENTIFIER"] == "hbd-server"
    assert "RTT_MS" not in fake.sent[1]
    assert capsys.readouterr().err == ""  # no duplicate through stderr
    assert "client timed out" in (tmp_path / "x.log").read_text()


def test_journald_names_the_call_site_and_gives_events_a_message_id(monkeypatch, fresh) -> None:
    fake = FakeJournal()
    monkeypatch.setattr(logs, "_journal", fake)
    lg = Logging("hbd-server", journald=True)
    fresh.append(lg)
    lg.configure("info", None)
    line = sys._getframe().f_lineno + 1
    log.warning("client x timed out", extra=fields(peer="10.0.0.1:5000", event="dead"))
    log.info("client joined", extra=fields(event="connected"))
    down, joined = fake.sent
    assert (down["CODE_FILE"], down["CODE_LINE"]) == (__file__, line)  # not logs.py's emit()
    assert down["CODE_FUNC"] == "test_journald_names_the_call_site_and_gives_events_a_message_id"
    assert down["MESSAGE_ID"] == logs.MESSAGE_ID_PEER_DOWN and "MESSAGE_ID" not in joined
    ids = set(logs.MESSAGE_IDS.values())
    assert all(len(i) == 32 and int(i, 16) for i in ids)
    catalog = (Path(__file__).resolve().parents[1] / "systemd" / "hbd.catalog").read_text()
    assert all(f"-- {i}\n" in catalog for i in ids)  # every id is explained by the shipped catalog


def test_journald_without_python_systemd_uses_priority_prefixes(monkeypatch, capsys, fresh) -> None:
    monkeypatch.setattr(logs, "_journal", None)
    lg = Logging("hbd-server", journald=True)
    fresh.append(lg)
    lg.configure("info", None)
    log.warning("late")
    assert capsys.readouterr().err == "<4>late\n"


def test_under_journald_matches_stderr_identity(monkeypatch) -> None:
    r, w = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(w, 2)
        st = os.fstat(2)
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not under_journald()  # a child that inherited the variable but not the stream
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not under_journald()
    finally:
        os.dup2(saved, 2)
        for fd in (r, w, saved):
            os.close(fd)


def test_log_file_failure_is_reported_once_and_retried(tmp_path: Path, monkeypatch, capsys, fresh) -> None:
    monkeypatch.setattr(logs, "REOPEN_AFTER", 0.0)
    lg = Logging("hbd-test", journald=False)
    fresh.append(lg)
    d = tmp_path / "logs"
    lg.configure("info", str(d / "x.log"))
    log.warning("one")
    assert lg.file_handler is not None
    lg.file_handler.stream.close()
    shutil.rmtree(d)
    lg.file_handler.stream = None  # the next write reopens, which now fails
    monkeypatch.setattr(logs, "REOPEN_AFTER", 3600.0)
    log.warning("two")
    log.warning("three")
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "still running" in err
    d.mkdir()
    monkeypatch.setattr(logs, "REOPEN_AFTER", 0.0)
    log.warning("four")
    assert "four" in (d / "x.log").read_text()


def test_a_deleted_log_directory_is_retried_after_reopen_after_seconds(tmp_path: Path, capsys, fresh, vclock) -> None:
    """The retry rule on virtual time: one error when the file breaks, nothing tried (nor written)
    before REOPEN_AFTER, then one retry that writes again once the directory is back."""
    lg = Logging("hbd-test", journald=False, clock=vclock)
    fresh.append(lg)
    d = tmp_path / "logs"
    lg.configure("info", str(d / "x.log"))
    log.warning("before")
    shutil.rmtree(d)
    log.warning("lost")  # the file is gone: reopening fails
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and f"retrying in {logs.REOPEN_AFTER:g} s" in err
    d.mkdir()
    vclock.advance(logs.REOPEN_AFTER - 0.01)
    log.warning("too early")
    err = capsys.readouterr().err
    assert "retrying the log file" not in err and not (d / "x.log").exists()
    vclock.advance(0.01)
    log.warning("back")
    err = capsys.readouterr().err
    assert err.count("retrying the log file") == 1 and "cannot write" not in err
    assert (d / "x.log").read_text().count("back") == 1
    assert "too early" not in (d / "x.log").read_text()


def test_level_and_file_change_on_commit(tmp_path: Path, capsys, fresh) -> None:
    lg = Logging("hbd-test", journald=False)
    fresh.append(lg)
    lg.configure("warning", str(tmp_path / "a.log"))
    log.info("quiet")
    assert capsys.readouterr().err == ""
    lg.configure("debug", str(tmp_path / "b.log"))
    log.debug("loud")
    log.error("problem")
    assert "loud" in capsys.readouterr().err
    assert "problem" in (tmp_path / "b.log").read_text()
    assert "problem" not in (tmp_path / "a.log").read_text()


def test_prepare_failure_changes_nothing(tmp_path: Path, fresh) -> None:
    lg = Logging("hbd-test", journald=False)
    fresh.append(lg)
    lg.configure("info", str(tmp_path / "a.log"))
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(logs.LogSetupError, match="Not a directory"):
        lg.prepare(str(blocker / "x.log"))
    log.error("still here")
    assert "still here" in (tmp_path / "a.log").read_text()


def test_peer_log_limiter() -> None:
    lim = PeerLogLimiter(burst=3, interval=10.0)
    assert [lim.check("1.2.3.4", "late", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert lim.check("5.6.7.8", "late", 0.0)  # other sources are not affected
    assert lim.check("1.2.3.4", "dead", 0.0)  # nor other kinds of line
    assert lim.check("1.2.3.4", "late", 10.0)  # a new window
    assert lim.expired(10.0) == [Suppressed("late", 2, 1, "1.2.3.4", 10.0)]


def test_peer_log_limiter_is_bounded() -> None:
    lim = PeerLogLimiter(burst=1, interval=10.0, max_sources=100)
    for i in range(1000):
        lim.check(f"10.0.{i // 256}.{i % 256}", "late", 0.0)
    assert len(lim._windows) <= 100
    assert all(len(kw.sources) <= 100 for kw in lim._kinds.values())


def test_priorities() -> None:
    assert [logs._priority(x) for x in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)] == [7, 6, 4, 3]
