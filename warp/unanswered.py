"""Unanswered tries, sans-I/O: when a handshake or a lookup keeps getting no answer, say so once.

The gateway keeps one `Unanswered` per thing it waits on (the map's handshake, the far gate's
handshake, the map's lookup of the far gate). Each try is `tried(now)`; an answer is
`answered()`. `due(now)` is True exactly once per episode (from the first unanswered try to the
next answer): when at least `tries` went out and the first is at least `after` seconds old.
Both conditions: a burst of forced retries must not look like a dead peer, nor one slow try."""

from __future__ import annotations


class Unanswered:
    __slots__ = ("after", "count", "since", "tries", "warned")

    def __init__(self, tries: int, after: float) -> None:
        if tries < 1 or after < 0:
            raise ValueError("tries must be at least 1 and after non-negative")
        self.tries = tries
        self.after = after
        self.count = 0
        """Tries since the last answer."""
        self.since: float | None = None
        """When the first of them went out."""
        self.warned = False

    def tried(self, now: float) -> None:
        if self.since is None:
            self.since = now
        self.count += 1

    def due(self, now: float) -> bool:
        """True once per episode, when the tries are too many and too old: warn now."""
        if self.warned or self.since is None or self.count < self.tries:
            return False
        if now - self.since < self.after:
            return False
        self.warned = True
        return True

    def answered(self) -> bool:
        """An answer came: the episode ends. Returns whether it had been warned about."""
        warned = self.warned
        self.count = 0
        self.since = None
        self.warned = False
        return warned
