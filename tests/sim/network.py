"""Simulated uplinks: in-memory links with seeded loss, duplication, reordering, delay,
jitter and blackouts, in virtual time. A link decides, per packet sent at `now`, when
(and how many times) it arrives; it never sees the bytes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


class LossModel(Protocol):
    def lost(self, now: float) -> bool:
        """Whether the packet sent at `now` is lost."""
        ...


class IidLoss:
    """Each packet lost independently with probability `rate`."""

    def __init__(self, rate: float, rng: random.Random) -> None:
        self.rate = rate
        self._random = rng.random

    def lost(self, now: float) -> bool:
        return self._random() < self.rate


class GilbertElliott:
    """Bursty loss: a two-state Markov chain stepped once per packet.

    In the good state a packet is lost with `loss_good`, in the bad state with
    `loss_bad`; the chain moves good -> bad with `p_good_to_bad` and bad -> good with
    `p_bad_to_good` before each packet.
    """

    def __init__(
        self,
        rng: random.Random,
        p_good_to_bad: float,
        p_bad_to_good: float,
        loss_good: float = 0.0,
        loss_bad: float = 1.0,
    ) -> None:
        self.p_good_to_bad = p_good_to_bad
        self.p_bad_to_good = p_bad_to_good
        self.loss_good = loss_good
        self.loss_bad = loss_bad
        self.bad = False
        self._random = rng.random

    @property
    def mean_loss(self) -> float:
        """Long-run loss rate (stationary distribution of the chain)."""
        share_bad = self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good)
        return share_bad * self.loss_bad + (1 - share_bad) * self.loss_good

    @property
    def mean_burst(self) -> float:
        """Mean number of consecutive packets spent in the bad state."""
        return 1 / self.p_bad_to_good

    def lost(self, now: float) -> bool:
        random_ = self._random
        if self.bad:
            if random_() < self.p_bad_to_good:
                self.bad = False
        elif random_() < self.p_good_to_bad:
            self.bad = True
        return random_() < (self.loss_bad if self.bad else self.loss_good)


class Blackout:
    """On/off outage: everything sent during the first `duration` seconds of every
    `period` (shifted by `offset`) is lost. `period=inf` with `offset=0` is a dead link."""

    def __init__(self, period: float, duration: float, offset: float = 0.0) -> None:
        self.period = period
        self.duration = duration
        self.offset = offset

    def lost(self, now: float) -> bool:
        return (now - self.offset) % self.period < self.duration


def dead() -> Blackout:
    return Blackout(period=float("inf"), duration=float("inf"))


@dataclass
class LinkStats:
    sent: int = 0
    sent_bytes: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    #: dropped at a full queue in front of the rate limit (a modem's buffer)
    queue_dropped: int = 0


@dataclass
class Link:
    """One uplink: fixed `delay` plus uniform jitter in [0, `jitter`); with probability
    `reorder` a packet is held back an extra `reorder_delay`; with probability
    `duplicate` it arrives twice (the copy with its own delay).

    `rate` (bytes/s; None: unlimited) is a bottleneck with a FIFO of at most `queue_bytes`
    in front (tc tbf, a modem): a packet waits for the ones ahead to be serialized, and one
    that finds the queue full is dropped (`stats.queue_dropped`)."""

    rng: random.Random
    delay: float = 0.010
    jitter: float = 0.0
    losses: tuple[LossModel, ...] = ()
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.0
    rate: float | None = None
    queue_bytes: int = 0
    stats: LinkStats = field(default_factory=LinkStats)
    #: when the bottleneck has serialized everything queued so far
    _busy_until: float = 0.0

    def transmit(self, now: float, size: int = 0) -> tuple[float, ...]:
        """Arrival times of a `size`-byte packet sent at `now`: none if lost, two if
        duplicated."""
        stats = self.stats
        stats.sent += 1
        stats.sent_bytes += size
        for model in self.losses:
            if model.lost(now):
                stats.lost += 1
                return ()
        if self.rate is not None:
            start = max(self._busy_until, now)
            if (start - now) * self.rate + size > self.queue_bytes:
                stats.queue_dropped += 1
                return ()
            self._busy_until = start + size / self.rate
            now = self._busy_until
        if self.duplicate and self.rng.random() < self.duplicate:
            stats.duplicated += 1
            return (self._arrival(now), self._arrival(now))
        return (self._arrival(now),)

    def _arrival(self, now: float) -> float:
        arrival = now + self.delay
        if self.jitter:
            arrival += self.rng.random() * self.jitter
        if self.reorder and self.rng.random() < self.reorder:
            self.stats.reordered += 1
            arrival += self.reorder_delay
        return arrival
