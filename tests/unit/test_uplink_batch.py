"""`Uplink.send_batch` (GSO) on loopback sockets, on uvloop and on the stock asyncio loop.

- Runs of equal-size datagrams plus odd sizes arrive complete, intact and in order; GSO was
  really used (and fewer `sendmsg` calls than datagrams); counters are per datagram.
- GSO unsupported (EIO at first use, forced): remembered, every datagram still arrives.
- Back-pressure: EAGAIN in the middle of a batch hands the rest to the transport, which
  queues it and pauses writing (`writable` False); later batches go through the transport
  queue (never straight to the socket past queued data), past `WRITE_BUFFER_LIMIT` they are
  dropped and counted; when the socket drains, `on_writable` fires and everything sent
  arrives in order. ENOBUFS takes the same branch.
- A transport swapped under the uplink (tests do): the batch goes through it, not the socket.
- No file descriptor left behind after sends, a rebuild and close (/proc/self/fd).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import uvloop

from warp.paths.uplinks import WRITE_BUFFER_LIMIT, Uplink, UplinkManager

T = TypeVar("T")
LOOPS = ["uvloop", "asyncio"]
Address = tuple[str, int]


def _run(loop_name: str, main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await asyncio.wait_for(main(), 20)

    if loop_name == "uvloop":
        return uvloop.run(wrapped())
    return asyncio.run(wrapped())


def _datagram(seq: int, size: int) -> bytes:
    head = struct.pack("!I", seq)
    return head + bytes([seq % 251]) * (size - len(head))


def _receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _receive(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    loop = asyncio.get_running_loop()
    out: list[bytes] = []
    deadline = loop.time() + timeout
    while len(out) < count and loop.time() < deadline:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            await asyncio.sleep(0.005)
    return out


class _Sock:
    """Stands in for the uplink's socket in `send_batch`: counts `sendmsg` calls and fails
    those listed in `fail` (call number → errno), else sends for real."""

    def __init__(self, real: socket.socket, fail: dict[int, int] | None = None) -> None:
        self.real = real
        self.fail = fail or {}
        self.calls = 0
        self.segments: list[int] = []

    def sendmsg(self, buffers: Sequence[bytes], ancdata: Any, flags: int, addr: Address) -> int:
        self.calls += 1
        code = self.fail.get(self.calls)
        if code is not None:
            raise OSError(code, os.strerror(code))
        self.segments.append(struct.unpack("=H", ancdata[0][2])[0])
        return self.real.sendmsg(buffers, ancdata, flags, addr)


async def _manager(**kwargs: Any) -> tuple[UplinkManager, Uplink]:
    manager = UplinkManager.from_static(
        [("lo0", "127.0.0.1")], on_datagram=lambda *a: None, **kwargs
    )
    await manager.start()
    return manager, manager.uplinks["lo0"]


def _spy(uplink: Uplink, fail: dict[int, int] | None = None) -> _Sock:
    real = uplink._sock
    assert real is not None
    spy = _Sock(real, fail)
    uplink._sock = spy  # type: ignore[assignment]
    return spy


@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_batch_in_order(loop_name: str) -> None:
    sizes = [528] * 100 + [200, 1400, 1400, 1400, 61, 528, 528, 527, 9000, 9000]
    datagrams = [_datagram(i, size) for i, size in enumerate(sizes)]

    async def main() -> None:
        receiver = _receiver()
        manager, uplink = await _manager()
        try:
            spy = _spy(uplink)
            remote = receiver.getsockname()
            assert uplink.send_batch(datagrams, remote) == len(datagrams)
            assert uplink.send_batch([datagrams[0]], remote) == 1  # single: plain send
            assert uplink.send_batch([], remote) == 0
            got = await _receive(receiver, len(datagrams) + 1)
            assert got == [*datagrams, datagrams[0]]
            # 100 × 528 → 64 + 36; 200 alone (plain send); 3 × 1400 + 61 (shorter last);
            # 528, 528, 527; 9000 × 2 (loopback MTU): 5 sendmsg calls for 110 datagrams.
            assert spy.calls == 5
            assert spy.segments == [528, 528, 1400, 528, 9000]
            assert uplink._gso_ok and uplink._gso
            assert uplink.tx_packets == len(datagrams) + 1
            assert uplink.tx_bytes == sum(sizes) + sizes[0]
            assert uplink.errors == 0 and uplink.tx_dropped == 0
        finally:
            await manager.close()
            receiver.close()

    _run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_batch_gso_unsupported(loop_name: str) -> None:
    datagrams = [_datagram(i, 528) for i in range(40)]

    async def main() -> None:
        receiver = _receiver()
        manager, uplink = await _manager()
        try:
            spy = _spy(uplink, fail={1: errno.EIO})
            remote = receiver.getsockname()
            assert uplink.send_batch(datagrams, remote) == 40
            assert uplink.send_batch(datagrams, remote) == 40
            assert spy.calls == 1  # remembered: no GSO attempt after the first failure
            assert not uplink._gso
            assert await _receive(receiver, 80) == datagrams + datagrams
            assert uplink.tx_packets == 80 and uplink.errors == 0
        finally:
            await manager.close()
            receiver.close()

    _run(loop_name, main)


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOBUFS])
def test_send_batch_back_pressure(code: int) -> None:
    """The EAGAIN/ENOBUFS branch against the stock loop's real transport queue: the
    transport's own socket is swapped for one that reports EAGAIN (a full send buffer)."""
    writable_calls: list[Uplink] = []
    datagrams = [_datagram(i, 528) for i in range(200)]

    class FullSocket:
        def __init__(self, real: Any) -> None:
            self.real = real
            self.full = True

        def sendto(self, data: bytes, addr: Address) -> int:
            if self.full:
                raise BlockingIOError(errno.EAGAIN, "full")
            return int(self.real.sendto(data, addr))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    async def main() -> None:
        receiver = _receiver()
        manager, uplink = await _manager(on_writable=writable_calls.append)
        try:
            remote = receiver.getsockname()
            transport: Any = uplink._transport
            full = FullSocket(transport._sock)
            transport._sock = full
            spy = _spy(uplink, fail={2: code})
            # Group 1 (64) goes out by GSO; group 2 fails: the other 136 go to the transport.
            assert uplink.send_batch(datagrams, remote) == 200
            assert spy.calls == 2
            assert not uplink.writable
            assert transport.get_write_buffer_size() == 136 * 528
            assert uplink.tx_packets == 200 and uplink.errors == 0
            # Unwritable, data queued: the next batch queues behind it, never straight to the
            # socket, up to WRITE_BUFFER_LIMIT; the rest is dropped and counted.
            more = [_datagram(1000 + i, 528) for i in range(600)]
            room = -(-(WRITE_BUFFER_LIMIT - 136 * 528) // 528)
            assert uplink.send_batch(more, remote) == room
            assert spy.calls == 2
            assert uplink.tx_dropped == 600 - room
            # The socket drains: the queue goes out, writing resumes, on_writable fires.
            full.full = False
            for _ in range(100):
                if uplink.writable:
                    break
                await asyncio.sleep(0.01)
            assert uplink.writable and writable_calls == [uplink]
            assert transport.get_write_buffer_size() == 0
            expected = datagrams + more[:room]
            assert await _receive(receiver, len(expected)) == expected
            # Writable again, nothing queued: GSO straight to the socket once more.
            assert uplink.send_batch(datagrams[:10], remote) == 10
            assert spy.calls == 3
            assert await _receive(receiver, 10) == datagrams[:10]
        finally:
            await manager.close()
            receiver.close()

    _run("asyncio", main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_batch_eagain_hands_rest_to_transport(loop_name: str) -> None:
    """On either loop: EAGAIN mid-batch, the rest goes through the transport, in order."""
    datagrams = [_datagram(i, 528) for i in range(150)]

    async def main() -> None:
        receiver = _receiver()
        manager, uplink = await _manager()
        try:
            spy = _spy(uplink, fail={2: errno.EAGAIN})
            remote = receiver.getsockname()
            assert uplink.send_batch(datagrams, remote) == 150
            assert spy.calls == 2
            assert await _receive(receiver, 150) == datagrams
            assert uplink.tx_packets == 150 and uplink.errors == 0
        finally:
            await manager.close()
            receiver.close()

    _run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_batch_no_fd_leak(loop_name: str) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> tuple[int, int]:
        receiver = _receiver()
        remote = receiver.getsockname()
        before = fds()
        manager, uplink = await _manager()
        datagrams = [_datagram(i, 528) for i in range(100)]
        assert uplink.send_batch(datagrams, remote) == 100
        await manager._rebuild("lo0")
        assert uplink.rebuilds == 1 and uplink._sock is not None
        assert uplink.send_batch(datagrams, remote) == 100
        assert await _receive(receiver, 200) == datagrams + datagrams
        await manager.close()
        assert uplink._sock is None
        assert uplink.send_batch(datagrams, remote) == 0  # closed: dropped, counted
        assert uplink.tx_dropped == 100
        after = fds()
        receiver.close()
        return before, after

    before, after = _run(loop_name, main)
    assert after == before


def test_send_batch_swapped_transport() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def sendto(self, data: bytes, addr: Address) -> None:
            self.sent.append(data)

    async def main() -> None:
        manager, uplink = await _manager()
        real = uplink._transport
        try:
            spy = _spy(uplink)
            recorder = Recorder()
            uplink._transport = recorder  # type: ignore[assignment]
            datagrams = [_datagram(i, 528) for i in range(20)]
            assert uplink.send_batch(datagrams, ("127.0.0.1", 9)) == 20
            assert recorder.sent == datagrams and spy.calls == 0
        finally:
            uplink._transport = real
            await manager.close()

    _run("asyncio", main)
