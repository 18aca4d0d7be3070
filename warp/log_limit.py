"""One rule for log lines about hostile or repeated input: at most one line per key per
interval, so a flood becomes a counter (kept by the caller) and a few log lines, never a
log that grows with the attack. Sans-I/O: the caller passes `now`."""

from __future__ import annotations

from collections.abc import Hashable

#: Default spacing of log lines for one key (seconds).
LOG_INTERVAL = 10.0


class LogLimiter:
    """``due(key, now)`` is True for the first call per key and then at most once per
    ``interval``. Keys are a small fixed set (reasons, event names), so the table stays
    bounded."""

    __slots__ = ("_last", "interval")

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        return True
