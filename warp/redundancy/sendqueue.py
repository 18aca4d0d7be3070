"""Send queue: datagrams wait here for the uplinks, highest priority first.

A datagram not handed to the wire before its deadline is dropped, never sent late (it is
stale at `expires_at`): for the traffic WARP carries (teleoperation, control loops,
WireGuard inside) a late packet is worse than a lost one, and sending it would only delay
the fresh ones behind it.

Back-pressure: `park` stops the deadline clock of everything queued (the uplinks cannot
take more, through no fault of the datagrams) and `restore` starts it again; a datagram
parked and restored is counted once in `enqueued` and once in `sent`. Tunnels in
`clock_runs` keep their clock running while parked: their senders never waited (a UDP or
TUN gate is not paused), so what was parked past its deadline is stale when restored.
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
    enqueued: int = 0  # offered to push()
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
        #: Tunnels whose deadline clock keeps running while parked (see the module docstring).
        self.clock_runs: set[int] = set()
        # While parked: (tunnel id, datagram, enqueued at, seconds of deadline left, priority,
        # when those seconds were counted), in the order they will be restored; None when
        # not parked.
        self._parked: list[tuple[int, bytes, float, float, int, float]] | None = None

    def __len__(self) -> int:
        """Datagrams waiting, parked ones included."""
        if self._parked is not None:
            return self._length + len(self._parked)
        return self._length

    @property
    def parked(self) -> bool:
        return self._parked is not None

    def park(self, now: float) -> None:
        """Stop the deadline clock: nothing is popped or expires until `restore`; what is
        pushed meanwhile waits with its whole deadline."""
        if self._parked is None:
            self._parked = []
        parked = self._parked
        stats = self.stats
        for priority in reversed(self._priorities):
            queue = self._queues[priority]
            for item in queue:
                if item.expires_at <= now:
                    stats.dropped_stale += 1
                    self._count_drop(stats.dropped_stale_by_tunnel, item.tunnel_id)
                else:
                    parked.append(
                        (
                            item.tunnel_id,
                            item.datagram,
                            item.enqueued_at,
                            item.expires_at - now,
                            priority,
                            now,
                        )
                    )
            queue.clear()
        self._length = 0

    def restore(self, now: float) -> None:
        """Start the deadline clock again: parked datagrams are queued with what was left of
        their deadline, in their order."""
        parked, self._parked = self._parked, None
        clock_runs = self.clock_runs
        for tunnel_id, datagram, enqueued_at, remaining, priority, counted_at in parked or ():
            since = counted_at if tunnel_id in clock_runs else now
            self._append(
                QueuedDatagram(tunnel_id, datagram, enqueued_at, since + remaining), priority
            )

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
        parked = self._parked
        if parked is not None:
            if len(parked) >= self.max_length:
                self._count_drop(stats.dropped_overflow_by_tunnel, tunnel_id)
                stats.dropped_overflow += 1
                return False
            parked.append((tunnel_id, datagram, now, send_deadline, priority, now))
            return True
        if self._length >= self.max_length and not self._make_room(priority):
            self._count_drop(stats.dropped_overflow_by_tunnel, tunnel_id)
            stats.dropped_overflow += 1
            return False
        self._append(QueuedDatagram(tunnel_id, datagram, now, now + send_deadline), priority)
        return True

    def _append(self, item: QueuedDatagram, priority: int) -> None:
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = deque()
            bisect.insort(self._priorities, priority)
        queue.append(item)
        self._length += 1

    def pop(self, now: float) -> QueuedDatagram | None:
        """The next datagram to send, dropping (and counting) those past their deadline;
        None while parked."""
        if self._parked is not None:
            return None
        stats = self.stats
        for priority in reversed(self._priorities):
            queue = self._queues[priority]
            while queue:
                item = queue.popleft()
                self._length -= 1
                if item.expires_at <= now:
                    stats.dropped_stale += 1
                    self._count_drop(stats.dropped_stale_by_tunnel, item.tunnel_id)
                    continue
                stats.sent += 1
                return item
        return None

    def drop_expired(self, now: float) -> int:
        """Drop every datagram past its deadline (e.g. while no uplink can send)."""
        if self._parked is not None:
            return 0
        dropped = 0
        stats = self.stats
        for queue in self._queues.values():
            # Deadlines can differ between tunnels of one priority, so scan the whole FIFO.
            kept = deque(item for item in queue if item.expires_at > now)
            for item in queue:
                if item.expires_at <= now:
                    self._count_drop(stats.dropped_stale_by_tunnel, item.tunnel_id)
            dropped += len(queue) - len(kept)
            queue.clear()
            queue.extend(kept)
        self._length -= dropped
        stats.dropped_stale += dropped
        return dropped

    def next_expiry(self) -> float | None:
        """Earliest deadline among the queued datagrams (when `drop_expired` drops it), or
        None when empty or parked."""
        if self._parked is not None:
            return None
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
