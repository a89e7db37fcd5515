import random
import statistics

from hbd.backoff import Backoff


def test_bounds_grow_exponentially_and_cap() -> None:
    b = Backoff(0.5, 10.0)
    assert [b.bound(i) for i in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.bound(10_000) == 10.0


def test_full_jitter_stays_within_bounds() -> None:
    b = Backoff(1.0, 30.0, rand=random.Random(1).random)
    for attempt in range(12):
        assert 0.0 <= b.next_delay() <= min(30.0, 2**attempt)


def test_jitter_spreads_a_fleet() -> None:
    rng = random.Random(7)
    first = [Backoff(1.0, 30.0, rand=rng.random).next_delay() for _ in range(2000)]
    assert 0.45 < statistics.mean(first) < 0.55  # uniform over [0, 1)
    assert max(first) - min(first) > 0.95
    buckets = [0] * 10
    for d in first:
        buckets[int(d * 10)] += 1
    assert max(buckets) < 2000 * 0.15  # no 100 ms slot holds much more than its 10 %


def test_reset_starts_over() -> None:
    b = Backoff(1.0, 30.0, rand=lambda: 1.0)
    for _ in range(5):
        b.next_delay()
    assert b.next_delay() == 30.0
    b.reset()
    assert b.next_delay() == 1.0
