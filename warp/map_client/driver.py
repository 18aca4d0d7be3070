"""A small asyncio driver: one :class:`MapClient`, one WireGuard :class:`Device` and one UDP
socket per uplink. Used by the integration tests and as the reference for how a gateway wires
the map client (``warp/node.py`` does the same inside its own loop).

How the pieces meet:

* the client's :class:`~warp.map_client.client.MapSend` (frame, uplink) is sealed with
  ``device.seal(map_key, frame, now)`` and sent **from that uplink's socket** to the map, so the
  map sees that uplink's reflexive address. Without a usable session (start, or after
  :class:`~warp.map_client.client.RehandshakeNeeded`) frames are held here, a handshake is
  started, and they go out, each from its own uplink, when the handshake completes (the device's
  own staging would lose which uplink a frame belongs to);
* handshake initiations to the map go out on every uplink (the first answer wins); other device
  output for the map goes out on the uplink that last heard from it;
* every datagram on an uplink socket goes to ``device.receive``; plaintexts from the map go to
  ``client.receive(plaintext, uplink, now)``, others to ``on_plaintext`` (e.g. the far gate's);
  device output for other peers goes to ``on_outgoing`` first (return True: handled, e.g.
  relayed through the map), else out of the uplink that last heard from the map;
* client events are handled before the client's sends, so a re-handshake request holds the
  retries that follow it until the new session is up;
* one timer, re-armed only when ``min(client.next_deadline(), device.next_deadline())`` changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from warp.map_client.client import (
    MapClient,
    MapEvent,
    PeerEndpointsChanged,
    RehandshakeNeeded,
    Stopped,
    UplinkRegistered,
)
from warp.map_client.messages import Endpoint
from warp.wireguard import Device, HandshakeComplete, MessageKind, Outgoing, Received
from warp.wireguard.constants import REJECT_AFTER_TIME

log = logging.getLogger("warp.map_client")

MAX_HELD_FRAMES = 64


class _UplinkProtocol(asyncio.DatagramProtocol):
    def __init__(self, driver: MapClientDriver, name: str) -> None:
        self.driver = driver
        self.name = name

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.driver._datagram(self.name, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.driver.send_errors += 1


class MapClientDriver:
    """Run a map client over real sockets. ``device`` may be shared with a gateway's own peers;
    by default the driver makes one from ``private_key``."""

    def __init__(
        self,
        private_key: bytes,
        map_public_key: bytes,
        map_address: Endpoint,
        far_gate: bytes,
        *,
        refresh_interval: float = 10.0,
        response_timeout: float = 1.0,
        device: Device | None = None,
        on_plaintext: Callable[[Received, str], None] | None = None,
        on_event: Callable[[MapEvent[str]], None] | None = None,
        on_outgoing: Callable[[Outgoing], bool] | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.device = device if device is not None else Device(private_key, rng=rng)
        self.map_key = map_public_key
        self.map_address = map_address
        self.device.add_peer(map_public_key, endpoint=map_address)
        self.client: MapClient[str] = MapClient(
            far_gate,
            refresh_interval=refresh_interval,
            response_timeout=response_timeout,
            rng=rng,
        )
        self.on_plaintext = on_plaintext
        self.on_event = on_event
        self.on_outgoing = on_outgoing
        self.events: list[tuple[float, MapEvent[str]]] = []
        self.send_errors = 0
        self.held_dropped = 0
        self._uplinks: dict[str, asyncio.DatagramTransport] = {}
        self._primary: str | None = None
        self._held: list[tuple[str, bytes]] = []
        self._awaiting_handshake = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._changed: asyncio.Event | None = None

    # ------------------------------------------------------------------------ API

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
        return self._loop

    def now(self) -> float:
        return self.loop.time()

    @property
    def uplinks(self) -> dict[str, Endpoint]:
        """Uplink name -> local socket address."""
        out: dict[str, Endpoint] = {}
        for name, transport in self._uplinks.items():
            host, port = transport.get_extra_info("sockname")[:2]
            out[name] = (str(host), int(port))
        return out

    async def add_uplink(self, name: str, local_addr: Endpoint = ("0.0.0.0", 0)) -> Endpoint:
        """Open a socket for ``name`` and register it with the map."""
        if name in self._uplinks:
            raise ValueError(f"uplink {name!r} exists")
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _UplinkProtocol(self, name), local_addr=local_addr
        )
        self._uplinks[name] = transport
        if self._primary is None:
            self._primary = name
        self.client.add_uplink(name, self.now())
        self._process()
        return self.uplinks[name]

    def remove_uplink(self, name: str) -> None:
        transport = self._uplinks.pop(name, None)
        if transport is None:
            return
        transport.close()
        if self._primary == name:
            self._primary = next(iter(self._uplinks), None)
        self._held = [(u, f) for u, f in self._held if u != name]
        self.client.remove_uplink(name, self.now())
        self._process()

    def uplink_changed(self, name: str) -> None:
        self.client.uplink_changed(name, self.now())
        self._process()

    def refresh(self) -> None:
        self.client.refresh(self.now())
        self._process()

    def relay(self, payload: bytes, uplink: str | None = None) -> bool:
        ok = self.client.relay(payload, self.now(), uplink)
        self._process()
        return ok

    async def stop(self, timeout: float = 1.0) -> bool:
        """Deregister (waiting up to ``timeout`` for the map's ack), then close every socket."""
        acknowledged = False
        if self._uplinks:
            self.client.stop(self.now())
            self._process()
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda: self.client.stopped, timeout)
            acknowledged = any(isinstance(e, Stopped) and e.acknowledged for _, e in self.events)
        self.close()
        return acknowledged

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for transport in self._uplinks.values():
            transport.close()
        self._uplinks.clear()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds (checked after every input); TimeoutError if not."""
        deadline = self.now() + timeout
        while not predicate():
            remaining = deadline - self.now()
            if remaining <= 0:
                raise TimeoutError
            changed = self._changed
            assert changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    # convenience views for tests and status
    def reflexive_addresses(self) -> dict[str, Endpoint]:
        return self.client.reflexive_addresses(self.now())

    def registered(self) -> bool:
        return self.client.all_registered(self.now())

    def first_event(self, kind: type, since: float = float("-inf")) -> tuple[float, Any] | None:
        for at, event in self.events:
            if at >= since and isinstance(event, kind):
                return at, event
        return None

    # ------------------------------------------------------------------------ internals

    def _datagram(self, name: str, data: bytes, addr: Any) -> None:
        now = self.now()
        received = self.device.receive(data, addr, now)
        if received is not None:
            if received.peer == self.map_key:
                self._primary = name
                if received.plaintext:
                    self.client.receive(received.plaintext, name, now)
            elif self.on_plaintext is not None:
                self.on_plaintext(received, name)
        self._process()

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

    def _process(self) -> None:
        now = self.now()
        for event in self.client.drain_events():
            self.events.append((now, event))
            self._log_event(event)
            if isinstance(event, RehandshakeNeeded):
                self._awaiting_handshake = True
                self.device.initiate_handshake(self.map_key, now, force=True)
            if self.on_event is not None:
                self.on_event(event)
        for send in self.client.drain_outgoing():
            self._send_map_frame(send.uplink, send.frame, now)
        self._flush_device(now)
        self._rearm()
        changed = self._changed
        if changed is not None:
            changed.set()
            self._changed = asyncio.Event()

    def _send_map_frame(self, uplink: str, frame: bytes, now: float) -> None:
        if uplink not in self._uplinks:
            return
        if not self._has_session(now):
            if len(self._held) >= MAX_HELD_FRAMES:
                self._held.pop(0)
                self.held_dropped += 1
            self._held.append((uplink, frame))
            peer = self.device.peer(self.map_key)
            if peer is not None and peer.retransmit_at is None:
                self.device.initiate_handshake(self.map_key, now)
            return
        sealed = self.device.seal(self.map_key, frame, now)
        if sealed is not None:
            self._sendto(uplink, sealed, self.map_address)

    def _flush_device(self, now: float) -> None:
        for _ in range(4):
            events = self.device.drain_events()
            for event in events:
                if isinstance(event, HandshakeComplete) and event.peer == self.map_key:
                    self._awaiting_handshake = False
                    held, self._held = self._held, []
                    for uplink, frame in held:
                        self._send_map_frame(uplink, frame, now)
            outgoing = self.device.drain_outgoing()
            for out in outgoing:
                hook = self.on_outgoing
                if hook is not None and out.peer != self.map_key and hook(out):
                    continue
                if out.peer == self.map_key:
                    if out.kind is MessageKind.INITIATION:
                        for name in list(self._uplinks):
                            self._sendto(name, out.data, self.map_address)
                    elif self._primary is not None:
                        self._sendto(self._primary, out.data, self.map_address)
                elif out.destination is not None and self._primary is not None:
                    self._sendto(self._primary, out.data, out.destination)
            if not events and not outgoing:
                return

    def _sendto(self, uplink: str, data: bytes, destination: Endpoint) -> None:
        transport = self._uplinks.get(uplink)
        if transport is None:
            return
        try:
            transport.sendto(data, destination)
        except OSError:
            self.send_errors += 1

    def _rearm(self) -> None:
        deadlines = [
            d for d in (self.client.next_deadline(), self.device.next_deadline()) if d is not None
        ]
        if not deadlines or not self._uplinks:
            return
        when = max(min(deadlines), self.now())
        if self._timer is not None and self._timer_at == when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.now()
        self.device.tick(now)
        self.client.tick(now)
        self._process()

    def _log_event(self, event: MapEvent[str]) -> None:
        if isinstance(event, UplinkRegistered) and event.changed:
            log.info(
                "map.registered uplink=%s reflexive=%s:%d",
                event.uplink,
                event.reflexive[0],
                event.reflexive[1],
            )
        elif isinstance(event, PeerEndpointsChanged):
            log.info("map.peer_endpoints count=%d pushed=%s", len(event.endpoints), event.pushed)
        elif isinstance(event, RehandshakeNeeded):
            log.info("map.rehandshake unanswered=%d", event.unanswered)
