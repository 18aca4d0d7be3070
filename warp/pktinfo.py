"""Sticky source address: a UDP socket bound to a wildcard address replies from the address
each peer's datagrams arrived at, as WireGuard does (IP_PKTINFO / IPV6_RECVPKTINFO).

A host with several addresses (its public one on ``lo`` or on a second interface) picks the
source of a reply from its routing table, not from the request: a client behind NAT then
hears from an address it never sent to, and its NAT drops the reply. :class:`StickyTransport`
reads with ``recvmsg``, keeps each peer's local address (the destination of its last
datagram, from the packet-info control message) and sends to that peer with ``sendmsg``
naming it as the source. The table is bounded (oldest peer forgotten first); a local
address that went away makes the send fall back to the kernel's choice.

It is an :class:`asyncio.DatagramTransport` driving an ordinary :class:`asyncio.DatagramProtocol`,
so the shells (warp-map's server, a gateway's uplink socket) use it in place of the loop's own
datagram transport when they bind a wildcard address. Linux only (the options are Linux's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

#: Linux's value; Python exposes ``socket.IP_PKTINFO`` only from 3.13
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16si")  # addr, ifindex
_ANCILLARY_SPACE = socket.CMSG_SPACE(_IN_PKTINFO.size) + socket.CMSG_SPACE(_IN6_PKTINFO.size)
#: peers whose local address is remembered (beyond, the oldest is forgotten)
MAX_PEERS = 65_536
#: datagrams read per readiness callback before yielding to the loop
READ_BATCH = 64
MAX_DATAGRAM = 65_535

Cmsg = list[tuple[int, int, bytes]]


def is_wildcard(host: str) -> bool:
    """Whether a socket bound to ``host`` receives on every local address."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False


def enable(sock: socket.socket) -> None:
    """Ask for the destination address of each received datagram (both families on an IPv6
    socket: a dual-stack one receives IPv4 too)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        # an IPv6-only socket on a kernel that refuses it: IPv6 is covered
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def destination(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    """The local address a datagram was sent to, from its packet-info control message."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            return socket.inet_ntop(socket.AF_INET, _IN_PKTINFO.unpack_from(data)[2])
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _IN6_PKTINFO.size
        ):
            address = ipaddress.IPv6Address(_IN6_PKTINFO.unpack_from(data)[0])
            mapped = address.ipv4_mapped
            return str(mapped) if mapped is not None else str(address)
    return None


def source_cmsg(local: str) -> Cmsg:
    """The control message that makes ``sendmsg`` send from ``local``."""
    address = ipaddress.ip_address(local)
    if address.version == 4:
        return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, address.packed, bytes(4)))]
    return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(address.packed, 0))]


class StickyTransport(asyncio.DatagramTransport):
    """A datagram transport on a wildcard-bound socket that replies from the address asked
    (see the module docstring). ``sock``: bound, non-blocking; it is closed with the
    transport. A send the socket cannot take now is dropped (``dropped``), as UDP may."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        *,
        max_peers: int = MAX_PEERS,
        max_size: int = MAX_DATAGRAM,
    ) -> None:
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        enable(sock)
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._max_peers = max_peers
        self.max_size = max_size
        #: peer (host, port) -> (its local address, the control message naming it)
        self._sources: dict[tuple[str, int], tuple[str, Cmsg]] = {}
        self._closing = False
        self.dropped = 0
        self.stale_sources = 0
        loop.add_reader(sock.fileno(), self._readable)
        loop.call_soon(protocol.connection_made, self)

    def sticky_source(self, peer: tuple[Any, ...]) -> str | None:
        """The local address replies to ``peer`` leave from (None: the kernel's choice)."""
        known = self._sources.get((str(peer[0]), int(peer[1])))
        return None if known is None else known[0]

    def _readable(self) -> None:
        receive = self._sock.recvmsg
        for _ in range(READ_BATCH):
            if self._closing:
                return
            try:
                data, ancillary, _flags, peer = receive(self.max_size, _ANCILLARY_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            local = destination(ancillary)
            if local is not None:
                self._remember((str(peer[0]), int(peer[1])), local)
            self._protocol.datagram_received(data, peer)

    def _remember(self, peer: tuple[str, int], local: str) -> None:
        sources = self._sources
        known = sources.get(peer)
        if known is not None and known[0] == local:
            return
        if known is None and len(sources) >= self._max_peers:
            del sources[next(iter(sources))]  # bounded: the oldest peer is forgotten
        sources[peer] = (local, source_cmsg(local))

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing or addr is None:
            return
        key = (str(addr[0]), int(addr[1]))
        known = self._sources.get(key)
        cmsg = None if known is None else known[1]
        try:
            self._send(data, cmsg, addr)
        except OSError as exc:
            if cmsg is None:
                self._protocol.error_received(exc)
                return
            # The address it came to is gone (removed, moved): let the kernel choose, as
            # WireGuard clears its sticky source.
            self.stale_sources += 1
            del self._sources[key]
            try:
                self._send(data, None, addr)
            except OSError as again:
                self._protocol.error_received(again)

    def _send(self, data: Any, cmsg: Cmsg | None, addr: Any) -> None:
        try:
            self._sock.sendmsg([data], cmsg or [], 0, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1

    def get_write_buffer_size(self) -> int:
        return 0  # never buffers: what the socket cannot take is dropped

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # nothing is buffered (`get_write_buffer_size`)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_soon(self._finish)

    def abort(self) -> None:
        self.close()

    def _finish(self) -> None:
        self._sock.close()
        self._protocol.connection_lost(None)


def open_sticky(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
) -> tuple[StickyTransport, asyncio.DatagramProtocol]:
    """Like ``loop.create_datagram_endpoint(protocol_factory, sock=sock)``, with replies from
    the address asked."""
    protocol = protocol_factory()
    return StickyTransport(loop, sock, protocol), protocol
