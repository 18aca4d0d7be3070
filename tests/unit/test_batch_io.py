"""warp/paths/batch_io.py on real loopback sockets: the C extension (`recvmmsg`/`sendmmsg`)
and the pure-Python path, each alone and against each other (one sends, the other receives),
give the same datagrams, bytes and addresses: IPv4 and IPv6, many destinations in one batch,
sizes 1..65 507 B, datagrams longer than the buffer (dropped and counted, the rest kept), an
empty socket (EAGAIN: nothing, no error), the batch bound, and errors on some destinations of
a batch (each reported for its own datagram, the others still sent).

Under CI the extension must have been built (`test_extension_built_under_ci`); elsewhere the
native cases skip when it was not.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from tests.batch_io_backends import batch_backend
from warp.paths import batch_io
from warp.paths.batch_io import MAX_BATCH, NATIVE, PYTHON, BatchIO, Datagram

IN_CI = bool(os.environ.get("CI"))


BACKENDS = ["native", "python"]
PAIRS = [(s, r) for s in BACKENDS for r in BACKENDS]


def test_extension_built_under_ci() -> None:
    """CI installs a compiler and the Python headers (.ci/run): the extension must be used."""
    if not IN_CI:
        pytest.skip("only asserted under CI")
    assert NATIVE is not None
    assert batch_io.default() is NATIVE


def _sock(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind(("::1", 0) if family == socket.AF_INET6 else ("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def _address(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return (name[0], name[1])


def _payload(seq: int, size: int) -> bytes:
    return bytes((seq + i) % 256 for i in range(size))


def _send_all(io: BatchIO, sock: socket.socket, messages: list[Datagram]) -> list[tuple[int, int]]:
    """Send everything as the uplinks do: a failure is about one datagram, skip it and go
    on. Returns (index, errno or -1) of each failure."""
    failures: list[tuple[int, int]] = []
    i = 0
    while i < len(messages):
        try:
            sent = io.send_many(sock, messages, i)
        except OSError as exc:
            failures.append((i, exc.errno or -1))
            i += 1
            continue
        assert sent >= 1
        i += sent
    return failures


def _recv_all(io: BatchIO, sock: socket.socket, max_size: int = 1 << 16) -> list[Datagram]:
    got: list[Datagram] = []
    while True:
        datagrams, truncated, error = io.recv_many(sock, 64, max_size)
        assert truncated == 0 and error is None
        if not datagrams:
            return got
        got.extend(datagrams)


@pytest.mark.parametrize(("sender", "receiver"), PAIRS)
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_many_destinations_same_bytes_and_addresses(
    sender: str, receiver: str, family: socket.AddressFamily, sockets: list[socket.socket]
) -> None:
    send_io, recv_io = batch_backend(sender), batch_backend(receiver)
    source = _sock(family)
    sinks = [_sock(family) for _ in range(3)]
    sockets.extend([source, *sinks])
    sizes = [1, 64, 528, 1400, 1400, 9000, 65507 if family == socket.AF_INET else 65487, 2]
    # 600 datagrams (more than one sendmmsg and many recv_many calls), round robin over the
    # three destinations, sizes cycling
    messages = [(_payload(i, sizes[i % len(sizes)]), _address(sinks[i % 3])) for i in range(600)]
    assert _send_all(send_io, source, messages) == []
    for k, sink in enumerate(sinks):
        expected = [(data, _address(source)) for data, dest in messages[k::3]]
        assert _recv_all(recv_io, sink) == expected


@pytest.mark.parametrize("name", BACKENDS)
def test_truncated_datagrams_counted_others_kept(name: str, sockets: list[socket.socket]) -> None:
    io = batch_backend(name)
    source, sink = _sock(), _sock()
    sockets.extend([source, sink])
    for size in (100, 5000, 1000, 1001, 100):
        source.sendto(_payload(size, size), _address(sink))
    datagrams, truncated, error = io.recv_many(sink, 64, 1000)
    assert error is None
    assert truncated == 2
    assert datagrams == [(_payload(s, s), _address(source)) for s in (100, 1000, 100)]


@pytest.mark.parametrize("name", BACKENDS)
def test_empty_socket_and_batch_bound(name: str, sockets: list[socket.socket]) -> None:
    io = batch_backend(name)
    source, sink = _sock(), _sock()
    sockets.extend([source, sink])
    assert io.recv_many(sink, 64, 2048) == ([], 0, None)  # EAGAIN: nothing, no error
    for i in range(150):
        source.sendto(_payload(i, 40), _address(sink))
    sizes = []
    for _ in range(4):
        datagrams, truncated, error = io.recv_many(sink, 64, 2048)
        assert truncated == 0 and error is None
        sizes.append(len(datagrams))
    assert sizes == [64, 64, 22, 0]
    with pytest.raises(ValueError):
        io.recv_many(sink, MAX_BATCH + 1, 2048)
    with pytest.raises(ValueError):
        io.recv_many(sink, 64, 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_receive_error_reported_not_raised(name: str) -> None:
    io = batch_backend(name)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()  # fileno -1: EBADF from the call, as from a socket closed under a reader
    datagrams, truncated, error = io.recv_many(closed, 8, 2048)
    assert datagrams == [] and truncated == 0
    assert isinstance(error, OSError) and error.errno == errno.EBADF


@pytest.mark.parametrize(("sender", "receiver"), PAIRS)
def test_errors_on_some_destinations_do_not_lose_the_rest(
    sender: str, receiver: str, sockets: list[socket.socket]
) -> None:
    send_io, recv_io = batch_backend(sender), batch_backend(receiver)
    source, sink = _sock(), _sock()
    sockets.extend([source, sink])
    good = _address(sink)
    messages: list[Datagram] = [
        (b"first", good),
        (b"port zero", ("127.0.0.1", 0)),  # EINVAL
        (b"second", good),
        (b"broadcast", ("255.255.255.255", good[1])),  # EACCES without SO_BROADCAST
        (b"third", good),
        (b"too big", good),
        (b"fourth", good),
    ]
    messages[5] = (bytes(70000), good)  # EMSGSIZE
    failures = _send_all(send_io, source, messages)
    assert failures == [(1, errno.EINVAL), (3, errno.EACCES), (5, errno.EMSGSIZE)]
    assert [d for d, _ in _recv_all(recv_io, sink)] == [b"first", b"second", b"third", b"fourth"]


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_address_raised_for_its_datagram(name: str, sockets: list[socket.socket]) -> None:
    """A malformed address fails like `socket.sendto` (its own datagram only)."""
    io = batch_backend(name)
    source, sink = _sock(), _sock()
    sockets.extend([source, sink])
    good = _address(sink)
    messages: list[Datagram] = [(b"a", good), (b"b", ("127.0.0.1", 70000)), (b"c", good)]
    assert io.send_many(source, messages, 0) == 1
    with pytest.raises(OverflowError):
        io.send_many(source, messages, 1)
    assert io.send_many(source, messages, 2) == 1
    assert [d for d, _ in _recv_all(io, sink)] == [b"a", b"c"]


def test_native_rejects_host_names(sockets: list[socket.socket]) -> None:
    """The extension takes numeric addresses only (the gateway never has others): no DNS
    lookup on the data path."""
    batch_backend("native")
    from warp import _batchio

    source = _sock()
    sockets.append(source)
    with pytest.raises(ValueError, match="numeric"):
        _batchio.send_many(source.fileno(), [(b"x", ("localhost", 9))], 0)


def test_default_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARP_BATCH_IO", "python")
    assert batch_io.default() is PYTHON
    monkeypatch.delenv("WARP_BATCH_IO")
    assert batch_io.default() is (NATIVE or PYTHON)
