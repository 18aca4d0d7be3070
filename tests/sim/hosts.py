"""Hosts for :mod:`tests.sim.simnet`: the map (a :class:`~warp_map_server.core.MapCore` on a
public address) and a map client host (the sans-I/O
:class:`~warp.map_client.client.MapClient` with its own WireGuard
:class:`~warp.wireguard.Device`, wired as :mod:`warp.map_client.driver` wires them, plus a
hole-punch probe towards the far gate's endpoints), for testing NATs and the map on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.sim.simnet import Address
from warp.config import MapServerConfig, validate_map_config
from warp.keys import encode_key
from warp.map_client.client import (
    MapClient,
    MapEvent,
    PeerEndpointsChanged,
    RehandshakeNeeded,
    RelayReceived,
)
from warp.wireguard import Device, HandshakeComplete, MessageKind
from warp.wireguard.constants import REJECT_AFTER_TIME
from warp_map_server.core import MapCore, MapCoreEvent

#: the uplink name of a host with a single public address
PUBLIC = "public"
#: the map's socket on its secondary port (the NAT mapping check)
SECONDARY = "secondary"
PUNCH = b"\xf0PUNCH"
ECHO = b"\xf0ECHO"
MAX_HELD_FRAMES = 64


def map_config(private_key: bytes, address: Address, **settings: Any) -> MapServerConfig:
    """A warp-map configuration as an operator writes it (``settings``: top-level tables)."""
    data = {"bind": f"{address[0]}:{address[1]}", "private_key": encode_key(private_key)}
    return validate_map_config({**data, **settings}, "<sim>")


class MapHost:
    """warp-map on one public address: its core, as the asyncio shell drives it."""

    def __init__(self, config: MapServerConfig, *, rng: Callable[[int], bytes], now: float) -> None:
        self.config = config
        self._rng = rng
        self.core = MapCore(config, now=now, rng=rng)
        self.events: list[tuple[float, MapCoreEvent]] = []
        self.restarts = 0

    def restart(self, now: float) -> None:
        """The process restarts: every session, registration and validation is gone."""
        self.core = MapCore(self.config, now=now, rng=self._rng)
        self.restarts += 1

    # Host
    def datagram_received(self, uplink: str, source: Address, data: bytes, now: float) -> None:
        self.core.datagram_received(source, data, now, secondary=uplink == SECONDARY)

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def datagrams_to_send(self) -> list[tuple[str, Address, bytes]]:
        out = [(PUBLIC, destination, data) for destination, data in self.core.datagrams_to_send()]
        secondary = self.core.secondary_datagrams_to_send()
        return out + [(SECONDARY, destination, data) for destination, data in secondary]

    def observe(self, now: float) -> None:
        self.events += [(now, event) for event in self.core.events()]


class MapClientHost:
    """A gateway's map client alone: registers each uplink, looks its far gate up, relays
    through the map; and, to see which NAT pairs let a direct path through, sends a probe from
    every uplink to every endpoint the map gave for the far gate (and to every address a
    probe came from) every ``punch_interval``, and echoes probes back to where they came from."""

    def __init__(
        self,
        name: str,
        private_key: bytes,
        map_key: bytes,
        map_address: Address,
        far_gate: bytes,
        *,
        rng: Callable[[int], bytes],
        uplinks: list[str],
        now: float,
        refresh_interval: float = 10.0,
        punch_interval: float = 0.2,
    ) -> None:
        self.name = name
        self.map_key = map_key
        self.map_address = map_address
        self.device = Device(private_key, rng=rng)
        self.device.add_peer(map_key, endpoint=map_address)
        self.client: MapClient[str] = MapClient(
            far_gate, refresh_interval=refresh_interval, rng=rng
        )
        self.punch_interval = punch_interval
        self.events: list[tuple[float, MapEvent[str]]] = []
        self.relayed: list[tuple[float, bytes, bytes]] = []  # (time, sender, payload)
        #: (uplink, remote) -> when the remote echoed our probe (a working direct path)
        self.direct: dict[tuple[str, Address], float] = {}
        self._outbox: list[tuple[str, Address, bytes]] = []
        self._held: list[tuple[str, bytes]] = []
        self._awaiting_handshake = False
        self._primary = uplinks[0]
        self._uplinks = list(uplinks)
        self._next_punch: float | None = None
        self._learned: set[tuple[str, Address]] = set()
        for uplink in uplinks:
            self.client.add_uplink(uplink, now)
        self._process(now)

    def relay(self, payload: bytes, now: float) -> bool:
        ok = self.client.relay(payload, now)
        self._process(now)
        return ok

    # Host
    def datagram_received(self, uplink: str, source: Address, data: bytes, now: float) -> None:
        if data.startswith(PUNCH):
            self._outbox.append((uplink, source, ECHO + self.name.encode()))
            self._learned.add((uplink, source))  # a port the map could not know (symmetric)
            return
        if data.startswith(ECHO):
            self.direct.setdefault((uplink, source), now)
            return
        received = self.device.receive(data, source, now)
        if received is not None and received.peer == self.map_key:
            self._primary = uplink
            if received.plaintext:
                self.client.receive(received.plaintext, uplink, now)
        self._process(now)

    def handle_timer(self, now: float) -> None:
        self.device.tick(now)
        self.client.tick(now)
        if self._next_punch is not None and self._next_punch <= now:
            self._next_punch = now + self.punch_interval
            probe = PUNCH + self.name.encode()
            for uplink in self._uplinks:
                for endpoint in self.client.peer_endpoints:
                    self._outbox.append((uplink, endpoint, probe))
            for uplink, source in self._learned:
                self._outbox.append((uplink, source, probe))
        self._process(now)

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (self.client.next_deadline(), self.device.next_deadline(), self._next_punch)
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def datagrams_to_send(self) -> list[tuple[str, Address, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    # internals, as warp.map_client.driver
    def _process(self, now: float) -> None:
        for event in self.client.drain_events():
            self.events.append((now, event))
            if isinstance(event, RehandshakeNeeded):
                self._awaiting_handshake = True
                self.device.initiate_handshake(self.map_key, now, force=True)
            elif isinstance(event, RelayReceived):
                self.relayed.append((now, event.sender, event.payload))
            elif isinstance(event, PeerEndpointsChanged) and self._next_punch is None:
                self._next_punch = now
        for send in self.client.drain_outgoing():
            self._send_map_frame(send.uplink, send.frame, now)
        self._flush_device(now)

    def _has_session(self, now: float) -> bool:
        peer = self.device.peer(self.map_key)
        if peer is None or self._awaiting_handshake:
            return False
        current = peer.current
        return (
            current is not None
            and current.send is not None
            and now - current.created < REJECT_AFTER_TIME
        )

    def _send_map_frame(self, uplink: str, frame: bytes, now: float) -> None:
        if not self._has_session(now):
            if len(self._held) >= MAX_HELD_FRAMES:
                self._held.pop(0)
            self._held.append((uplink, frame))
            peer = self.device.peer(self.map_key)
            if peer is not None and peer.retransmit_at is None:
                self.device.initiate_handshake(self.map_key, now)
            return
        sealed = self.device.seal(self.map_key, frame, now)
        if sealed is not None:
            self._outbox.append((uplink, self.map_address, sealed))

    def _flush_device(self, now: float) -> None:
        while self.device.has_events or self.device.has_outgoing:
            for event in self.device.drain_events():
                if isinstance(event, HandshakeComplete) and event.peer == self.map_key:
                    self._awaiting_handshake = False
                    held, self._held = self._held, []
                    for uplink, frame in held:
                        self._send_map_frame(uplink, frame, now)
            for out in self.device.drain_outgoing():
                if out.kind is MessageKind.INITIATION:
                    for uplink in self._uplinks:
                        self._outbox.append((uplink, self.map_address, out.data))
                else:
                    self._outbox.append((self._primary, self.map_address, out.data))
