"""Deterministic helpers for tests and simulations of :class:`~warp.wireguard.Device`.

Not used by the core itself: a seeded RNG, a settable wall clock, and a :class:`Link` that carries
the outboxes of two devices to each other over virtual time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .device import Device
from .events import Address, Event, Outgoing, Received
from .keys import generate_private_key


class SeededRng:
    """``rng(n) -> bytes`` from a seeded PRNG (never use outside tests)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self._random.randbytes(n)


class WallClock:
    """A settable wall clock for TAI64N timestamps."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Side:
    device: Device
    address: Address
    received: list[Received] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    sent: list[Outgoing] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.device.public_key


def make_device(
    seed: int, *, wallclock: Callable[[], float] | None = None, **kwargs: Any
) -> Device:
    """A device whose key and randomness come from ``seed``."""
    rng = SeededRng(seed)
    private = generate_private_key(rng)
    return Device(private, rng=rng, wallclock=wallclock or WallClock(), **kwargs)


class Link:
    """Two devices joined by a lossless (or filtered) virtual wire."""

    def __init__(
        self,
        a: Device,
        b: Device,
        a_address: Address = ("192.0.2.1", 51820),
        b_address: Address = ("198.51.100.2", 51820),
    ) -> None:
        self.a = Side(a, a_address)
        self.b = Side(b, b_address)
        #: return False to drop a datagram ``(sender side, outgoing)``
        self.deliver: Callable[[Side, Outgoing], bool] = lambda side, out: True

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def pump(self, now: float, rounds: int = 50) -> int:
        """Deliver outboxes both ways until both are empty; returns the datagrams delivered."""
        delivered = 0
        for _ in range(rounds):
            moved = False
            for side in (self.a, self.b):
                out = side.device.drain_outgoing()
                side.events.extend(side.device.drain_events())
                for o in out:
                    side.sent.append(o)
                    moved = True
                    if not self.deliver(side, o):
                        continue
                    other = self.other(side)
                    r = other.device.receive(o.data, side.address, now)
                    delivered += 1
                    if r is not None:
                        other.received.append(r)
            if not moved:
                break
        for side in (self.a, self.b):
            side.events.extend(side.device.drain_events())
        return delivered

    def tick(self, now: float) -> None:
        self.a.device.tick(now)
        self.b.device.tick(now)
        self.pump(now)

    def run_until(self, end: float, now: float, step: float | None = None) -> float:
        """Advance virtual time from ``now`` to ``end`` by following both devices' deadlines
        (or fixed ``step``s), ticking and pumping; returns ``end``."""
        for _ in range(1_000_000):
            if step is not None:
                t = now + step
            else:
                deadlines = [
                    d
                    for d in (self.a.device.next_deadline(), self.b.device.next_deadline())
                    if d is not None
                ]
                t = max(min(deadlines), now) if deadlines else end
            if t > end:
                break
            now = t
            self.tick(now)
        else:  # pragma: no cover
            raise RuntimeError("virtual time does not advance: a timer is stuck")
        self.tick(end)
        return end
