"""hbd.registry_types, and the shape of the registry's pieces (handed down, none importing
hbd.registry back; their size is tests/test_shape.py's)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from hbd import registry
from hbd.registry_types import NEVER, Notice, Peer, PeerStatus, notice

PACKAGE = Path(__file__).resolve().parent.parent / "hbd"
PIECES = ("types", "table", "identity", "states", "flapping", "deadlines", "silences", "records")


def test_notice_carries_the_peer_as_it_is_now() -> None:
    peer = Peer("10.0.0.5:4000", "10.0.0.5:4000", PeerStatus.UP, 0.0, 10.0, False)
    peer.expected, peer.labels = True, (("rack", "r1"),)
    n = notice(peer, "down", "UP", "DOWN", "timeout", False, logging.WARNING, True, 12.0)
    assert n == Notice(
        "10.0.0.5:4000",
        "down",
        "UP",
        "DOWN",
        "timeout",
        False,
        logging.WARNING,
        True,
        "10.0.0.5:4000",
        True,
        12.0,
        (("rack", "r1"),),
        False,
    )


def test_per_peer_state_has_slots() -> None:
    peer = Peer("a", "", PeerStatus.NEW, 0.0, 1.0, True)
    with pytest.raises(AttributeError):
        peer.extra = 1  # type: ignore[attr-defined]


def test_hbd_registry_re_exports_what_its_callers_import() -> None:
    for name in registry.__all__:
        assert hasattr(registry, name), name
    assert registry.Peer is Peer and registry.PeerStatus is PeerStatus  # the same classes, not copies


@pytest.mark.parametrize("piece", PIECES)
def test_no_piece_imports_the_registry(piece: str) -> None:
    path = PACKAGE / f"registry_{piece}.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.module != "hbd.registry", f"{path.name} imports hbd.registry"
            assert not (node.module == "hbd" and any(a.name == "registry" for a in node.names)), path.name
        elif isinstance(node, ast.Import):
            assert all(a.name != "hbd.registry" for a in node.names), f"{path.name} imports hbd.registry"


def test_a_peers_flags_and_rising_count_share_one_int_and_read_as_attributes() -> None:
    """Peer keeps named, expected and the rising count in one slot (8 B each saved on 100,000
    peers), and its address packed: each reads and sets as a plain attribute, independently."""
    peer = Peer("web1", "10.0.0.5:4000", PeerStatus.NEW, 0.0, 10.0, True)
    assert (peer.named, peer.expected, peer.flapping, peer.rising) == (True, False, False, 0)
    assert peer.address == "10.0.0.5:4000"
    peer.rising += 1
    peer.rising += 1
    peer.expected = True
    assert (peer.named, peer.expected, peer.flapping, peer.rising) == (True, True, False, 2)
    peer.flapping = True
    peer.rising = 1000  # rise: has no small bound
    assert (peer.named, peer.expected, peer.flapping, peer.rising) == (True, True, True, 1000)
    peer.expected = False
    peer.rising = 0
    assert (peer.named, peer.expected, peer.flapping, peer.rising) == (True, False, True, 0)
    peer.flapping = False
    assert (peer.named, peer.expected, peer.flapping, peer.rising) == (True, False, False, 0)
    legacy = Peer("10.0.0.6:4001", "10.0.0.6:4001", PeerStatus.NEW, 0.0, 10.0, False)
    legacy.expected = True
    assert (legacy.named, legacy.expected) == (False, True)
    for address in ("", "10.0.0.0/24", "[::1]:4000", "10.0.0.7:1"):
        peer.address = address
        assert peer.address == address
    assert len(Peer.__slots__) <= 16  # 19 before: 184 B a peer, now 160


def test_a_peers_grace_and_its_connections_first_ping_share_one_slot() -> None:
    """A peer has a grace (NEW, never connected) or a connection's first ping, never both: one slot
    holds either, and each reads NEVER when it is the other's."""
    peer = Peer("web1", "", PeerStatus.NEW, 0.0, 10.0, True)
    assert peer.grace == peer.first_ping == NEVER
    peer.grace = 30.0
    assert (peer.grace, peer.first_ping) == (30.0, NEVER)
    peer.key = 7  # it connects (hbd.registry_states: its grace is over)
    peer.grace = NEVER
    assert peer.grace == NEVER
    peer.first_ping = 12.0
    assert (peer.grace, peer.first_ping) == (NEVER, 12.0)
    peer.key = None  # its connection ended: it is DOWN, never NEW again
    assert peer.first_ping == NEVER
