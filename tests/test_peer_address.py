"""hbd.peer_address: a peer's address kept packed (an int for a plain IPv4 ip:port), read back as it came."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from hbd.peer_address import host_of, of, pack, unpack


def test_a_plain_ipv4_address_is_one_small_int_and_reads_back() -> None:
    for address in ("127.0.0.1:1", "0.0.0.0:0", "255.255.255.255:65535", "10.20.30.40:45678"):
        packed = pack(address)
        assert isinstance(packed, int)
        assert unpack(packed) == address
    packed = pack("127.106.16.250:30000")
    assert sys.getsizeof(packed) <= 32 < sys.getsizeof("127.106.16.250:30000")


def test_anything_else_is_kept_as_it_came() -> None:
    for address in (
        "",
        "10.0.0.0/24",
        "[::1]:4000",
        "::ffff:127.0.0.1:80",
        "01.2.3.4:5",  # reads back otherwise: not packed
        "1.2.3.4:05",
        " 1.2.3.4:5",
        "+1.2.3.4:5",
        "1.2.3:5",
        "1.2.3.4.5:6",
        "256.1.1.1:1",
        "1.2.3.4:65536",
        "1.2.3.4:",
        "1.2.3.4",
        "1.2.3.4 x:5",
        "1.2:5",
        "1.2.3.4\x00:5",
        "1.2.3.4:5\x00",
        "1.2.3.4:99999999999",
        "\u0661.2.3.4:5",  # an Arabic-Indic 1: a digit int() reads, not ASCII
        "1.2.3.4:\u00b2",  # a superscript 2: isdigit(), and no int
        "web1",
    ):
        assert pack(address) == address, address
        assert unpack(pack(address)) == address


@given(st.text(alphabet="0123456789.:[]abf \u00b2\u0661+-", max_size=24))
def test_every_address_reads_back_as_it_came(address: str) -> None:
    assert unpack(pack(address)) == address
    assert host_of(pack(address)) == address.rsplit(":", 1)[0]  # its host: all before the last ":"


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_every_ipv4_address_and_port_packs(ip: object, port: int) -> None:
    address = f"{ip}:{port}"
    assert isinstance(pack(address), int)
    assert unpack(pack(address)) == address
    assert host_of(pack(address)) == host_of(of(str(ip), port)) == str(ip)
