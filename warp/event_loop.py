"""The event loop the shell runs on (uvloop when installed) and its one-timer-per-object
slot (`TimerSlot`), which wakes a sans-I/O object only once its deadline is due."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable

__all__ = ["TimerSlot", "install_event_loop_policy"]


def _clock_step(loop: asyncio.AbstractEventLoop) -> float:
    """The tick of the loop's clock: uvloop's `time()` counts whole milliseconds (libuv's
    `uv_now`) and rounds timer delays to the nearest millisecond; asyncio's is
    `time.monotonic` (0 here: no rounding needed)."""
    return 0.001 if type(loop).__module__.startswith("uvloop") else 0.0


class TimerSlot:
    """One `loop.call_at` timer for one sans-I/O object, re-armed only when its deadline moves.

    The callback runs only once `loop.time()` has reached the deadline, so the object, which
    compares the loop's `now` against its own deadline, always finds it due. Under uvloop a
    deadline a fraction of a millisecond ahead used to fire at once (its delay rounded to 0),
    with `loop.time()` (whole ms) still before it: the object did nothing, the slot re-armed
    at once, and spun until the next millisecond (up to hundreds of callbacks per deadline).
    The delay is now rounded *up* to a whole tick, and an early wake-up (clock rounding) re-arms
    without calling back: one callback per deadline."""

    __slots__ = ("_callback", "_deadline", "_handle", "_loop", "_step")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._step = _clock_step(loop)

    def arm(self, deadline: float | None) -> None:
        if deadline == self._deadline:
            return
        if deadline is not None and self._deadline is not None and self._deadline <= deadline:
            # Lazy: the armed handle fires first; the callback (every one tolerates an early
            # call) re-arms for the later deadline. Saves a cancel + call_at per move.
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._deadline = deadline
        if deadline is not None:
            self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        loop = self._loop
        step = self._step
        if step:
            now = loop.time()
            if deadline > now:
                # Whole ticks, rounded up: fires at the first tick at or after the deadline.
                self._handle = loop.call_at(
                    now + math.ceil((deadline - now) / step) * step, self._fire
                )
                return
        self._handle = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        deadline = self._deadline
        if deadline is not None and self._loop.time() < deadline:
            self._schedule(deadline)  # woken early by clock rounding: not due yet
            return
        self._handle = None
        self._deadline = None
        self._callback()

    def cancel(self) -> None:
        self.arm(None)


def install_event_loop_policy() -> str:
    """Use uvloop when installed (≈5× the datagram rate); say which loop runs."""
    if os.environ.get("WARP_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
