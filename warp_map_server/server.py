"""warp-map's asyncio shell: one UDP socket, one timer, and the optional link to the other
instances of a map cluster, around the sans-I/O :class:`~warp_map_server.core.MapCore` (which
holds the WireGuard device, the registry, address validation and the session table, and makes
every decision; see its module docstring).

After every input (a datagram, the timer, something from the cluster link) the shell sends what
the core has to send, hands its cluster outputs to the link, logs its events, and re-arms the
one timer when ``next_deadline()`` moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from warp.config import MapServerConfig
from warp.keys import encode_key
from warp.pktinfo import is_wildcard, open_sticky
from warp.wireguard import Address
from warp_map_server.cluster import ClusterInput, ClusterLink
from warp_map_server.core import (
    STATS_INTERVAL,
    MapCore,
    MapCoreEvent,
    SessionAccepted,
    SessionDropped,
    SessionRefused,
    StatsDue,
)
from warp_map_server.registry import Registry, log_event, short

log = logging.getLogger("warp_map_server")

RECEIVE_BUFFER = 4 * 1024 * 1024


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: MapServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["socket.errors"] += 1


def _bound_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``(host, port)`` (IPv6 "::" is dual-stack, as the
    loop's own endpoint makes it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class MapServer:
    """The rendezvous server. ``start()`` binds; ``serve_forever()`` runs until cancelled."""

    def __init__(
        self,
        config: MapServerConfig,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        stats_interval: float = STATS_INTERVAL,
    ) -> None:
        self.config = config
        self.public_key = config.public_key
        self._rng = rng
        self.stats_interval = stats_interval
        #: the map's decisions; made by ``start()`` (its clock starts there)
        self._core: MapCore | None = None
        #: shared state with the other instances of a map cluster (``[cluster]``), else None
        self.cluster: ClusterLink | None = None
        #: socket-level counters (the core counts the rest)
        self.counters: Counter[str] = Counter()
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._ipv6 = False
        self.address: tuple[str, int] | None = None

    @property
    def core(self) -> MapCore:
        if self._core is None:
            raise RuntimeError("the map server is not started")
        return self._core

    @property
    def registry(self) -> Registry:
        return self.core.registry

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        host, port = self.config.bind
        transport: asyncio.DatagramTransport
        if is_wildcard(host):
            # Every local address: reply from the one each client sent to (sticky source).
            transport, _ = open_sticky(loop, _bound_socket(host, port), lambda: _Protocol(self))
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(host, port)
            )
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.address = (str(sockname[0]), int(sockname[1]))
        sock = transport.get_extra_info("socket")
        self._ipv6 = sock is not None and sock.family == socket.AF_INET6
        receive_buffer = 0
        if sock is not None:
            # Absorb bursts (and floods) while the loop is busy; the kernel caps this at
            # net.core.rmem_max, so ask for a lot and log what we got.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            with contextlib.suppress(OSError):
                receive_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        core = self._core = MapCore(
            self.config, now=loop.time(), rng=self._rng, stats_interval=self.stats_interval
        )
        if self.config.cluster is not None:
            self.cluster = ClusterLink(
                self.config.cluster,
                core.boot_id,
                self._from_cluster,
                max_clients=self.config.limits.max_clients,
                on_up=self._cluster_up,
                on_down=core.cluster_down,
            )
        log_event(
            log,
            "map.listening",
            address=f"{self.address[0]}:{self.address[1]}",
            public_key=encode_key(self.public_key),
            policy=self.config.lookup_policy,
            ttl=self.config.registration_ttl,
            relay=self.config.relay.enabled,
            rcvbuf=receive_buffer,
        )
        if self.cluster is not None:
            self.cluster.start()
        self._rearm()
        return self.address

    async def serve_forever(self) -> None:
        if self._transport is None:
            await self.start()
        try:
            await asyncio.Future()
        finally:
            self.close()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            self.log_stats()
            log_event(log, "map.stopped")

    # ------------------------------------------------------------------------ inputs

    def datagram(self, data: bytes, addr: Any) -> None:
        core = self._core
        if core is None or self._loop is None:
            return
        core.datagram_received(addr, data, self._loop.time())
        self._drain(core)

    def _from_cluster(self, items: Sequence[ClusterInput]) -> None:
        """Records and relays from the other instances (through Valkey)."""
        core = self._core
        if core is None or self._loop is None:
            return
        core.cluster_received(items, self._loop.time())
        self._drain(core)

    def _cluster_up(self) -> None:
        """Valkey is (back) up: what we hold may be missing there; announce it again."""
        core = self._core
        if core is None or self._loop is None:
            return
        core.cluster_up(self._loop.time())
        self._drain(core)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        core = self._core
        if core is None or self._loop is None:
            return
        core.handle_timer(self._loop.time())
        self._drain(core)

    # ------------------------------------------------------------------------ outputs

    def _drain(self, core: MapCore) -> None:
        """Carry out what the core decided, then re-arm the timer if its deadline moved."""
        for destination, data in core.datagrams_to_send():
            self._send(data, destination)
        if self.cluster is not None:
            self.cluster.submit(core.cluster_outputs())
        for event in core.events():
            self._log_event(event)
        self._rearm()

    def _send(self, data: bytes, destination: Address) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._ipv6 and ":" not in destination[0]:
            # registry endpoints are plain IPv4; a dual-stack socket wants them v4-mapped
            destination = (f"::ffff:{destination[0]}", destination[1])
        try:
            transport.sendto(data, destination)
        except OSError:
            self.counters["socket.errors"] += 1
            return
        self.counters["datagrams.out"] += 1
        self.counters["bytes.out"] += len(data)

    def _log_event(self, event: MapCoreEvent) -> None:
        match event:
            case SessionAccepted(client, source):
                log_event(
                    log,
                    "map.session_accepted",
                    logging.DEBUG,
                    client=short(client),
                    source=source,
                )
            case SessionRefused(client, reason):
                log_event(
                    log, "map.session_refused", logging.DEBUG, client=short(client), reason=reason
                )
            case SessionDropped(client, reason):
                log_event(
                    log, "map.session_dropped", logging.DEBUG, client=short(client), reason=reason
                )
            case StatsDue():
                self.log_stats()

    def _rearm(self) -> None:
        loop = self._loop
        core = self._core
        if loop is None or core is None or self._transport is None:
            return
        when = max(core.next_deadline(), loop.time())
        if self._timer is not None and self._timer_at == when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)

    # ------------------------------------------------------------------------ observability

    def stats(self) -> dict[str, int]:
        core = self._core
        if core is None:
            return dict(self.counters)
        now = self._loop.time() if self._loop is not None else 0.0
        out = core.stats(now)
        out.update(self.counters)
        if self.cluster is not None:
            out.update(self.cluster.stats())
        return out

    def log_stats(self) -> None:
        stats = self.stats()
        log_event(log, "map.stats", **{k.replace(".", "_"): v for k, v in sorted(stats.items())})
