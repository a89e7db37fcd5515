"""The hooks' waiting line without processes or a clock: fairness per peer, drops, the token bucket."""

from hbd.hook_queue import Change, HookQueue


def change(peer: str, event: str = "down", standing: float = 0.0) -> Change:
    return Change(event, peer, f"{peer}:1", {}, standing)


def full_queue(max_running: int = 2, max_queued: int = 3) -> HookQueue:
    q = HookQueue(rate=10.0)
    q.configure(max_running, max_queued)
    return q


def test_a_peers_later_change_replaces_the_waiting_one_in_its_place() -> None:
    q = full_queue()
    a, b = change("a", "up"), change("b")
    assert q.offer(a, 0.0, running=2) is None and q.offer(b, 0.0, running=2) is None
    a2 = change("a", "late")
    a3 = change("a", "down")
    assert q.offer(a2, 0.0, running=2) is None and q.offer(a3, 0.0, running=2) is None
    assert list(q.waiting.values()) == [a3, b] and a3.coalesced == 2


def test_one_run_per_peer_at_a_time_and_others_are_not_held_up() -> None:
    q = full_queue(max_running=4)
    first = change("a", "up")
    q.offer(first, 0.0, running=0)
    assert q.take(0.0, running=0) is first
    q.offer(change("a", "down"), 0.0, running=1)
    b = change("b")
    q.offer(b, 0.0, running=1)
    assert q.take(0.0, running=1) is b  # a's next waits for a's run
    assert q.take(0.0, running=2) is None
    q.done(first)
    nxt = q.take(0.0, running=1)
    assert isinstance(nxt, Change) and nxt.peer == "a" and nxt.event == "down"


def test_when_full_the_least_established_is_dropped_newcomer_included() -> None:
    q = full_queue(max_running=1, max_queued=2)
    old, new = change("old", standing=30.0), change("new", standing=0.001)
    q.offer(old, 0.0, running=1)
    q.offer(new, 0.0, running=1)
    stranger = change("stranger", standing=0.0)
    assert q.offer(stranger, 0.0, running=1) is stranger  # less established than all who wait
    web = change("web", standing=10.0)
    assert q.offer(web, 0.0, running=1) is new
    assert list(q.waiting) == [old.key, web.key]
    assert q.configure(1, 1) == [web]


def test_starts_are_paced_by_the_token_bucket() -> None:
    q = full_queue(max_running=2, max_queued=10)
    for i in range(4):
        q.offer(change(f"p{i}"), 0.0, running=0)
    assert isinstance(q.take(0.0, 0), Change) and isinstance(q.take(0.0, 0), Change)  # a burst of max_running
    delay = q.take(0.0, 0)
    assert delay == 0.1  # one token at 10 a second
    assert isinstance(q.take(0.1, 0), Change)
    assert q.take(0.1, 0) == 0.1


def test_without_a_waiting_line_a_change_runs_at_once_or_is_dropped() -> None:
    q = full_queue(max_running=1, max_queued=0)
    a = change("a")
    assert q.offer(a, 0.0, running=0) is None and q.take(0.0, 0) is a
    b = change("b")
    assert q.offer(b, 0.0, running=1) is b and not q.waiting
