"""Ordered delivery: hold datagrams that arrive after a gap, for at most `timeout`."""

from __future__ import annotations

import heapq
import sys
from collections import OrderedDict
from collections.abc import Callable

from warp.redundancy.stats import DecoderStats


class ReorderBuffer:
    """Releases datagrams in sequence order.

    Datagrams are keyed by the (extended) block sequence number of their first block and
    span as many sequence numbers as they have blocks. One that arrives after a gap waits
    until the gap fills, or until it has waited `timeout`, or until more than `max_blocks`
    sequence numbers or `max_bytes` bytes are held; then the gap is skipped. Anything
    that completes after its place was skipped is dropped (`on_drop` is told its key), so
    delivery is never out of order.

    Where the stream starts is known only if it is `first_key` (encoders start their
    sequence at 0); otherwise the first datagram waits like one after a gap, in case
    earlier ones were overtaken.

    Skipping a gap costs O(log held): a heap of the held keys gives the lowest one (keys
    released in order are left in it and popped once they reach the top).
    """

    __slots__ = (
        "_held",
        "_held_blocks",
        "_held_bytes",
        "_keys",
        "_next_key",
        "first_key",
        "max_blocks",
        "max_bytes",
        "on_drop",
        "stats",
        "timeout",
    )

    def __init__(
        self,
        timeout: float,
        max_blocks: int,
        stats: DecoderStats,
        first_key: int = 0,
        *,
        max_bytes: int = sys.maxsize,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.first_key = first_key
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self.stats = stats
        self.on_drop = on_drop
        self._next_key: int | None = None
        # key -> (datagram, span, time it became ready); insertion order is time order.
        self._held: OrderedDict[int, tuple[bytes, int, float]] = OrderedDict()
        self._keys: list[int] = []  # heap of the held keys (and of some released ones)
        self._held_blocks = 0
        self._held_bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, key: int, span: int, datagram: bytes, now: float) -> list[bytes]:
        """A datagram is complete: return what can now be delivered, in order."""
        next_key = self._next_key
        if next_key is None and key == self.first_key:
            next_key = key
        if key == next_key:
            self._next_key = key + span
            out = [datagram]
            if self._held:
                self._release_consecutive(out)
            self.stats.datagrams_delivered += len(out)
            return out
        if (next_key is not None and key < next_key) or key in self._held:
            self._drop(key)
            return []
        self._held[key] = (datagram, span, now)
        heapq.heappush(self._keys, key)
        self._held_blocks += span
        self._held_bytes += len(datagram)
        out = []
        while self._held and (
            self._held_blocks > self.max_blocks or self._held_bytes > self.max_bytes
        ):
            out += self._skip_gap()
        return out

    def tick(self, now: float) -> list[bytes]:
        """Skip every gap that a held datagram has waited on for `timeout`."""
        out: list[bytes] = []
        held = self._held
        while held and next(iter(held.values()))[2] + self.timeout <= now:
            out += self._skip_gap()
        return out

    def deadline(self) -> float | None:
        if not self._held:
            return None
        return next(iter(self._held.values()))[2] + self.timeout

    def flush(self) -> list[bytes]:
        """Release everything held, in order, skipping all gaps."""
        out: list[bytes] = []
        while self._held:
            out += self._skip_gap()
        self._keys.clear()
        return out

    def held_bytes(self) -> int:
        return self._held_bytes

    def _drop(self, key: int) -> None:
        self.stats.datagrams_late += 1
        if self.on_drop is not None:
            self.on_drop(key)

    def _release_consecutive(self, out: list[bytes]) -> None:
        held = self._held
        next_key = self._next_key
        assert next_key is not None  # set before anything is released
        while (entry := held.pop(next_key, None)) is not None:
            out.append(entry[0])
            self._held_blocks -= entry[1]
            self._held_bytes -= len(entry[0])
            next_key += entry[1]
        self._next_key = next_key
        # Released keys are below every held one: they are at the top of the heap.
        keys = self._keys
        while keys and keys[0] not in held:
            heapq.heappop(keys)

    def _skip_gap(self) -> list[bytes]:
        held = self._held
        keys = self._keys
        next_key = self._next_key
        while keys:
            key = keys[0]
            entry = held.get(key)
            if entry is None:  # released already
                heapq.heappop(keys)
            elif next_key is not None and key < next_key:
                # A peer can make datagrams overlap (a key inside an earlier datagram's
                # span): such leftovers are behind the cursor and must not move it back.
                heapq.heappop(keys)
                del held[key]
                self._held_blocks -= entry[1]
                self._held_bytes -= len(entry[0])
                self._drop(key)
            else:
                break
        if not held:
            return []
        lowest = keys[0]
        if next_key is not None:  # else this is where the stream starts: nothing skipped
            self.stats.blocks_skipped += lowest - next_key
        self._next_key = lowest
        out: list[bytes] = []
        self._release_consecutive(out)
        self.stats.datagrams_delivered += len(out)
        return out
