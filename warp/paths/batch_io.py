"""Many UDP datagrams per system call, with a pure-Python path where that can't be had.

`NATIVE` wraps the optional C extension `warp._batchio` (Linux `recvmmsg`/`sendmmsg`, built
by `pip install` when a C compiler and the Python headers are there); `PYTHON` does the same
with one `recvfrom`/`sendto` per datagram. Both have the same results, datagram for datagram
(tests/unit/test_batch_io.py holds them to it), so the uplinks do not care which one runs:

* `recv_many(sock, max_count, max_size)` → `(datagrams, truncated, error)`: what waits on
  the socket, at most `max_count`, as `(bytes, (host, port))` (IPv6 addresses shortened to
  two fields, as the uplinks use them); datagrams longer than `max_size` are dropped and
  counted in `truncated`; `error` is the receive error when nothing was received (EAGAIN, an
  empty socket, is no error). It never blocks.
* `send_many(sock, messages, start)` → how many of `messages[start:]` (`(data, (host,
  port))`, each to its own address) went out, in order, from `start`; if the first of them
  fails it raises that error (as `socket.sendto` would: OSError such as BlockingIOError,
  ValueError/TypeError/OverflowError for a bad address); a failure further on ends the
  batch before it, so the caller's next call, from there, gets the error.

`WARP_BATCH_IO=python` in the environment makes `default()` pick the pure-Python path even
when the extension is there (to compare, or to rule it out).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from warp.paths.path import Address

Datagram = tuple[bytes, Address]

MAX_BATCH = 256
"""Most datagrams one call handles (`recv_many`'s `max_count`, `send_many`'s batch)."""
MAX_SIZE = 1 << 16
"""Largest receive buffer per datagram (`recv_many`'s `max_size`)."""


class RecvMany(Protocol):
    def __call__(
        self, sock: socket.socket, max_count: int, max_size: int
    ) -> tuple[list[Datagram], int, OSError | None]: ...


class SendMany(Protocol):
    def __call__(self, sock: socket.socket, messages: Sequence[Datagram], start: int) -> int: ...


@dataclass(frozen=True, slots=True)
class BatchIO:
    name: str
    recv_many: RecvMany
    send_many: SendMany


def _check(max_count: int, max_size: int) -> None:
    if not 1 <= max_count <= MAX_BATCH:
        raise ValueError(f"max_count must be 1-{MAX_BATCH}")
    if not 1 <= max_size <= MAX_SIZE:
        raise ValueError(f"max_size must be 1-{MAX_SIZE}")


def _python_recv_many(
    sock: socket.socket, max_count: int, max_size: int
) -> tuple[list[Datagram], int, OSError | None]:
    _check(max_count, max_size)
    datagrams: list[Datagram] = []
    truncated = 0
    recvfrom = sock.recvfrom
    # One byte more than allowed tells a too long datagram (cheaper than recvmsg's flags).
    buffer_size = max_size + 1
    for _ in range(max_count):
        try:
            data, address = recvfrom(buffer_size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError as exc:
            if datagrams or truncated:
                break  # as recvmmsg: what came before is returned, the error ends the batch
            return datagrams, 0, exc
        if len(data) > max_size:
            truncated += 1
            continue
        datagrams.append((data, (address[0], address[1])))
    return datagrams, truncated, None


def _python_send_many(sock: socket.socket, messages: Sequence[Datagram], start: int) -> int:
    if not 0 <= start <= len(messages):
        raise IndexError("start out of range")
    sendto = sock.sendto
    sent = 0
    for data, address in messages[start : start + MAX_BATCH]:
        try:
            sendto(data, socket.MSG_DONTWAIT, address)
        except Exception:
            if sent:
                return sent  # as sendmmsg: the next call, from this message, reports it
            raise
        sent += 1
    return sent


PYTHON = BatchIO("python", _python_recv_many, _python_send_many)


def _native() -> BatchIO | None:
    try:
        from warp import _batchio
    except ImportError:
        return None
    native_recv, native_send = _batchio.recv_many, _batchio.send_many

    def recv_many(
        sock: socket.socket, max_count: int, max_size: int
    ) -> tuple[list[Datagram], int, OSError | None]:
        return native_recv(sock.fileno(), max_count, max_size)

    def send_many(sock: socket.socket, messages: Sequence[Datagram], start: int) -> int:
        return native_send(sock.fileno(), messages, start)

    return BatchIO("native", recv_many, send_many)


NATIVE = _native()
"""The extension's calls, or None where it was not built (no compiler, not Linux)."""


def default() -> BatchIO:
    """NATIVE when built, unless `WARP_BATCH_IO=python`; else PYTHON."""
    if NATIVE is not None and os.environ.get("WARP_BATCH_IO", "").lower() != "python":
        return NATIVE
    return PYTHON
