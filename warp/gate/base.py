"""The `Gate` protocol: the application-facing end of a tunnel.

A gate is a thin asyncio shell around one local socket (or TUN device). It holds no
protocol logic:

* every datagram an application sends to the gate is handed, as ``bytes``, to the
  ``on_datagram(gate, payload)`` callback supplied by the gateway;
* the gateway calls ``gate.deliver(payload)`` for each datagram that came out of the
  tunnel, and the gate sends it to the application.

Flow control is explicit. If ``on_datagram`` returns ``False`` the gate stops reading
(the kernel queue then fills up and, for a Unix gate, a blocking ``send()`` in the
application waits) until the gateway calls ``gate.resume_reading()``. The payload passed
with the False has been taken by the gateway; only the *next* ones wait. The gateway may
also call ``gate.pause_reading()`` at any time. Any other return value (``None``,
``True``) means "keep going".

Gates read with a raw non-blocking socket and ``loop.add_reader``, draining up to
`READ_BATCH` datagrams per wake-up: no per-datagram task, queue, future or log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "READ_BATCH",
    "DatagramSocketGate",
    "DropReason",
    "Gate",
    "GateCounters",
    "GateError",
    "OnDatagram",
    "claim_socket_path",
    "remove_socket_path",
    "set_socket_buffers",
]

#: Datagrams read per event-loop wake-up before yielding back to the loop.
READ_BATCH = 64


class DropReason:
    """Stable names for `GateCounters.drops` keys (also used by metrics and status)."""

    #: tunnel data arrived, but no application has spoken and no fixed destination is set
    NO_APPLICATION = "no_application"
    #: the last sender was an unbound Unix socket: it has no address to reply to
    UNBOUND_SENDER = "unbound_sender"
    #: the application's receive queue is full (non-blocking send would block)
    APPLICATION_BUSY = "application_busy"
    #: the application's socket is gone (refused / no such file)
    APPLICATION_GONE = "application_gone"
    #: any other local send error
    SEND_ERROR = "send_error"
    #: an application datagram larger than the gate accepts
    TOO_LARGE = "too_large"
    #: a local receive error (not counted as a datagram)
    RECEIVE_ERROR = "receive_error"
    #: the gateway's on_datagram callback raised (a bug; logged once per gate)
    CALLBACK_ERROR = "callback_error"
    #: deliver() called on a gate that is not started or already closed
    CLOSED = "closed"
    #: a Unix gate datagram whose sender's uid/gid is not in allowed_uids/allowed_gids
    SENDER_NOT_ALLOWED = "sender_not_allowed"


@dataclass(slots=True)
class GateCounters:
    """Mutable per-gate counters. ``*_in``: application → gate; ``*_out``: gate → application."""

    datagrams_in: int = 0
    bytes_in: int = 0
    datagrams_out: int = 0
    bytes_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        drops = self.drops
        drops[reason] = drops.get(reason, 0) + 1

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return {
            "datagrams_in": self.datagrams_in,
            "bytes_in": self.bytes_in,
            "datagrams_out": self.datagrams_out,
            "bytes_out": self.bytes_out,
            "drops": dict(self.drops),
        }


class GateError(Exception):
    """A gate cannot be set up (bad path, port in use, …). The message is one line for users."""


@runtime_checkable
class Gate(Protocol):
    """What the gateway needs from any gate (loopback, unix, tun).

    Implementations take the ``on_datagram`` callback in their constructor.
    """

    #: ``"loopback"``, ``"unix"`` or ``"tun"``
    kind: str
    counters: GateCounters

    @property
    def address(self) -> str:
        """Human-readable local address (``127.0.0.1:59401``, a path, an interface name)."""
        ...

    @property
    def is_reading(self) -> bool:
        """True when started, not closed and not paused."""
        ...

    async def start(self) -> None:
        """Open the socket/device and start reading. Raises `GateError` on failure."""
        ...

    async def close(self) -> None:
        """Stop reading, close, remove any socket file this gate created. Idempotent."""
        ...

    def deliver(self, payload: bytes) -> bool:
        """Send one tunnel datagram to the application. Never raises for I/O errors: a
        datagram that cannot be sent is counted in ``counters.drops`` and False returned."""
        ...

    def pause_reading(self) -> None:
        """Stop taking datagrams from the application (idempotent)."""
        ...

    def resume_reading(self) -> None:
        """Take datagrams again after `pause_reading` or a False from ``on_datagram``."""
        ...


#: ``on_datagram(gate, payload)``: return ``False`` to pause the gate until
#: ``gate.resume_reading()``; anything else keeps it reading.
OnDatagram = Callable[[Gate, bytes], bool | None]


def claim_socket_path(path: str, sock_type: int) -> None:
    """Make ``path`` free for binding a Unix socket of ``sock_type``.

    A stale socket file (nobody bound to it) is removed. A live socket (another process
    is serving there) or a file that is not a socket is refused with `GateError`.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise GateError(f"cannot inspect {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise GateError(f"refusing to replace {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, sock_type)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: nobody is bound to it any more
    except FileNotFoundError:
        return  # vanished meanwhile
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            raise GateError(f"{path} is in use by another program") from None
        raise GateError(f"cannot probe {path}: {exc.strerror or exc}") from None
    else:
        raise GateError(f"{path} is in use by another running program")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise GateError(f"cannot remove stale socket {path}: {exc.strerror}") from None


def remove_socket_path(path: str, inode: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the socket file we created (same device and inode)."""
    if inode is None:
        return
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


log = logging.getLogger("warp.gate")

#: `_last_sender` before any application has spoken
_NOBODY = object()


class DatagramSocketGate:
    """Shared machinery of the socket gates: a raw non-blocking datagram socket read with
    ``loop.add_reader`` in batches of `READ_BATCH`, pause/resume, counters and deliver.

    Subclasses open the socket in `_open`. Replies go to ``_fixed_target`` if set, else to
    the sender of the last application datagram.
    """

    kind: str = "socket"

    #: bytes asked of recvfrom: at most 64 KiB + 1 so that oversize can be told apart and the
    #: buffer stays below glibc's mmap threshold (128 KiB): no mmap/munmap per datagram
    _recv_size: int = 65536
    _max_datagram: int = 65536

    def __init__(self, on_datagram: OnDatagram) -> None:
        self._on_datagram = on_datagram
        self.counters = GateCounters()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_added = False
        self._paused = False
        self._closed = False
        #: address of the last application datagram's sender (None: unbound Unix sender)
        self._last_sender: object = _NOBODY
        #: where replies go regardless of who spoke last (``gate_to_application`` …)
        self._fixed_target: object = None
        self._callback_error_logged = False

    # -- subclass hooks ---------------------------------------------------------------

    def _open(self) -> socket.socket:
        raise NotImplementedError

    def _cleanup(self) -> None:
        """Called once on close, after the socket is closed."""

    def _receiver(self, sock: socket.socket) -> Callable[[int], tuple[bytes, Any]]:
        """What reads one datagram: ``recvfrom`` unless a gate filters its senders."""
        return sock.recvfrom

    @property
    def address(self) -> str:
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------

    @property
    def is_reading(self) -> bool:
        return self._reader_added

    async def start(self) -> None:
        if self._closed:
            raise GateError(f"{self.kind} gate {self.address} is closed")
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._sock = self._open()
        if not self._paused:
            self._add_reader()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._remove_reader()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._cleanup()

    def pause_reading(self) -> None:
        self._paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        self._paused = False
        if self._sock is not None and not self._closed:
            self._add_reader()

    def _add_reader(self) -> None:
        if not self._reader_added and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._reader_added = True

    def _remove_reader(self) -> None:
        if self._reader_added and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._reader_added = False

    # -- data path --------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        recvfrom = self._receiver(sock)
        size = self._recv_size
        limit = self._max_datagram
        counters = self.counters
        on_datagram = self._on_datagram
        for _ in range(READ_BATCH):
            try:
                data, addr = recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                counters.drop(DropReason.RECEIVE_ERROR)
                continue
            n = len(data)
            self._last_sender = addr
            if n > limit:
                counters.drop(DropReason.TOO_LARGE)
                continue
            counters.datagrams_in += 1
            counters.bytes_in += n
            try:
                verdict = on_datagram(self, data)
            except Exception:
                counters.drop(DropReason.CALLBACK_ERROR)
                if not self._callback_error_logged:
                    self._callback_error_logged = True
                    log.exception("gate.callback_error gate=%s", self.address)
                continue
            if verdict is False:
                self._paused = True
                self._remove_reader()
                return
            if self._sock is None or not self._reader_added:
                return  # closed or paused from inside the callback

    def deliver(self, payload: bytes) -> bool:
        sock = self._sock
        counters = self.counters
        if sock is None:
            counters.drop(DropReason.CLOSED)
            return False
        target = self._fixed_target
        if target is None:
            target = self._last_sender
            if target is _NOBODY:
                counters.drop(DropReason.NO_APPLICATION)
                return False
            if target is None:
                counters.drop(DropReason.UNBOUND_SENDER)
                return False
        try:
            sock.sendto(payload, target)  # type: ignore[call-overload]
        except (BlockingIOError, InterruptedError):
            counters.drop(DropReason.APPLICATION_BUSY)
            return False
        except (ConnectionRefusedError, FileNotFoundError):
            counters.drop(DropReason.APPLICATION_GONE)
            return False
        except OSError as exc:
            counters.drop(
                DropReason.TOO_LARGE if exc.errno == errno.EMSGSIZE else DropReason.SEND_ERROR
            )
            return False
        counters.datagrams_out += 1
        counters.bytes_out += len(payload)
        return True


def set_socket_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte send and receive buffers (best effort: the kernel caps them)."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, opt) < size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
