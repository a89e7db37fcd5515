"""The client link's lifecycle (hbd/link.py) as a sans-I/O machine: every order of events, and
client.Link driving it in virtual time against a real loopback server."""

from __future__ import annotations

import itertools
import socket

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hbd.link import GaveUp, Health, HealthChange, Lifecycle, LinkError, LinkState, Retry
from hbd.metrics import LinkStats

TIMINGS = {"reconnect_delay": 1.0, "reconnect_max_delay": 8.0, "pong_timeout": 2.0}


def make(attempts: int = 0, rand: float = 1.0) -> Lifecycle:
    return Lifecycle(0.0, reconnect_attempts=attempts, rand=lambda: rand, **TIMINGS)


def test_a_link_comes_up_goes_late_answers_again_and_is_lost() -> None:
    life = make()
    assert life.state is LinkState.WAITING and life.health is None
    life.attempt(0.0)
    life.connected(0.1)
    assert life.pong(0.2, answering=True) == HealthChange(None, Health.UP, "pong")
    assert life.pong(0.3, answering=True) is None  # reported once
    assert life.late(1.5) == HealthChange(Health.UP, Health.LATE, "no pong")
    assert life.late(1.6) is None
    assert life.pong(1.7, answering=True) == HealthChange(Health.LATE, Health.UP, "pong")
    change, nxt = life.down(3.0, "server closed the connection")
    assert change == HealthChange(Health.UP, Health.DOWN, "server closed the connection")
    assert nxt == Retry(at=4.0, delay=1.0, attempt=1, limit=0) and life.state is LinkState.WAITING
    assert life.retries == 1 and life.health_since == 3.0


def test_never_two_attempts_in_flight() -> None:
    life = make()
    life.attempt(0.0)
    with pytest.raises(LinkError):
        life.attempt(0.0)
    life.connected(0.1)
    with pytest.raises(LinkError):
        life.attempt(0.2)
    life.close()
    with pytest.raises(LinkError):
        life.attempt(0.3)  # closed: a stray timer must not bring it back


def test_backoff_grows_until_healthy_and_restarts_after_a_healthy_period() -> None:
    life = make()
    delays = []
    for t in range(4):
        life.attempt(float(t))
        delays.append(life.down(float(t), "refused")[1])
    assert [d.delay for d in delays if isinstance(d, Retry)] == [1.0, 2.0, 4.0, 8.0]
    life.attempt(10.0)
    life.connected(10.0)
    life.pong(13.0, answering=True)  # 3 s up < 2 x pong_timeout: not healthy yet
    assert life.retries == 4
    life.pong(14.0, answering=True)
    assert life.retries == 0
    _, nxt = life.down(15.0, "reset")
    assert isinstance(nxt, Retry) and nxt.delay == 1.0


def test_only_a_healthy_period_restarts_the_series_of_retries() -> None:
    life = make()
    for t in range(2):
        life.attempt(float(t))
        life.down(float(t), "refused")
    life.attempt(5.0)
    life.connected(5.0)
    life.pong(10.0, answering=True)  # healthy: the backoff restarts at the base ...
    _, nxt = life.down(11.0, "protocol error: junk")
    assert isinstance(nxt, Retry) and nxt.delay == 1.0 and nxt.attempt == 1
    life.attempt(12.0)
    life.connected(12.0)
    life.pong(20.0, answering=True)
    life.down(21.0, "protocol error: junk")
    life.attempt(22.0)
    life.connected(22.0)
    _, nxt = life.down(22.5, "protocol error: junk")  # ... but a broken server's grows
    assert isinstance(nxt, Retry) and nxt.attempt == 2


def test_gives_up_after_reconnect_attempts_and_a_reload_can_change_the_limit() -> None:
    life = make(attempts=2)
    results = []
    for t in range(3):
        life.attempt(float(t))
        results.append(life.down(float(t), "refused")[1])
    assert results[:2] == [Retry(1.0, 1.0, 1, 2), Retry(3.0, 2.0, 2, 2)]
    assert results[2] == GaveUp(2) and life.state is LinkState.GAVE_UP and life.retry_at is None
    life = make(attempts=1)
    life.attempt(0.0)
    life.down(0.0, "refused")
    life.retime(reconnect_delay=1.0, reconnect_max_delay=8.0, reconnect_attempts=3, pong_timeout=2.0)
    life.attempt(1.0)
    assert isinstance(life.down(1.0, "refused")[1], Retry)


def test_status_says_what_is_happening() -> None:
    life = make(rand=0.8)
    assert life.status("s", 0.0, None) == "s waiting"
    life.attempt(0.0)
    assert life.status("s", 0.0, None) == "s connecting"
    life.down(0.0, "cannot connect: Connection refused")
    assert life.status("s", 0.3, None) == "s DOWN (connection refused), retry in 0.5 s"
    life.attempt(1.0)
    assert life.status("s", 1.0, None) == "s DOWN (connection refused), connecting"
    life.connected(1.0)
    assert life.status("s", 1.0, None) == "s up"
    assert life.status("s", 1.0, 0.0123) == "s up, rtt 12.3 ms"
    life.close()
    assert life.status("s", 2.0, None) == "s gave up"  # closed while up: nothing went wrong


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["attempt", "connected", "pong", "late_pong", "late", "down", "reload", "redial", "close"]),
        st.floats(0.0, 5.0),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.integers(0, 4))
# found by a package build: a rename's reconnect keeps the health it had while it dials again
@example([("attempt", 0.0), ("connected", 0.0), ("pong", 0.0), ("redial", 0.0), ("attempt", 0.0)], 0)
def test_any_order_of_events_keeps_the_invariants(events: list[tuple[str, float]], limit: int) -> None:
    """Connect, reset/EOF/timeout (down), pong, late, reload and close in any order, at any times:
    never two attempts in flight, a retry always due unless it gave up, health reported once per
    change and matching the link's state."""
    life = make(attempts=limit, rand=0.5)
    now = 0.0
    reported: Health | None = None
    redialing = False  # a deliberate reconnect (rename) keeps the health it had until it succeeds or fails
    for name, dt in events:
        now += dt
        before = life.state
        try:
            if name == "attempt":
                life.attempt(now)
                assert before is LinkState.WAITING and life.state is LinkState.CONNECTING
            elif name == "connected":
                life.connected(now)
                assert before is LinkState.CONNECTING and life.up_since == now
                redialing = False
            elif name in ("pong", "late_pong"):
                change = life.pong(now, answering=name == "pong")
                assert before is LinkState.UP
                if name == "pong":
                    assert life.health is Health.UP
                    assert (change is None) == (reported is Health.UP)
                else:
                    assert change is None
            elif name == "late":
                change = life.late(now)
                assert before is LinkState.UP and life.health is Health.LATE
            elif name == "down":
                change, nxt = life.down(now, "lost")
                assert before in (LinkState.CONNECTING, LinkState.UP)
                redialing = False
                assert life.health is Health.DOWN and life.up_since is None
                if isinstance(nxt, Retry):
                    assert life.state is LinkState.WAITING and life.retry_at == nxt.at >= now
                    assert nxt.attempt == life.retries and 0 <= nxt.delay <= TIMINGS["reconnect_max_delay"]
                    assert not limit or nxt.attempt <= limit
                else:
                    assert life.state is LinkState.GAVE_UP and limit and life.retries >= limit
            elif name == "redial":  # a reload renamed the client: reconnect at once, health as it was
                health = life.health
                assert life.redial(now) == now == life.retry_at
                assert before is LinkState.UP and life.state is LinkState.WAITING and life.health is health
                redialing = True
                continue
            elif name == "reload":
                life.retime(reconnect_delay=0.5, reconnect_max_delay=4.0, reconnect_attempts=limit, pong_timeout=1.0)
                assert life.state is before
                continue
            else:
                life.close()
                assert life.state is LinkState.GAVE_UP
                redialing = False
                continue
        except LinkError:
            assert life.state is before  # refused events change nothing
            continue
        if name in ("pong", "late", "down") and change is not None:
            assert change.old is reported and change.new is life.health and life.health_since == now
            reported = change.new
        assert life.health is reported  # what hooks and status were told is what the link is
        if life.state is LinkState.WAITING and life.down_reason is not None:
            assert life.retry_at is not None  # a retry is always due unless it gave up
        if life.health is Health.UP or life.health is Health.LATE:
            # UP or LATE only on a live connection, or while a deliberate reconnect is under way
            assert life.state is LinkState.UP or (redialing and life.state is not LinkState.GAVE_UP)


def test_link_stats_count_each_rtt_once() -> None:
    stats = LinkStats()
    for rtt in (0.25, 0.5):
        stats.pong(rtt, 1.0)
    assert stats.rtt.count == 2 and stats.rtt_max == 0.5 and stats.rtt_last == 0.5
    assert stats.rtt.sum / stats.rtt.count == pytest.approx(0.375)


# -- client.Link driving the machine, in virtual time, against a real loopback server ----------------
class Answerer:
    """A loopback server on the virtual loop: answers every ping (``mode`` "answer"), or stays silent
    and answers what it owes once it answers again (a stalled server); resets connections on demand."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.mode = "answer"
        self.pongs = 0
        self.conns: list[socket.socket] = []
        self.owed: dict[int, int] = {}
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        loop.add_reader(self.lsock, self._accept)

    def _accept(self) -> None:
        conn, _ = self.lsock.accept()
        conn.setblocking(False)
        self.conns.append(conn)
        self.loop.add_reader(conn, lambda: self._read(conn))

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.owed.pop(conn.fileno(), None)
            self.loop.forget(conn)
            conn.close()
            return
        n = self.owed.pop(conn.fileno(), 0) + data.count(b"ping")
        if self.mode == "answer":
            conn.send(b"pong" * n)
            self.pongs += n
        else:
            self.owed[conn.fileno()] = n

    def reset_all(self) -> None:
        for conn in self.conns:
            if conn.fileno() >= 0:
                self.owed.pop(conn.fileno(), None)
                self.loop.forget(conn)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()

    def close(self) -> None:
        self.reset_all()
        self.loop.forget(self.lsock)
        self.lsock.close()


def test_client_link_counts_each_pong_once_and_reports_what_happens_in_virtual_time(vclock, vloop) -> None:
    from virtual_time import run_until

    from hbd.client import Client
    from hbd.config import ClientConfig, ServerEntry

    srv = Answerer(vloop)
    cfg = ClientConfig(
        servers=(ServerEntry("127.0.0.1", srv.port, "a"),),
        heartbeat_interval=1.0,
        pong_timeout=2.0,
        reconnect_delay=0.5,
        reconnect_max_delay=0.5,
        log_file=None,
        control_socket=None,
    )
    client = Client(cfg, loop=vloop)
    events: list[str] = []
    client.ops.event = lambda event, *a, **kw: events.append(str(event))  # type: ignore[method-assign]
    try:
        client.start()
        (link,) = client.links
        run_until(vloop, vclock, 1000.0 + 10.5)
        assert link.state is LinkState.UP and events == ["up"]
        assert link.stats.rtt.count == srv.pongs == link.proto.pongs >= 10  # one count per pong
        srv.mode = "silent"
        run_until(vloop, vclock, 1000.0 + 16.0)  # late after 1 s, dead after 2 s, then reconnects
        assert link.stats.timeouts >= 1 and events[:3] == ["up", "late", "down"]
        srv.mode = "answer"
        run_until(vloop, vclock, 1000.0 + 20.0)
        assert events[-1] == "up" and link.state is LinkState.UP
        connects, seen = link.stats.connects, len(events)
        srv.reset_all()
        run_until(vloop, vclock, 1000.0 + 24.0)
        assert events[seen:] == ["down", "up"] and link.stats.connects == connects + 1
        assert all(a != b for a, b in itertools.pairwise(events))  # each change reported once
        assert link.stats.rtt.count == srv.pongs  # one count per pong, across reconnects
    finally:
        client.shutdown()
        srv.close()
