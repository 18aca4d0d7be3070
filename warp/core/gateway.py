"""`GatewayCore`: a whole gateway's decisions, sans-I/O (see `warp.core`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass

from warp.config import FarGateConfig, GatewayConfig, TunGate
from warp.core import session as far_gate_session
from warp.core.reload import ReloadPlan, plan_reload
from warp.core.session import (
    FarGateSession,
    Tunnel,
    host_port,
    ip_destination,
    ip_source,
    relay_path_uplink,
    relayed_over,
)
from warp.map_client.client import (
    LookupRefused,
    MapClient,
    MapErrorReceived,
    MapSwitched,
    PeerEndpointsChanged,
    RehandshakeNeeded,
    RelayReceived,
    Stopped,
    UplinkExpired,
    UplinkRegistered,
)
from warp.paths.path import Address
from warp.unanswered import Unanswered
from warp.wireguard import (
    Device,
    HandshakeComplete,
    HandshakeFailed,
    KeysZeroed,
    MessageKind,
    Outgoing,
    PeerRoamed,
    SessionExpired,
)
from warp.wireguard.allowed_ips import AllowedIPs

log = logging.getLogger("warp.core")

#: Map frames held until the map session is up (then sent from their own uplink).
MAP_PENDING_LIMIT = 64
#: First retry of an unanswered map request (doubling). A new uplink's first registration is
#: often lost (its address appears before its route), and the peer can only reach the new
#: uplink after the map pushed its reflexive address: this bounds time-to-use of an uplink.
MAP_RESPONSE_TIMEOUT = 0.3
#: Datagrams (to send, for gates) held for the shell at most: the shell drains after every
#: input, so this bounds only a shell that stopped draining.
OUTBOX_LIMIT = 1 << 16


@dataclass(frozen=True, slots=True)
class GatePaused:
    """Stop reading this tunnel's gate (its far gate's uplinks are saturated)."""

    tunnel: str


@dataclass(frozen=True, slots=True)
class GateResumed:
    """Read this tunnel's gate again."""

    tunnel: str


CoreEvent = GatePaused | GateResumed


class GatewayCore:
    """All a gateway decides, for every far gate, with no socket and no clock.

    ``rng`` drives every random choice (probe ids, collision back-off, map request ids);
    ``now`` is the time at creation (the shell's clock). ``embedded``: every tunnel's gate is
    an in-process queue whose sender waits while paused (`warp.embed`), so every tunnel gets
    back-pressure whatever its configured gate. See `warp.core` for the interface.
    """

    def __init__(
        self, config: GatewayConfig, *, rng: random.Random, now: float, embedded: bool = False
    ) -> None:
        self.config = config
        self.rng = rng
        self.now = now
        self.public_key = config.public_key
        # Embedded (`warp.open`): every tunnel waits under back-pressure; else by gate type.
        self._back_pressure: bool | None = True if embedded else None
        # Multi-path: a far gate's "endpoint" flips with every packet from another path, so
        # the WireGuard core's roaming events would be noise; paths are the prober's business.
        self.device = Device(config.private_key, roaming_events=False)
        #: uplink name -> writable (its socket's send buffer has room)
        self.uplinks: dict[str, bool] = {}
        self.stopping = False
        self.counters: dict[str, int] = {
            "no_session": 0,
            "no_path": 0,
            "unknown_tunnel": 0,
            "unknown_frame": 0,
            "send_failed": 0,
            "no_route": 0,
            # queued datagrams of a tunnel a reload removed (dropped at send time)
            "tunnel_removed": 0,
        }
        self._to_send: list[tuple[str, Address, bytes]] = []
        self._deliveries: list[tuple[str, bytes]] = []
        self._events: list[CoreEvent] = []
        # Far gates, and each tunnel's sessions: a tun gate shared by several far gates
        # (tunnel far_gate None) routes each packet by destination over `_routes`.
        self.sessions: dict[str, FarGateSession] = {}
        self._by_key: dict[bytes, FarGateSession] = {}
        self._tunnel_sessions: dict[str, list[tuple[FarGateSession, Tunnel]]] = {}
        self._routes = AllowedIPs()
        for far_name, far_config in config.far_gates.items():
            self._add_far_gate(far_name, far_config)
        self._index_tunnels()
        self.map_key = config.warp_map.public_key if config.warp_map.address else None
        self.map_address: Address | None = None
        #: every map instance (``warp_map.address`` list, each name's addresses), in order
        self.map_addresses: list[Address] = []
        self.map_client: MapClient[str] | None = None
        if self.map_key is not None:
            self.device.add_peer(self.map_key)
            self.map_client = MapClient(
                [s.key for s in self.sessions.values()],
                refresh_interval=config.interfaces.interface_scan_interval,
                response_timeout=MAP_RESPONSE_TIMEOUT,
                rng=lambda n: rng.randbytes(n),
            )
        self._map_pending: list[tuple[str, bytes]] = []
        self._map_rehandshake = False
        self.map_registered_at: float | None = None
        self.map_reflexive: dict[str, str | None] = {}
        self._map_unanswered = Unanswered(
            far_gate_session.UNANSWERED_TRIES, far_gate_session.UNANSWERED_AFTER
        )

    def _add_far_gate(self, far_name: str, far_config: FarGateConfig) -> FarGateSession:
        """A far gate's session, WireGuard peer and routes (at start and on reload)."""
        tunnels = [
            Tunnel.make(name, far_name, tunnel_config, back_pressure=self._back_pressure)
            for name, tunnel_config in self.config.tunnels_of(far_name).items()
        ]
        session = FarGateSession(self, far_name, far_config, tunnels)
        self.sessions[far_name] = session
        self._by_key[session.key] = session
        plain_ips: list[str] = []
        if session.plain_wireguard:
            plain_ips = [str(net) for net in far_config.allowed_ips]
            if not plain_ips:
                for tunnel in tunnels:
                    if isinstance(tunnel.config.gate, TunGate):
                        plain_ips += [str(net) for net in tunnel.config.gate.allowed_ips]
        else:
            for network in far_config.allowed_ips:
                self._routes.insert(str(network), session.key)
        self.device.add_peer(
            session.key, preshared_key=far_config.preshared_key, allowed_ips=plain_ips
        )
        for cidr in plain_ips:
            self._routes.insert(cidr, session.key)
        return session

    def _index_tunnels(self) -> None:
        """Each tunnel's (session, runtime) pairs, in far gate order."""
        self._tunnel_sessions = {}
        for session in self.sessions.values():
            for tunnel in session.tunnels.values():
                self._tunnel_sessions.setdefault(tunnel.name, []).append((session, tunnel))

    # ------------------------------------------------------------------ live reload

    def reconfigure(
        self,
        config: GatewayConfig,
        now: float,
        *,
        static_endpoints: Mapping[str, list[Address]] | None = None,
        control_socket_changed: bool = False,
    ) -> ReloadPlan:
        """Apply a new config live (SIGHUP, ``warp reload``); `ReloadRefused` (nothing
        changed) if it needs a restart. Far gates and tunnels the new config leaves as they
        were keep their sessions, paths, queues and FEC state. ``static_endpoints``: the
        resolved ``endpoints`` of the far gates the plan adds (the shell resolves them)."""
        plan = plan_reload(self.config, config, control_socket_changed=control_socket_changed)
        self.now = now
        resumed: set[str] = set()
        for name in plan.far_gates_removed:
            session = self.sessions.pop(name)
            self._by_key.pop(session.key, None)
            self.device.remove_peer(session.key)
            self._routes.remove_peer(session.key)
            resumed.update(session.paused)
            log.info("far_gate.removed far_gate=%s", name)
        kept = list(self.sessions.values())
        for session in kept:
            for name in plan.tunnels_removed:
                session.remove_tunnel(name)
        self.config = config
        for name in sorted(resumed):
            if name in config.tunnels:  # paused by a far gate that is gone
                self.gate_flow(name, paused=False)
        for session in kept:
            wanted = config.tunnels_of(session.name)
            for name in plan.tunnels_added:
                if name in wanted:
                    session.add_tunnel(
                        Tunnel.make(
                            name, session.name, wanted[name], back_pressure=self._back_pressure
                        )
                    )
            for name in plan.tunnels_changed:
                if name in wanted:
                    session.update_transport(name, wanted[name])
        added = [self._add_far_gate(name, config.far_gates[name]) for name in plan.far_gates_added]
        self._index_tunnels()
        for session in self.sessions.values():
            session.set_log_fields(several=len(self.sessions) > 1)
        client = self.map_client
        if client is not None:
            client.set_far_gates([s.key for s in self.sessions.values()], now)
        for session in added:
            log.info("far_gate.added far_gate=%s", session.name)
            endpoints = (static_endpoints or {}).get(session.name)
            if endpoints:
                self.set_static_endpoints(session.name, endpoints)
            for uplink in self.uplinks:
                session.uplink_up(uplink, now)
            session.after_prober(now)
        self._after_map(now)
        return plan

    # ------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[str, Address, bytes]]:
        """``(uplink, remote, data)`` to send, in order (relayed ones are map frames already)."""
        out, self._to_send = self._to_send, []
        return out

    def gate_deliveries(self) -> list[tuple[str, bytes]]:
        """``(tunnel, datagram)`` for the tunnels' gates, in order."""
        out, self._deliveries = self._deliveries, []
        return out

    def events(self) -> list[CoreEvent]:
        """Gate flow decisions (`GatePaused`, `GateResumed`), in order."""
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next run (None: only on an input)."""
        deadline = self.device.next_deadline()
        client = self.map_client
        if client is not None:
            t = client.next_deadline()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        for session in self.sessions.values():
            t = session.next_deadline()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        return deadline

    def emit(self, uplink: str, remote: Address, data: bytes) -> bool:
        """Queue a datagram for the shell to send from an uplink; False if no such uplink."""
        if uplink not in self.uplinks or len(self._to_send) >= OUTBOX_LIMIT:
            return False
        self._to_send.append((uplink, remote, data))
        return True

    def deliver(self, tunnel: str, datagram: bytes) -> None:
        if len(self._deliveries) < OUTBOX_LIMIT:
            self._deliveries.append((tunnel, datagram))

    def source_allowed(self, far_key: bytes, packet: bytes) -> bool:
        """Whether an IP packet from that far gate carries a source address of its own
        allowed_ips (cryptokey routing on receive)."""
        return self._routes.lookup(ip_source(packet)) == far_key

    def gate_flow(self, tunnel: str, *, paused: bool) -> None:
        self._events.append(GatePaused(tunnel) if paused else GateResumed(tunnel))

    def send_failed(self, uplink: str, remote: Address, data: bytes) -> None:
        """The shell could not send a datagram (socket full or failed): counted, and taken
        back from its path's counters."""
        self.counters["send_failed"] += 1
        if data[:1] == b"\x04":
            for session in self.sessions.values():
                path = session.prober.get(uplink, remote)
                if path is not None:
                    path.tx_packets = max(0, path.tx_packets - 1)
                    path.tx_bytes = max(0, path.tx_bytes - len(data))
                    return

    # ------------------------------------------------------------------ inputs

    def set_map_addresses(self, addresses: list[Address]) -> None:
        """The map instances, resolved (the first is used until it fails)."""
        self.map_addresses = list(addresses)
        self.map_address = self.map_addresses[0] if addresses else None
        if self.map_client is not None and addresses:
            self.map_client.map_count = len(addresses)

    def set_static_endpoints(self, far_gate: str, endpoints: list[Address]) -> None:
        """A far gate's ``endpoints``, resolved."""
        session = self.sessions[far_gate]
        session.static_endpoints = list(endpoints)
        peer = self.device.peer(session.key)
        if peer is not None and endpoints:
            peer.endpoint = endpoints[0]

    def start(self, now: float) -> None:
        self.now = now
        for session in self.sessions.values():
            session.after_prober(now)
        self._after_map(now)

    def uplink_added(self, name: str, now: float) -> None:
        self.now = now
        self.uplinks[name] = True
        self._uplink_up(name, now, added=True)

    def uplink_changed(self, name: str, now: float) -> None:
        self.now = now
        self.uplinks[name] = True
        self._uplink_up(name, now, added=False)

    def _uplink_up(self, name: str, now: float, *, added: bool) -> None:
        for session in self.sessions.values():
            session.uplink_up(name, now)
        client = self.map_client
        if client is not None and any(not s.plain_wireguard for s in self.sessions.values()):
            if added:
                self.map_reflexive.setdefault(name, None)
                client.add_uplink(name, now)
            else:
                client.uplink_changed(name, now)
        for session in self.sessions.values():
            session.after_prober(now)
        self._after_map(now)

    def uplink_removed(self, name: str, now: float) -> None:
        self.now = now
        self.uplinks.pop(name, None)
        self.map_reflexive.pop(name, None)
        if self.map_client is not None and not self.stopping:
            self.map_client.remove_uplink(name, now)
        for session in self.sessions.values():
            session.uplink_removed(name, now)
        self._after_map(now)

    def uplink_writable(self, name: str, writable: bool) -> None:
        if name not in self.uplinks:
            return
        self.uplinks[name] = writable
        if writable:
            for session in self.sessions.values():
                session.uplink_writable(self.now)

    def datagram_received(self, uplink: str, source: Address, data: bytes, now: float) -> None:
        """A datagram from an uplink socket (or, for a relayed path's pseudo uplink
        ``relay:<uplink>``, relayed by the map)."""
        self.now = now
        device = self.device
        received = device.receive(data, source, now)
        if device.has_outgoing:
            self._send_device_output(uplink, source, now)
        if device.has_events:
            self._handle_device_events(uplink, now)
        if received is None:
            return
        plaintext = received.plaintext
        session = self._by_key.get(received.peer)
        if session is not None:
            session.on_received(uplink, source, plaintext, len(data), now)
        elif received.peer == self.map_key and self.map_client is not None and plaintext:
            self.map_client.receive(plaintext, uplink, now)
            self._after_map(now)

    def gate_datagram(self, tunnel: str, payload: bytes, now: float) -> bool:
        """A datagram from a tunnel's gate. False: pause that gate until `GateResumed`."""
        sessions = self._tunnel_sessions.get(tunnel)
        if not sessions or not payload:
            return True
        self.now = now
        if len(sessions) == 1:
            session, runtime = sessions[0]
        else:
            # A tun gate shared by several far gates: cryptokey routing on the destination.
            key = self._routes.lookup(ip_destination(payload))
            found = next(((s, t) for s, t in sessions if s.key == key), None)
            if found is None:
                self.counters["no_route"] += 1
                return True
            session, runtime = found
        return session.gate_datagram(runtime, payload, now)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (early calls do nothing)."""
        self.now = now
        device = self.device
        due = device.next_deadline()
        if due is not None and due <= now:
            device.tick(now)
            self.after_device(now)
        client = self.map_client
        if client is not None:
            due = client.next_deadline()
            if due is not None and due <= now:
                client.tick(now)
                self._after_map(now)
        for session in self.sessions.values():
            session.handle_timer(now)

    def rekey(self, now: float) -> None:
        """Start a new handshake with every far gate (SIGUSR1)."""
        self.now = now
        if self.stopping:
            return
        for session in self.sessions.values():
            session.rekey(now)

    def stop(self, now: float) -> None:
        """Deregister from the map (`map_stopped` tells when it confirmed or gave up)."""
        self.now = now
        if self.map_client is not None and self.uplinks:
            self.map_client.stop(now)
        self.stopping = True
        self._after_map(now)

    @property
    def map_stopped(self) -> bool:
        return self.map_client is None or not self.uplinks or self.map_client.stopped

    # ------------------------------------------------------------------ WireGuard plumbing

    def after_device(self, now: float) -> None:
        device = self.device
        if device.has_outgoing:
            self._send_device_output(None, None, now)
        if device.has_events:
            self._handle_device_events(None, now)

    def _send_device_output(self, uplink: str | None, source: Address | None, now: float) -> None:
        """Send what the WireGuard core produced. Replies (response, cookie) go back where the
        request came from; initiations to a far gate go out on each of its paths."""
        for out in self.device.drain_outgoing():
            kind = out.kind
            session = self._by_key.get(out.peer) if out.peer is not None else None
            if kind is MessageKind.INITIATION:
                if session is not None:
                    session.send_initiation(out, now)
                else:
                    self._send_map_initiation(out, now)
            elif (
                uplink is not None
                and source is not None
                and kind in (MessageKind.RESPONSE, MessageKind.COOKIE_REPLY)
            ):
                if session is not None:
                    if kind is MessageKind.RESPONSE:
                        session.on_response_sent(now)
                    session.emit(uplink, source, out.data, now)
                elif relayed_over(uplink) is not None:
                    pass  # the map never relays handshakes of its own
                else:
                    self.emit(uplink, source, out.data)
            elif session is not None:
                session.send_to_peer(out, now)
            elif out.peer == self.map_key and self.map_address is not None and self.uplinks:
                first = next(iter(self.uplinks))
                self.emit(first, self.map_address, out.data)

    def _send_map_initiation(self, out: Outgoing, now: float) -> None:
        if out.peer == self.map_key and self.map_address is not None and self.uplinks:
            targets = [(name, self.map_address) for name in self.uplinks]
        elif out.destination is not None:
            targets = [(name, out.destination) for name in self.uplinks]
        else:
            targets = []
        for name, remote in targets:
            self.emit(name, remote, out.data)
        if targets and out.peer == self.map_key:
            watch = self._map_unanswered
            watch.tried(now)
            if watch.due(now) and watch.since is not None:
                log.warning("map.unreachable handshakes=%d for_s=%.1f address=%s likely: map down, "
                            "wrong map address or wrong warp_map.public_key", watch.count,
                            now - watch.since, host_port(self.map_address))  # fmt: skip

    def _handle_device_events(self, uplink: str | None, now: float) -> None:
        for event in self.device.drain_events():
            session = self._by_key.get(event.peer)
            if isinstance(event, HandshakeComplete):
                if session is not None:
                    session.on_handshake_complete(event.initiator, event.source, uplink, now)
                elif event.peer == self.map_key:
                    if self._map_unanswered.answered():
                        log.info("map.reachable")
                    self._map_rehandshake = False
                    log.info("handshake.complete peer=map source=%s", host_port(event.source))
                    self._flush_map_pending(now)
            elif isinstance(event, HandshakeFailed):
                log.warning("handshake.failed peer=%s dropped=%d", self._peer_name(event.peer),
                            event.dropped_packets)  # fmt: skip
                if session is not None:
                    session.on_handshake_failed()
                elif event.peer == self.map_key:
                    self._map_rehandshake = False  # the next map request tries again
            elif isinstance(event, SessionExpired | KeysZeroed):
                if session is not None:
                    session.on_session_expired()
                log.info("session.expired peer=%s", self._peer_name(event.peer))
            elif isinstance(event, PeerRoamed):
                log.debug("peer.roamed peer=%s old=%s new=%s", self._peer_name(event.peer),
                          event.old, event.new)  # fmt: skip
        for session in self.sessions.values():
            session.after_prober(now)

    def _peer_name(self, key: bytes) -> str:
        session = self._by_key.get(key)
        if session is not None:
            return "far_gate" if len(self.sessions) == 1 else f"far_gate:{session.name}"
        return "map" if key == self.map_key else "other"

    # ------------------------------------------------------------------ map and relay

    def relay(
        self, far_key: bytes, data: bytes, now: float, uplink: str, endpoint: Address
    ) -> bool:
        """Hand a sealed WireGuard message for a far gate to the map's relay, sent from
        ``uplink``'s map session, for the far gate's ``endpoint`` (the map's own address:
        wherever the map delivers)."""
        client = self.map_client
        target = None if endpoint == self.map_address else endpoint
        if client is None or not client.relay(data, now, uplink, to=far_key, endpoint=target):
            return False
        for action in client.drain_outgoing():
            self._send_map_frame(action.uplink, action.frame, now)
        return True

    def _after_map(self, now: float) -> None:
        client = self.map_client
        if client is None:
            return
        # Events first: a RehandshakeNeeded must start the new handshake (and hold frames)
        # before the retries it comes with are sealed under the dead session and lost.
        for event in client.drain_events():
            if isinstance(event, UplinkRegistered):
                self.map_registered_at = now
                self.map_reflexive[event.uplink] = f"{event.reflexive[0]}:{event.reflexive[1]}"
                if event.changed:
                    log.info("map.registered uplink=%s reflexive=%s:%d", event.uplink,
                             event.reflexive[0], event.reflexive[1])  # fmt: skip
            elif isinstance(event, UplinkExpired):
                self.map_reflexive[event.uplink] = None
                log.warning("map.registration_expired uplink=%s", event.uplink)
            elif isinstance(event, PeerEndpointsChanged):
                session = self._by_key.get(event.key)
                if session is not None:
                    session.map_endpoints_changed(event.endpoints, event.pushed, now)
            elif isinstance(event, LookupRefused):
                session = self._by_key.get(event.key)
                if session is not None:
                    session.on_lookup_refused(event.code, event.message, now)
            elif isinstance(event, RehandshakeNeeded):
                if self.map_key is not None:
                    # Hold map frames (`_map_pending`) until this handshake completes.
                    self._map_rehandshake = True
                    log.info("map.rehandshake unanswered=%d", event.unanswered)
                    self.device.initiate_handshake(self.map_key, now, force=True)
                    self.after_device(now)
            elif isinstance(event, MapSwitched):
                if self.map_key is not None and self.map_addresses:
                    # Another instance of the map cluster (same key): a fresh session there;
                    # map frames wait for it (`_map_pending`). Paths to far gates stay.
                    old = self.map_address
                    self.map_address = self.map_addresses[event.index % len(self.map_addresses)]
                    log.warning("map.failover from=%s to=%s unanswered=%d", host_port(old),
                                host_port(self.map_address), event.unanswered)  # fmt: skip
                    self._map_rehandshake = True
                    self.device.initiate_handshake(self.map_key, now, force=True)
                    self.after_device(now)
            elif isinstance(event, MapErrorReceived):
                log.warning("map.error code=%s %s", event.code, event.message)
            elif isinstance(event, RelayReceived):
                self._on_relayed(event, now)
            elif isinstance(event, Stopped):
                log.info("map.deregistered acknowledged=%s", event.acknowledged)
        for session in self.sessions.values():
            session.check_lookup_refused(now)
        for action in client.drain_outgoing():
            self._send_map_frame(action.uplink, action.frame, now)

    def _on_relayed(self, event: RelayReceived[str], now: float) -> None:
        """A WireGuard message a far gate sent through the map's relay: received on the
        relayed path from the uplink it arrived on to the far gate's endpoint it came from, as
        if from an uplink (replies go back on that path)."""
        session = self._by_key.get(event.sender)
        if session is None or self.map_address is None or session.plain_wireguard:
            return
        source = event.source if event.source is not None else self.map_address
        session.on_relayed(event.uplink, source, now)
        self.datagram_received(relay_path_uplink(event.uplink), source, event.payload, now)

    def _send_map_frame(self, uplink: str, frame: bytes, now: float) -> None:
        if self.map_key is None or self.map_address is None or uplink not in self.uplinks:
            return
        peer = self.device.peer(self.map_key)
        if peer is None or not peer.has_session or self._map_rehandshake:
            # Held until the session is up, then sent from its own uplink (the map must see
            # each uplink's own reflexive address).
            if len(self._map_pending) < MAP_PENDING_LIMIT:
                self._map_pending.append((uplink, frame))
            if peer is not None and not peer.handshake_in_progress and not self._map_rehandshake:
                self.device.initiate_handshake(self.map_key, now)
                self.after_device(now)
            return
        wire = self.device.seal(self.map_key, frame, now)
        if wire is None:
            self.after_device(now)
            return
        self.emit(uplink, self.map_address, wire)

    def _flush_map_pending(self, now: float) -> None:
        pending, self._map_pending = self._map_pending, []
        for uplink, frame in pending:
            self._send_map_frame(uplink, frame, now)
