"""Uplinks with batched socket I/O (warp/paths/batch_io.py), on both event loops and with
both the C extension and the pure-Python path, over real loopback sockets:

- a burst waiting on the socket is read in batches (the loop's datagram, then one
  `recv_many`), every datagram reaches `on_datagram` in order with its source, and
  `on_read_done` runs once per batch, not per datagram;
- a datagram longer than `max_datagram_size` is dropped and counted (`rx_truncated`), the
  others of its batch are delivered;
- `send_many`: many destinations in one batch, in order; a datagram whose destination fails
  is reported and counted (`errors`), the rest still go out; EAGAIN mid-batch hands the rest
  to the transport, in order, nothing lost.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import uvloop

from tests.batch_io_backends import batch_backend
from warp.paths.batch_io import BatchIO, Datagram
from warp.paths.uplinks import RECEIVE_BATCH, Uplink, UplinkManager

T = TypeVar("T")
LOOPS = ["uvloop", "asyncio"]
BACKENDS = ["native", "python"]


def _run(loop_name: str, main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await asyncio.wait_for(main(), 20)

    if loop_name == "uvloop":
        return uvloop.run(wrapped())
    return asyncio.run(wrapped())


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()
    return (host, port)


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _drain(sock: socket.socket, count: int) -> list[bytes]:
    got: list[bytes] = []

    def more() -> bool:
        while True:
            try:
                got.append(sock.recv(70000))
            except BlockingIOError:
                return len(got) >= count

    await _until(more)
    return got


class _Receiver:
    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []
        self.batches: list[int] = []

    def on_datagram(self, uplink: Uplink, data: bytes, source: tuple[str, int]) -> None:
        self.datagrams.append((data, source))

    def on_read_done(self, uplink: Uplink) -> None:
        self.batches.append(len(self.datagrams) - sum(self.batches))


async def _manager(receiver: _Receiver, io: BatchIO, **kwargs: Any) -> UplinkManager:
    manager = UplinkManager.from_static(
        [("lo0", "127.0.0.1")],
        on_datagram=receiver.on_datagram,
        on_read_done=receiver.on_read_done,
        io=io,
        **kwargs,
    )
    await manager.start()
    return manager


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_burst_read_in_batches(loop_name: str, backend: str) -> None:
    io = batch_backend(backend)
    sent = [i.to_bytes(4, "big") * (1 + i % 300) for i in range(300)]

    async def main() -> None:
        receiver = _Receiver()
        manager = await _manager(receiver, io)
        peer = _socket()
        try:
            uplink = manager.uplinks["lo0"]
            for data in sent:  # all queued before the loop gets to read
                peer.sendto(data, uplink.local_address)
            await _until(lambda: len(receiver.datagrams) == len(sent))
            assert receiver.datagrams == [(d, _address(peer)) for d in sent]
            assert sum(receiver.batches) == len(sent)
            assert max(receiver.batches) > 1 and len(receiver.batches) <= 2 * (
                -(-len(sent) // RECEIVE_BATCH)
            )
            assert uplink.rx_packets == len(sent) and uplink.rx_truncated == 0
            assert uplink.rx_bytes == sum(map(len, sent))
        finally:
            await manager.close()
            peer.close()

    _run(loop_name, main)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_too_long_datagram_dropped_and_counted(loop_name: str, backend: str) -> None:
    io = batch_backend(backend)
    sizes = [100, 5000, 200, 1000, 1001, 300]

    async def main() -> None:
        receiver = _Receiver()
        manager = await _manager(receiver, io, max_datagram_size=1000)
        peer = _socket()
        try:
            uplink = manager.uplinks["lo0"]
            for size in sizes:
                peer.sendto(bytes([size % 256]) * size, uplink.local_address)
            await _until(lambda: len(receiver.datagrams) == 4)
            await asyncio.sleep(0.05)
            # the first datagram is the loop's own read; the rest come in one batch
            assert [len(d) for d, _ in receiver.datagrams] == [100, 200, 1000, 300]
            assert uplink.rx_truncated == 2 and uplink.rx_packets == 4
        finally:
            await manager.close()
            peer.close()

    _run(loop_name, main)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_many_destinations_and_failures(loop_name: str, backend: str) -> None:
    io = batch_backend(backend)

    async def main() -> None:
        manager = await _manager(_Receiver(), io)
        sinks = [_socket() for _ in range(3)]
        try:
            uplink = manager.uplinks["lo0"]
            messages: list[Datagram] = [
                (i.to_bytes(2, "big") * (1 + i), _address(sinks[i % 3])) for i in range(400)
            ]
            bad = {7: ("127.0.0.1", 0), 150: ("255.255.255.255", 9), 399: ("127.0.0.1", 0)}
            for i, address in bad.items():
                messages[i] = (messages[i][0], address)
            assert uplink.send_many(messages) == sorted(bad)
            assert uplink.errors == len(bad)
            assert uplink.tx_packets == len(messages) - len(bad)
            good = [d for i, (d, _) in enumerate(messages) if i not in bad]
            assert uplink.tx_bytes == sum(map(len, good))
            for k, sink in enumerate(sinks):
                expected = [d for i, (d, _) in enumerate(messages) if i % 3 == k and i not in bad]
                assert await _drain(sink, len(expected)) == expected
            # one datagram, or a closed uplink: as `send`
            assert uplink.send_many([(b"x", _address(sinks[0]))]) == []
            assert await _drain(sinks[0], 1) == [b"x"]
            await manager.close()
            assert uplink.send_many(messages[:5]) == [0, 1, 2, 3, 4]
            assert uplink.tx_dropped == 5
        finally:
            await manager.close()
            for sink in sinks:
                sink.close()

    _run(loop_name, main)


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOBUFS])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_send_many_full_socket_hands_rest_to_transport(
    loop_name: str, backend: str, code: int
) -> None:
    """The socket reports full (EAGAIN/ENOBUFS) on the second `send_many` call: the rest goes
    through the transport (which queues what the socket won't take), in order."""
    real = batch_backend(backend)
    calls: list[int] = []

    def send_many(sock: socket.socket, messages: Sequence[Datagram], start: int) -> int:
        calls.append(start)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code))
        return real.send_many(sock, messages, start)

    io = BatchIO("full-once", real.recv_many, send_many)

    async def main() -> None:
        manager = await _manager(_Receiver(), io)
        sinks = [_socket() for _ in range(2)]
        try:
            uplink = manager.uplinks["lo0"]
            messages: list[Datagram] = [
                (i.to_bytes(2, "big") * 50, _address(sinks[i % 2])) for i in range(600)
            ]
            assert uplink.send_many(messages) == []
            assert calls == [0, 256]
            assert uplink.tx_packets == 600 and uplink.errors == 0
            for k, sink in enumerate(sinks):
                assert await _drain(sink, 300) == [d for d, _ in messages[k::2]]
        finally:
            await manager.close()
            for sink in sinks:
                sink.close()

    _run(loop_name, main)
