"""hbd.cpu_slice: a short CPU slice for every thread and process of a daemon (the real kernel, real daemons)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import start_server
from helpers import NotifySocket
from test_workers import children

from hbd import cpu_slice

CUSTOM = cpu_slice.request(0.00025) is not None and cpu_slice.current() == 0.00025  # Linux 6.12 or later
cpu_slice.request(0)
needs_custom_slices = pytest.mark.skipif(not CUSTOM, reason="the kernel has no custom slices (Linux 6.12 or later)")


def slices_of(pid: int) -> dict[int, int]:
    """Each thread's slice in ns, as /proc shows the scheduler's entity (se.slice)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
        except OSError:
            continue
        line = next(line for line in text.splitlines() if line.startswith("se.slice"))
        out[int(tid)] = int(line.split(":")[1])
    return out


@pytest.fixture
def kernel_default() -> Iterator[None]:
    yield
    cpu_slice.request(0)  # this test process's threads back to the kernel's slice


def test_the_machine_that_runs_the_tests_has_custom_slices() -> None:
    """The CI machines run Linux 6.18: if this fails, the tests below were skipped and prove nothing."""
    assert CUSTOM, os.uname().release


@needs_custom_slices
def test_a_request_reaches_every_thread_and_what_they_start(kernel_default: None) -> None:
    started = threading.Event()
    later: list[float | None] = []
    go = threading.Event()

    def waits() -> None:
        started.set()
        go.wait(10)
        threading.Thread(target=lambda: later.append(cpu_slice.current())).start()

    before = threading.Thread(target=waits)
    before.start()
    started.wait(10)
    assert cpu_slice.request(0.0003) == 0.0003
    assert set(slices_of(os.getpid()).values()) == {300_000}  # the thread that was running too
    go.set()
    before.join(10)
    deadline = time.monotonic() + 10
    while not later and time.monotonic() < deadline:
        time.sleep(0.01)
    assert later == [0.0003]
    base = cpu_slice.request(0)
    assert base is not None and base != 0.0003 and set(slices_of(os.getpid()).values()) == {round(base * 1e9)}


@needs_custom_slices
def test_out_of_range_asks_are_clamped_to_the_kernels_bounds(kernel_default: None) -> None:
    assert cpu_slice.request(1e-6) == cpu_slice.MIN_SLICE
    assert cpu_slice.request(5.0) == cpu_slice.MAX_SLICE


@needs_custom_slices
def test_a_batch_policy_stays_and_a_real_time_one_is_left_alone(
    kernel_default: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        assert cpu_slice.request(0.0004) == 0.0004 and os.sched_getscheduler(0) == os.SCHED_BATCH
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_FIFO)
    assert cpu_slice.request(0.0002) is None
    assert cpu_slice.current() == 0.0004  # not touched


def test_a_nice_value_is_kept(kernel_default: None) -> None:
    """sched_setattr sets the nice value too: the daemon's (systemd's Nice=, say) must survive."""
    pid = os.fork()
    if pid == 0:  # (a child: nice cannot be undone in this process without privilege)
        try:
            os.nice(3)
            cpu_slice.request(0.0003)
            os._exit(0 if os.getpriority(os.PRIO_PROCESS, 0) == 3 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_custom_slices
def test_a_server_and_its_workers_run_with_the_configured_slice_and_a_reload_changes_it(tmp_path: Path, procs) -> None:
    notify = NotifySocket(tmp_path)
    (tmp_path / "state").mkdir()
    srv = start_server(
        tmp_path, workers=2, cpu_slice_us=250, state_dir=str(tmp_path / "state"), env={"NOTIFY_SOCKET": notify.path}
    )
    procs.append(srv)
    notify.wait_for("READY=1")  # every worker listens by now
    pids = [srv.pid, *children(srv.pid)]
    assert len(pids) == 3
    for pid in pids:  # every thread of the supervisor (its state store's writer too) and of each worker
        assert set(slices_of(pid).values()) == {250_000}, (pid, slices_of(pid))
    srv.write_config({**srv.config, "cpu_slice_us": 0})
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    for w in (1, 2):
        srv.wait_for(rf"hbd-server/{w} INFO +reloaded ", after=mark, timeout=10)
    srv.wait_for(r"hbd-server INFO +reloaded ", after=mark, timeout=10)
    for pid in pids:
        assert 250_000 not in set(slices_of(pid).values()), (pid, slices_of(pid))


@needs_custom_slices
def test_the_default_asks_nothing_and_a_reload_to_it_asks_for_the_kernels(kernel_default: None) -> None:
    """cpu_slice_us 0 at start leaves a slice set from outside alone; a reload from a value back to 0
    asks for the kernel's own again."""
    cpu_slice.request(0.0004)
    cpu_slice.ask(0)
    assert cpu_slice.current() == 0.0004
    cpu_slice.ask(0, 400)
    assert cpu_slice.current() not in (None, 0.0004)
