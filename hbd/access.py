"""The server's optional ``allow:`` list: source networks (CIDR) that may connect.

Checked once per accepted connection, before any byte is read; never on the ping path.
"""

from __future__ import annotations

import ipaddress

from hbd.quote import quote, show

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow(value: object) -> tuple[Network, ...] | None:
    """Config converter: null (everyone) or a non-empty list of addresses / CIDR networks."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(
            "must be a list of addresses or networks such as 10.0.0.0/8 (leave it out to allow everyone), "
            f"got {show(value)}"
        )
    nets: list[Network] = []
    bad: list[str] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int):
            bad.append(quote(item))
            continue
        try:
            nets.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            bad.append(quote(item))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"not an address or network: {', '.join(bad[:3])}{more}")
    return tuple(nets)


class AllowList:
    __slots__ = ("nets",)

    def __init__(self, nets: tuple[Network, ...]) -> None:
        self.nets = nets

    def allows(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 client on a dual-stack (::) listener
        return any(ip in net for net in self.nets)
