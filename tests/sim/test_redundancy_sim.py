"""The FEC engine end to end over simulated uplinks: residual loss against the binomial
prediction, outages, ordering, and memory under a flood. Every case runs at least
100 000 datagrams in virtual time; printed figures show with `pytest -s`."""

from __future__ import annotations

import itertools
import math
import random
import tracemalloc

import pytest

from tests.sim.harness import (
    ReceiverEngine,
    SenderEngine,
    SimResult,
    Simulation,
    predicted_losses,
)
from tests.sim.network import Blackout, GilbertElliott, IidLoss, Link, dead
from warp.paths.scheduler import PathQuality, ShardScheduler
from warp.redundancy import ShardDecoder, ShardEncoder, max_shard_payload
from warp.redundancy.shard import PARITY_FRAME_TYPE, PARITY_HEADER

TUNNEL = 5
MTU = 1400
FILLER = random.Random(0).randbytes(65_536)


def engines(
    k: int, n: int, links: dict[int, Link], losses: dict[int, float] | None = None
) -> SenderEngine:
    """A sender whose scheduler knows each path's loss (as probes would measure it)."""
    paths = [PathQuality(p, loss=(losses or {}).get(p, 0.0), rtt=0.020) for p in links]
    return SenderEngine(ShardEncoder(TUNNEL, k, n, MTU), ShardScheduler(k, n), paths)


def receiver(k: int, n: int, count: int, **options: object) -> ReceiverEngine:
    decoder = ShardDecoder(TUNNEL, k, n, **options)  # type: ignore[arg-type]
    return ReceiverEngine(decoder, count, FILLER)


def assert_exactly_once(result: SimResult) -> None:
    for engine in result.receivers:
        assert engine.delivery.corrupt == 0
        assert engine.delivery.duplicates == 0


# ---- residual loss under iid loss: measured against the exact binomial prediction -------

IID_CASES = [
    # (k, n, paths, loss per path, datagrams): enough datagrams for >= ~330 expected
    # losses, so that the 20 % tolerance is over 3.5 standard deviations wide.
    pytest.param(3, 5, 3, 0.05, 300_000, id="k3n5-3paths-loss5pct", marks=pytest.mark.slow),
    pytest.param(3, 5, 3, 0.10, 100_000, id="k3n5-3paths-loss10pct"),
    pytest.param(2, 4, 2, 0.05, 700_000, id="k2n4-2paths-loss5pct", marks=pytest.mark.slow),
    pytest.param(2, 4, 2, 0.10, 100_000, id="k2n4-2paths-loss10pct"),
]


@pytest.mark.parametrize(("k", "n", "path_count", "loss", "count"), IID_CASES)
def test_residual_loss_matches_the_binomial_prediction(
    k: int, n: int, path_count: int, loss: float, count: int
) -> None:
    links = {
        p: Link(
            random.Random(10 + p),
            delay=0.010 + 0.005 * p,
            jitter=0.004,
            losses=(IidLoss(loss, random.Random(100 + p)),),
        )
        for p in range(path_count)
    }
    sender = engines(k, n, links, {p: loss for p in links})
    engine = receiver(k, n, count)
    result = Simulation(sender, links, [engine]).run(count, 5000, 64, FILLER)
    assert_exactly_once(result)
    measured = result.delivery.lost
    # The receiver's own count is exact (the seeds do not lose the stream's last shards,
    # which nothing after them would reveal).
    assert engine.decoder.stats.datagrams_lost == measured
    # One datagram per data shard here (each is sent alone): datagrams lost = data shards.
    predicted = predicted_losses(sender.layouts, [loss] * path_count)
    spreads = ", ".join(f"{s}x{c}" for s, c in sorted(sender.spreads.items()))
    print(
        f"\n(k={k}, n={n}) over {path_count} paths at {loss:.0%} iid loss, {count} datagrams;"
        f" spreads used: {spreads}\n"
        f"  residual loss measured {measured} ({measured / count:.4%}),"
        f" predicted {predicted:.1f} ({predicted / count:.4%}),"
        f" ratio {measured / predicted:.3f}"
    )
    # Every block used the spread the invariant demands: at most n - k per path.
    assert all(max(s) <= n - k for s in sender.spreads)
    assert abs(measured - predicted) <= 0.2 * predicted


# ---- outages ------------------------------------------------------------------------------


def test_one_of_three_paths_blacked_out_two_seconds_in_seven_loses_nothing() -> None:
    k, n, count = 3, 5, 100_000
    links = {p: Link(random.Random(p), delay=0.010 + 0.01 * p, jitter=0.005) for p in range(3)}
    links[1].losses = (Blackout(period=7.0, duration=2.0, offset=1.0),)
    sender = engines(k, n, links)  # the scheduler is not told: worst case
    result = Simulation(sender, links, [receiver(k, n, count)]).run(count, 1000, 200, FILLER)
    assert_exactly_once(result)
    blacked_out = links[1].stats.lost / links[1].stats.sent
    print(
        f"\nblackout: path 1 lost {blacked_out:.1%} of its shards over {result.duration:.0f} s;"
        f" datagrams lost {result.delivery.lost} of {count}"
    )
    assert blacked_out == pytest.approx(2 / 7, rel=0.05)
    assert result.delivery.lost == 0


def test_one_of_two_paths_dead_loses_nothing_with_two_of_four() -> None:
    k, n, count = 2, 4, 100_000
    links = {p: Link(random.Random(p), delay=0.015, jitter=0.01) for p in range(2)}
    links[0].losses = (dead(),)
    sender = engines(k, n, links)
    result = Simulation(sender, links, [receiver(k, n, count)]).run(count, 2000, 300, FILLER)
    assert_exactly_once(result)
    print(f"\ndead path: datagrams lost {result.delivery.lost} of {count}")
    # Blocks of 2 data shards (one datagram each) + 2 parity, 2 shards on each path.
    assert links[0].stats.lost == links[0].stats.sent >= 0.9 * count
    assert result.delivery.lost == 0


# ---- ordered delivery -------------------------------------------------------------------


@pytest.mark.slow
def test_ordered_never_out_of_order_and_never_waits_longer_than_reorder_timeout() -> None:
    k, n, count, reorder_timeout = 3, 5, 100_000, 0.05
    links = {
        p: Link(
            random.Random(20 + p),
            delay=0.010 + 0.008 * p,
            jitter=0.015,
            losses=(GilbertElliott(random.Random(200 + p), 0.01, 0.25, 0.01, 0.6),),
            duplicate=0.01,
            reorder=0.03,
            reorder_delay=0.04,
        )
        for p in range(3)
    }
    sender = engines(k, n, links)
    ordered = receiver(k, n, count, ordered=True, reorder_timeout=reorder_timeout)
    unordered = receiver(k, n, count)

    def size(ident: int) -> int:  # mostly small, some multi-block
        return 9000 if ident % 50 == 0 else 40 + ident % 1300

    result = Simulation(sender, links, [ordered, unordered]).run(count, 2000, size, FILLER)
    assert_exactly_once(result)
    order = ordered.delivery.order
    assert all(a < b for a, b in itertools.pairwise(order)), "out of order"
    # Identical arrivals: each datagram becomes ready at the time the unordered decoder
    # delivers it; ordered delivery may hold it back, but never beyond reorder_timeout.
    waits = [
        ordered.delivery.times[i] - unordered.delivery.times[i]
        for i in order
        if not math.isnan(unordered.delivery.times[i])
    ]
    assert len(waits) == len(order)  # ordered never delivers what unordered could not
    held = [w for w in waits if w > 0]
    stats = ordered.decoder.stats
    print(
        f"\nordered: delivered {len(order)} of {count} (unordered {unordered.delivery.delivered});"
        f" {len(held)} held back, longest {max(held, default=0) * 1000:.1f} ms"
        f" (reorder_timeout {reorder_timeout * 1000:.0f} ms); gaps skipped"
        f" {stats.blocks_skipped} blocks, late and dropped {stats.datagrams_late}"
    )
    assert max(waits) <= reorder_timeout + 1e-9
    assert min(waits) >= 0
    assert held, "the case must actually exercise reordering"
    assert unordered.delivery.delivered - len(order) == stats.datagrams_late
    assert stats.blocks_skipped > 0


# ---- memory under a flood of blocks that never complete ---------------------------------


@pytest.mark.slow
def test_flood_of_never_completed_blocks_keeps_memory_under_the_bound() -> None:
    k, n, count, rate, max_blocks = 3, 5, 100_000, 2000, 256
    links = {p: Link(random.Random(30 + p), delay=0.010, jitter=0.003) for p in range(3)}
    sender = engines(k, n, links)
    engine = receiver(
        k,
        n,
        count,
        max_blocks_in_flight=max_blocks,
        window=1024,
        max_shard_size=max_shard_payload(MTU),
    )
    decoder = engine.decoder
    flood_rng = random.Random(7)

    def flood(now: float) -> list[tuple[int, bytes]]:
        # Parity of the same stream for blocks that never get enough shards (their data
        # shards never come): two such blocks for every legitimate datagram.
        out = []
        encoder = sender.encoder
        for _ in range(2):
            size = flood_rng.choice((300, 1000, max_shard_payload(MTU)))
            first = (encoder.next_seq + 100_000 + flood_rng.randrange(1 << 20)) & 0xFFFFFFFF
            head = PARITY_HEADER.pack(
                PARITY_FRAME_TYPE, TUNNEL, encoder.epoch, first, k, n - k, 0, size + 9
            )
            out.append((0, head + FILLER[: size + 9]))
        return out

    # Allocator-level check over the last 10 % of the run (tracing all of it is too
    # slow): what decoder.py allocated after tracing started and still holds. By then
    # every block it holds was allocated after the start, thousands of times over.
    trace_from = int(0.9 * count)
    held_payload: list[int] = []
    traced: list[int] = []

    def sample(now: float) -> None:
        held_payload.append(decoder.buffered_bytes())
        assert held_payload[-1] <= decoder.memory_bound
        assert decoder.blocks_in_flight <= max_blocks
        ident = round(now * rate)
        if ident == trace_from:
            tracemalloc.start()
        elif ident >= trace_from + 2000 and ident % 1000 == 0:
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, "*/warp/redundancy/decoder.py")]
            )
            traced.append(sum(t.size for t in snapshot.traces))

    try:
        result = Simulation(sender, links, [engine], sample=sample).run(
            count, rate, 100, FILLER, sample_every=500, inject=flood
        )
    finally:
        tracemalloc.stop()
    assert_exactly_once(result)
    # Payload bound plus per-block bookkeeping (block object, dict) for each slot.
    allowance = decoder.memory_bound + max_blocks * 512
    incomplete = decoder.stats.blocks_evicted + decoder.stats.blocks_expired
    print(
        f"\nflood: {incomplete} never-completed blocks ({decoder.stats.blocks_evicted} evicted"
        f" at the bound of {max_blocks}); payload held at most {max(held_payload)} B"
        f" (bound {decoder.memory_bound} B); allocated by the decoder at most {max(traced)} B"
        f" (bound + bookkeeping {allowance} B); legitimate datagrams lost"
        f" {result.delivery.lost} of {count}"
    )
    assert incomplete >= 0.999 * 2 * count  # (a few forged ones collide with each other)
    assert len(traced) >= 5
    assert max(traced) <= allowance
    assert result.delivery.lost == 0
