"""The simulator itself: link models and the binomial prediction are what we think."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tests.sim.harness import (
    ReceiverEngine,
    SenderEngine,
    Simulation,
    block_loss_probability,
)
from tests.sim.network import Blackout, GilbertElliott, IidLoss, Link, dead
from warp.paths.scheduler import PathQuality, ShardScheduler
from warp.redundancy import ShardDecoder, ShardEncoder


def send_many(link: Link, count: int, interval: float = 0.001) -> list[tuple[float, ...]]:
    return [link.transmit(i * interval) for i in range(count)]


def test_iid_loss_rate() -> None:
    link = Link(random.Random(1), losses=(IidLoss(0.1, random.Random(2)),))
    results = send_many(link, 100_000)
    lost = sum(1 for r in results if not r)
    assert lost == link.stats.lost
    assert lost / 100_000 == pytest.approx(0.1, abs=0.005)


def test_gilbert_elliott_loss_is_bursty_with_the_stationary_mean() -> None:
    model = GilbertElliott(random.Random(3), p_good_to_bad=0.01, p_bad_to_good=0.2)
    assert model.mean_loss == pytest.approx(0.01 / 0.21)
    assert model.mean_burst == pytest.approx(5)
    losses = [model.lost(0.0) for _ in range(200_000)]
    rate = sum(losses) / len(losses)
    assert rate == pytest.approx(model.mean_loss, rel=0.1)
    after_loss = [b for a, b in itertools.pairwise(losses) if a]
    # Loss after a loss is far likelier than on average: bursts, not iid.
    assert sum(after_loss) / len(after_loss) > 0.7
    bursts = "".join("x" if lost else "." for lost in losses).split(".")
    lengths = [len(b) for b in bursts if b]
    assert sum(lengths) / len(lengths) == pytest.approx(5, rel=0.1)


def test_blackout_is_on_off_in_virtual_time() -> None:
    blackout = Blackout(period=7.0, duration=2.0, offset=1.0)
    assert not blackout.lost(0.99)
    assert blackout.lost(1.0)
    assert blackout.lost(2.99)
    assert not blackout.lost(3.0)
    assert blackout.lost(8.5)
    assert not blackout.lost(10.0)
    link = Link(random.Random(0), losses=(dead(),))
    assert all(r == () for r in send_many(link, 1000))


def test_delay_jitter_duplication_and_reordering() -> None:
    link = Link(
        random.Random(4),
        delay=0.010,
        jitter=0.002,
        duplicate=0.05,
        reorder=0.1,
        reorder_delay=0.030,
    )
    results = send_many(link, 50_000, interval=0.0005)
    delays = [t - i * 0.0005 for i, r in enumerate(results) for t in r]
    assert len(delays) == 50_000 + link.stats.duplicated
    assert link.stats.duplicated / 50_000 == pytest.approx(0.05, abs=0.005)
    plain = [d for d in delays if d < 0.02]
    assert min(plain) >= 0.010
    assert max(plain) < 0.012
    assert link.stats.reordered / len(delays) == pytest.approx(0.1, abs=0.01)
    arrivals = [r[0] for r in results]
    overtaken = sum(1 for a, b in itertools.pairwise(arrivals) if b < a)
    assert overtaken > 1000


def test_links_are_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[tuple[float, ...]]:
        link = Link(
            random.Random(seed),
            jitter=0.01,
            duplicate=0.1,
            losses=(GilbertElliott(random.Random(seed + 1), 0.05, 0.3),),
        )
        return send_many(link, 1000)

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_binomial_prediction() -> None:
    p = 0.05
    direct = sum(math.comb(5, lost) * p**lost * (1 - p) ** (5 - lost) for lost in range(3, 6))
    assert block_loss_probability((2, 2, 1), (p, p, p), 3) == pytest.approx(direct)
    assert block_loss_probability((2, 2), (0.1, 0.1), 2) == pytest.approx(4 * 0.1**3 * 0.9 + 0.1**4)
    # A dead path carrying n - k shards loses nothing by itself.
    assert block_loss_probability((2, 2, 1), (1.0, 0.0, 0.0), 3) == 0.0
    assert block_loss_probability((3, 2), (1.0, 0.0), 3) == 1.0


def test_a_clean_network_delivers_everything_once_in_time() -> None:
    k, n, count = 3, 5, 2000
    links = {p: Link(random.Random(p), delay=0.005 * (p + 1), jitter=0.003) for p in range(3)}
    paths = [PathQuality(p) for p in links]
    sender = SenderEngine(ShardEncoder(1, k, n, 1400), ShardScheduler(k, n), paths)
    filler = bytes(range(256)) * 64
    receiver = ReceiverEngine(ShardDecoder(1, k, n, block_timeout=0.2), count, filler)
    result = Simulation(sender, links, [receiver]).run(count, 1000, lambda i: 8 + i % 9000, filler)
    delivery = result.delivery
    assert (delivery.lost, delivery.duplicates, delivery.corrupt) == (0, 0, 0)
    for ident in range(count):
        # Sent at ident / 1000; the 3rd fastest shard arrives within the slowest delay.
        assert 0.005 <= delivery.times[ident] - ident / 1000 <= 0.015 + 0.003
    # Blocks left incomplete never happen here, and every timer ran to completion.
    assert receiver.decoder.stats.blocks_expired == 0
    assert receiver.decoder.next_deadline() is None


def test_rate_limited_link_delivers_its_rate_and_drops_at_a_full_queue() -> None:
    # 1 MB/s with a 10 kB queue, offered 2 MB/s of 1000 B packets for a second: about half
    # arrives, evenly spaced at the rate, and the rest is dropped at the queue, never late.
    link = Link(random.Random(1), delay=0.010, rate=1_000_000, queue_bytes=10_000)
    sent = [(i * 0.0005, link.transmit(i * 0.0005, 1000)) for i in range(2000)]
    arrivals = [a for _, results in sent for a in results]
    assert len(arrivals) + link.stats.queue_dropped == 2000
    assert len(arrivals) == pytest.approx(1000, abs=15)
    gaps = [b - a for a, b in itertools.pairwise(arrivals[20:])]
    assert min(gaps) == pytest.approx(0.001)
    # Nothing waits longer than the queue holds (10 ms) plus the link's delay.
    assert all(a - at <= 0.0211 for at, results in sent for a in results)
