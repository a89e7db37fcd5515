"""Who a connection is, and whether it may be that peer (the registry's admission).

Identity: the greeting name; with ``name_from: certificate`` the certificate's name (a greeting
naming someone else is refused); an unnamed legacy client is its address ("ip:port") unless its
source address matches an expected peer's ``address:``, then it is that peer. Admission: an
expected name is always admitted; ``unexpected: reject`` refuses the others, and ``max_peers``
refuses a name not known yet once that many peers are known.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from hbd.access import Network
from hbd.registry_types import Action, Close, Expected, Key, Peer, RegistrySettings


def show_address(net: Network | None) -> str:
    """An expected peer's address until it connects: an address, a network, or nothing."""
    if net is None:
        return ""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


class AddressBook:
    """The expected peers' ``address:`` (addresses and networks), to know a legacy client by its
    source address: one dict lookup per prefix length in use (at most 33 + 129), whatever their number."""

    __slots__ = ("_by_len",)

    def __init__(self, expected: Iterable[Expected] = ()) -> None:
        self._by_len: dict[int, dict[Network, str]] = {}  # prefix length -> network -> expected name
        for e in expected:
            self.add(e)

    def add(self, e: Expected) -> None:
        if e.address is not None:
            self._by_len.setdefault(e.address.prefixlen, {})[e.address] = e.name

    def match(self, address: str) -> str | None:
        """The expected peer whose ``address:`` holds this source address ("ip:port")."""
        if not self._by_len:
            return None
        host = address.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for prefixlen, nets in self._by_len.items():
            if prefixlen > ip.max_prefixlen:
                continue
            name = nets.get(ipaddress.ip_network((ip, prefixlen), strict=False))
            if name is not None:
                return name
        return None


class Admission:
    """Identity and admission, reading the registry's known peers (handed down, never changed here)."""

    __slots__ = ("addresses", "expected", "peers", "settings", "to_add")

    def __init__(self, peers: Mapping[str, Peer], settings: RegistrySettings) -> None:
        self.peers = peers
        self.settings = settings
        self.expected: dict[str, Expected] = {}  # replaced on each reload, never changed: a snapshot
        self.addresses = AddressBook()
        self.to_add = 0  # expected peers a reload has yet to add (hbd.registry.Registry.begin)

    def configure(
        self, settings: RegistrySettings, expected: dict[str, Expected], addresses: AddressBook | None = None
    ) -> None:
        """``addresses``: the book of ``expected``, when made already (off the loop: hbd.registry_plan)."""
        self.settings = settings
        self.expected = expected
        self.addresses = addresses if addresses is not None else AddressBook(expected.values())

    def identify(self, name: str | None, certificate: str | None, address: str) -> tuple[str, bool] | str:
        """(identity, named) for a connection, or why it is refused."""
        if self.settings.name_from == "certificate":
            if certificate is None:
                return "no certificate name (tls.name_from: certificate)"
            if name is not None and name != certificate:
                return f"name mismatch: it greeted as {name}, its certificate names {certificate}"
            return certificate, True
        if name is not None:
            return name, True
        expected = self.addresses.match(address)
        if expected is not None:
            return expected, True
        return address, False

    def admit(self, identity: str, key: Key) -> Close | None:
        """Whether a connection may be this peer: unexpected names and max_peers."""
        if identity in self.expected:
            return None
        if self.settings.unexpected == "reject":
            return Close(key, f"{identity} is not an expected peer (unexpected: reject)", identity)
        if identity not in self.peers and len(self.peers) + self.to_add >= self.settings.max_peers:
            return Close(key, f"max_peers ({self.settings.max_peers}) reached: {identity} refused", identity)
        return None

    def hello(self, key: Key, name: str, certificate: str | None, address: str) -> list[Action]:
        """A connection greeted: refuse it now if its name is not acceptable (nothing is bound yet)."""
        who = self.identify(name, certificate, address)
        if isinstance(who, str):
            return [Close(key, who, name)]
        refused = self.admit(who[0], key)
        return [refused] if refused is not None else []
