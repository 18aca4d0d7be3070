"""Send queue: datagrams wait here for the uplinks, highest priority first.

A datagram not handed to the wire by its deadline is dropped, never sent late: for the
traffic WARP carries (teleoperation, control loops, WireGuard inside) a late packet is
worse than a lost one, and sending it would only delay the fresh ones behind it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple


class QueuedDatagram(NamedTuple):
    tunnel_id: int
    datagram: bytes
    enqueued_at: float
    expires_at: float


@dataclass(slots=True)
class SendQueueStats:
    enqueued: int = 0
    sent: int = 0  # handed out by pop()
    dropped_stale: int = 0  # past their send deadline
    dropped_overflow: int = 0  # queue full
    dropped_stale_by_tunnel: dict[int, int] = field(default_factory=dict)
    dropped_overflow_by_tunnel: dict[int, int] = field(default_factory=dict)


class SendQueue:
    """Bounded multi-priority FIFO with per-datagram deadlines (sans-I/O: `now` passed in).

    When full, the oldest datagram of the lowest non-empty priority makes room, provided
    that priority is not above the newcomer's; otherwise the newcomer is dropped. Oldest
    first because it is the closest to its deadline, and the least useful when it arrives.
    """

    def __init__(self, max_length: int = 1024) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.max_length = max_length
        self.stats = SendQueueStats()
        self._queues: dict[int, deque[QueuedDatagram]] = {}
        self._priorities: list[int] = []  # ascending; served from the end
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def push(
        self,
        tunnel_id: int,
        datagram: bytes,
        now: float,
        send_deadline: float,
        priority: int = 0,
    ) -> bool:
        """Queue a datagram that must be on the wire within `send_deadline` seconds.

        Returns False if it was dropped at once because the queue is full of datagrams of
        higher priority.
        """
        stats = self.stats
        stats.enqueued += 1
        if self._length >= self.max_length and not self._make_room(priority):
            self._count_drop(stats.dropped_overflow_by_tunnel, tunnel_id)
            stats.dropped_overflow += 1
            return False
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = deque()
            bisect.insort(self._priorities, priority)
        queue.append(QueuedDatagram(tunnel_id, datagram, now, now + send_deadline))
        self._length += 1
        return True

    def pop(self, now: float) -> QueuedDatagram | None:
        """The next datagram to send, dropping (and counting) those past their deadline."""
        stats = self.stats
        for priority in reversed(self._priorities):
            queue = self._queues[priority]
            while queue:
                item = queue.popleft()
                self._length -= 1
                if item.expires_at < now:
                    stats.dropped_stale += 1
                    self._count_drop(stats.dropped_stale_by_tunnel, item.tunnel_id)
                    continue
                stats.sent += 1
                return item
        return None

    def drop_expired(self, now: float) -> int:
        """Drop every datagram past its deadline (e.g. while no uplink can send)."""
        dropped = 0
        stats = self.stats
        for queue in self._queues.values():
            # Deadlines can differ between tunnels of one priority, so scan the whole FIFO.
            kept = deque(item for item in queue if item.expires_at >= now)
            for item in queue:
                if item.expires_at < now:
                    self._count_drop(stats.dropped_stale_by_tunnel, item.tunnel_id)
            dropped += len(queue) - len(kept)
            queue.clear()
            queue.extend(kept)
        self._length -= dropped
        stats.dropped_stale += dropped
        return dropped

    def next_expiry(self) -> float | None:
        """Earliest deadline among the queued datagrams, or None when empty."""
        expiries = [item.expires_at for queue in self._queues.values() for item in queue]
        return min(expiries) if expiries else None

    def _make_room(self, priority: int) -> bool:
        for lowest in self._priorities:
            if lowest > priority:
                return False
            queue = self._queues[lowest]
            if queue:
                victim = queue.popleft()
                self._length -= 1
                self.stats.dropped_overflow += 1
                self._count_drop(self.stats.dropped_overflow_by_tunnel, victim.tunnel_id)
                return True
        return False

    @staticmethod
    def _count_drop(counts: dict[int, int], tunnel_id: int) -> None:
        counts[tunnel_id] = counts.get(tunnel_id, 0) + 1
