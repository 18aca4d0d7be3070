"""`TimerSlot` under uvloop and asyncio: a sans-I/O deadline fires in at most 2 callbacks.

uvloop's clock counts whole milliseconds and rounds timer delays to the nearest one; the
slot used to call back before `loop.time()` reached the deadline, the decoder found nothing
due, the slot re-armed at once and spun until the next millisecond."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from warp.event_loop import TimerSlot
from warp.redundancy import ShardDecoder, ShardEncoder

REORDER_TIMEOUT = 0.0103  # not a whole number of milliseconds: the case that spun


def _run_uvloop(main: Callable[[], Coroutine[Any, Any, list[int]]]) -> list[int]:
    return uvloop.run(main())


def _run_asyncio(main: Callable[[], Coroutine[Any, Any, list[int]]]) -> list[int]:
    return asyncio.run(main())


async def _callbacks_for_one_gap(offset: float) -> int:
    """A gap in an ordered tunnel, waited on for `reorder_timeout`, driven the way the
    gateway drives its decoder (`_on_decoder_timer`): callbacks until the held datagram
    comes out."""
    loop = asyncio.get_running_loop()
    encoder = ShardEncoder(1, 2, 3, 1400)
    decoder = ShardDecoder(1, 2, 3, ordered=True, reorder_timeout=REORDER_TIMEOUT)
    encoder.push(b"one", 0.0)
    encoder.flush(0.0)  # data shard 0: never received
    second = encoder.push(b"two", 0.0) + encoder.flush(0.0)  # data shard 1, then parity
    await asyncio.sleep(offset)
    assert decoder.receive(second[0][1], loop.time()) == []  # held: datagram 0 is missing
    calls = 0
    released: asyncio.Future[list[bytes]] = loop.create_future()

    def on_timer() -> None:
        nonlocal calls
        calls += 1
        delivered = decoder.tick(loop.time())
        if delivered:
            released.set_result(delivered)
        slot.arm(decoder.next_deadline())

    slot = TimerSlot(loop, on_timer)
    slot.arm(decoder.next_deadline())
    assert await asyncio.wait_for(released, 1.0) == [b"two"]
    slot.cancel()
    return calls


async def _callbacks_per_reorder_deadline() -> list[int]:
    """40 gaps opened at different offsets inside a millisecond."""
    return [await _callbacks_for_one_gap(0.00017 * (i % 6)) for i in range(40)]


@pytest.mark.parametrize("run", [_run_uvloop, _run_asyncio], ids=["uvloop", "asyncio"])
def test_a_reorder_deadline_fires_in_at_most_two_callbacks(
    run: Callable[[Callable[[], Coroutine[Any, Any, list[int]]]], list[int]],
) -> None:
    counts = run(_callbacks_per_reorder_deadline)
    assert max(counts) <= 2, counts


def test_the_callback_never_runs_before_the_deadline() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        early = 0
        for i in range(30):
            deadline = loop.time() + 0.002 + i * 0.000037
            fired = loop.create_future()

            def callback(deadline: float = deadline, fired: asyncio.Future[None] = fired) -> None:
                nonlocal early
                if loop.time() < deadline:
                    early += 1
                fired.set_result(None)

            TimerSlot(loop, callback).arm(deadline)
            await fired
        return [early]

    assert uvloop.run(main()) == [0]
