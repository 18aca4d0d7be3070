"""Callbacks per reorder deadline: one ordered tunnel's gap, driven through `TimerSlot` the
way the gateway drives its decoder, on uvloop and on asyncio.

    .venv/bin/python bench/timer_callbacks.py [--gaps 500]

Prints max and mean callbacks per deadline (1 is ideal). uvloop's clock counts whole
milliseconds: a slot that calls back before `loop.time()` reaches the deadline spins."""

from __future__ import annotations

import argparse
import asyncio
import statistics

import uvloop

from warp.event_loop import TimerSlot
from warp.redundancy import ShardDecoder, ShardEncoder


async def one_gap(offset: float, reorder_timeout: float) -> int:
    loop = asyncio.get_running_loop()
    encoder = ShardEncoder(1, 2, 3, 1400)
    decoder = ShardDecoder(1, 2, 3, ordered=True, reorder_timeout=reorder_timeout)
    encoder.push(b"lost", 0.0)
    encoder.flush(0.0)  # data shard 0: never received
    second = encoder.push(b"held", 0.0) + encoder.flush(0.0)
    await asyncio.sleep(offset)
    decoder.receive(second[0][1], loop.time())  # held: datagram 0 is missing
    calls = 0
    released: asyncio.Future[None] = loop.create_future()

    def on_timer() -> None:
        nonlocal calls
        calls += 1
        if decoder.tick(loop.time()) and not released.done():
            released.set_result(None)
        slot.arm(decoder.next_deadline())

    slot = TimerSlot(loop, on_timer)
    slot.arm(decoder.next_deadline())
    await released
    slot.cancel()
    return calls


async def measure(gaps: int, reorder_timeout: float) -> list[int]:
    return [await one_gap(0.00013 * (i % 8), reorder_timeout) for i in range(gaps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps", type=int, default=500)
    parser.add_argument("--reorder-timeout", type=float, default=0.0103)
    args = parser.parse_args()
    for name, run in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
        counts = run(measure(args.gaps, args.reorder_timeout))
        print(f"{name:8} callbacks per deadline: max {max(counts)}, "
              f"mean {statistics.fmean(counts):.2f} ({len(counts)} deadlines)")  # fmt: skip


if __name__ == "__main__":
    main()
