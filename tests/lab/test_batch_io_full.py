"""A really full send buffer (EAGAIN) for warp/paths/batch_io.py, extension and pure Python:
a site host's uplink is shaped by tbf to 1 Mbit/s with a long queue, so the datagrams wait
in the qdisc charged to the sending socket's small SO_SNDBUF until it is full. `send_many`
then takes a prefix of the batch and the next call raises BlockingIOError (nothing is sent
twice, nothing lost silently); what it took arrives in order at the router; once the qdisc has
drained, the socket takes datagrams again.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time

import pytest

from tests.batch_io_backends import batch_backend
from warp.netlab import Lab
from warp.paths.batch_io import Datagram

PORT = 45000
CLONE_NEWNET = 0x40000000


def _socket_in(ns: str) -> socket.socket:
    """A UDP socket created in network namespace `ns` (it stays there): setns(2) in a thread
    of its own, which then ends."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, os.strerror(code))
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


@pytest.mark.lab
@pytest.mark.parametrize("name", ["native", "python"])
def test_full_send_buffer_eagain(lab: Lab, name: str) -> None:
    io = batch_backend(name)
    site = lab.add_site("s", "cone", uplinks=1)
    up = site.uplinks[0]
    lab.run(site.host_ns, ["tc", "qdisc", "replace", "dev", up.name, "root", "tbf",
                           "rate", "1mbit", "burst", "4kb", "limit", "1mb"])  # fmt: skip
    sender = _socket_in(site.host_ns)
    receiver = _socket_in(site.router_ns)
    try:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        sender.bind((up.address, 0))
        sender.setblocking(False)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        receiver.bind((up.gateway, PORT))
        receiver.setblocking(False)
        messages: list[Datagram] = [
            (i.to_bytes(4, "big") * 250, (up.gateway, PORT)) for i in range(200)
        ]
        taken = 0
        with pytest.raises(BlockingIOError):
            while True:
                sent = io.send_many(sender, messages, taken)
                assert sent >= 1
                taken += sent
        assert 2 <= taken < 100  # a few KiB of SO_SNDBUF, not the whole batch
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < taken and time.monotonic() < deadline:
            datagrams, truncated, error = io.recv_many(receiver, 64, 2048)
            assert truncated == 0 and error is None
            got.extend(data for data, _ in datagrams)
            if not datagrams:
                time.sleep(0.01)
        assert got == [data for data, _ in messages[:taken]]
        assert io.send_many(sender, messages, taken) >= 1  # drained: taking datagrams again
    finally:
        sender.close()
        receiver.close()
