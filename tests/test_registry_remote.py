"""hbd.registry_remote: the worker's stand-in for the supervisor's registry (its unit parts; the whole
is tested with real workers in tests/test_workers_registry.py)."""

from __future__ import annotations

import logging
import tracemalloc
from types import SimpleNamespace

from hbd.logs import PeerLog
from hbd.peer_uptime import WINDOW, Account
from hbd.registry_remote import Mark, RemotePeers
from hbd.workers_codec import Decoder, PeerMark, encode


def remote() -> RemotePeers:
    return RemotePeers(lambda msg: None, lambda conn: None, lambda conn: True, PeerLog(logging.getLogger("t")))


def test_a_connections_mark_costs_little_memory() -> None:
    """At 100,000 connections each byte per connection counts: the worker keeps what its rows show of
    each mark (and the peer's account), shared where equal, not the message as it came over the pipe.
    Kept as received it measured ~1,170 B per connection (the message, its lists, a second dict);
    an account is kept only when it tells more than the mark's state and since (~450 -> ~260 B); its
    reason is shared with equal ones (~260 -> ~200 B: each mark had its own "first ping" string)."""
    n = 20000
    peers = remote()
    frames = [
        encode(
            PeerMark(
                i,
                f"peer{i:06d}",
                True,
                "UP",
                1.0,
                "first ping",
                True,
                [],
                [["role", "web"]],
                None,
                0,
                0.0,
                [[1.0, "UP"]],
            )
        )
        for i in range(n)
    ]
    for i in range(n):  # stand-ins: order() looks a connection up and reads its peer's name
        peers.conns[i] = SimpleNamespace(peer=SimpleNamespace(name=f"peer{i:06d}"))  # type: ignore[assignment]
    decoder = Decoder(down=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for frame in frames:
            (msg,) = decoder.feed(frame)
            peers.order(msg)  # type: ignore[arg-type]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(peers.marks) == n
    assert used / n < 230, f"{used / n:.0f} B per connection for its mark"


def test_a_mark_shows_the_same_account_whether_kept_or_made() -> None:
    """A peer UP since its mark with no outage keeps no account: its row reads what one kept would."""
    for state in ("UP", "LATE", "DOWN"):
        mark = PeerMark(1, "web1", True, state, 1000.0, "", False, [], [], None, 0, 0.0, [[1000.0, state]])
        made, kept = Mark(mark, "web1", {}), Account.of(mark.outages, mark.down, mark.spans)
        assert made.account is None
        for now in (1000.0, 2000.0, 1000.0 + WINDOW * 2):
            a = made.accounted()
            assert (a.uptime(now), a.down_seconds(now), a.outages) == (
                kept.uptime(now),
                kept.down_seconds(now),
                kept.outages,
            )
    for outages, down, spans in ((1, 0.0, [[1000.0, "UP"]]), (0, 0.0, [[999.0, "UP"]]), (0, 0.0, [])):
        mark = PeerMark(1, "web1", True, "UP", 1000.0, "", False, [], [], None, outages, down, spans)
        assert Mark(mark, "web1", {}).account is not None  # more than the mark tells: kept
