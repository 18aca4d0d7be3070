"""Two FEC engines talking through simulated links, in virtual time.

The sender engine is what a gateway does per tunnel on the way out (send queue, encoder
with its block window timer, scheduler); the receiver engine what it does on the way in
(decoder, with `tick` called exactly at `next_deadline`). Encryption and sockets are
left out: the links carry shard frames. Several receivers can listen to the same
arrivals (to compare ordered and unordered delivery on identical input).
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests.sim.network import Link
from warp.paths.scheduler import PathQuality, ShardScheduler
from warp.redundancy import Emission, SendQueue, ShardDecoder, ShardEncoder

ID_BYTES = 8
NEVER = math.inf


class SenderEngine:
    """Queue, encode and spread one tunnel's datagrams over the paths."""

    def __init__(
        self,
        encoder: ShardEncoder,
        scheduler: ShardScheduler[int],
        paths: Sequence[PathQuality[int]],
        *,
        send_deadline: float = 0.1,
        priority: int = 0,
    ) -> None:
        self.encoder = encoder
        self.scheduler = scheduler
        self.scheduler.update(paths)
        self.path_ids = [p.path_id for p in paths]
        self.queue = SendQueue(max_length=4096)
        self.send_deadline = send_deadline
        self.priority = priority
        # How many shards of each block went on each path (in `path_ids` order).
        self.spreads: Counter[tuple[int, ...]] = Counter()
        # Each block's layout: the path index of each data shard, then of each parity
        # shard: what the binomial prediction of residual loss is computed from.
        self.layouts: Counter[tuple[tuple[int, ...], tuple[int, ...]]] = Counter()
        self._paths: tuple[int, ...] = ()
        self._data: list[int] = []
        self._parity: list[int] = []

    def offer(self, datagram: bytes, now: float) -> None:
        self.queue.push(self.encoder.tunnel_id, datagram, now, self.send_deadline, self.priority)

    def pump(self, now: float) -> list[tuple[int, bytes]]:
        """Everything the queue lets go at `now`, as (path id, frame) pairs."""
        out: list[tuple[int, bytes]] = []
        encoder = self.encoder
        while (item := self.queue.pop(now)) is not None:
            out += self._place(encoder.push(item.datagram, now, self.scheduler.effective_n))
        return out + self._place(encoder.flush(now))

    def deadline(self) -> float:
        deadline = self.encoder.next_deadline()
        return NEVER if deadline is None else deadline

    def close_due(self, now: float) -> list[tuple[int, bytes]]:
        """The open block's parity once its window has expired."""
        return self._place(self.encoder.close_due(now))

    def finish(self) -> None:
        """Account for the last block (its layout is recorded when the next one opens)."""
        self._end_block()

    def _place(self, frames: list[Emission]) -> list[tuple[int, bytes]]:
        out = []
        k = self.encoder.k
        index = {p: i for i, p in enumerate(self.path_ids)}
        for slot, frame in frames:
            if slot == 0:
                self._end_block()
                self._paths = self.scheduler.assign()
            path = self._paths[slot]
            (self._data if slot < k else self._parity).append(index[path])
            out.append((path, frame))
        return out

    def _end_block(self) -> None:
        if not self._data:
            return
        shards = self._data + self._parity
        self.spreads[tuple(shards.count(i) for i in range(len(self.path_ids)))] += 1
        self.layouts[(tuple(self._data), tuple(self._parity))] += 1
        self._data = []
        self._parity = []


@dataclass
class Delivery:
    """What one receiver delivered: per datagram id, when (NaN: never)."""

    count: int
    times: array[float] = field(init=False)
    order: list[int] = field(default_factory=list)
    duplicates: int = 0
    corrupt: int = 0

    def __post_init__(self) -> None:
        self.times = array("d", [math.nan]) * self.count

    @property
    def delivered(self) -> int:
        return self.count - sum(1 for t in self.times if math.isnan(t))

    @property
    def lost(self) -> int:
        return self.count - self.delivered


class ReceiverEngine:
    """One tunnel's decoder, recording what it delivers and checking every byte."""

    def __init__(self, decoder: ShardDecoder, count: int, filler: bytes) -> None:
        self.decoder = decoder
        self.delivery = Delivery(count)
        self._filler = filler
        self.deadline = NEVER

    def receive(self, frame: bytes, now: float) -> None:
        datagrams = self.decoder.receive(frame, now)
        if datagrams:
            self._record(datagrams, now)
        self._rearm()

    def tick(self, now: float) -> None:
        datagrams = self.decoder.tick(now)
        if datagrams:
            self._record(datagrams, now)
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.decoder.next_deadline()
        self.deadline = NEVER if deadline is None else deadline

    def _record(self, datagrams: list[bytes], now: float) -> None:
        delivery = self.delivery
        times = delivery.times
        for datagram in datagrams:
            ident = int.from_bytes(datagram[:ID_BYTES])
            if ident >= delivery.count or datagram[ID_BYTES:] != self._filler[: len(datagram) - 8]:
                delivery.corrupt += 1
                continue
            if not math.isnan(times[ident]):
                delivery.duplicates += 1
                continue
            times[ident] = now
            delivery.order.append(ident)


@dataclass
class SimResult:
    sent: int
    receivers: list[ReceiverEngine]
    sender: SenderEngine
    links: dict[int, Link]
    duration: float

    @property
    def delivery(self) -> Delivery:
        return self.receivers[0].delivery


class Simulation:
    """Drive a sender and its receivers through links in virtual time."""

    def __init__(
        self,
        sender: SenderEngine,
        links: dict[int, Link],
        receivers: Sequence[ReceiverEngine],
        *,
        sample: Callable[[float], None] | None = None,
    ) -> None:
        self.sender = sender
        self.links = links
        self.receivers = list(receivers)
        self.sample = sample
        self._arrivals: list[tuple[float, int, bytes]] = []
        self._tie = itertools.count()

    def run(
        self,
        count: int,
        rate: float,
        size: int | Callable[[int], int],
        filler: bytes,
        *,
        sample_every: int = 1000,
        inject: Callable[[float], list[tuple[int, bytes]]] | None = None,
    ) -> SimResult:
        """Send `count` datagrams at `rate` per second: 8-byte id, then filler bytes.

        `inject(now)`, if given, adds more (path id, frame) pairs after each datagram.
        """
        interval = 1.0 / rate
        sizes = (lambda _: size) if isinstance(size, int) else size
        now = 0.0
        for ident in range(count):
            now = ident * interval
            self._advance(now)
            self.sender.offer(ident.to_bytes(ID_BYTES) + filler[: sizes(ident) - ID_BYTES], now)
            shards = self.sender.pump(now)
            if inject is not None:
                shards += inject(now)
            self._transmit(shards, now)
            if self.sample is not None and ident % sample_every == 0:
                self.sample(now)
        self._advance(NEVER)
        self.sender.finish()
        return SimResult(count, self.receivers, self.sender, self.links, now)

    def _transmit(self, shards: list[tuple[int, bytes]], now: float) -> None:
        for path_id, frame in shards:
            for arrival in self.links[path_id].transmit(now):
                heapq.heappush(self._arrivals, (arrival, next(self._tie), frame))

    def _advance(self, until: float) -> None:
        """Deliver arrivals and run the encoder's and decoders' timers, in time order, up
        to `until`."""
        arrivals = self._arrivals
        receivers = self.receivers
        pop = heapq.heappop
        sender = self.sender
        while True:
            arrival = arrivals[0][0] if arrivals else NEVER
            deadline = min(r.deadline for r in receivers)
            closing = sender.deadline()
            if closing < NEVER and closing <= min(until, arrival, deadline):
                self._transmit(sender.close_due(closing), closing)
                continue
            if deadline <= arrival:
                if deadline > until or deadline == NEVER:
                    return
                for receiver in receivers:
                    if receiver.deadline <= deadline:
                        receiver.tick(deadline)
                continue
            if arrival > until:
                return
            _, _, frame = pop(arrivals)
            for receiver in receivers:
                receiver.receive(frame, arrival)


def block_loss_probability(spread: Sequence[int], losses: Sequence[float], k: int) -> float:
    """Exact probability that fewer than k of a block's shards arrive, when path i
    carries spread[i] shards and loses each independently with losses[i]."""
    # Distribution of the number of shards received, path by path (sum of binomials).
    received = [1.0]
    for shards, loss in zip(spread, losses, strict=True):
        path = [
            math.comb(shards, r) * (1 - loss) ** r * loss ** (shards - r) for r in range(shards + 1)
        ]
        combined = [0.0] * (len(received) + shards)
        for a, pa in enumerate(received):
            for b, pb in enumerate(path):
                combined[a + b] += pa * pb
        received = combined
    return sum(received[:k])


def predicted_losses(
    layouts: Counter[tuple[tuple[int, ...], tuple[int, ...]]], losses: Sequence[float]
) -> float:
    """Expected lost data shards (datagrams, when each data shard holds one) given how
    many blocks used each layout: data shard i is lost when it does not arrive and fewer
    than k' of the block's other shards do."""
    expected = 0.0
    for (data, parity), count in layouts.items():
        shards = data + parity
        for i, path in enumerate(data):
            others = [0] * len(losses)
            for j, other in enumerate(shards):
                if j != i:
                    others[other] += 1
            expected += count * losses[path] * block_loss_probability(others, losses, len(data))
    return expected
