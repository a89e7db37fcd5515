"""A peer's address as the registry keeps it: an IPv4 ``a.b.c.d:port`` packed into one int.

Every connected peer's address is its own string (``ip:port``: 60-70 B each, 80 B as pymalloc
allocates them); the same address as an int of 48 bits is 32 B. The registry keeps the packed
form and gives back the string on each read (a state change's notice, a status row, a state store
record: never per ping). Anything else (IPv6, a legacy client's odd form, an expected peer's
network, "") is kept as it came: only an address that reads back exactly as it was is packed.
"""

from __future__ import annotations

from socket import inet_aton, inet_ntoa

Packed = str | int


def pack(address: str) -> Packed:
    """``address`` as kept: an int when it is a plain IPv4 ``a.b.c.d:port``, else itself. About 1 us:
    once per connection's first ping."""
    host, sep, port = address.rpartition(":")
    if not (sep and port.isascii() and port.isdigit() and len(port) <= 5):
        return address
    try:
        raw = inet_aton(host)  # it also takes "1.2", "01.2.3.4" (octal), "1.2.3.4 x": the round trip below
    except (OSError, ValueError):  # not an address; a NUL or a character that is not ASCII
        return address
    number = int(port)
    if number > 65535 or str(number) != port or inet_ntoa(raw) != host:
        return address  # it would read back otherwise: kept as it came
    return int.from_bytes(raw, "big") << 16 | number


def unpack(packed: Packed) -> str:
    """The address that ``pack`` was given."""
    if isinstance(packed, str):
        return packed
    return f"{inet_ntoa((packed >> 16).to_bytes(4, 'big'))}:{packed & 65535}"


def host_of(packed: Packed) -> str:
    """The host part of the address that ``pack`` was given (everything before its last ``:``)."""
    if isinstance(packed, str):
        return packed.rsplit(":", 1)[0]
    return inet_ntoa((packed >> 16).to_bytes(4, "big"))


def of(host: str, port: int) -> Packed:
    """An accepted connection's address as ``pack(f"{host}:{port}")`` gives it, without the string
    in between (the kernel's IPv4 form reads back as it came; anything else is the string)."""
    if "." in host and ":" not in host:
        try:
            return int.from_bytes(inet_aton(host), "big") << 16 | port
        except (OSError, ValueError):
            pass
    return f"{host}:{port}"
