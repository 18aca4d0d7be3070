"""warp-map's I/O loop: one UDP socket, one WireGuard :class:`~warp.wireguard.Device`, one
:class:`~warp_map_server.registry.Registry`, one timer.

Every datagram goes to the device first. Handshake messages are answered by the device itself
(responses are 92 bytes for a 148-byte initiation, cookie replies 64 bytes: an unauthenticated
sender never gets more bytes back than it sent, which :meth:`MapServer.datagram` also enforces);
under load the device requires cookies (``limits.handshake_load_threshold`` handshake messages
per second) and rate-limits handshakes per source IP. Only authenticated transport plaintexts
reach the registry. Replies are sealed for the client and sent to the *source* of the request
(the uplink that asked); pushes go to each registered endpoint of the client pushed to.

Every send for a client passes its :class:`~warp_map_server.validation.AddressValidator`: an
address that has not proven it receives (handshake response confirmed, or challenge echoed) gets
nothing but its challenge (within what came from it): no answers, pushes or relayed payloads.

Peers (sessions) are bounded by ``limits.max_clients``: when the table is full, a new client
evicts the least recently active peer that holds no registration, or is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from warp.config import MapServerConfig
from warp.keys import encode_key
from warp.map_client.messages import is_map_frame
from warp.wireguard import (
    Device,
    HandshakeComplete,
    KeysZeroed,
    MessageKind,
    Outgoing,
    UnknownPeerAccepted,
)
from warp.wireguard.constants import REJECT_AFTER_TIME
from warp_map_server.cluster import ClusterInput, ClusterLink, RelayIn
from warp_map_server.registry import Registry, log_event, normalize, short
from warp_map_server.validation import AddressValidator

log = logging.getLogger("warp_map_server")

GC_INTERVAL = 1.0
STATS_INTERVAL = 60.0
#: A peer with no registration and no authenticated packet for this long is dropped.
IDLE_PEER_TIMEOUT = REJECT_AFTER_TIME
EVICTION_SCAN = 64
RECEIVE_BUFFER = 4 * 1024 * 1024


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: MapServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["socket.errors"] += 1


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
        limits = config.limits
        self.counters: Counter[str] = Counter()
        self.device = Device(
            config.private_key,
            rng=rng,
            mtu=None,
            accept_unknown_peer=self._accept_peer,
            # the device refuses at max_peers before asking us; we keep max_clients ourselves
            max_peers=limits.max_clients + 1,
            handshake_load_threshold=limits.handshake_load_threshold,
            roaming_events=False,
        )
        self.allowed_keys = (
            frozenset(config.allowed_keys) if config.allowed_keys is not None else None
        )
        self.validation = AddressValidator(rng(32))
        self.registry = Registry(
            registration_ttl=config.registration_ttl,
            lookup_policy=config.lookup_policy,
            relay_enabled=config.relay.enabled,
            relay_rate=config.relay.rate_limit,
            max_clients=limits.max_clients,
            max_registrations=limits.max_registrations,
            requests_per_second=limits.requests_per_second,
            boot_id=int.from_bytes(rng(8), "big"),
            validator=self.validation,
            clustered=config.cluster is not None,
        )
        #: shared state with the other instances of a map cluster (``[cluster]``), else None
        self.cluster: ClusterLink | None = (
            ClusterLink(
                config.cluster,
                self.registry.boot_id,
                self._from_cluster,
                max_clients=limits.max_clients,
                on_up=self._cluster_up,
                on_down=self.registry.cluster_lost,
            )
            if config.cluster is not None
            else None
        )
        self.stats_interval = stats_interval
        #: peer key -> time of its last authenticated packet, least recent first
        self._activity: OrderedDict[bytes, float] = OrderedDict()
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._next_gc = 0.0
        self._next_stats = 0.0
        self._now = 0.0
        self._ipv6 = False
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        host, port = self.config.bind
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
        now = loop.time()
        self._next_gc = now + GC_INTERVAL
        self._next_stats = now + self.stats_interval
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

    # ------------------------------------------------------------------------ datagrams

    def datagram(self, data: bytes, addr: Any) -> None:
        assert self._loop is not None
        now = self._now = self._loop.time()
        self.counters["datagrams.in"] += 1
        self.counters["bytes.in"] += len(data)
        received = self.device.receive(data, addr, now)
        if received is None:
            # Not authenticated: whatever the device answers must not exceed what came in.
            # The common case (garbage, dropped) produces nothing and changes no timer.
            outgoing = self.device.drain_outgoing()
            if outgoing:
                self._send_device_output(outgoing, limit=len(data))
                self._device_events()
                self._rearm()
            return
        else:
            peer = received.peer
            activity = self._activity
            activity[peer] = now
            activity.move_to_end(peer)
            source = normalize(received.source)
            self.validation.received(peer, source, len(data))
            # a key confirmation in this very packet validates the handshake's address first
            self._device_events()
            plaintext = received.plaintext
            if plaintext and is_map_frame(plaintext):
                self.registry.handle(peer, plaintext, source, now)
            elif plaintext:
                self.counters["plaintext.unexpected"] += 1
            else:
                self.registry.heard(peer, source, now)
            self._flush(now)
        self._rearm()

    def _send(self, data: bytes, destination: tuple[str, int]) -> None:
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

    def _flush_device(self) -> None:
        outgoing = self.device.drain_outgoing()
        if outgoing:
            self._send_device_output(outgoing)
        self._device_events()

    def _send_device_output(self, outgoing: list[Outgoing], limit: int | None = None) -> None:
        """``limit``: answers to one unauthenticated datagram of that size (handshake responses,
        cookie replies); else what the device sends in sessions (keepalives), which are held
        to the client's validated addresses or its credit at the destination."""
        if limit is not None and sum(len(o.data) for o in outgoing) > limit:
            self.counters["amplification.blocked"] += 1
            return
        for out in outgoing:
            if out.destination is None:
                continue
            if out.peer is not None:
                destination = normalize(out.destination)
                if out.kind is MessageKind.RESPONSE:
                    self.validation.responded(out.peer, destination)
                elif limit is None and not self.validation.may_send(
                    out.peer, destination, len(out.data), challenge=True
                ):
                    continue
            self._send(out.data, out.destination)

    def _flush(self, now: float) -> None:
        self._flush_device()
        for deliver in self.registry.drain():
            sealed = self.device.seal(deliver.peer, deliver.plaintext, now)
            if sealed is None:
                self.counters["seal.no_session"] += 1
                continue
            if self.validation.may_send(
                deliver.peer, deliver.destination, len(sealed), challenge=deliver.challenge
            ):
                self._send(sealed, deliver.destination)
        self._flush_device()
        if self.cluster is not None:
            self.cluster.submit(self.registry.drain_cluster())

    # ------------------------------------------------------------------------ cluster

    def _from_cluster(self, items: Sequence[ClusterInput]) -> None:
        """Records and relays from the other instances (through Valkey)."""
        if self._loop is None:
            return
        now = self._now = self._loop.time()
        for item in items:
            if isinstance(item, RelayIn):
                self.registry.relay_from_cluster(item.sender, item.target, item.payload, now)
            else:
                self.registry.remote_update(item, now)
        self._flush(now)
        self._rearm()

    def _cluster_up(self) -> None:
        """Valkey is (back) up: what we hold may be missing there; announce it again."""
        if self._loop is None:
            return
        now = self._now = self._loop.time()
        self.registry.cluster_back(now)
        self._flush(now)
        self._rearm()

    def _device_events(self) -> None:
        for event in self.device.drain_events():
            if isinstance(event, UnknownPeerAccepted):
                self._activity[event.peer] = self._now
                self._activity.move_to_end(event.peer)
                self.counters["sessions.accepted"] += 1
                log_event(
                    log,
                    "map.session_accepted",
                    logging.DEBUG,
                    client=short(event.peer),
                    source=event.source,
                )
            elif isinstance(event, HandshakeComplete):
                self.counters["handshakes.completed"] += 1
                if not event.initiator:
                    self.validation.handshake_confirmed(event.peer)
            elif isinstance(event, KeysZeroed):
                self._drop_peer(event.peer, self._now, reason="keys_zeroed")

    # ------------------------------------------------------------------------ admission

    def _accept_peer(self, key: bytes) -> bool:
        """The device's policy for an initiator it does not know (after mac1, DH and the
        timestamp check: the initiator holds the private key of ``key``)."""
        if self.allowed_keys is not None and key not in self.allowed_keys:
            self.counters["sessions.refused_key"] += 1
            log_event(log, "map.session_refused", logging.DEBUG, client=short(key), reason="key")
            return False
        if len(self.device.peers) >= self.config.limits.max_clients and not self._evict_one():
            self.counters["sessions.refused_full"] += 1
            log_event(log, "map.session_refused", logging.DEBUG, client=short(key), reason="full")
            return False
        return True

    def _evict_one(self) -> bool:
        for candidate in list(self._activity)[:EVICTION_SCAN]:
            if not self.registry.has_registrations(candidate):
                self._drop_peer(candidate, self._now, reason="evicted")
                self.counters["sessions.evicted"] += 1
                return True
        return False

    def _drop_peer(self, key: bytes, now: float, *, reason: str) -> None:
        self._activity.pop(key, None)
        self.registry.forget(key, now)
        self.validation.forget(key)
        self.device.remove_peer(key)
        log_event(log, "map.session_dropped", logging.DEBUG, client=short(key), reason=reason)

    # ------------------------------------------------------------------------ timers

    def _rearm(self) -> None:
        loop = self._loop
        if loop is None or self._transport is None:
            return
        candidates = [self._next_gc, self._next_stats]
        for deadline in (self.device.next_deadline(), self.registry.next_deadline()):
            if deadline is not None:
                candidates.append(deadline)
        when = max(min(candidates), loop.time())
        if self._timer is not None and self._timer_at == when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        assert self._loop is not None
        self._timer = None
        self._timer_at = None
        now = self._now = self._loop.time()
        self.device.tick(now)
        self.registry.tick(now)
        if now >= self._next_gc:
            self._next_gc = now + GC_INTERVAL
            self._gc(now)
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval
            self.log_stats()
        self._flush(now)
        self._rearm()

    def _gc(self, now: float) -> None:
        self.registry.gc(now)
        # idle sessions without registrations: least recently active first
        for key, last in list(self._activity.items()):
            if now - last < IDLE_PEER_TIMEOUT:
                break
            if not self.registry.has_registrations(key):
                self._drop_peer(key, now, reason="idle")
        # peers the device knows but that never sent an authenticated packet
        if len(self.device.peers) > len(self._activity):
            for peer in self.device.peers:
                if peer.public_key not in self._activity:
                    self._activity[peer.public_key] = now
                    self._activity.move_to_end(peer.public_key, last=False)

    # ------------------------------------------------------------------------ observability

    def stats(self) -> dict[str, int]:
        now = self._loop.time() if self._loop is not None else 0.0
        out: dict[str, int] = dict(self.counters)
        out.update({f"registry.{k}": v for k, v in self.registry.summary(now).items()})
        out.update(self.validation.counters)
        out["validation.addresses"] = len(self.validation)
        out["sessions"] = len(self.device.peers)
        out["under_load"] = int(self.device.under_load(now))
        out.update({f"wireguard.{k}": v for k, v in self.device.counters.items()})
        out.update({f"wireguard.rejected.{k}": v for k, v in self.device.rejected.items()})
        if self.cluster is not None:
            out.update(self.cluster.stats())
        return out

    def log_stats(self) -> None:
        stats = self.stats()
        log_event(log, "map.stats", **{k.replace(".", "_"): v for k, v in sorted(stats.items())})
