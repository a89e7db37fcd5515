"""bench/scale.py's arithmetic and parsing on recorded figures (no load: the runs are make bench-scale)."""

from __future__ import annotations

import copy
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from bench import scale

SOCKSTAT = """sockets: used 200123
TCP: inuse 200005 orphan 0 tw 12 alloc 200010 mem 1536
UDP: inuse 0 mem 0
"""
MEMINFO = """MemTotal:       25165824 kB
MemFree:        10000000 kB
MemAvailable:   20971520 kB
Slab:            1048576 kB
SUnreclaim:       524288 kB
"""


def record() -> dict[str, Any]:
    """A run of 100,000 clients as bench.scale.run() records it (figures shortened)."""
    p = scale.plan(100_000)
    mib = 1 << 20
    return {
        "plan": scale.asdict(p),
        "idle": {"VmRSS": 200 * mib, "VmHWM": 210 * mib, "Threads": 7},
        "kernel_idle": {"MemAvailable": 22 << 30, "Slab": 300 * mib},
        "marks": {
            "ss": {"t": 100.0, "cpu_s": 50.0, "mem": {"VmRSS": 290 * mib}, "counts": {"UP": 100_000, "DOWN": 0}},
            "se": {
                "t": 120.0,
                "cpu_s": 55.0,  # 5 CPU-seconds in 20 s: 25 % of one core
                "mem": {"VmRSS": 300 * mib, "VmHWM": 305 * mib},
                "kernel": {"MemAvailable": 20 << 30, "Slab": 700 * mib, "tcp_inuse": 200_005, "tcp_mem_pages": 256},
                "counts": {"UP": 100_000, "DOWN": 0},
            },
            "before_end": {
                "t": 158.0,
                "counts": {"UP": 99_000, "DOWN": 1000},
                "turns": {"max_ms": 40.5, "over_100ms": 0},
            },
        },
        "end": {"mem": {"VmRSS": 301 * mib, "VmHWM": 310 * mib}, "turns": {"max_ms": 41.0, "over_100ms": 0}},
        "min_mem_available": 19 << 30,
        "aborted": None,
        "gen": {
            "connected": 100_000,
            "errors": {"refused": 0, "closed_by_peer": 0, "reset": 0},
            "missed": 0,
            "late_pongs": 0,
            "pings_total": 700_000,
            "rtt_ms": {"n": 200_000, "p99": 3.0, "max": 40.0},
            "gen_cpu_pct": 60.0,
            "silent": {
                "silenced": 1000,
                "undetected": 0,
                "detect_ms": {"n": 1000, "max": 30014.0},
                "detect_min_ms": 30008.0,
            },
        },
    }


def test_plan_keeps_every_process_under_the_descriptor_cap() -> None:
    for n in (1, 17_000, 17_001, 100_000, 1_000_000):
        p = scale.plan(n)
        assert p.n / p.workers <= scale.PER_PROC < scale.FD_CAP
        assert p.n / p.gen_procs <= scale.PER_PROC
    assert scale.plan(100_000).workers == 6
    assert scale.plan(100_000).timeout == 30.0  # 3 x the 10 s interval
    p = scale.plan(1_000_000, interval=60.0, timeout=90.0)
    assert p.window >= p.interval and p.detect_wait > p.timeout
    with pytest.raises(SystemExit):
        scale.plan(2_000_000)  # 118 workers: more than hbd allows


def test_derive_of_a_run_that_held() -> None:
    d = scale.derive(record())
    assert d["held"] is True
    assert d["connected"] == 100_000 and d["errors"] == 0 and d["missed"] == 0
    assert d["false_deaths"] == 0 and d["false_deaths_server"] == 0 and d["server_down"] == 1000
    assert d["cpu_pct"] == 25.0
    assert d["rss_per_conn_b"] == round(100 * 2**20 / 100_000)  # (300 - 200) MiB over 100,000
    assert d["hwm_per_conn_b"] == round(100 * 2**20 / 100_000)  # (310 - 210) MiB
    assert d["kernel"]["slab_per_conn_b"] == round(400 * 2**20 / 100_000)
    assert d["kernel"]["used_per_conn_b"] == round(2 * 2**30 / 100_000)
    assert d["kernel"]["tcp_mem_mib"] == 1.0
    assert d["detect_over_timeout_ms"] == 14.0
    assert d["loop_turn_max_ms"] == 40.5  # to just before the generator hangs up
    assert d["loop_turn_max_with_teardown_ms"] == 41.0
    assert d["min_mem_available_gib"] == 19.0


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["gen"].update(missed=1),
        lambda r: r["gen"].update(late_pongs=1),  # answered, but after the deadline
        lambda r: r["gen"].update(connected=99_999),
        lambda r: r["gen"]["errors"].update(closed_by_peer=1),  # a pinging client closed: a false death
        lambda r: r["marks"]["before_end"]["counts"].update(DOWN=1001),  # the server saw one more DOWN
        lambda r: r["gen"]["silent"].update(undetected=1),
        lambda r: r.update(aborted="MemAvailable 3.9 GiB < 4.0 GiB"),
    ],
)
def test_derive_says_when_a_run_did_not_hold(change: Any) -> None:
    r = copy.deepcopy(record())
    change(r)
    d = scale.derive(r)
    assert d["held"] is False
    assert "held" in scale.markdown([d]) and "| NO" in scale.markdown([d])


def test_markdown_row() -> None:
    md = scale.markdown([scale.derive(record())])
    assert "| 100,000 | 10 s | 6 | 100,000 | 0 | 0 | 0 / 0 | 30.008-30.014 s (30 s) |" in md
    assert md.count("\n") == 3  # header, rule, one row


def test_proc_parsers() -> None:
    s = scale.sockstat(SOCKSTAT)
    assert s == {
        "sockets_used": 200123,
        "tcp_inuse": 200005,
        "tcp_orphan": 0,
        "tcp_tw": 12,
        "tcp_alloc": 200010,
        "tcp_mem_pages": 1536,
    }
    m = scale.meminfo(MEMINFO)
    assert m["MemAvailable"] == 20 << 30 and m["Slab"] == 1 << 30 and "MemFree" not in m


def test_status_head_reads_no_further_than_the_peer_list(tmp_path: Path) -> None:
    """The head is parsed; the (here endless) peer listing is never read to its end."""
    path = tmp_path / "s.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    sent = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b'{"counts":{"UP":3,"DOWN":1},"loop":{"turns":null},"peers":[')
            try:
                for _ in range(10_000):
                    conn.sendall(b'{"peer":"x"},' * 100)
                    sent.append(1)
            except OSError:
                pass  # the reader hung up: as it should

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    doc = scale.status_head(path, timeout=5.0)
    t.join(10.0)
    srv.close()
    assert doc == {"counts": {"UP": 3, "DOWN": 1}, "loop": {"turns": None}}
    assert len(sent) < 10_000


def test_render_rewrites_the_table_from_the_raw_records(tmp_path: Path) -> None:
    out = tmp_path / "scale-100000.jsonl"
    held, failed = record(), record()
    failed["gen"]["missed"] = 5
    out.write_text(json.dumps(held) + "\n" + json.dumps(failed) + "\n")
    scale.main_args(["--render", str(out)])
    md = (tmp_path / "scale-100000.md").read_text()
    assert "N = 100,000" in md and md.count("| yes |") == 1 and md.count("| NO |") == 1


def test_the_status_read_waits_longer_for_more_reports_a_second() -> None:
    assert scale.status_timeout(100_000, 10.0) == 30.0  # 10,000 reports/s: 10 + 20 s
    assert scale.status_timeout(1_000, 10.0) == 10.2
    assert scale.status_timeout(1_000_000, 10.0) == 45.0  # at most 45 s
    p = scale.plan(250_000, interval=60.0)
    assert p.timeout == 180.0 and p.status_wait == 18.3
    assert p.detect_wait == p.timeout + 5.0 + p.status_wait  # room for the DOWN count before the hang-up


def test_a_down_count_read_after_the_generator_hung_up_is_not_the_runs() -> None:
    r = copy.deepcopy(record())
    r["gen_end"] = 160.0
    r["marks"]["before_end"]["status_done"] = 159.0
    assert scale.derive(r)["held"] is True
    r["marks"]["before_end"]["status_done"] = 161.0  # every peer is DOWN by then
    d = scale.derive(r)
    assert d["server_down"] is None and d["held"] is False


def test_hbd_numbers_retries_and_says_how_long_the_answer_took(tmp_path: Path) -> None:
    """The first connection is never answered; the second is: both tries are recorded."""
    path = tmp_path / "s.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve() -> None:
        first, _ = srv.accept()  # left unanswered until the reader gives up
        second, _ = srv.accept()
        with first, second:
            second.recv(64)
            second.sendall(b'{"counts":{"UP":2,"DOWN":0},"loop":{"turns":null},"peers":[]}\n')
            second.recv(64)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    got = scale.hbd_numbers(path, timeout=1.0)
    t.join(10.0)
    srv.close()
    assert got["counts"] == {"UP": 2, "DOWN": 0}
    assert len(got["status_tries_s"]) == 2 and got["status_tries_s"][0] >= 0.9
    assert got["status_s"] == got["status_tries_s"][1] < 1.0


def test_pss_of_this_process() -> None:
    assert 0 < scale.procstat.pss(scale.os.getpid()) < 1 << 34
