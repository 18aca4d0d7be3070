"""Uplinks: discovery of the local interfaces to use, and one UDP socket per uplink.

This is a thin asyncio shell: it owns the sockets and one supervisory task, and
nothing else. Discovery goes through netlink (warp/paths/netlink.py): a full dump every
`scan_interval` as a safety net, and an immediate rescan whenever the kernel reports a link
or address change (RTM_NEWLINK/DELLINK/NEWADDR/DELADDR on a netlink socket watched with
`loop.add_reader`). An interface is used when its name matches one inclusion pattern and no
exclusion pattern (`re.search`), it is up and running, and it has an IPv4 address (else a
global IPv6 one, after DAD). Each uplink gets one UDP socket bound to that address (and
`SO_BINDTODEVICE` when asked) with enlarged buffers.

Batched I/O (warp/paths/batch_io.py: `recvmmsg`/`sendmmsg` through the optional C extension,
else one syscall per datagram): when the event loop hands the protocol a datagram, the
protocol drains what else waits on the socket (up to `RECEIVE_BATCH` per wake-up), passes
each to `on_datagram`, then calls `on_read_done` once, so the gateway sends what the whole
batch produced together; `Uplink.send_many` sends many datagrams, each to its own address,
per syscall.

`UplinkManager.from_static(...)` skips netlink entirely and binds given local addresses, so a
gateway (the demo) can run on loopback without root.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import re
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from warp.paths import batch_io
from warp.paths.batch_io import BatchIO, Datagram
from warp.paths.netlink import InterfaceInfo, NetlinkMonitor, dump_interfaces
from warp.paths.path import Address
from warp.pktinfo import StickyTransport, is_wildcard

#: the int of an IP_TTL / IPV6_HOPLIMIT control message
_TTL = struct.Struct("=i")

log = logging.getLogger("warp.paths.uplinks")

DEFAULT_RECEIVE_BUFFER = 512 << 10
"""SO_RCVBUF asked for an uplink socket; the kernel doubles it: 1 MiB of skb truesize, about
450 full-size shards (~2.3 KiB each). That absorbs a ~10 ms event-loop stall at 10 000
datagrams/s with n = 4 (40 000 shards/s), or 50 ms of a 100 Mbit/s uplink, and bounds how long
a shard can wait there to about as much. 4 MiB (the old value) let the queue grow to 300+ ms
under load, which `send_deadline` (warp's own queue only) cannot see; a datagram that late is
worse than a lost one, and FEC covers an occasional overflow."""
DEFAULT_SEND_BUFFER = 128 << 10
"""SO_SNDBUF asked for an uplink socket; the kernel doubles it: 256 KiB of skb truesize,
~1 s of queue at 2 Mbit/s, ~0.1 s at 20 Mbit/s. UDP datagrams queued in the interface's
qdisc (a shaper such as tbf, a slow modem's queue) count against it, so it is what bounds the
kernel's queueing delay on a saturated uplink: when it is full the socket stops taking
datagrams, the uplink becomes unwritable and the gateway holds its gates (back-pressure)
instead of filling a qdisc that then drops silently."""
DEFAULT_MAX_DATAGRAM = 1 << 16
"""Receive buffer per datagram on the stock loop (its default, 256 KiB, costs an mmap per read;
64 KiB is below the mmap threshold and still never truncates a UDP payload)."""
WRITE_BUFFER_LIMIT = 256 << 10
"""Past this much queued in the transport (socket full), `send` drops instead of queueing.
The uplink is unwritable (`Uplink.writable`) as soon as anything waits there: the gateway
stops sending tunnel data to it, so only small control frames (probes, handshakes) can land
in this margin."""
RECEIVE_BATCH = 64
"""Datagrams read per event-loop wake-up at most (the first by the loop, the rest in one
`recv_many`): bounds how long one uplink holds the loop and how much one `on_read_done` sees."""
REBUILD_MIN_INTERVAL = 1.0
"""An uplink is rebuilt at most this often, however fast its sends fail."""

# Errors about one datagram, not about the uplink: they do not count towards a rebuild.
_DATAGRAM_ERRNOS = frozenset({errno.EMSGSIZE, errno.EAFNOSUPPORT, errno.EDESTADDRREQ})

_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux >= 4.18; Python 3.11 lacks the name
GSO_MAX_SEGMENTS = 64
"""Segments per `send_batch` syscall (the kernel's UDP_MAX_SEGMENTS on older kernels)."""
GSO_MAX_BYTES = 65507
"""Payload per `send_batch` syscall: one UDP datagram's worth (65535 - IPv4 and UDP headers)."""
# `sendmsg` with UDP_SEGMENT failing with these before GSO ever worked on the socket: no GSO
# here (old kernel, a device without checksum offload); the uplink sends one by one from then on.
_GSO_UNSUPPORTED_ERRNOS = frozenset({errno.EINVAL, errno.ENOPROTOOPT, errno.EIO, errno.EOPNOTSUPP})
_GSO_SIZE = struct.Struct("=H")

OnDatagram = Callable[["Uplink", bytes, Address], None]
OnWritable = Callable[["Uplink"], None]
OnReadDone = Callable[["Uplink"], None]


def _compile(patterns: Iterable[str | re.Pattern[str]]) -> list[re.Pattern[str]]:
    return [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]


def select_interfaces(
    names: Iterable[str],
    inclusion: Iterable[str | re.Pattern[str]],
    exclusion: Iterable[str | re.Pattern[str]],
) -> list[str]:
    """The names (in the given order) that match one inclusion pattern and no exclusion one.

    Patterns are regular expressions applied with `re.search`, so `"lo"` matches any name
    containing "lo"; anchor it (`"^lo$"`) to mean exactly `lo`.
    """
    inc = _compile(inclusion)
    exc = _compile(exclusion)
    return [
        name
        for name in names
        if any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)
    ]


TUNNEL_LINK_KINDS = frozenset({"wireguard", "tun"})
"""Netlink link kinds that carry a tunnel (WireGuard, TUN devices such as wireguard-go's,
tailscale's or WARP's own): never uplinks, whatever the patterns say."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def tunnel_exclusion(
    info: InterfaceInfo, own_tuns: Iterable[str], tunnel_networks: Iterable[Network]
) -> str | None:
    """Why this interface must never be an uplink (traffic sent on it would go into a tunnel,
    possibly this one), as one log word; None if it may be one.

    `own_tuns`: WARP's own TUN gate names; `tunnel_networks`: the TUN gates' `allowed_ips`,
    whose addresses are reached through the tunnel (a default route, prefix length 0, says
    where traffic goes, not what the tunnel's addresses are: it is ignored)."""
    if info.name in own_tuns:
        return "warp_tun_gate"
    if info.kind in TUNNEL_LINK_KINDS:
        return f"link_kind:{info.kind}"
    for text in (*info.ipv4, *info.ipv6):
        address = ipaddress.ip_address(text)
        for network in tunnel_networks:
            if network.prefixlen and address.version == network.version and address in network:
                return f"address_in_allowed_ips:{network}"
    return None


class UplinkEventKind(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    REBUILT = "rebuilt"


@dataclass(frozen=True, slots=True)
class UplinkEvent:
    """An uplink appeared, disappeared (its socket is closed), or got a fresh socket."""

    kind: UplinkEventKind
    uplink: Uplink
    reason: str = ""

    @property
    def name(self) -> str:
        """Stable log event name: `uplink.added`, `uplink.removed`, `uplink.rebuilt`."""
        return f"uplink.{self.kind}"


class Uplink:
    """One local uplink: an interface address and the UDP socket bound to it."""

    __slots__ = (
        "_batch_io",
        "_direct_io",
        "_gso",
        "_gso_max_segment",
        "_gso_ok",
        "_max_failures",
        "_on_failure",
        "_protocol",
        "_sock",
        "_sock_transport",
        "_transport",
        "_writable",
        "address",
        "bound_to_device",
        "callback_errors",
        "consecutive_failures",
        "errors",
        "family",
        "index",
        "last_error",
        "local_port",
        "name",
        "rebuilds",
        "rx_bytes",
        "rx_packets",
        "rx_truncated",
        "tx_bytes",
        "tx_dropped",
        "tx_packets",
    )

    def __init__(
        self,
        name: str,
        index: int,
        address: str,
        *,
        max_consecutive_failures: int = 10,
        on_failure: Callable[[Uplink], None] | None = None,
        io: BatchIO | None = None,
    ) -> None:
        self.name = name
        self.index = index
        self.address = address
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.local_port = 0
        self.bound_to_device = False
        self.rx_bytes = 0
        self.rx_packets = 0
        self.rx_truncated = 0
        """Datagrams longer than the manager's `max_datagram_size`, dropped."""
        self.tx_bytes = 0
        self.tx_packets = 0
        self.tx_dropped = 0
        """Datagrams not sent because the uplink was closed or its socket buffer full."""
        self.errors = 0
        self.callback_errors = 0
        self.consecutive_failures = 0
        self.rebuilds = 0
        self.last_error: BaseException | None = None
        self._max_failures = max_consecutive_failures
        self._on_failure = on_failure
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _UplinkProtocol | None = None
        self._sock: socket.socket | None = None
        """The transport's own socket object (same fd, closed with it) for `send_batch`."""
        self._sock_transport: asyncio.DatagramTransport | None = None
        #: batches may read/write the socket itself (not through a StickyTransport, which
        #: must see every datagram to keep each peer's source address)
        self._direct_io = True
        """The transport `_sock` belongs to: written directly only while it is `_transport`."""
        self._writable = True
        self._gso = True
        """False once GSO proved unsupported on this uplink (`send_batch` then sends one by
        one); kept across rebuilds (same interface)."""
        self._gso_ok = False
        self._gso_max_segment = GSO_MAX_BYTES
        """Largest segment size GSO accepted or may accept (EINVAL after GSO worked: the
        segment is above the path MTU; such segments then go one by one)."""
        self._batch_io = io if io is not None else batch_io.default()

    def __repr__(self) -> str:
        state = "open" if self._transport is not None else "closed"
        return f"<Uplink {self.name} {self.address}:{self.local_port} {state}>"

    @property
    def closed(self) -> bool:
        return self._transport is None

    @property
    def local_address(self) -> Address:
        return (self.address, self.local_port)

    @property
    def writable(self) -> bool:
        """False while the socket's send buffer is full (datagrams wait in the transport) or
        the uplink is closed; `on_writable` is called when it drains."""
        return self._writable and self._transport is not None

    def send(self, data: bytes, addr: Address) -> bool:
        """Queue one datagram (non-blocking). False if it was dropped or failed at once.

        While the uplink is unwritable, datagrams still queue in the transport up to
        `WRITE_BUFFER_LIMIT` bytes; past that (or closed) they are dropped (`tx_dropped`)."""
        transport = self._transport
        if transport is None or (
            not self._writable and transport.get_write_buffer_size() >= WRITE_BUFFER_LIMIT  # type: ignore[attr-defined]
        ):
            self.tx_dropped += 1
            return False
        errors = self.errors
        try:
            transport.sendto(data, addr)
        except Exception as exc:  # e.g. a transport torn down under us, a bad address
            self._on_error(exc)
        if self.errors != errors:
            return False
        self.consecutive_failures = 0
        self.tx_packets += 1
        self.tx_bytes += len(data)
        return True

    def send_batch(self, datagrams: Sequence[bytes], addr: Address) -> int:
        """Send `datagrams` to `addr` in order, with as few syscalls as possible; returns how
        many were sent or queued (the others were dropped or failed, as with `send`).

        Runs of equal-size datagrams (the last of a run may be shorter) go out with one
        `sendmsg` each, carrying a UDP_SEGMENT (GSO) control message: at most
        `GSO_MAX_SEGMENTS` segments and `GSO_MAX_BYTES` per call. The socket is written
        directly only while the transport has nothing queued (else order would break); when
        the socket is full (EAGAIN/ENOBUFS) the rest goes through `send` (the transport
        queues it and pauses writing: `writable`/`on_writable` as with `send`). Counters are
        per datagram, as with `send`."""
        count = len(datagrams)
        if count == 1:
            return 1 if self.send(datagrams[0], addr) else 0
        transport = self._transport
        sock = self._sock
        if (
            count == 0
            or transport is None
            or sock is None
            or transport is not self._sock_transport
            or not self._gso
            or not self._writable
            or transport.get_write_buffer_size()  # type: ignore[attr-defined]
        ):
            return self._send_each(datagrams, 0, count, addr)
        sendmsg = sock.sendmsg
        pack = _GSO_SIZE.pack
        max_segment = self._gso_max_segment
        sent = 0
        i = 0
        while i < count:
            size = len(datagrams[i])
            end = min(count, i + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size if size else 1))
            j = i + 1
            while j < end and len(datagrams[j]) == size:
                j += 1
            if j < end and 0 < len(datagrams[j]) < size:
                j += 1  # the last segment may be shorter
            if j - i == 1 or not 0 < size <= max_segment:
                sent += self._send_each(datagrams, i, j, addr)
            else:
                group = datagrams[i:j]
                payload = b"".join(group)
                try:
                    sendmsg([payload], [(_SOL_UDP, _UDP_SEGMENT, pack(size))], 0, addr)
                except (BlockingIOError, InterruptedError):
                    return sent + self._send_each(datagrams, i, count, addr)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        return sent + self._send_each(datagrams, i, count, addr)
                    if exc.errno in _GSO_UNSUPPORTED_ERRNOS:
                        if not self._gso_ok or exc.errno != errno.EINVAL:
                            self._gso = False
                            log.info("uplink.gso_unsupported uplink=%s error=%s", self.name, exc)
                            return sent + self._send_each(datagrams, i, count, addr)
                        max_segment = self._gso_max_segment = size - 1
                    # Anything else (or a too large segment): one by one, each failing or
                    # not on its own, counted as with `send`.
                    sent += self._send_each(datagrams, i, j, addr)
                except Exception:  # a bad address: per datagram, as `send` reports it
                    sent += self._send_each(datagrams, i, j, addr)
                else:
                    self._gso_ok = True
                    self.consecutive_failures = 0
                    self.tx_packets += j - i
                    self.tx_bytes += len(payload)
                    sent += j - i
                    i = j
                    continue
            i = j
            if i < count and (
                self._transport is not transport
                or not self._writable
                or transport.get_write_buffer_size()  # type: ignore[attr-defined]
            ):
                return sent + self._send_each(datagrams, i, count, addr)
        return sent

    def send_many(self, messages: Sequence[Datagram]) -> list[int]:
        """Send `messages`, `(data, address)` each to its own address, in order, many per
        syscall (`sendmmsg`); returns the indices of those dropped or failed (counted as with
        `send`: `tx_dropped`, `errors`), the others were sent or queued.

        A failure on one datagram (a bad or unreachable address) counts against it alone and
        the batch goes on after it. The socket is written directly only while the transport
        has nothing queued (else order would break); when the socket is full
        (EAGAIN/ENOBUFS) the rest goes through `send` (the transport queues it and pauses
        writing: `writable`/`on_writable` as with `send`)."""
        count = len(messages)
        transport = self._transport
        sock = self._sock
        if (
            count < 2
            or transport is None
            or sock is None
            or transport is not self._sock_transport
            or not self._direct_io
            or not self._writable
            or transport.get_write_buffer_size()  # type: ignore[attr-defined]
        ):
            return self._send_each_to(messages, 0)
        send_many = self._batch_io.send_many
        failed: list[int] = []
        i = 0
        while i < count:
            try:
                sent = send_many(sock, messages, i)
            except (BlockingIOError, InterruptedError):
                return failed + self._send_each_to(messages, i)
            except Exception as exc:  # about messages[i] alone (see batch_io.send_many)
                if isinstance(exc, OSError) and exc.errno == errno.ENOBUFS:
                    return failed + self._send_each_to(messages, i)
                self._on_error(exc)
                failed.append(i)
                i += 1
                continue
            self.consecutive_failures = 0
            self.tx_packets += sent
            for k in range(i, i + sent):
                self.tx_bytes += len(messages[k][0])
            i += sent
        return failed

    def _send_each_to(self, messages: Sequence[Datagram], start: int) -> list[int]:
        send = self.send
        return [k for k in range(start, len(messages)) if not send(*messages[k])]

    def send_with_ttl(self, data: bytes, addr: Address, ttl: int) -> bool:
        """Send one datagram with this TTL (IPv6: hop limit), as a control message of its own
        `sendmsg` (the socket's TTL stays as it was). Only written directly while the transport
        queues nothing; otherwise, or if the socket is full, it is dropped (a first punch: the
        next one goes at full TTL anyway)."""
        transport = self._transport
        sock = self._sock
        if (
            transport is None
            or sock is None
            or transport is not self._sock_transport
            or transport.get_write_buffer_size()  # type: ignore[attr-defined]
        ):
            self.tx_dropped += 1
            return False
        if sock.family == socket.AF_INET6 and ":" in addr[0]:
            level, option = socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT
        else:
            level, option = socket.IPPROTO_IP, socket.IP_TTL
        try:
            sock.sendmsg([data], [(level, option, _TTL.pack(ttl))], 0, addr)
        except (BlockingIOError, InterruptedError):
            self.tx_dropped += 1
            return False
        except Exception as exc:
            self._on_error(exc)
            return False
        self.tx_packets += 1
        self.tx_bytes += len(data)
        return True

    def _send_each(self, datagrams: Sequence[bytes], start: int, stop: int, addr: Address) -> int:
        send = self.send
        sent = 0
        for k in range(start, stop):
            if send(datagrams[k], addr):
                sent += 1
        return sent

    def _on_error(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = exc
        if isinstance(exc, (socket.gaierror, ValueError, TypeError)) or (
            isinstance(exc, OSError) and exc.errno in _DATAGRAM_ERRNOS
        ):
            return  # about this datagram (wrong family, too big), not about the uplink
        self.consecutive_failures += 1
        if self.consecutive_failures == self._max_failures and self._on_failure is not None:
            self._on_failure(self)

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "index": self.index,
            "address": self.address,
            "local_port": self.local_port,
            "bound_to_device": self.bound_to_device,
            "open": not self.closed,
            "rx_bytes": self.rx_bytes,
            "rx_packets": self.rx_packets,
            "rx_truncated": self.rx_truncated,
            "tx_bytes": self.tx_bytes,
            "tx_packets": self.tx_packets,
            "tx_dropped": self.tx_dropped,
            "errors": self.errors,
            "consecutive_failures": self.consecutive_failures,
            "rebuilds": self.rebuilds,
        }


class _UplinkProtocol(asyncio.DatagramProtocol):
    def __init__(
        self,
        uplink: Uplink,
        on_datagram: OnDatagram,
        max_datagram: int,
        on_writable: OnWritable | None = None,
        on_read_done: OnReadDone | None = None,
    ) -> None:
        self._uplink = uplink
        self._on_datagram = on_datagram
        self._on_writable = on_writable
        self._on_read_done = on_read_done
        self._max_datagram = max_datagram
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Stock asyncio reads every datagram into a fresh 256 KiB buffer (an mmap/munmap per
        # datagram); uvloop has no such attribute.
        if hasattr(transport, "max_size"):
            transport.max_size = self._max_datagram
        with contextlib.suppress(AttributeError, NotImplementedError):  # loop dependent
            # Paused as soon as one datagram waits in the transport (the socket is full).
            transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """One datagram from the loop: it, then what else waits (one `recv_many`), then
        `on_read_done` once."""
        uplink = self._uplink
        if len(addr) != 2:  # IPv6 sockaddr: drop flowinfo and scope id
            addr = (addr[0], addr[1])
        self._deliver(data, addr)
        sock = uplink._sock
        if sock is not None and uplink._protocol is self and uplink._direct_io:
            datagrams, truncated, error = uplink._batch_io.recv_many(
                sock, RECEIVE_BATCH - 1, self._max_datagram
            )
            for more, source in datagrams:
                self._deliver(more, source)
            if truncated:
                if not uplink.rx_truncated:  # once per uplink: a peer may send nothing else
                    log.warning(
                        "uplink.rx_truncated uplink=%s max_datagram=%d (dropped, counted)",
                        uplink.name,
                        self._max_datagram,
                    )
                uplink.rx_truncated += truncated
            if error is not None:
                self.error_received(error)
        if self._on_read_done is not None:
            try:
                self._on_read_done(uplink)
            except Exception:
                uplink.callback_errors += 1
                log.exception("uplink.callback_error uplink=%s", uplink.name)

    def _deliver(self, data: bytes, addr: Address) -> None:
        uplink = self._uplink
        uplink.rx_packets += 1
        uplink.rx_bytes += len(data)
        try:
            self._on_datagram(uplink, data, addr)
        except Exception:
            # Never let a handler bug close the transport (asyncio would, on an exception).
            uplink.callback_errors += 1
            log.exception("uplink.callback_error uplink=%s", uplink.name)

    def error_received(self, exc: Exception) -> None:
        self._uplink._on_error(exc)

    def pause_writing(self) -> None:
        self._uplink._writable = False

    def resume_writing(self) -> None:
        uplink = self._uplink
        uplink._writable = True
        if self._on_writable is not None:
            try:
                self._on_writable(uplink)
            except Exception:
                uplink.callback_errors += 1
                log.exception("uplink.callback_error uplink=%s", uplink.name)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """Best effort: SO_*BUFFORCE (root, ignores rmem_max/wmem_max), else the capped one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class UplinkManager:
    """Keeps `uplinks` (name → Uplink) in line with the machine's usable interfaces."""

    def __init__(
        self,
        *,
        inclusion_patterns: Iterable[str] = (".*",),
        exclusion_patterns: Iterable[str] = ("^lo$", "^wg", "^tun", "^tailscale"),
        own_tuns: Iterable[str] = (),
        tunnel_networks: Iterable[str | Network] = (),
        bind_to_device: bool = True,
        listen_port: int = 0,
        scan_interval: float = 10.0,
        max_consecutive_failures: int = 10,
        on_datagram: OnDatagram,
        on_change: Callable[[UplinkEvent], None] | None = None,
        on_writable: OnWritable | None = None,
        on_read_done: OnReadDone | None = None,
        static: Sequence[tuple[str, str]] | None = None,
        receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        max_datagram_size: int = DEFAULT_MAX_DATAGRAM,
        io: BatchIO | None = None,
    ) -> None:
        if not 0 <= listen_port <= 65535:
            raise ValueError(f"listen_port out of range: {listen_port}")
        if scan_interval <= 0:
            raise ValueError("scan_interval must be positive")
        if max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures must be at least 1")
        if not 1 <= max_datagram_size <= batch_io.MAX_SIZE:
            raise ValueError(f"max_datagram_size must be 1-{batch_io.MAX_SIZE}")
        self.inclusion = _compile(inclusion_patterns)
        self.exclusion = _compile(exclusion_patterns)
        self.own_tuns = frozenset(own_tuns)
        self.tunnel_networks = [ipaddress.ip_network(n, strict=False) for n in tunnel_networks]
        # Interfaces kept from being uplinks because they carry a tunnel, and why (logged once).
        self.excluded: dict[str, str] = {}
        self.bind_to_device = bind_to_device and static is None
        self.listen_port = listen_port
        self.scan_interval = float(scan_interval)
        self.max_consecutive_failures = max_consecutive_failures
        self.receive_buffer = receive_buffer
        self.send_buffer = send_buffer
        self.max_datagram_size = max_datagram_size
        self._on_datagram = on_datagram
        self._on_change = on_change
        self._on_writable = on_writable
        self._on_read_done = on_read_done
        self.io = io if io is not None else batch_io.default()
        """How uplink sockets read and write batches (warp/paths/batch_io.py)."""
        self._static = None if static is None else [(n, a) for n, a in static]
        if self._static is not None:
            names = [n for n, _ in self._static]
            if len(set(names)) != len(names):
                raise ValueError("static uplink names must be unique")
        self.uplinks: dict[str, Uplink] = {}
        #: extra sockets of an uplink (`open_extra`): name -> its socket, same address and
        #: device, its own port
        self.extras: dict[str, Uplink] = {}
        self._extra_lock = asyncio.Lock()
        self._extra_tasks: set[asyncio.Task[None]] = set()
        self.scans = 0
        self._monitor: NetlinkMonitor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._scan_requested = False
        self._scan_timer: asyncio.TimerHandle | None = None
        self._rebuild_timer: asyncio.TimerHandle | None = None
        self._rebuild_due: dict[str, float] = {}
        self._last_rebuild: dict[str, float] = {}
        self._warned_bind_to_device = False
        self._started = False
        self._closed = False

    @classmethod
    def from_static(
        cls,
        uplinks: Iterable[tuple[str, str]],
        *,
        on_datagram: OnDatagram,
        on_change: Callable[[UplinkEvent], None] | None = None,
        on_writable: OnWritable | None = None,
        on_read_done: OnReadDone | None = None,
        listen_port: int = 0,
        max_consecutive_failures: int = 10,
        scan_interval: float = 10.0,
        receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        max_datagram_size: int = DEFAULT_MAX_DATAGRAM,
        io: BatchIO | None = None,
    ) -> UplinkManager:
        """Uplinks bound to given local addresses, e.g. `[("lo0", "127.0.0.1"), ("lo1",
        "127.0.0.2")]`: no netlink, no root, no SO_BINDTODEVICE (loopback demo, tests)."""
        return cls(
            on_datagram=on_datagram,
            on_change=on_change,
            on_writable=on_writable,
            on_read_done=on_read_done,
            listen_port=listen_port,
            max_consecutive_failures=max_consecutive_failures,
            scan_interval=scan_interval,
            static=list(uplinks),
            bind_to_device=False,
            receive_buffer=receive_buffer,
            send_buffer=send_buffer,
            max_datagram_size=max_datagram_size,
            io=io,
        )

    @property
    def netlink_events(self) -> int:
        return 0 if self._monitor is None else self._monitor.events

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the netlink monitor, scan once (uplinks are open when this returns), and start
        the one supervisory task (rescans, rebuilds)."""
        if self._started:
            raise RuntimeError("UplinkManager already started")
        self._started = True
        log.info("uplink.batch_io backend=%s", self.io.name)
        loop = asyncio.get_running_loop()
        try:
            if self._static is None:
                # Listen before the first dump, so no change between the two is missed.
                self._monitor = NetlinkMonitor(self._on_netlink)
                self._monitor.open(loop)
            await self._scan()
        except BaseException:
            await self.close()
            raise
        self._task = loop.create_task(self._run(), name="warp.uplinks")
        self._arm_scan_timer()

    async def close(self) -> None:
        """Stop the task, the monitor and every uplink socket (all closed on return)."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._scan_timer, self._rebuild_timer):
            if timer is not None:
                timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if self._monitor is not None:
            self._monitor.close()
        try:
            if task is not None:
                await asyncio.wait([task])
        finally:
            await self.close_extra(list(self.extras))
            for name in list(self.uplinks):
                await self._remove(name, "closed")

    def socket_of(self, name: str) -> Uplink | None:
        """The uplink (or extra socket) called ``name``."""
        return self.uplinks.get(name) or self.extras.get(name)

    def send_all(
        self, to_send: Sequence[tuple[str, Address, bytes]]
    ) -> tuple[list[tuple[str, Address, bytes]], list[str]]:
        """Send each ``(uplink, remote, data)`` from that uplink (or extra socket), in order,
        one `send_many` (sendmmsg) per uplink. Returns what could not be sent and the uplinks
        whose socket filled up (not writable: their senders wait)."""
        batches: dict[str, list[Datagram]] = {}
        for name, remote, data in to_send:
            batches.setdefault(name, []).append((data, remote))
        failed: list[tuple[str, Address, bytes]] = []
        full: list[str] = []
        for name, batch in batches.items():
            uplink = self.socket_of(name)
            indices = range(len(batch)) if uplink is None else uplink.send_many(batch)
            failed += [(name, batch[i][1], batch[i][0]) for i in indices]
            if uplink is not None and not uplink.writable:
                full.append(name)
        return failed, full

    def send_with_ttl(self, datagrams: Sequence[tuple[str, Address, bytes, int]]) -> None:
        """Send each ``(uplink, remote, data, ttl)`` with that TTL (first punches)."""
        for name, remote, data, ttl in datagrams:
            uplink = self.socket_of(name)
            if uplink is not None:
                uplink.send_with_ttl(data, remote, ttl)

    def request_extra(
        self, open_: bool, uplink: str, names: Sequence[str], on_opened: Callable[[list[str]], None]
    ) -> None:
        """Open (then ``on_opened(names opened)``) or close extra sockets, in a task; requests
        are carried out in order."""

        async def serve() -> None:
            async with self._extra_lock:
                if not open_:
                    await self.close_extra(names)
                    return
                opened = await self.open_extra(uplink, names)
            on_opened(opened)

        task = asyncio.get_running_loop().create_task(serve(), name="warp.uplinks.extra")
        self._extra_tasks.add(task)
        task.add_done_callback(self._extra_tasks.discard)

    async def open_extra(self, uplink: str, names: Sequence[str]) -> list[str]:
        """Open a socket for each of ``names`` on ``uplink``'s address and device, any port
        (birthday probing's hard side); the names of those opened (a socket that cannot be
        opened, e.g. out of file descriptors, is logged and left out)."""
        base = self.uplinks.get(uplink)
        opened: list[str] = []
        if base is None or self._closed:
            return opened
        for name in names:
            if name in self.extras:
                continue
            extra = Uplink(name, base.index, base.address)
            try:
                await self._open(extra, 0, device=uplink)
            except OSError as exc:
                log.warning("uplink.extra_open_failed uplink=%s socket=%s error=%s", uplink,
                            name, exc)  # fmt: skip
                break
            self.extras[name] = extra
            opened.append(name)
        return opened

    async def close_extra(self, names: Sequence[str]) -> None:
        for name in names:
            extra = self.extras.pop(name, None)
            if extra is not None:
                await self._detach(extra)

    async def __aenter__(self) -> UplinkManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def request_rescan(self) -> None:
        """Rescan interfaces soon (from the manager's task)."""
        self._scan_requested = True
        self._wake.set()

    async def rescan(self) -> None:
        """Rescan now and return when uplinks reflect the result."""
        await self._scan()

    # --- the supervisory task -----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._service()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep the uplinks alive whatever happened; retry later
                log.exception("uplink.service_error")

    async def _service(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for name, due in list(self._rebuild_due.items()):
            if due <= now:
                del self._rebuild_due[name]
                await self._rebuild(name)
        if self._scan_requested:
            self._scan_requested = False
            await self._scan()
            self._arm_scan_timer()
        if self._rebuild_timer is not None:
            self._rebuild_timer.cancel()
            self._rebuild_timer = None
        if self._rebuild_due:
            delay = max(0.0, min(self._rebuild_due.values()) - loop.time())
            self._rebuild_timer = loop.call_later(delay, self._wake.set)

    def _arm_scan_timer(self) -> None:
        if self._scan_timer is not None:
            self._scan_timer.cancel()
        if not self._closed:
            loop = asyncio.get_running_loop()
            self._scan_timer = loop.call_later(self.scan_interval, self.request_rescan)

    def _on_netlink(self, kinds: frozenset[str]) -> None:
        log.debug("uplink.netlink_event kinds=%s", ",".join(sorted(kinds)))
        self.request_rescan()

    def _request_rebuild(self, uplink: Uplink) -> None:
        if self._closed or self.uplinks.get(uplink.name) is not uplink:
            return
        if uplink.name in self._rebuild_due:
            return
        loop = asyncio.get_running_loop()
        last = self._last_rebuild.get(uplink.name)
        due = loop.time() if last is None else max(loop.time(), last + REBUILD_MIN_INTERVAL)
        self._rebuild_due[uplink.name] = due
        self._wake.set()

    # --- scanning -----------------------------------------------------------------------

    def _desired(self) -> tuple[dict[str, tuple[int, str]], dict[str, str]]:
        """(name → (index, address)) wanted now, and why each other known name is not."""
        if self._static is not None:
            return {name: (0, address) for name, address in self._static}, {}
        return self.select(dump_interfaces())

    def select(
        self, infos: Sequence[InterfaceInfo]
    ) -> tuple[dict[str, tuple[int, str]], dict[str, str]]:
        """`_desired` on a given interface list: patterns, then never a tunnel interface
        (`tunnel_exclusion`, logged once per interface as `uplink.excluded`), then up with
        an address."""
        selected = set(select_interfaces((i.name for i in infos), self.inclusion, self.exclusion))
        wanted: dict[str, tuple[int, str]] = {}
        why_not: dict[str, str] = {}
        excluded: dict[str, str] = {}
        for info in infos:
            address = info.address
            tunnel = (
                tunnel_exclusion(info, self.own_tuns, self.tunnel_networks)
                if info.name in selected
                else None
            )
            if info.name not in selected:
                why_not[info.name] = "excluded by patterns"
            elif tunnel is not None:
                why_not[info.name] = f"carries a tunnel ({tunnel})"
                excluded[info.name] = tunnel
                if self.excluded.get(info.name) != tunnel:
                    log.info("uplink.excluded name=%s reason=%s", info.name, tunnel)
            elif not info.up:
                why_not[info.name] = "interface down"
            elif address is None:
                why_not[info.name] = "no usable address"
            else:
                wanted[info.name] = (info.index, address)
        self.excluded = excluded
        return wanted, why_not

    async def _scan(self) -> None:
        self.scans += 1
        wanted, why_not = self._desired()
        for name, uplink in list(self.uplinks.items()):
            want = wanted.get(name)
            if want is None:
                await self._remove(name, why_not.get(name, "interface removed"))
            elif want != (uplink.index, uplink.address):
                await self._remove(name, f"address changed to {want[1]}")
        for name, (index, address) in wanted.items():
            if name not in self.uplinks and not self._closed:
                await self._add(name, index, address)

    async def _add(self, name: str, index: int, address: str) -> None:
        uplink = Uplink(
            name,
            index,
            address,
            max_consecutive_failures=self.max_consecutive_failures,
            on_failure=self._request_rebuild,
            io=self.io,
        )
        try:
            await self._open(uplink, self.listen_port)
        except OSError as exc:
            log.warning(
                "uplink.open_failed uplink=%s address=%s port=%d error=%s",
                name,
                address,
                self.listen_port,
                exc,
            )
            return
        self.uplinks[name] = uplink
        log.info(
            "uplink.added uplink=%s index=%d address=%s port=%d device_bound=%s",
            name,
            index,
            address,
            uplink.local_port,
            uplink.bound_to_device,
        )
        self._emit(UplinkEvent(UplinkEventKind.ADDED, uplink))

    async def _remove(self, name: str, reason: str) -> None:
        uplink = self.uplinks.pop(name, None)
        if uplink is None:
            return
        self._rebuild_due.pop(name, None)
        self._last_rebuild.pop(name, None)
        await self._detach(uplink)
        log.info("uplink.removed uplink=%s address=%s reason=%s", name, uplink.address, reason)
        self._emit(UplinkEvent(UplinkEventKind.REMOVED, uplink, reason))

    async def _rebuild(self, name: str) -> None:
        uplink = self.uplinks.get(name)
        if uplink is None:
            return
        self._last_rebuild[name] = asyncio.get_running_loop().time()
        reason = f"{uplink.consecutive_failures} consecutive send errors, last: {uplink.last_error}"
        old_port = uplink.local_port
        await self._detach(uplink)
        uplink.consecutive_failures = 0
        uplink.rebuilds += 1
        ports = [old_port] if old_port == self.listen_port else [old_port, self.listen_port]
        error: OSError | None = None
        for port in ports:  # keep the port (NAT mapping, map registration) when possible
            try:
                await self._open(uplink, port)
                break
            except OSError as exc:
                error = exc
        else:
            self.uplinks.pop(name, None)
            log.warning("uplink.removed uplink=%s reason=rebuild failed: %s", name, error)
            self._emit(UplinkEvent(UplinkEventKind.REMOVED, uplink, f"rebuild failed: {error}"))
            self.request_rescan()
            return
        log.warning(
            "uplink.rebuilt uplink=%s address=%s port=%d reason=%s",
            name,
            uplink.address,
            uplink.local_port,
            reason,
        )
        self._emit(UplinkEvent(UplinkEventKind.REBUILT, uplink, reason))

    # --- sockets ------------------------------------------------------------------------

    def _make_socket(self, uplink: Uplink, port: int, device: str | None = None) -> socket.socket:
        sock = socket.socket(uplink.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if port:
                # Several uplinks share a fixed listen_port on different addresses/devices;
                # REUSEADDR also lets a rebuilt socket take the port back at once.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if uplink.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            uplink.bound_to_device = False
            if self.bind_to_device:
                try:
                    sock.setsockopt(
                        socket.SOL_SOCKET, _SO_BINDTODEVICE, (device or uplink.name).encode()
                    )
                    uplink.bound_to_device = True
                except OSError as exc:
                    if not self._warned_bind_to_device:
                        self._warned_bind_to_device = True
                        log.warning(
                            "uplink.bind_to_device_failed uplink=%s error=%s "
                            "(needs CAP_NET_RAW; continuing without)",
                            uplink.name,
                            exc,
                        )
            _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, self.receive_buffer)
            _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, self.send_buffer)
            if uplink.family == socket.AF_INET6:
                sock.bind((uplink.address, port, 0, 0))
            else:
                sock.bind((uplink.address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open(self, uplink: Uplink, port: int, *, device: str | None = None) -> None:
        sock = self._make_socket(uplink, port, device)
        loop = asyncio.get_running_loop()
        protocol = _UplinkProtocol(
            uplink,
            self._on_datagram,
            self.max_datagram_size,
            self._on_writable,
            self._on_read_done,
        )
        try:
            if is_wildcard(uplink.address):
                # Every local address (a `listen_port` server): replies leave from the address
                # each peer sent to (warp/pktinfo.py), one by one (a GSO batch would not).
                transport: asyncio.DatagramTransport = StickyTransport(loop, sock, protocol)
                uplink._gso = uplink._direct_io = False
            else:
                transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
                uplink._direct_io = True
        except BaseException:
            sock.close()
            raise
        uplink._transport = transport
        uplink._protocol = protocol
        uplink._sock = sock  # the transport's socket (both loops): closed with the transport
        uplink._sock_transport = transport
        uplink._writable = True
        uplink.local_port = sock.getsockname()[1]

    async def _detach(self, uplink: Uplink) -> None:
        """Close the uplink's socket and wait until it really is closed."""
        transport, protocol = uplink._transport, uplink._protocol
        uplink._transport = None
        uplink._protocol = None
        uplink._sock = None
        uplink._sock_transport = None
        if transport is None or protocol is None:
            return
        transport.abort()  # drop anything queued: this socket is going away
        await asyncio.wait([protocol.closed], timeout=1.0)

    def _emit(self, event: UplinkEvent) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(event)
        except Exception:
            log.exception("uplink.callback_error event=%s", event.name)
