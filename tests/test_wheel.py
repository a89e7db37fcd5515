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
