"""A peer's address as the registry keeps it: an IPv4 ``a.b.c.d:port`` packed into one int.

Every connected peer's address is its own string (``ip:port``: 60-70 B each, 80 B as pymalloc
allocates them); the same address as an int of 48 bits is 32 B. The registry keeps the packed
form and gives back the string on each read (a state change's notice, a status row, a state store
record: never per ping). Anything else (IPv6, a legacy client's odd form, an expected peer's
network, "") is kept as it came: only an address that reads back exactly as it was is packed.
"""

from __future__ import annotations

Packed = str | int


def pack(address: str) -> Packed:
    """``address`` as kept: an int when it is a plain IPv4 ``a.b.c.d:port``, else itself."""
    host, sep, port = address.rpartition(":")
    parts = host.split(".")
    if not sep or len(parts) != 4 or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return address
    try:
        a, b, c, d = (int(p) for p in parts)
    except ValueError:
        return address
    if not (0 <= a <= 255 and 0 <= b <= 255 and 0 <= c <= 255 and 0 <= d <= 255 and int(port) <= 65535):
        return address
    packed = (a << 40) | (b << 32) | (c << 24) | (d << 16) | int(port)
    return packed if unpack(packed) == address else address  # "01.2.3.4", " 1.2.3.4", "+1": kept as they are


def unpack(packed: Packed) -> str:
    """The address that ``pack`` was given."""
    if isinstance(packed, str):
        return packed
    return f"{packed >> 40}.{packed >> 32 & 255}.{packed >> 24 & 255}.{packed >> 16 & 255}:{packed & 65535}"
