"""Token buckets keyed by source or client, in a table of bounded size (sans-I/O)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBucketTable(Generic[K]):
    """One token bucket per key: ``rate`` tokens per second, at most ``burst`` stored.

    The table holds at most ``max_entries`` buckets. A new key in a full table first drops
    buckets that have refilled completely (they hold no information), then the least recently
    used one: memory stays bounded whatever the number of keys seen. An evicted key starts
    again with a full bucket, so eviction only ever errs on the side of letting traffic in.
    """

    __slots__ = ("_buckets", "burst", "evictions", "max_entries", "rate")

    def __init__(self, rate: float, burst: float, max_entries: int) -> None:
        if rate <= 0 or burst <= 0 or max_entries <= 0:
            raise ValueError("rate, burst and max_entries must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_entries = max_entries
        self.evictions = 0
        # key -> [tokens, last update]; most recently used last.
        self._buckets: OrderedDict[K, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def allow(self, key: K, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them; say whether it did."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._make_room(now)
            bucket = [self.burst, now]
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
            elapsed = now - bucket[1]
            if elapsed > 0:
                bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
                bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return True
        return False

    def tokens(self, key: K, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)

    def forget(self, key: K) -> None:
        self._buckets.pop(key, None)

    def gc(self, now: float) -> int:
        """Drop every bucket that has refilled completely; return how many were dropped."""
        full = [
            k for k, (tokens, last) in self._buckets.items() if self._is_full(tokens, last, now)
        ]
        for key in full:
            del self._buckets[key]
        return len(full)

    def _is_full(self, tokens: float, last: float, now: float) -> bool:
        return tokens + max(0.0, now - last) * self.rate >= self.burst

    def _make_room(self, now: float) -> None:
        # Cheap first: refilled buckets among the oldest few, then the oldest outright.
        for key in list(self._buckets)[:16]:
            tokens, last = self._buckets[key]
            if self._is_full(tokens, last, now):
                del self._buckets[key]
        while len(self._buckets) >= self.max_entries:
            self._buckets.popitem(last=False)
            self.evictions += 1
