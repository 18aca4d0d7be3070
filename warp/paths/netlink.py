"""Minimal rtnetlink plumbing for uplink discovery: interface dumps and a change monitor.

Why not `pyroute2.AsyncIPRoute`: in pyroute2 0.9 it opens its netlink socket through
`loop.create_datagram_endpoint`, which uvloop refuses for AF_NETLINK ("invalid family 16").
So the monitor is a plain non-blocking AF_NETLINK socket joined to the link and address
multicast groups and watched with `loop.add_reader` (works on every loop, no thread), and a
dump is one short synchronous request/response on its own netlink socket (the kernel answers
a dump from memory; it takes well under a millisecond for a handful of links). pyroute2 still
encodes the requests and parses the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("warp.paths.netlink")

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_DUMP_INTR = 0x10
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100

IFF_UP = 0x1
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000
IFA_F_SECONDARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255

EVENT_NAMES = {
    RTM_NEWLINK: "newlink",
    RTM_DELLINK: "dellink",
    RTM_NEWADDR: "newaddr",
    RTM_DELADDR: "deladdr",
}

_NLMSGHDR = struct.Struct("=IHHII")
_RECV_SIZE = 1 << 16
_DUMP_TIMEOUT = 2.0


class NetlinkError(OSError):
    pass


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    """What discovery needs to know about one interface."""

    name: str
    index: int
    up: bool
    """Administratively up with carrier (IFF_UP and IFF_LOWER_UP).

    Not IFF_RUNNING (operstate): the kernel's linkwatch reports operstate changes up to a
    second late, while the carrier bit is set at once; a dormant link has no address yet."""
    ipv4: tuple[str, ...]
    """Usable IPv4 addresses, primary ones first."""
    ipv6: tuple[str, ...]
    """Global-scope IPv6 addresses that finished DAD, non-deprecated first."""
    kind: str | None = None
    """The netlink link kind (IFLA_INFO_KIND): "veth", "wireguard", "tun" (TUN/TAP devices,
    wireguard-go's and WARP's own included), ...; None for a physical device."""

    @property
    def address(self) -> str | None:
        """The address an uplink binds to: the first IPv4 one, else the first global IPv6."""
        if self.ipv4:
            return self.ipv4[0]
        if self.ipv6:
            return self.ipv6[0]
        return None


def _dump(sock: socket.socket, request: Any, msg_type: int, seq: int) -> list[Any]:
    request["header"]["type"] = msg_type
    request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    request["header"]["sequence_number"] = seq
    request.encode()
    sock.send(request.data)
    marshal = MarshalRtnl()
    out: list[Any] = []
    interrupted = False
    while True:
        data = sock.recv(_RECV_SIZE)
        for msg in marshal.parse(data):
            header = msg["header"]
            if header["sequence_number"] != seq:
                continue
            if header["flags"] & NLM_F_DUMP_INTR:
                interrupted = True
            kind = header["type"]
            if kind == NLMSG_DONE:
                if interrupted:
                    raise InterruptedError("netlink dump interrupted")
                return out
            if kind == NLMSG_ERROR:
                code = abs(header.get("error") or msg.get("error") or 0)
                if code:
                    raise NetlinkError(code, f"netlink dump failed: {errno.errorcode.get(code)}")
                continue
            out.append(msg)


def dump_interfaces() -> list[InterfaceInfo]:
    """All interfaces of this network namespace with their usable addresses (synchronous)."""
    for attempt in range(3):
        try:
            return _dump_interfaces_once(attempt)
        except InterruptedError:
            continue  # the table changed during the dump (NLM_F_DUMP_INTR): retry
    return _dump_interfaces_once(3)


def _dump_interfaces_once(attempt: int) -> list[InterfaceInfo]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_DUMP_TIMEOUT)
        sock.bind((0, 0))
        link_req = ifinfmsg()
        link_req["family"] = socket.AF_UNSPEC
        links = _dump(sock, link_req, RTM_GETLINK, 100 + 2 * attempt)
        addr_req = ifaddrmsg()
        addr_req["family"] = socket.AF_UNSPEC
        addrs = _dump(sock, addr_req, RTM_GETADDR, 101 + 2 * attempt)

    v4: dict[int, list[tuple[int, str]]] = {}
    v6: dict[int, list[tuple[int, str]]] = {}
    for msg in addrs:
        flags = msg.get_attr("IFA_FLAGS")
        if flags is None:
            flags = msg["flags"]
        scope = msg["scope"]
        index = msg["index"]
        if msg["family"] == socket.AF_INET:
            # IFA_LOCAL is the local address; on point-to-point links IFA_ADDRESS is the peer.
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address and scope != RT_SCOPE_NOWHERE:  # host scope (127/8) allowed: patterns decide
                v4.setdefault(index, []).append((1 if flags & IFA_F_SECONDARY else 0, address))
        elif msg["family"] == socket.AF_INET6:
            address = msg.get_attr("IFA_ADDRESS")
            if (
                address
                and scope == RT_SCOPE_UNIVERSE
                and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
            ):
                v6.setdefault(index, []).append((1 if flags & IFA_F_DEPRECATED else 0, address))

    result: list[InterfaceInfo] = []
    for msg in links:
        index = msg["index"]
        name = msg.get_attr("IFLA_IFNAME")
        if not name:
            continue
        flags = msg["flags"]
        result.append(
            InterfaceInfo(
                name=name,
                index=index,
                up=bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP),
                ipv4=tuple(a for _, a in sorted(v4.get(index, []), key=lambda t: t[0])),
                ipv6=tuple(a for _, a in sorted(v6.get(index, []), key=lambda t: t[0])),
                kind=_link_kind(msg),
            )
        )
    return result


def _link_kind(msg: Any) -> str | None:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if linkinfo is None:
        return None
    kind = linkinfo.get_attr("IFLA_INFO_KIND")
    return str(kind) if kind else None


class NetlinkMonitor:
    """Calls `on_change(kinds)` as soon as the kernel reports link or address changes.

    `kinds` is the set of event names seen in one read batch ("newlink", "deladdr", ...,
    or "overflow" when the kernel dropped events because we were slow: rescan everything).
    """

    def __init__(self, on_change: Callable[[frozenset[str]], None]) -> None:
        self._on_change = on_change
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0
        self.overflows = 0

    @property
    def fileno(self) -> int | None:
        return None if self._sock is None else self._sock.fileno()

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):  # best effort
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            loop.add_reader(sock.fileno(), self._on_readable)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop = loop

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        kinds: set[str] = set()
        for _ in range(1024):  # bounded drain
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    kinds.add("overflow")
                    continue
                log.warning("netlink.error %s", exc)
                kinds.add("overflow")
                break
            kinds.update(_event_kinds(data))
        if kinds:
            self.events += 1
            self._on_change(frozenset(kinds))


def _event_kinds(data: bytes) -> set[str]:
    kinds: set[str] = set()
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        name = EVENT_NAMES.get(kind)
        if name is not None:
            kinds.add(name)
        offset += (length + 3) & ~3
    return kinds
