"""`MemoryGate`: a tunnel's gate inside the application's own process (`warp.embed`).

No socket: the application calls `send` (a coroutine) and `recv`; the gateway drives the gate
through the same `Gate` protocol as the socket gates. Flow control is the Unix gate's, without
the kernel: `send` hands over one datagram per event-loop turn and, while the gateway has
paused the gate (`pause_reading`, or a False from ``on_datagram``), waits instead of handing
it over. Datagrams out of the tunnel wait in a bounded receive queue; when it is full the
newest one is dropped and counted (``application_busy``, as a socket gate's full application
queue).
"""

from __future__ import annotations

import asyncio
from collections import deque

from warp.gate.base import DropReason, GateCounters, GateError, OnDatagram

__all__ = ["MAX_DATAGRAM", "RECEIVE_QUEUE", "GateClosed", "MemoryGate"]

#: The largest datagram `send` takes (the socket gates' limit).
MAX_DATAGRAM = 65535
#: Default length of the receive queue (datagrams).
RECEIVE_QUEUE = 4096


class GateClosed(GateError):
    """`send` or `recv` on a tunnel whose gateway has closed."""


class MemoryGate:
    """The in-process end of one tunnel. ``receive_queue``: datagrams held for `recv`."""

    kind = "embedded"

    def __init__(
        self, on_datagram: OnDatagram, *, tunnel: str, receive_queue: int = RECEIVE_QUEUE
    ) -> None:
        if receive_queue < 1:
            raise ValueError("receive_queue must be at least 1")
        self._on_datagram = on_datagram
        self._tunnel = tunnel
        self.counters = GateCounters()
        self._received: deque[bytes] = deque()
        self._receive_limit = receive_queue
        self._started = False
        self._closed = False
        self._open = asyncio.Event()  # set while the gateway takes datagrams
        self._readable = asyncio.Event()  # set while `_received` has something (or closed)
        #: seconds `send` spent waiting for the gateway (back-pressure)
        self.send_wait_seconds = 0.0

    @property
    def address(self) -> str:
        return f"embedded:{self._tunnel}"

    @property
    def is_reading(self) -> bool:
        return self._open.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        if self._closed:
            raise GateClosed(f"tunnel {self._tunnel!r} is closed")
        self._started = True
        self._open.set()

    async def close(self) -> None:
        self._closed = True
        # Wake every waiter: `send` and `recv` raise GateClosed (recv once the queue is empty).
        self._open.set()
        self._readable.set()

    def pause_reading(self) -> None:
        self._open.clear()

    def resume_reading(self) -> None:
        if self._started and not self._closed:
            self._open.set()

    def deliver(self, payload: bytes) -> bool:
        counters = self.counters
        if self._closed:
            counters.drop(DropReason.CLOSED)
            return False
        if len(self._received) >= self._receive_limit:
            counters.drop(DropReason.APPLICATION_BUSY)
            return False
        self._received.append(payload)
        self._readable.set()
        counters.datagrams_out += 1
        counters.bytes_out += len(payload)
        return True

    async def send(self, data: bytes) -> None:
        """Hand one datagram to the tunnel, waiting while the gateway has paused this gate."""
        if not data or len(data) > MAX_DATAGRAM:
            raise ValueError(f"a datagram is 1 to {MAX_DATAGRAM} bytes, got {len(data)}")
        if not self._open.is_set() and not self._closed:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await self._open.wait()
            self.send_wait_seconds += loop.time() - started
        if self._closed:
            raise GateClosed(f"tunnel {self._tunnel!r} is closed")
        self.counters.datagrams_in += 1
        self.counters.bytes_in += len(data)
        if self._on_datagram(self, bytes(data)) is False:
            # Taken; the next send waits until the gateway resumes this gate.
            self._open.clear()
        # One datagram per loop turn, as a socket gate reads per wake-up: the gateway's
        # flush (a timer due now) and the uplinks' I/O run between two sends. Without it, a
        # sender that is never paused fills the send queue faster than it is flushed and
        # its datagrams expire there (send_deadline) instead of making the uplinks push back.
        await asyncio.sleep(0)

    async def recv(self) -> bytes:
        """The next datagram out of the tunnel (waits for one)."""
        received = self._received
        while not received:
            if self._closed:
                raise GateClosed(f"tunnel {self._tunnel!r} is closed")
            self._readable.clear()
            await self._readable.wait()
        return received.popleft()

    def recv_nowait(self) -> bytes | None:
        """The next datagram if one is queued, else None."""
        return self._received.popleft() if self._received else None
