"""TUN gate: a Linux TUN interface whose IP packets go through the tunnel, encrypted once.

* `start` opens ``/dev/net/tun`` (``IFF_TUN | IFF_NO_PI``: bare IPv4/IPv6 packets, no
  packet-information header), then through rtnetlink (pyroute2) sets the MTU, adds the
  addresses (IPv6 ones with ``nodad``, usable at once), brings the link up and adds one route
  per ``allowed_ips`` network (a ``/0`` becomes two ``/1`` routes, so the existing default
  route is kept and comes back untouched when warp stops);
* every packet the kernel routes into the interface is handed to ``on_datagram(gate, packet)``;
  `deliver` writes a packet from the tunnel into the interface;
* `close` closes the file descriptor, which removes a non-persistent TUN device together with
  its addresses and routes. A *persistent* TUN device that existed before (``ip tuntap add``)
  is kept: then the addresses and routes this gate added are removed instead.

Netlink runs in a worker thread with its own stock asyncio loop: pyroute2 0.9's synchronous
`IPRoute` cannot run inside a running event loop, and its `AsyncIPRoute` does not work under
uvloop (``create_datagram_endpoint`` refuses ``AF_NETLINK``). Setup happens once per start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from warp.gate.base import READ_BATCH, DropReason, GateCounters, GateError, OnDatagram

if TYPE_CHECKING:
    from warp.config import TunGate as TunGateConfig

__all__ = ["TUN_DEVICE", "TunDropReason", "TunGate", "routes_for"]

log = logging.getLogger("warp.gate")

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
IFA_F_NODAD = 0x02
#: read size: any IP packet (up to 64 KiB) in one read, below glibc's mmap threshold
_READ_SIZE = 65536

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TunDropReason:
    """`GateCounters.drops` keys specific to the TUN gate (besides `DropReason`'s)."""

    #: the kernel refused a packet from the tunnel (not a well-formed IPv4/IPv6 packet)
    INVALID_PACKET = "invalid_packet"
    #: the interface is administratively down (write returned EIO)
    INTERFACE_DOWN = "interface_down"


def routes_for(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """The routes that send ``networks`` into the interface: a ``/0`` is split into two
    ``/1`` routes (more specific than any default route, which is therefore kept)."""
    routes: list[IPNetwork] = []
    for net in networks:
        if net.prefixlen == 0:
            routes.extend(net.subnets(prefixlen_diff=1))
        else:
            routes.append(net)
    return routes


def _open_tun(name: str) -> tuple[int, str]:
    """Open /dev/net/tun and attach it to interface ``name`` (created if it does not exist)."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise GateError(f"tun gate {name}: cannot open {TUN_DEVICE}: {exc.strerror}") from None
    try:
        ifr = _IFREQ.pack(name.encode(), IFF_TUN | IFF_NO_PI)
        result = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            cause = "operation not permitted (needs CAP_NET_ADMIN)"
        elif exc.errno in (errno.EINVAL, errno.EBUSY):
            cause = "an interface of that name exists and is not a free TUN device"
        else:
            cause = exc.strerror or str(exc)
        raise GateError(f"tun gate {name}: cannot create the interface: {cause}") from None
    actual = _IFREQ.unpack(result)[0].rstrip(b"\0").decode()
    return fd, actual


class _Netlink:
    """Synchronous rtnetlink setup, run in a worker thread (see the module docstring)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._loop = asyncio.SelectorEventLoop()
        try:
            self.ipr: Any = IPRoute(use_event_loop=self._loop)
        except BaseException:
            self._loop.close()
            raise

    def close(self) -> None:
        try:
            self.ipr.close()
        finally:
            self._loop.close()


def _netlink_error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _configure(
    ifindex: int,
    mtu: int,
    addresses: Sequence[IPInterface],
    routes: Sequence[IPNetwork],
) -> tuple[list[IPInterface], list[IPNetwork]]:
    """Set MTU, add addresses, bring up, add routes. Returns what was actually added (an
    address or route that already exists is kept, not added, and not removed later)."""
    nl = _Netlink()
    added_addresses: list[IPInterface] = []
    added_routes: list[IPNetwork] = []
    try:
        ipr = nl.ipr
        ipr.link("set", index=ifindex, mtu=mtu)
        for iface in addresses:
            kwargs: dict[str, Any] = {
                "index": ifindex,
                "address": str(iface.ip),
                "prefixlen": iface.network.prefixlen,
            }
            if iface.version == 6:
                kwargs["flags"] = IFA_F_NODAD
            try:
                ipr.addr("add", **kwargs)
            except Exception as exc:
                if _netlink_error_code(exc) != errno.EEXIST:
                    raise GateError(f"cannot add address {iface}: {exc}") from None
            else:
                added_addresses.append(iface)
        ipr.link("set", index=ifindex, state="up")
        for net in routes:
            try:
                ipr.route("add", dst=str(net), oif=ifindex)
            except Exception as exc:
                if _netlink_error_code(exc) != errno.EEXIST:
                    raise GateError(f"cannot add route {net}: {exc}") from None
                log.warning("tun.route_exists route=%s (kept as it is)", net)
            else:
                added_routes.append(net)
    except GateError:
        raise
    except Exception as exc:
        raise GateError(f"netlink: {exc}") from None
    finally:
        nl.close()
    return added_addresses, added_routes


def _unconfigure(
    ifindex: int, addresses: Sequence[IPInterface], routes: Sequence[IPNetwork]
) -> None:
    """Best effort: remove routes and addresses this gate added to a device it keeps."""
    nl = _Netlink()
    try:
        for net in routes:
            with contextlib.suppress(Exception):
                nl.ipr.route("del", dst=str(net), oif=ifindex)
        for iface in addresses:
            with contextlib.suppress(Exception):
                nl.ipr.addr(
                    "del", index=ifindex, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
    finally:
        nl.close()


class TunGate:
    """A TUN interface as a gate: IP packets in (`on_datagram`), IP packets out (`deliver`).

    ``addresses`` are the interface's own addresses (CIDR: the prefix also gives the
    connected route); ``allowed_ips`` get routes into the interface.
    """

    kind = "tun"

    def __init__(
        self,
        on_datagram: OnDatagram,
        *,
        name: str = "warp0",
        addresses: Sequence[IPInterface | str] = (),
        mtu: int = 1420,
        allowed_ips: Sequence[IPNetwork | str] = (),
    ) -> None:
        if not 0 < len(name.encode()) < IFNAMSIZ:
            raise GateError(f"invalid interface name {name!r}: 1 to 15 bytes")
        self._on_datagram = on_datagram
        self.name = name
        self.addresses: tuple[IPInterface, ...] = tuple(
            ipaddress.ip_interface(a) for a in addresses
        )
        self.mtu = mtu
        self.allowed_ips: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in allowed_ips
        )
        self.counters = GateCounters()
        #: interface index once started
        self.ifindex: int | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_added = False
        self._paused = False
        self._closed = False
        self._persistent = False
        self._added_addresses: list[IPInterface] = []
        self._added_routes: list[IPNetwork] = []
        self._callback_error_logged = False

    @classmethod
    def from_config(cls, on_datagram: OnDatagram, config: TunGateConfig) -> TunGate:
        """A gate from a ``[tunnels.<name>.gate]`` table of type ``tun``."""
        return cls(
            on_datagram,
            name=config.name,
            addresses=config.address,
            mtu=config.mtu,
            allowed_ips=config.allowed_ips,
        )

    # -- Gate protocol ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.name

    @property
    def is_reading(self) -> bool:
        return self._reader_added

    @property
    def fileno(self) -> int | None:
        return self._fd

    async def start(self) -> None:
        if self._closed:
            raise GateError(f"tun gate {self.name} is closed")
        if self._fd is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            existing: int | None = socket.if_nametoindex(self.name)
        except OSError:
            existing = None
        fd, actual = _open_tun(self.name)
        self.name = actual
        try:
            ifindex = socket.if_nametoindex(actual)
            # a device that existed before TUNSETIFF attached to it is a persistent one
            self._persistent = existing == ifindex
            added = await asyncio.to_thread(
                _configure, ifindex, self.mtu, self.addresses, routes_for(self.allowed_ips)
            )
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, GateError):
                raise GateError(f"tun gate {actual}: {exc}") from None
            if isinstance(exc, OSError):
                raise GateError(f"tun gate {actual}: {exc.strerror or exc}") from None
            raise
        self._added_addresses, self._added_routes = added
        self.ifindex = ifindex
        self._fd = fd
        log.info(
            "tun.up name=%s ifindex=%d mtu=%d addresses=%s routes=%s",
            actual,
            ifindex,
            self.mtu,
            ",".join(map(str, self.addresses)) or "-",
            ",".join(map(str, self._added_routes)) or "-",
        )
        if not self._paused:
            self._add_reader()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._remove_reader()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._persistent and self.ifindex is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    _unconfigure, self.ifindex, self._added_addresses, self._added_routes
                )
        os.close(fd)
        log.info("tun.closed name=%s", self.name)

    def pause_reading(self) -> None:
        self._paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        self._paused = False
        if self._fd is not None and not self._closed:
            self._add_reader()

    def _add_reader(self) -> None:
        if not self._reader_added and self._fd is not None and self._loop is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reader_added = True

    def _remove_reader(self) -> None:
        if self._reader_added and self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._reader_added = False

    # -- data path ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        read = os.read
        counters = self.counters
        on_datagram: Callable[[Any, bytes], bool | None] = self._on_datagram
        for _ in range(READ_BATCH):
            try:
                packet = read(fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                counters.drop(DropReason.RECEIVE_ERROR)
                return
            if not packet:
                return
            counters.datagrams_in += 1
            counters.bytes_in += len(packet)
            try:
                verdict = on_datagram(self, packet)
            except Exception:
                counters.drop(DropReason.CALLBACK_ERROR)
                if not self._callback_error_logged:
                    self._callback_error_logged = True
                    log.exception("gate.callback_error gate=%s", self.name)
                continue
            if verdict is False:
                self._paused = True
                self._remove_reader()
                return
            if self._fd is None or not self._reader_added:
                return  # closed or paused from inside the callback

    def deliver(self, payload: bytes) -> bool:
        fd = self._fd
        counters = self.counters
        if fd is None:
            counters.drop(DropReason.CLOSED)
            return False
        try:
            os.write(fd, payload)
        except (BlockingIOError, InterruptedError):
            counters.drop(DropReason.APPLICATION_BUSY)
            return False
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                counters.drop(TunDropReason.INVALID_PACKET)
            elif exc.errno == errno.EIO:
                counters.drop(TunDropReason.INTERFACE_DOWN)
            elif exc.errno == errno.EMSGSIZE:
                counters.drop(DropReason.TOO_LARGE)
            else:
                counters.drop(DropReason.SEND_ERROR)
            return False
        counters.datagrams_out += 1
        counters.bytes_out += len(payload)
        return True
