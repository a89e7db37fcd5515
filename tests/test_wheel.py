from hbd.wheel import DeadlineWheel


def test_items_fire_at_the_end_of_their_slot_never_before() -> None:
    w: DeadlineWheel[str] = DeadlineWheel(0.01)
    a = w.add(1.001, "a")
    w.add(1.009, "b")
    w.add(1.5, "c")
    assert w.next_time() is not None and 1.009 <= w.next_time() <= 1.0101
    assert w.pop_due(1.005) == []
    due = w.pop_due(1.0101)
    assert due == [(a, ["a", "b"])]
    assert w.pop_due(2.0) == [(w_slot := due[0][0] + 49, ["c"])] and w_slot == a + 49
    assert w.next_time() is None and len(w) == 0


def test_slots_stay_few_however_many_items() -> None:
    w: DeadlineWheel[int] = DeadlineWheel(0.01)
    for i in range(100_000):
        w.add(10.0 + (i % 1000) / 1000, i)  # 100k deadlines spread over one second
    assert len(w._ticks) <= 101
    assert len(w) == 100_000


def test_discard_takes_an_item_out_and_emptied_slots_do_not_pile_up() -> None:
    """An item moved earlier again and again (a peer re-greeting with ever shorter intervals) keeps
    one entry; the ticks of emptied slots are dropped or compacted, never accumulated."""
    w: DeadlineWheel[str] = DeadlineWheel(0.01)
    tick = w.add(1000.0, "a")
    for i in range(100_000):
        when = 999.0 - i * 0.005  # always earlier: a new slot every other time
        w.discard(tick, "a")
        tick = w.add(when, "a")
        assert len(w) == 1
        assert len(w._slots) == 1
        assert len(w._ticks) <= 2 * 1025
    assert w.pop_due(tick * 0.01 + 0.001) == [(tick, ["a"])]
    assert w.next_time() is None and len(w._ticks) == 0


def test_an_emptied_and_refilled_slot_fires_once() -> None:
    w: DeadlineWheel[str] = DeadlineWheel(0.01)
    t = w.add(1.0, "a")
    w.discard(t, "a")
    assert w.next_time() is None  # nothing filed: no wake-up for the emptied slot
    t2 = w.add(1.0, "b")
    assert t2 == t
    w.add(2.0, "c")
    assert w.pop_due(1.5) == [(t, ["b"])]
    assert w.pop_due(3.0) == [(w.tick(2.0), ["c"])]
    w.discard(12345, "x")  # not filed: nothing happens
    assert len(w) == 0
