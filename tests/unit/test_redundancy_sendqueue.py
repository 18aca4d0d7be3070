"""Send queue: priority, FIFO, deadlines, bounded length."""

from __future__ import annotations

import pytest

from warp.redundancy import SendQueue


def drain(queue: SendQueue, now: float) -> list[bytes]:
    out = []
    while (item := queue.pop(now)) is not None:
        out.append(item.datagram)
    return out


def test_highest_priority_first_fifo_within_a_priority() -> None:
    queue = SendQueue()
    queue.push(1, b"low-1", 0.0, 1.0, priority=0)
    queue.push(2, b"high-1", 0.0, 1.0, priority=5)
    queue.push(1, b"low-2", 0.0, 1.0, priority=0)
    queue.push(3, b"mid-1", 0.0, 1.0, priority=2)
    queue.push(2, b"high-2", 0.0, 1.0, priority=5)
    queue.push(4, b"neg", 0.0, 1.0, priority=-1)
    assert drain(queue, 0.5) == [b"high-1", b"high-2", b"mid-1", b"low-1", b"low-2", b"neg"]
    assert len(queue) == 0
    assert queue.stats.sent == 6


def test_datagrams_past_their_deadline_are_dropped_and_counted_never_sent() -> None:
    queue = SendQueue()
    queue.push(1, b"old", 0.0, 0.1)
    queue.push(2, b"fresh", 0.05, 0.1)
    queue.push(1, b"older", 0.0, 0.1, priority=3)
    item = queue.pop(0.12)
    assert item is not None
    assert (item.datagram, item.tunnel_id, item.enqueued_at) == (b"fresh", 2, 0.05)
    assert item.expires_at == pytest.approx(0.15)
    assert queue.stats.dropped_stale == 2
    assert queue.stats.dropped_stale_by_tunnel == {1: 2}
    assert queue.pop(0.12) is None


def test_a_datagram_is_stale_at_its_deadline() -> None:
    queue = SendQueue()
    queue.push(1, b"x", 0.0, 0.25)
    queue.push(1, b"y", 0.0, 0.25)
    assert queue.pop(0.2499) is not None
    assert queue.pop(0.25) is None
    assert queue.stats.dropped_stale == 1


def test_next_expiry_is_when_drop_expired_drops_it() -> None:
    # A timer armed at next_expiry() must find something to drop, not re-arm at once.
    queue = SendQueue()
    for i in range(5):
        queue.push(1, b"x", i * 0.1, 0.3)
    while (expiry := queue.next_expiry()) is not None:
        assert queue.drop_expired(expiry) >= 1
        after = queue.next_expiry()
        assert after is None or after > expiry
    assert queue.stats.dropped_stale == 5


def test_parked_datagrams_keep_their_deadline_budget_and_count_once() -> None:
    queue = SendQueue()
    queue.push(1, b"a", 0.0, 0.5)
    queue.push(2, b"b", 0.1, 0.5, priority=3)
    queue.park(0.2)  # a: 0.3 left, b: 0.4 left
    assert queue.parked and len(queue) == 2
    queue.push(1, b"c", 0.3, 0.5)  # taken while parked: its whole 0.5 is left
    assert queue.pop(0.3) is None
    assert queue.drop_expired(10.0) == 0
    assert queue.next_expiry() is None
    queue.restore(10.0)
    assert not queue.parked
    assert queue.next_expiry() == pytest.approx(10.3)
    assert drain(queue, 10.35) == [b"b", b"c"]  # a's budget ran out at 10.3
    assert (queue.stats.enqueued, queue.stats.sent, queue.stats.dropped_stale) == (3, 2, 1)


def test_parking_is_bounded() -> None:
    queue = SendQueue(max_length=2)
    queue.push(1, b"a", 0.0, 1.0)
    queue.park(0.0)
    assert queue.push(1, b"b", 0.0, 1.0)
    assert not queue.push(1, b"c", 0.0, 1.0)
    assert queue.stats.dropped_overflow == 1 and len(queue) == 2


def test_drop_expired_purges_without_sending() -> None:
    queue = SendQueue()
    for i in range(5):
        queue.push(1, bytes([i]), i * 0.1, 0.15, priority=i % 2)
    assert queue.next_expiry() == pytest.approx(0.15)
    assert queue.drop_expired(0.32) == 2  # those expiring at 0.15 and 0.25
    assert len(queue) == 3
    assert queue.stats.dropped_stale_by_tunnel == {1: 2}
    assert sorted(drain(queue, 0.32)) == [b"\x02", b"\x03", b"\x04"]


def test_full_queue_drops_the_oldest_of_the_lowest_priority() -> None:
    queue = SendQueue(max_length=3)
    assert queue.push(1, b"a", 0.0, 1.0, priority=0)
    assert queue.push(1, b"b", 0.0, 1.0, priority=0)
    assert queue.push(2, b"H", 0.0, 1.0, priority=9)
    assert queue.push(1, b"c", 0.0, 1.0, priority=0)  # drops a
    assert queue.push(2, b"I", 0.0, 1.0, priority=9)  # drops b
    assert queue.stats.dropped_overflow == 2
    assert queue.stats.dropped_overflow_by_tunnel == {1: 2}
    assert len(queue) == 3
    assert drain(queue, 0.0) == [b"H", b"I", b"c"]


def test_full_queue_of_higher_priority_refuses_the_newcomer() -> None:
    queue = SendQueue(max_length=2)
    queue.push(2, b"H", 0.0, 1.0, priority=9)
    queue.push(2, b"I", 0.0, 1.0, priority=9)
    assert not queue.push(1, b"low", 0.0, 1.0, priority=0)
    assert queue.stats.dropped_overflow_by_tunnel == {1: 1}
    assert drain(queue, 0.0) == [b"H", b"I"]


def test_length_is_bounded_whatever_is_pushed() -> None:
    queue = SendQueue(max_length=10)
    for i in range(1000):
        queue.push(i % 3, b"x", i * 0.001, 0.1, priority=i % 4)
        assert len(queue) <= 10
    assert queue.stats.enqueued == 1000
    assert queue.stats.dropped_overflow == 990


def test_invalid_length_refused() -> None:
    with pytest.raises(ValueError):
        SendQueue(max_length=0)
