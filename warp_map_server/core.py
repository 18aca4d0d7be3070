"""warp-map's decisions, sans-I/O: one WireGuard :class:`~warp.wireguard.Device`, one
:class:`~warp_map_server.registry.Registry`, one
:class:`~warp_map_server.validation.AddressValidator`, the session table and its bounds.

:class:`MapCore` owns no socket, no timer and no clock. Its shell (the asyncio
:class:`~warp_map_server.server.MapServer`, or an in-memory simulation) feeds it:

* ``datagram_received(source, data, now)``: every datagram from the map's socket;
* ``handle_timer(now)``: at (or after) ``next_deadline()``;
* ``cluster_received(items, now)`` / ``cluster_up(now)`` / ``cluster_down()``: what the link to
  the other instances of a map cluster brings (the link itself stays in the shell);

and drains, after each input:

* ``datagrams_to_send()``: ``(destination, bytes)`` pairs, in order;
* ``cluster_outputs()``: announces and forwards for the other instances (empty unclustered);
* ``events()``: :data:`MapCoreEvent` items (sessions accepted, refused, dropped; stats due),
  which the shell logs under their stable names.

Every datagram goes to the device first. Handshake messages are answered by the device itself
(responses are 92 bytes for a 148-byte initiation, cookie replies 64 bytes: an unauthenticated
sender never gets more bytes back than it sent, which :meth:`MapCore.datagram_received` also
enforces); under load the device requires cookies (``limits.handshake_load_threshold``
handshake messages per second) and rate-limits handshakes per source IP. Only authenticated
transport plaintexts reach the registry. Replies are sealed for the client and sent to the
*source* of the request (the uplink that asked); pushes go to each registered endpoint of the
client pushed to.

Every send for a client passes its :class:`~warp_map_server.validation.AddressValidator`: an
address that has not proven it receives (handshake response confirmed, or challenge echoed) gets
nothing but its challenge (within what came from it): no answers, pushes or relayed payloads.

Peers (sessions) are bounded by ``limits.max_clients``: when the table is full, a new client
evicts the least recently active peer that holds no registration, or is refused.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from warp.config import MapServerConfig
from warp.map_client.messages import is_map_frame
from warp.wireguard import (
    Address,
    Device,
    HandshakeComplete,
    KeysZeroed,
    MessageKind,
    Outgoing,
    UnknownPeerAccepted,
)
from warp.wireguard.constants import REJECT_AFTER_TIME
from warp_map_server.cluster import ClusterInput, RelayIn
from warp_map_server.registry import ClusterOutput, Registry, normalize
from warp_map_server.validation import AddressValidator

GC_INTERVAL = 1.0
STATS_INTERVAL = 60.0
#: A peer with no registration and no authenticated packet for this long is dropped.
IDLE_PEER_TIMEOUT = REJECT_AFTER_TIME
EVICTION_SCAN = 64


# ------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class SessionAccepted:
    """``map.session_accepted``: a client unknown to the device completed its initiation."""

    client: bytes
    source: Address


@dataclass(frozen=True, slots=True)
class SessionRefused:
    """``map.session_refused``: a client's initiation was refused (key not allowed, or the
    session table full of clients that hold registrations)."""

    client: bytes
    reason: Literal["key", "full"]


@dataclass(frozen=True, slots=True)
class SessionDropped:
    """``map.session_dropped``: a session and everything it registered and proved is gone."""

    client: bytes
    reason: Literal["keys_zeroed", "evicted", "idle"]


@dataclass(frozen=True, slots=True)
class StatsDue:
    """``map.stats``: the periodic statistics are due (the shell logs :meth:`MapCore.stats`)."""


MapCoreEvent: TypeAlias = SessionAccepted | SessionRefused | SessionDropped | StatsDue


# ------------------------------------------------------------------------------------ core


class MapCore:
    """The rendezvous server's state machine; see the module docstring.

    ``now``: the time the map starts (its first GC and stats deadlines count from it).
    ``rng``: source of random bytes (device, challenge secret, boot id)."""

    def __init__(
        self,
        config: MapServerConfig,
        *,
        now: float,
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
        self.stats_interval = stats_interval
        #: peer key -> time of its last authenticated packet, least recent first
        self._activity: OrderedDict[bytes, float] = OrderedDict()
        self._outgoing: list[tuple[Address, bytes]] = []
        self._cluster_out: list[ClusterOutput] = []
        self._events: list[MapCoreEvent] = []
        self._next_gc = now + GC_INTERVAL
        self._next_stats = now + stats_interval
        self._now = now

    @property
    def boot_id(self) -> int:
        return self.registry.boot_id

    # ------------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        """``(destination, datagram)`` pairs to send from the map's socket, in order."""
        out, self._outgoing = self._outgoing, []
        return out

    def cluster_outputs(self) -> list[ClusterOutput]:
        """What to store in / publish to the cluster (empty unless clustered)."""
        out, self._cluster_out = self._cluster_out, []
        return out

    def events(self) -> list[MapCoreEvent]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float:
        """When :meth:`handle_timer` is due (never None: GC and stats run periodically)."""
        deadline = min(self._next_gc, self._next_stats)
        for candidate in (self.device.next_deadline(), self.registry.next_deadline()):
            if candidate is not None and candidate < deadline:
                deadline = candidate
        return deadline

    # ------------------------------------------------------------------------ inputs

    def datagram_received(self, source: Address, data: bytes, now: float) -> None:
        """A datagram from ``source`` (as the socket gave it) reached the map's socket."""
        self._now = now
        self.counters["datagrams.in"] += 1
        self.counters["bytes.in"] += len(data)
        received = self.device.receive(data, source, now)
        if received is None:
            # Not authenticated: whatever the device answers must not exceed what came in.
            # The common case (garbage, dropped) produces nothing.
            if self.device.has_outgoing:
                self._send_device_output(self.device.drain_outgoing(), limit=len(data))
                self._device_events()
            return
        peer = received.peer
        activity = self._activity
        activity[peer] = now
        activity.move_to_end(peer)
        normalized = normalize(received.source)
        self.validation.received(peer, normalized, len(data))
        # a key confirmation in this very packet validates the handshake's address first
        self._device_events()
        plaintext = received.plaintext
        if plaintext and is_map_frame(plaintext):
            self.registry.handle(peer, plaintext, normalized, now)
        elif plaintext:
            self.counters["plaintext.unexpected"] += 1
        else:
            self.registry.heard(peer, normalized, now)
        self.flush(now)

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now``: WireGuard timers, expiries, GC, stats."""
        self._now = now
        self.device.tick(now)
        self.registry.tick(now)
        if now >= self._next_gc:
            self._next_gc = now + GC_INTERVAL
            self._gc(now)
        if now >= self._next_stats:
            self._next_stats = now + self.stats_interval
            self._events.append(StatsDue())
        self.flush(now)

    def cluster_received(self, items: Sequence[ClusterInput], now: float) -> None:
        """Records and relays from the other instances (through the cluster store)."""
        self._now = now
        for item in items:
            if isinstance(item, RelayIn):
                self.registry.relay_from_cluster(
                    item.sender, item.target, item.payload, now, item.source, item.endpoint
                )
            else:
                self.registry.remote_update(item, now)
        self.flush(now)

    def cluster_up(self, now: float) -> None:
        """The cluster store is (back) up: what we hold may be missing there; announce it."""
        self._now = now
        self.registry.cluster_back(now)
        self.flush(now)

    def cluster_down(self) -> None:
        """The cluster store is unreachable: serve what we hold, mirrored clients included."""
        self.registry.cluster_lost()

    def flush(self, now: float) -> None:
        """Turn what the device and the registry decided into datagrams and cluster outputs
        (every input does this itself; public for shells that drive the registry directly)."""
        self._flush_device()
        for deliver in self.registry.drain():
            sealed = self.device.seal(deliver.peer, deliver.plaintext, now)
            if sealed is None:
                self.counters["seal.no_session"] += 1
                continue
            if self.validation.may_send(
                deliver.peer, deliver.destination, len(sealed), challenge=deliver.challenge
            ):
                self._outgoing.append((deliver.destination, sealed))
        self._flush_device()
        if self.registry.clustered:
            self._cluster_out += self.registry.drain_cluster()

    # ------------------------------------------------------------------------ device

    def _flush_device(self) -> None:
        if self.device.has_outgoing:
            self._send_device_output(self.device.drain_outgoing())
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
            self._outgoing.append((out.destination, out.data))

    def _device_events(self) -> None:
        if not self.device.has_events:
            return
        for event in self.device.drain_events():
            if isinstance(event, UnknownPeerAccepted):
                self._activity[event.peer] = self._now
                self._activity.move_to_end(event.peer)
                self.counters["sessions.accepted"] += 1
                self._events.append(SessionAccepted(event.peer, event.source))
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
            self._events.append(SessionRefused(key, "key"))
            return False
        if len(self.device.peers) >= self.config.limits.max_clients and not self._evict_one():
            self.counters["sessions.refused_full"] += 1
            self._events.append(SessionRefused(key, "full"))
            return False
        return True

    def _evict_one(self) -> bool:
        for candidate in list(self._activity)[:EVICTION_SCAN]:
            if not self.registry.has_registrations(candidate):
                self._drop_peer(candidate, self._now, reason="evicted")
                self.counters["sessions.evicted"] += 1
                return True
        return False

    def _drop_peer(
        self, key: bytes, now: float, *, reason: Literal["keys_zeroed", "evicted", "idle"]
    ) -> None:
        self._activity.pop(key, None)
        self.registry.forget(key, now)
        self.validation.forget(key)
        self.device.remove_peer(key)
        self._events.append(SessionDropped(key, reason))

    # ------------------------------------------------------------------------ timers

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

    def stats(self, now: float) -> dict[str, int]:
        out: dict[str, int] = dict(self.counters)
        out.update({f"registry.{k}": v for k, v in self.registry.summary(now).items()})
        out.update(self.validation.counters)
        out["validation.addresses"] = len(self.validation)
        out["sessions"] = len(self.device.peers)
        out["under_load"] = int(self.device.under_load(now))
        out.update({f"wireguard.{k}": v for k, v in self.device.counters.items()})
        out.update({f"wireguard.rejected.{k}": v for k, v in self.device.rejected.items()})
        return out
