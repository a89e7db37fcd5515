"""hbd.registry_silences on its own: add/remove, expiry on the wall clock, bounds, loading."""

from __future__ import annotations

import pytest

from hbd import registry_silences
from hbd.registry_silences import MAX_REASON, Silences
from hbd.store_records import SilenceRecord

T0 = 1000.0
WALL = 1_700_000_000.0


def test_silence_records_and_refusals() -> None:
    s = Silences()
    assert s.add("web1", WALL + 60, "maintenance", T0, WALL) == SilenceRecord("web1", WALL + 60, "maintenance", WALL)
    assert "web1" in s.by_name and len(s.by_name) == 1
    assert s.add("bad name!", WALL + 60, "", T0, WALL) == "not a peer name: 'bad name!'"
    assert s.add("web2", WALL, "", T0, WALL) == "the silence would already be over"
    assert s.next_due() == T0 + 60


def test_a_longer_silence_keeps_its_creation_time_and_cuts_the_reason() -> None:
    s = Silences()
    s.add("web1", WALL + 60, "", T0, WALL)
    rec = s.add("web1", WALL + 600, "x" * 1000, T0 + 10, WALL + 10)
    assert isinstance(rec, SilenceRecord) and rec.created == WALL and len(rec.reason) == MAX_REASON
    assert s.expire(T0 + 61, WALL + 61) == []  # its first due time is stale
    assert s.expire(T0 + 600, WALL + 600) == ["web1"] and s.records() == []


def test_expiry_follows_the_wall_clock() -> None:
    s = Silences()
    s.add("web1", WALL + 60, "", T0, WALL)
    assert s.expire(T0 + 61, WALL + 61 - 3600) == []  # the wall clock was set back an hour
    assert s.next_due() == pytest.approx(T0 + 61 + 3599)
    assert s.expire(T0 + 61 + 3599, WALL + 60) == ["web1"]
    assert s.next_due() is None


def test_remove_and_take_dirty() -> None:
    s = Silences()
    s.add("web1", WALL + 60, "a", T0, WALL)
    s.add("web2", WALL + 60, "b", T0, WALL)
    assert s.remove("web1") and not s.remove("web1")
    silences, gone = s.take_dirty()
    assert silences == [SilenceRecord("web2", WALL + 60, "b", WALL)] and gone == ["web1"]
    assert s.take_dirty() == ([], [])
    assert s.expire(T0 + 60, WALL + 60) == ["web2"]  # web1's entry is stale
    assert s.take_dirty() == ([], ["web2"])


def test_the_number_of_silences_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_silences, "MAX_SILENCES", 3)
    s = Silences()
    for i in range(3):
        assert isinstance(s.add(f"p{i}", WALL + 60, "", T0, WALL), SilenceRecord)
    assert s.add("p3", WALL + 60, "", T0, WALL) == "too many silences (3)"
    assert isinstance(s.add("p0", WALL + 90, "", T0, WALL), SilenceRecord)  # a known one may change


def test_the_heap_stays_bounded_when_one_silence_is_renewed_again_and_again() -> None:
    s = Silences()
    for i in range(10_000):
        s.add("web1", WALL + 60 + i, "", T0, WALL)
    assert len(s._heap) <= 2 * len(s.by_name) + 65


def test_load_brings_back_the_silences_that_have_not_ended() -> None:
    s = Silences()
    recs = [
        SilenceRecord("web1", WALL + 100, "fix", WALL - 50),
        SilenceRecord("web2", WALL - 1, "", WALL - 50),  # over
        SilenceRecord("bad name", WALL + 100, "", WALL - 50),
    ]
    s.load(recs, 5.0, WALL)
    assert s.records() == [SilenceRecord("web1", WALL + 100, "fix", WALL - 50)]
    assert s.next_due() == 105.0
    assert s.take_dirty() == ([], [])  # it came from the store: nothing to write
