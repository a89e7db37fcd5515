"""hbd.registry_identity on its own: identity, address matching, admission."""

from __future__ import annotations

import ipaddress

from helpers import Exp

from hbd.registry_identity import AddressBook, Admission, show_address
from hbd.registry_types import Close, Expected, Peer, PeerStatus, RegistrySettings


def admission(peers: dict[str, Peer] | None = None, *exp: Expected, **kw: object) -> Admission:
    settings = RegistrySettings(**kw)  # type: ignore[arg-type]
    adm = Admission(peers if peers is not None else {}, settings)
    adm.configure(settings, {e.name: e for e in exp})
    return adm


def test_greeting_name_then_expected_address_then_the_address() -> None:
    adm = admission(
        None, Exp("db1", ipaddress.ip_network("10.0.0.7/32")), Exp("rack", ipaddress.ip_network("10.1.0.0/16"))
    )
    assert adm.identify("web1", None, "10.0.0.7:1") == ("web1", True)
    assert adm.identify(None, None, "10.0.0.7:1") == ("db1", True)
    assert adm.identify(None, "certname", "10.1.200.3:1") == ("rack", True)  # greeting mode: no certificate used
    assert adm.identify(None, None, "10.2.0.1:1") == ("10.2.0.1:1", False)


def test_address_matching_ipv6_mapped_scoped_and_garbage() -> None:
    book = AddressBook([Exp("db1", ipaddress.ip_network("10.0.0.0/8")), Exp("v6", ipaddress.ip_network("fe80::/64"))])
    assert book.match("[::ffff:10.9.9.9]:5") == "db1"
    assert book.match("[fe80::1%eth0]:5") == "v6"
    assert book.match("[2001:db8::1]:5") is None
    assert book.match("not-an-ip:5") is None
    assert AddressBook().match("10.0.0.1:5") is None  # no address: in the config, no parsing at all


def test_a_reload_rebuilds_the_address_book() -> None:
    adm = admission(None, Exp("db1", ipaddress.ip_network("10.0.0.7/32")))
    adm.configure(adm.settings, {"db2": Exp("db2", ipaddress.ip_network("10.0.0.8/32"))})
    assert adm.addresses.match("10.0.0.7:1") is None and adm.addresses.match("10.0.0.8:1") == "db2"
    assert adm.identify(None, None, "10.0.0.8:1") == ("db2", True)


def test_an_expected_address_is_shown_as_an_address_or_a_network() -> None:
    assert show_address(None) == ""
    assert show_address(ipaddress.ip_network("10.0.0.7/32")) == "10.0.0.7"
    assert show_address(ipaddress.ip_network("10.1.0.0/16")) == "10.1.0.0/16"


def test_certificate_mode() -> None:
    adm = admission(None, name_from="certificate")
    assert adm.identify("web1", "web1", "a:1") == ("web1", True)
    assert adm.identify(None, "web1", "a:1") == ("web1", True)
    assert adm.identify("db1", "web1", "a:1") == "name mismatch: it greeted as db1, its certificate names web1"
    assert adm.identify("web1", None, "a:1") == "no certificate name (tls.name_from: certificate)"
    [close] = adm.hello("k", "db1", "web1", "a:1")
    assert isinstance(close, Close) and (close.key, close.peer) == ("k", "db1")


def test_admit_unexpected_and_max_peers() -> None:
    peers = {"a": Peer("a", "x:1", PeerStatus.UP, 0.0, 10.0, True)}
    adm = admission(peers, Exp("db1"), max_peers=1)
    assert adm.admit("db1", "k") is None  # expected names always fit
    assert adm.admit("a", "k") is None  # a known name
    refused = adm.admit("b", "k")
    assert refused is not None and refused.reason == "max_peers (1) reached: b refused"
    assert adm.hello("k", "b", None, "x:2") == [refused]
    adm = admission(peers, Exp("db1"), unexpected="reject")
    refused = adm.admit("a", "k")
    assert refused is not None and refused.reason == "a is not an expected peer (unexpected: reject)"
    assert adm.hello("k", "db1", None, "x:2") == []
