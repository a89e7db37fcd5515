"""hbd.workers_codec: the supervisor <-> worker messages, framed; plain calls, no processes."""

from __future__ import annotations

import os
import select

import pytest

from hbd.config import ServerConfig
from hbd.workers_codec import (
    HEADER,
    MAX_FRAME,
    CodecError,
    Decoder,
    LogLine,
    Numbers,
    Ready,
    Reload,
    Reloaded,
    Status,
    WorkerChannel,
    encode,
)

UP = [
    Ready(),
    Status(12, 3),
    Numbers({"clients": 12, "pings": 40}),
    LogLine(30, "client x timed out ünï"),
    Reloaded(None),
    Reloaded("tls: cannot load the certificate files"),
]


def test_every_message_round_trips_even_one_byte_at_a_time() -> None:
    data = b"".join(encode(m) for m in UP)
    assert Decoder().feed(data) == UP
    dec = Decoder()
    got = [m for i in range(len(data)) for m in dec.feed(data[i : i + 1])]
    assert got == UP and dec.buf == b""


def test_reload_carries_the_validated_config() -> None:
    cfg = ServerConfig(host="127.0.0.1", port=4321, heartbeat_timeout=7.5, allow=["10.0.0.0/8"], workers=3)
    (msg,) = Decoder(down=True).feed(encode(Reload(cfg)))
    assert isinstance(msg, Reload) and msg.config == cfg


def test_each_side_takes_only_its_own_kinds() -> None:
    with pytest.raises(CodecError):  # the supervisor never unpickles what a worker sends
        Decoder().feed(encode(Reload(ServerConfig())))
    with pytest.raises(CodecError):
        Decoder(down=True).feed(encode(Ready()))


def test_garbage_is_refused_before_it_is_buffered() -> None:
    dec = Decoder()
    with pytest.raises(CodecError, match="not a frame"):
        dec.feed(HEADER.pack(MAX_FRAME + 1, 1))  # a length past the bound: refused from the header alone
    assert dec.buf == b""
    with pytest.raises(CodecError, match="bad Status frame"):
        dec.feed(HEADER.pack(2, 2) + b"{}")  # missing fields
    with pytest.raises(CodecError):
        encode(LogLine(40, "x" * (MAX_FRAME + 1)))


def test_a_long_log_line_is_cut_to_one_atomic_pipe_write() -> None:
    rfd, wfd = os.pipe()
    try:
        channel = WorkerChannel(wfd)
        channel.send(LogLine(40, "é" * 10_000))
        data = os.read(rfd, 65536)
        assert len(data) <= select.PIPE_BUF
        (msg,) = Decoder().feed(data)
        assert isinstance(msg, LogLine) and msg.message and set(msg.message) == {"é"}
    finally:
        os.close(rfd)
        os.close(wfd)


def test_the_channel_hands_reloads_to_the_worker() -> None:
    from virtual_time import FakeClock, VirtualSelector

    from hbd.loop import EventLoop

    clock = FakeClock()
    loop = EventLoop(clock, VirtualSelector(clock))
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    try:
        channel = WorkerChannel(up_w, 1, ServerConfig(heartbeat_timeout=5.0), rfd=down_r)
        reloads: list[float] = []
        channel.attach(loop, lambda: reloads.append(channel.config.heartbeat_timeout))  # type: ignore[union-attr]
        frame = encode(Reload(ServerConfig(heartbeat_timeout=4.0)))
        os.write(down_w, frame[:7])  # a frame may come in pieces
        loop.run_once(0)
        assert reloads == []
        os.write(down_w, frame[7:])
        loop.run_once(0)
        assert reloads == [4.0]
    finally:
        loop.close()
        for fd in (up_r, up_w, down_r, down_w):
            os.close(fd)


def test_a_reload_carries_no_expected_peers_so_a_large_list_fits() -> None:
    """The registry (and so the peers list) is the supervisor's; 100,000 expected peers pickle to
    ~4.5 MB, more than a frame holds."""
    import ipaddress

    from hbd.config import ExpectedPeer

    net = ipaddress.ip_network
    peers = tuple(ExpectedPeer(f"w{i:05d}", net(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")) for i in range(100_000))
    frame = encode(Reload(ServerConfig(peers=peers, rise=3)))
    assert len(frame) < 10_000
    (msg,) = Decoder(down=True).feed(frame)
    assert isinstance(msg, Reload) and msg.config.peers == () and msg.config.rise == 3


def test_registry_reports_wait_in_order_while_the_pipe_is_full_and_nothing_else_interleaves(monkeypatch) -> None:
    from hbd import workers_codec
    from hbd.workers_codec import PeerBack, PeerLate

    r, w = os.pipe()
    os.set_blocking(r, False)
    ch = WorkerChannel(w)
    n = 0
    while not ch.pending:  # until the pipe is full
        ch.send(PeerLate(n))
        n += 1
    ch.send(Status(1, 0))  # dropped, as ever: the pipe is full
    ch.send(LogLine(30, "dropped too"))
    for i in range(n, n + 100):
        ch.send(PeerBack(i))  # wait in order
    got: list = []
    dec = Decoder()
    while True:
        try:
            data = os.read(r, 65536)
        except BlockingIOError:
            if not ch.pending:
                break
            ch._flush()  # what the loop does when the pipe is writable
            continue
        got += dec.feed(data)
    assert [m.conn for m in got] == list(range(n + 100))
    assert {type(m) for m in got} == {PeerLate, PeerBack}
    # bounded: past MAX_PENDING reports are lost (the supervisor is not reading: it is hung)
    monkeypatch.setattr(workers_codec, "MAX_PENDING", 1000)
    while not ch.pending:
        ch.send(PeerLate(0))
    for _ in range(100):
        ch.send(PeerLate(1))
    assert len(ch.pending) <= 1000 and ch.lost > 0
    os.close(r)
    os.close(w)
