"""One running gateway: the thin asyncio shell that wires the sans-I/O cores together.

Data path, application → wire: a gate hands a datagram to `_on_gate_datagram`, which queues it
(`SendQueue`: priority, `send_deadline`); `_flush` turns each queued datagram into blocks of
shard frames (`ShardEncoder`), lets the scheduler spread each block over the live paths, seals
every frame as its own WireGuard transport message (`Device.seal`) and sends it from the path's
uplink socket.

Wire → application: an uplink socket hands a datagram to `_on_uplink_datagram`, which gives it
to the WireGuard core. An authenticated shard goes to its tunnel's `ShardDecoder` (by tunnel
id) and what that rebuilds goes out of the tunnel's gate; probes are answered or measured;
map frames go to the `MapClient`.

Each sans-I/O object has one timer (`TimerSlot`), re-armed only when its deadline changes.

Back-pressure: `_flush` takes nothing from the send queue while an uplink its shards would go
to is unwritable (its socket's send buffer is full: the link is saturated). It *holds*: the
Unix gates are paused first (their blocking sender then waits in `send()`; loopback and TUN
gates are never paused, `_has_back_pressure`), and the few datagrams warp had already taken
from them are parked with their deadline clock stopped, so a held application sees no
`send_deadline` drops: the deadline bounds warp's own queueing, not the time the link makes
the application wait. When every sending uplink is writable again (`on_writable`), the parked
datagrams go back to the queue with the rest of their budget, are sent, and the gates resume
(`_resume_gates`, the one place gates resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from warp import __version__
from warp.config import GatewayConfig, LoopbackGate, TunGate, TunnelConfig, UnixGate
from warp.frames import FrameType
from warp.gate.base import Gate
from warp.gate.loopback import LoopbackGate as LoopbackGateRuntime
from warp.gate.unix import UnixGate as UnixGateRuntime
from warp.keys import encode_key
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
from warp.metrics import MetricsExporter, start_gateway_metrics
from warp.paths.path import Address, Path, PathState
from warp.paths.prober import (
    PathAdded,
    PathProber,
    PathRemoved,
    PathStateChanged,
    make_probe_reply,
)
from warp.paths.scheduler import ParityChange, PathQuality, ShardScheduler
from warp.paths.uplinks import Uplink, UplinkEvent, UplinkEventKind, UplinkManager
from warp.redundancy import (
    RejectReason,
    SendQueue,
    ShardDecoder,
    ShardEncoder,
    max_shard_payload,
    shard_tunnel_id,
)
from warp.status import ControlServer, gate_info
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

log = logging.getLogger("warp.node")

_SHARD = int(FrameType.SHARD)
_PROBE = int(FrameType.PROBE)
_PROBE_REPLY = int(FrameType.PROBE_REPLY)

#: Datagrams held while the tunnel cannot send (no session, no path, uplinks saturated).
SEND_QUEUE_LENGTH = 4096
#: Gates pause (back-pressure) while this many datagrams wait to be sent.
SEND_QUEUE_PAUSE = 1024
#: While the tunnel cannot send (no session, no path, held), expired datagrams are swept from the
#: queue at their deadline but at most this often: each sweep is O(queue), so a gate's steady
#: stream costs O(1) per datagram, not O(queue). (`SendQueue.pop` drops anything past its
#: deadline anyway: the sweep bounds memory and makes room, it is not what keeps stale data off
#: the wire.)
STALLED_SWEEP = 0.1
#: While held by full uplinks, `_flush` also re-checks this often (an uplink rebuilt or removed
#: under the hold calls no `on_writable`).
HOLD_RECHECK = 0.050
# `shard.rejected` is logged at most this often per tunnel (with the count since the last).
REJECT_LOG_INTERVAL = 10.0
#: `_flush` seals this many queued datagrams, collecting their shards per (uplink, remote),
#: before it sends each collection (`_send_batches`) and re-checks that every sending uplink is
#: still writable: 16 × (3, 5) shards of 1400 B ≈ 42 KiB, well inside
#: `WRITE_BUFFER_LIMIT` when a socket fills during the last batch.
FLUSH_BATCH = 16
#: Map frames held until the map session is up (then sent from their own uplink).
MAP_PENDING_LIMIT = 64
#: First retry of an unanswered map request (doubling). A new uplink's first registration is
#: often lost (its address appears before its route), and the peer can only reach the new
#: uplink after the map pushed its reflexive address: this bounds time-to-use of an uplink.
MAP_RESPONSE_TIMEOUT = 0.3
#: After crossed initiations, the lower key re-initiates after this long (random, seconds):
#: past the responder's 20 ms initiation rate limit, well inside the 5 s retransmission.
COLLISION_RETRY_MIN = 0.030
COLLISION_RETRY_MAX = 0.080
#: A forced rekey waits this long after our previous initiation (responders, wireguard-go
#: included, drop initiations less than 20 ms apart).
REKEY_SPACING = 0.030
#: The relay path's pseudo uplink name: relayed packets go through the map (`MapClient.relay`)
#: from whichever uplink last heard from it, and arrive on whichever uplink the map chose.
RELAY_UPLINK = "relay"
#: No direct path active this long after the peer's endpoints are known (or after the last
#: direct path died): fall back to the map's relay for the data path (direct paths keep
#: being probed in the background; traffic moves back as soon as one is active).
RELAY_FALLBACK_AFTER = 2.5
#: A handshake (map or far gate) unanswered for this many initiations, the first at least
#: UNANSWERED_AFTER seconds ago, is logged as a WARNING naming the likely cause, once per
#: episode (WireGuard retries every 5 s: about 10 s after the first try).
UNANSWERED_TRIES = 3
UNANSWERED_AFTER = 10.0
#: The map still refuses to say where the far gate is this long after the first refusal (the
#: map retries every interface_scan_interval): a WARNING, where a refusal at start (the far
#: gate not up yet) is normal.
LOOKUP_REFUSED_WARN_AFTER = 20.0


def _host_port(address: Address | None) -> str:
    """``host:port`` (``[v6]:port``) for logs: one word, as log fields split on spaces."""
    if address is None:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(seconds: float | None) -> str:
    """Milliseconds for logs, ``-`` when unknown (never ``None``)."""
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _has_back_pressure(gate: Gate) -> bool:
    """Whether pausing the gate makes its application wait rather than queue.

    A Unix datagram socket's sender blocks in `send()` (or gets EAGAIN) while warp does not
    read: real back-pressure. A UDP (loopback) or TUN sender never waits: its packets pile up
    in a kernel queue and would be read later, stale, with a fresh `send_deadline`. Those
    gates are therefore never paused: their datagrams are queued with the deadline running and
    dropped at the queue (past `send_deadline`, or on overflow)."""
    return gate.kind == "unix"


def _ip_destination(packet: bytes) -> bytes:
    """The destination address of an IPv4/IPv6 packet (empty if it is neither)."""
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return packet[16:20]
    if version == 6 and len(packet) >= 40:
        return packet[24:40]
    return b""


def _quantize_loss(loss: float | None) -> int:
    """Loss in 5 % steps: finer changes do not move the shard shares enough to recompute."""
    return 0 if loss is None else round(loss * 20)


def _quantize_rtt(rtt: float | None) -> int:
    """RTT in ~25 % (log) steps above 1 ms; below that the scheduler sees no difference."""
    if rtt is None or rtt < 0.001:
        return 0
    return 1 + int(math.log(rtt * 1000, 1.25))


def _clock_step(loop: asyncio.AbstractEventLoop) -> float:
    """The tick of the loop's clock: uvloop's `time()` counts whole milliseconds (libuv's
    `uv_now`) and rounds timer delays to the nearest millisecond; asyncio's is
    `time.monotonic` (0 here: no rounding needed)."""
    return 0.001 if type(loop).__module__.startswith("uvloop") else 0.0


class TimerSlot:
    """One `loop.call_at` timer for one sans-I/O object, re-armed only when its deadline moves.

    The callback runs only once `loop.time()` has reached the deadline, so the object, which
    compares the loop's `now` against its own deadline, always finds it due. Under uvloop a
    deadline a fraction of a millisecond ahead used to fire at once (its delay rounded to 0),
    with `loop.time()` (whole ms) still before it: the object did nothing, the slot re-armed
    at once, and spun until the next millisecond (up to hundreds of callbacks per deadline).
    The delay is now rounded *up* to a whole tick, and an early wake-up (clock rounding) re-arms
    without calling back: one callback per deadline."""

    __slots__ = ("_callback", "_deadline", "_handle", "_loop", "_step")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._step = _clock_step(loop)

    def arm(self, deadline: float | None) -> None:
        if deadline == self._deadline:
            return
        if deadline is not None and self._deadline is not None and self._deadline <= deadline:
            # Lazy: the armed handle fires first; the callback (every one tolerates an early
            # call) re-arms for the later deadline. Saves a cancel + call_at per move.
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._deadline = deadline
        if deadline is not None:
            self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        loop = self._loop
        step = self._step
        if step:
            now = loop.time()
            if deadline > now:
                # Whole ticks, rounded up: fires at the first tick at or after the deadline.
                self._handle = loop.call_at(
                    now + math.ceil((deadline - now) / step) * step, self._fire
                )
                return
        self._handle = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        deadline = self._deadline
        if deadline is not None and self._loop.time() < deadline:
            self._schedule(deadline)  # woken early by clock rounding: not due yet
            return
        self._handle = None
        self._deadline = None
        self._callback()

    def cancel(self) -> None:
        self.arm(None)


class RelayLink:
    """The map's relay as a pseudo uplink: `send` hands a sealed WireGuard message to the map
    client (a Relay request, sealed again for the map and sent from the map's best uplink).
    The gateway treats it like an `Uplink` for the relay path (`RELAY_UPLINK`, the map's
    address as remote)."""

    __slots__ = ("_send",)

    name = RELAY_UPLINK
    closed = False
    writable = True

    def __init__(self, send: Callable[[bytes], bool]) -> None:
        self._send = send

    def send(self, data: bytes, addr: Address) -> bool:
        return self._send(data)


Link = Uplink | RelayLink


@dataclass(slots=True, eq=False)
class Tunnel:
    """One configured tunnel at run time: its gate and its FEC engines."""

    name: str
    config: TunnelConfig
    tunnel_id: int
    encoder: ShardEncoder
    decoder: ShardDecoder
    scheduler: ShardScheduler[Path]
    """Spreads each block over the paths (both ends balanced) and sets its shard count."""
    gate: Gate | None = None
    timer: TimerSlot | None = None
    drops: dict[str, int] = field(default_factory=dict)
    # `shard.rejected` log rate limit: when it was last logged, rejections since.
    reject_logged_at: float = -math.inf
    rejects_unlogged: int = 0

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count


class Gateway:
    """A running warp instance (`warp run`).

    ``static_uplinks`` replaces interface discovery with fixed local addresses (the loopback
    demo and tests without root); ``control_socket`` overrides ``control.socket``;
    ``rekey_signal``: SIGUSR1 forces a handshake with the far gate (`rekey`).
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        static_uplinks: Sequence[tuple[str, str]] | None = None,
        control_socket: str | None = None,
        rng: random.Random | None = None,
        rekey_signal: bool = True,
    ) -> None:
        self.config = config
        self._rekey_signal = rekey_signal
        self._rekey_signal_installed = False
        self._static_uplinks = static_uplinks
        self._control_path = control_socket or config.control.socket
        self._rng = rng or random.Random()
        # (One far gate for now: the first.)
        self.far_gate_config = next(iter(config.far_gates.values()))
        self.far_key = self.far_gate_config.public_key
        self.map_key = config.warp_map.public_key if config.warp_map.address else None
        self.map_address: Address | None = None
        #: every map instance (``warp_map.address`` list, each name's addresses), in order
        self.map_addresses: list[Address] = []
        # Multi-path: the far gate's "endpoint" flips with every packet from another path, so
        # the core's roaming events would be noise; paths are the prober's business.
        self.device = Device(config.private_key, roaming_events=False)
        # A plain WireGuard far gate (no warp): IP packets travel bare, exactly as WireGuard.
        self.plain_wireguard = self.far_gate_config.kind == "wireguard"
        allowed_ips: list[str] = []
        if self.plain_wireguard:
            for tunnel_config in config.tunnels.values():
                if isinstance(tunnel_config.gate, TunGate):
                    allowed_ips += [str(net) for net in tunnel_config.gate.allowed_ips]
        self.device.add_peer(
            self.far_key,
            preshared_key=self.far_gate_config.preshared_key,
            allowed_ips=allowed_ips,
        )
        self._plain_uplink: Uplink | None = None
        if self.map_key is not None:
            self.device.add_peer(self.map_key)
        interfaces = config.interfaces
        self.prober = PathProber(
            interfaces.holepunch_keep_alive_interval, interfaces.path_timeout, self._rng
        )
        # What the schedulers were last told (`_update_schedulers`): the sending paths and a
        # signature of their state and quality; None forces a recomputation.
        self._sending: list[Path] = []
        self._sending_signature: tuple[object, ...] | None = None
        self.send_queue = SendQueue(SEND_QUEUE_LENGTH)
        self.tunnels: dict[str, Tunnel] = {}
        self._tunnels_by_id: dict[int, Tunnel] = {}
        self._tunnel_of_gate: dict[int, Tunnel] = {}
        for name, tunnel_config in config.tunnels.items():
            transport = tunnel_config.transport
            k = transport.redundancy.required_shards
            n = transport.redundancy.num_shards
            tunnel = Tunnel(
                name=name,
                config=tunnel_config,
                tunnel_id=tunnel_config.tunnel_id,
                encoder=ShardEncoder(tunnel_config.tunnel_id, k, n, transport.mtu),
                # Whatever (k, n) the peer's shards carry is decoded; the memory bound
                # comes from our configured (k, n) and mtu (docs/operations.md, Counters).
                decoder=ShardDecoder(
                    tunnel_config.tunnel_id,
                    k,
                    n,
                    ordered=transport.ordered,
                    reorder_timeout=transport.reorder_timeout,
                    max_shard_size=max_shard_payload(transport.mtu),
                ),
                # The default spread, survive_uplink_loss: parity is added while the paths
                # are too few for (k, n) to survive losing an uplink at either end.
                scheduler=ShardScheduler(k, n, add_parity=True),
            )
            tunnel.decoder.on_reject = functools.partial(self._on_shard_rejected, tunnel)
            self.tunnels[name] = tunnel
            self._tunnels_by_id[tunnel.tunnel_id] = tunnel
        self._tun_tunnel = next(
            (t for t in self.tunnels.values() if isinstance(t.config.gate, TunGate)), None
        )
        self.map_client: MapClient[str] | None = (
            MapClient(
                self.far_key,
                refresh_interval=interfaces.interface_scan_interval,
                response_timeout=MAP_RESPONSE_TIMEOUT,
            )
            if self.map_key is not None
            else None
        )
        self._map_pending: list[tuple[str, bytes]] = []
        self._map_rehandshake = False
        self._map_registered_at: float | None = None
        self._map_reflexive: dict[str, str | None] = {}
        # Relay fallback (`_check_relay`): the relay path is added once no direct path has been
        # active for RELAY_FALLBACK_AFTER since `_direct_lost_at` (peer endpoints known / the
        # last direct path died); `_relay_in_use`: the data path is on the relay right now.
        self._relay_link = RelayLink(self._relay_send)
        self._direct_lost_at: float | None = None
        self._relay_in_use = False
        self._relay_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.uplinks: UplinkManager | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsExporter | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._flush_scheduled = False
        self._paused_gates: set[Gate] = set()
        # Back-pressure (`_hold`): the send queue is parked (deadline clocks stopped for gates
        # with back-pressure, see `_has_back_pressure`).
        self._held = False
        # Stalled queue (`_sweep_stale`): no sweep before this time (None: sweep now).
        self._sweep_at: float | None = None
        self._last_sweep = -math.inf
        self.holds = 0
        self._last_initiation: bytes | None = None
        # Simultaneous initiation (both sides initiate at once, e.g. on the same map push):
        # each answers the other's initiation, which replaces its own initiator state, so
        # both responses are dropped. The side with the lower public key re-initiates
        # shortly after; the other stays responder (`_on_initiation_collision`).
        self._initiating = False
        self._last_initiation_at = -1.0
        self._reinitiate: asyncio.TimerHandle | None = None
        self.collisions = 0
        self._handshake_state = "none"
        # Loud misconfiguration: handshakes / lookups that keep getting no answer.
        self._far_unanswered = Unanswered(UNANSWERED_TRIES, UNANSWERED_AFTER)
        self._map_unanswered = Unanswered(UNANSWERED_TRIES, UNANSWERED_AFTER)
        self._lookup_refused = Unanswered(1, LOOKUP_REFUSED_WARN_AFTER)
        self._rekeys = 0
        self._handshakes = 0
        self._stopping = False
        self.counters: dict[str, int] = {
            "no_session": 0,
            "no_path": 0,
            "unknown_tunnel": 0,
            "unknown_frame": 0,
            "send_failed": 0,
            "no_route": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then deregister from the map and close everything."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._device_timer = TimerSlot(loop, self._on_device_timer)
        self._prober_timer = TimerSlot(loop, self._on_prober_timer)
        self._queue_timer = TimerSlot(loop, self._flush)
        self._map_timer = TimerSlot(loop, self._on_map_timer)
        self._relay_timer = TimerSlot(loop, self._on_relay_timer)
        try:
            # Claim everything local first (gates, control socket, metrics port): if one is
            # taken we stop before sending anything, so a failed start never handshakes with
            # the far gate or registers/deregisters at the map (`warp run` also holds the
            # key and control-socket locks before this).
            await self._start_gates()
            self.control = ControlServer(self._control_path, self.snapshot)
            await self.control.start()
            if self.config.metrics.listen is not None:
                # Raises MetricsError (one line) if the address is taken.
                self.metrics = start_gateway_metrics(self.config.metrics.listen, self.snapshot)
                self._metrics_task = loop.create_task(
                    self.metrics.refresh_forever(), name="warp.metrics"
                )
            if self.config.warp_map.address is not None:
                for host_port in self.config.warp_map.addresses:
                    for address in await self._resolve_all(host_port):
                        if address not in self.map_addresses:
                            self.map_addresses.append(address)
                self.map_address = self.map_addresses[0]
                if self.map_client is not None:
                    self.map_client.map_count = len(self.map_addresses)
            self._static_endpoints = [
                await self._resolve(endpoint) for endpoint in self.far_gate_config.endpoints
            ]
            far_peer = self.device.peer(self.far_key)
            if far_peer is not None and self._static_endpoints:
                far_peer.endpoint = self._static_endpoints[0]
            await self._start_uplinks()
            # The gates read only now: the first packet from a gate (a fresh tun sends its
            # own router solicitation at once) starts a handshake that needs an uplink.
            for tunnel in self.tunnels.values():
                if tunnel.gate is not None:
                    tunnel.gate.resume_reading()
            log.info(
                "gateway.started public_key=%s far_gate=%s tunnels=%s uplinks=%s",
                encode_key(self.config.public_key),
                encode_key(self.far_key),
                ",".join(self.tunnels),
                ",".join(self.uplinks.uplinks) if self.uplinks else "",
            )
            self._rearm()
            self._install_rekey_signal(loop)
            await stop.wait()
        finally:
            await self._shutdown()

    def _install_rekey_signal(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGUSR1 forces a new handshake with the far gate (`kill -USR1 <pid>`)."""
        if not self._rekey_signal:
            return
        try:
            loop.add_signal_handler(signal.SIGUSR1, self.rekey)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            return
        self._rekey_signal_installed = True

    def rekey(self) -> None:
        """Start a new handshake with the far gate now (the session stays usable meanwhile).
        Not within 30 ms of our previous initiation: WireGuard responders drop initiations
        closer than 20 ms apart as a flood."""
        if self._loop is None or self._stopping:
            return
        now = self._now()
        wait = self._last_initiation_at + REKEY_SPACING - now
        if wait > 0:
            self._loop.call_later(wait, self.rekey)
            return
        log.info("handshake.rekey_requested peer=far_gate")
        self.device.initiate_handshake(self.far_key, now, force=True)
        self._after_device(now)

    async def _resolve(self, host_port: Any) -> Address:
        return (await self._resolve_all(host_port))[0]

    async def _resolve_all(self, host_port: Any) -> list[Address]:
        host, port = host_port.host, host_port.port
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
        return [(str(info[4][0]), int(info[4][1])) for info in infos]

    async def _start_gates(self) -> None:
        for tunnel in self.tunnels.values():
            gate_config = tunnel.config.gate
            gate: Gate
            if isinstance(gate_config, LoopbackGate):
                gate = LoopbackGateRuntime(
                    self._on_gate_datagram,
                    application_to_gate=gate_config.application_to_gate,
                    ipv4=gate_config.ipv4,
                    gate_to_application=gate_config.gate_to_application,
                )
            elif isinstance(gate_config, UnixGate):
                gate = UnixGateRuntime(
                    self._on_gate_datagram,
                    path=gate_config.path,
                    application_path=gate_config.application_path,
                    group=gate_config.group,
                    allowed_uids=gate_config.allowed_uids,
                    allowed_gids=gate_config.allowed_gids,
                    allow_shared_directory=gate_config.allow_shared_directory,
                )
            else:
                gate = self._make_tun_gate(gate_config)
            await gate.start()
            gate.pause_reading()  # until the uplinks are up (`run`)
            tunnel.gate = gate
            self._tunnel_of_gate[id(gate)] = tunnel
            if not _has_back_pressure(gate):
                self.send_queue.clock_runs.add(tunnel.tunnel_id)
            assert self._loop is not None
            tunnel.timer = TimerSlot(self._loop, functools.partial(self._on_decoder_timer, tunnel))
            log.info("gate.started tunnel=%s %s %s", tunnel.name, gate.kind, gate.address)

    def _make_tun_gate(self, gate_config: TunGate) -> Gate:
        tun_module = importlib.import_module("warp.gate.tun")  # needs root; loaded on demand
        return tun_module.TunGate(  # type: ignore[no-any-return]
            self._on_gate_datagram,
            name=gate_config.name,
            addresses=gate_config.address,
            mtu=gate_config.mtu,
            allowed_ips=gate_config.allowed_ips,
        )

    async def _start_uplinks(self) -> None:
        interfaces = self.config.interfaces
        if self._static_uplinks is not None:
            self.uplinks = UplinkManager.from_static(
                self._static_uplinks,
                on_datagram=self._on_uplink_datagram,
                on_change=self._on_uplink_change,
                on_writable=self._on_uplink_writable,
                listen_port=self.config.listen_port,
                max_consecutive_failures=interfaces.max_consecutive_failures,
            )
        else:
            # Never carry the tunnel over itself: our own tun gates, any WireGuard/TUN link and
            # any interface addressed inside a tun gate's allowed_ips are never uplinks.
            tun_gates = [
                t.config.gate for t in self.tunnels.values() if isinstance(t.config.gate, TunGate)
            ]
            self.uplinks = UplinkManager(
                inclusion_patterns=[p.pattern for p in interfaces.inclusion_patterns],
                exclusion_patterns=[p.pattern for p in interfaces.exclusion_patterns],
                own_tuns=[gate.name for gate in tun_gates],
                tunnel_networks=[net for gate in tun_gates for net in gate.allowed_ips],
                bind_to_device=interfaces.bind_to_device,
                listen_port=self.config.listen_port,
                scan_interval=interfaces.interface_scan_interval,
                max_consecutive_failures=interfaces.max_consecutive_failures,
                on_datagram=self._on_uplink_datagram,
                on_change=self._on_uplink_change,
                on_writable=self._on_uplink_writable,
            )
        await self.uplinks.start()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self.map_client is not None and self.uplinks is not None and self.uplinks.uplinks:
            # Deregister, waiting briefly for the map's confirmation.
            self.map_client.stop(self._now())
            self._after_map()
            for _ in range(20):
                if self.map_client.stopped:
                    break
                await asyncio.sleep(0.05)
        for timer in (
            self._device_timer,
            self._prober_timer,
            self._queue_timer,
            self._map_timer,
            self._relay_timer,
        ):
            timer.cancel()
        if self._reinitiate is not None:
            self._reinitiate.cancel()
        if self._rekey_signal_installed and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGUSR1)
            self._rekey_signal_installed = False
        for tunnel in self.tunnels.values():
            if tunnel.timer is not None:
                tunnel.timer.cancel()
            if tunnel.gate is not None:
                with contextlib.suppress(Exception):
                    await tunnel.gate.close()
        task, self._metrics_task = self._metrics_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            await self.control.close()
        if self.uplinks is not None:
            await self.uplinks.close()
        log.info("gateway.stopped")

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # ------------------------------------------------------------------ uplinks

    def _on_uplink_change(self, event: UplinkEvent) -> None:
        uplink = event.uplink
        now = self._now()
        # (UplinkManager logs uplink.added/removed/rebuilt itself: one line per event.)
        if event.kind is UplinkEventKind.REMOVED:
            self.prober.remove_uplink(uplink.name)
            self._map_reflexive.pop(uplink.name, None)
            if self.map_client is not None and not self._stopping:
                self.map_client.remove_uplink(uplink.name, now)
        else:
            far = self.device.peer(self.far_key)
            if (
                far is not None
                and not far.has_session
                and far.handshake_in_progress
                and self.uplinks is not None
                and len(self.uplinks.uplinks) == 1
            ):
                # The pending initiation (packets are staged) had no uplink to go out on:
                # send a fresh one now rather than at the 5 s retransmission.
                self.device.initiate_handshake(self.far_key, now, force=True)
                self._after_device(now)
            if not self.plain_wireguard:
                for endpoint in self._static_endpoints:
                    self.prober.add_candidate(uplink.name, endpoint, "static", now)
            if self.map_client is not None and not self.plain_wireguard:
                for endpoint in self.map_client.peer_endpoints:
                    self.prober.add_candidate(uplink.name, endpoint, "map", now)
                if event.kind is UplinkEventKind.ADDED:
                    self._map_reflexive.setdefault(uplink.name, None)
                    self.map_client.add_uplink(uplink.name, now)
                else:
                    self.map_client.uplink_changed(uplink.name, now)
            self._ensure_session(now)
        self._after_prober()
        self._after_map()

    def _on_uplink_writable(self, uplink: Uplink) -> None:
        if self._held:
            self._schedule_flush()

    def _on_uplink_datagram(self, uplink: Link, data: bytes, source: Address) -> None:
        now = self._loop.time()  # type: ignore[union-attr]
        device = self.device
        received = device.receive(data, source, now)
        if device.has_outgoing:
            self._send_device_output(uplink, source)
        if device.has_events:
            self._handle_device_events(uplink, now)
        self._device_timer.arm(device.next_deadline())
        if received is None:
            return
        peer = received.peer
        plaintext = received.plaintext
        if self.plain_wireguard and peer == self.far_key:
            if isinstance(uplink, Uplink):
                self._plain_uplink = uplink
            if plaintext and self._tun_tunnel is not None and self._tun_tunnel.gate is not None:
                self._tun_tunnel.gate.deliver(plaintext)
            return
        if peer == self.far_key:
            path = self.prober.on_authenticated(uplink.name, source, now, len(data))
            if path is not None and path.state_since == now:
                # A path just learned or just active: log it and reschedule now (the core's
                # roaming events, which used to prompt this, are off).
                self._after_prober()
            if not plaintext:
                return  # keepalive
            kind = plaintext[0]
            if kind == _SHARD:
                self._on_shard(plaintext, now)
            elif kind == _PROBE:
                reply = make_probe_reply(plaintext)
                if reply is not None:
                    self._seal_and_send(self.far_key, reply, uplink, source, now)
            elif kind == _PROBE_REPLY:
                self.prober.on_probe_reply(plaintext, uplink.name, source, now)
                self._after_prober()
            else:
                self.counters["unknown_frame"] += 1
        elif peer == self.map_key and self.map_client is not None and plaintext:
            self.map_client.receive(plaintext, uplink.name, now)
            self._after_map()

    def _on_shard(self, frame: bytes, now: float) -> None:
        tunnel = self._tunnels_by_id.get(shard_tunnel_id(frame) or -1)
        if tunnel is None:
            self.counters["unknown_tunnel"] += 1
            return
        delivered = tunnel.decoder.receive(frame, now)
        if delivered:
            gate = tunnel.gate
            if gate is not None:
                for datagram in delivered:
                    gate.deliver(datagram)
        if tunnel.timer is not None:
            tunnel.timer.arm(tunnel.decoder.next_deadline())

    def _on_shard_rejected(self, tunnel: Tunnel, reason: RejectReason) -> None:
        tunnel.rejects_unlogged += 1
        now = self._now() if self._loop is not None else time.monotonic()
        if now - tunnel.reject_logged_at >= REJECT_LOG_INTERVAL:
            log.warning(
                "shard.rejected tunnel=%s reason=%s count=%d",
                tunnel.name,
                reason,
                tunnel.rejects_unlogged,
            )
            tunnel.reject_logged_at = now
            tunnel.rejects_unlogged = 0

    def _on_decoder_timer(self, tunnel: Tunnel) -> None:
        delivered = tunnel.decoder.tick(self._now())
        if tunnel.gate is not None:
            for datagram in delivered:
                tunnel.gate.deliver(datagram)
        assert tunnel.timer is not None
        tunnel.timer.arm(tunnel.decoder.next_deadline())

    # ------------------------------------------------------------------ WireGuard plumbing

    def _seal_and_send(
        self, peer: bytes, plaintext: bytes, uplink: Link, remote: Address, now: float
    ) -> bool:
        wire = self.device.seal(peer, plaintext, now)
        if wire is None:
            self._after_device(now)
            return False
        if uplink.send(wire, remote):
            if peer == self.far_key:
                self.prober.record_tx(uplink.name, remote, len(wire))
            return True
        self.counters["send_failed"] += 1
        return False

    def _send_device_output(self, uplink: Link | None, source: Address | None) -> None:
        """Send what the core produced. Replies (response, cookie) go back where the request
        came from; initiations to the far gate go out on every candidate path."""
        for out in self.device.drain_outgoing():
            kind = out.kind
            if kind is MessageKind.INITIATION:
                self._send_initiation(out)
            elif (
                uplink is not None
                and source is not None
                and kind
                in (
                    MessageKind.RESPONSE,
                    MessageKind.COOKIE_REPLY,
                )
            ):
                if kind is MessageKind.RESPONSE and out.peer == self.far_key:
                    self._on_initiation_collision()
                uplink.send(out.data, source)
            else:
                self._send_to_peer(out)

    def _on_initiation_collision(self) -> None:
        """We answered the far gate's initiation: if ours was pending, both crossed and both
        responses will be dropped. The side with the lower public key re-initiates after a
        short random delay (past the responder's 20 ms initiation rate limit); the other side
        only answers. Without this, nothing completes before the 5 s retransmission."""
        if not self._initiating:
            return
        self._initiating = False
        self.collisions += 1
        if self.config.public_key >= self.far_key or self._loop is None:
            return
        if self._reinitiate is not None:
            self._reinitiate.cancel()
        delay = self._rng.uniform(COLLISION_RETRY_MIN, COLLISION_RETRY_MAX)
        self._reinitiate = self._loop.call_later(delay, self._on_reinitiate)
        log.info("handshake.collision peer=far_gate retry_ms=%d", round(delay * 1000))

    def _on_reinitiate(self) -> None:
        self._reinitiate = None
        peer = self.device.peer(self.far_key)
        if peer is None or peer.has_session or self._stopping:
            return
        now = self._now()
        self.device.initiate_handshake(self.far_key, now, force=True)
        self._after_device(now)

    def _initiation_sent(self, peer: bytes, now: float) -> None:
        """One more handshake try: a WARNING once per episode when they keep going unanswered,
        naming the likely causes (cleared by `_handshake_answered`)."""
        if peer == self.far_key:
            far = self._far_unanswered
            far.tried(now)
            if far.due(now) and far.since is not None:
                log.warning("far_gate.unanswered handshakes=%d for_s=%.1f paths=%d likely: far "
                            "gate not running/not registered, or wrong far_gate.public_key",
                            far.count, now - far.since, len(self.prober))  # fmt: skip
        elif peer == self.map_key:
            watch = self._map_unanswered
            watch.tried(now)
            if watch.due(now) and watch.since is not None:
                log.warning("map.unreachable handshakes=%d for_s=%.1f address=%s likely: map down, "
                            "wrong map address or wrong warp_map.public_key", watch.count,
                            now - watch.since, _host_port(self.map_address))  # fmt: skip

    def _handshake_answered(self, peer: bytes) -> None:
        if peer == self.far_key and self._far_unanswered.answered():
            log.info("far_gate.answered")
        elif peer == self.map_key and self._map_unanswered.answered():
            log.info("map.reachable")

    def _send_initiation(self, out: Outgoing) -> None:
        if out.peer == self.far_key:
            self._initiating = True
            self._last_initiation_at = self._now()
            self._last_initiation = out.data
            self._handshake_state = (
                "initiating" if self._handshake_state != "established" else "established"
            )
            targets = [(p.uplink, p.remote) for p in self.prober.paths]
        elif out.peer == self.map_key and self.map_address is not None and self.uplinks:
            targets = [(name, self.map_address) for name in self.uplinks.uplinks]
        else:
            targets = []
        if not targets and out.destination is not None and self.uplinks:
            targets = [(name, out.destination) for name in self.uplinks.uplinks]
        self._send_on(targets, out.data)
        if targets and out.peer is not None and self._loop is not None:
            self._initiation_sent(out.peer, self._now())

    def _send_to_peer(self, out: Outgoing) -> None:
        """A transport/keepalive the core emitted by itself (staged flush, keepalive timer)."""
        if out.peer == self.far_key and self.plain_wireguard:
            uplink = self._plain_sending_uplink()
            if uplink is not None and out.destination is not None:
                uplink.send(out.data, out.destination)
            return
        if out.peer == self.far_key:
            paths = self._sending_paths()
            if paths:
                path = paths[0]
                self._send_on([(path.uplink, path.remote)], out.data)
            return
        if out.peer == self.map_key and self.map_address is not None and self.uplinks:
            first = next(iter(self.uplinks.uplinks), None)
            if first is not None:
                self._send_on([(first, self.map_address)], out.data)

    def _send_on(self, targets: Sequence[tuple[str, Address]], data: bytes) -> None:
        for name, remote in targets:
            uplink = self._link_named(name)
            if uplink is not None:
                uplink.send(data, remote)

    def _link_named(self, name: str) -> Link | None:
        """The uplink of that name, or the relay link for the relay path."""
        if name == RELAY_UPLINK:
            return self._relay_link if self.map_client is not None else None
        return self.uplinks.uplinks.get(name) if self.uplinks is not None else None

    def _handle_device_events(self, uplink: Link | None, now: float) -> None:
        for event in self.device.drain_events():
            if isinstance(event, HandshakeComplete):
                self._handshake_answered(event.peer)
                if event.peer == self.far_key:
                    self._initiating = False
                    self._handshakes += 1
                    if self._handshake_state == "established":
                        self._rekeys += 1
                    self._handshake_state = "established"
                    if uplink is not None and not self.plain_wireguard and event.initiator:
                        # The handshake response is an authenticated packet on this path.
                        # (Responder: completion comes with the first transport packet, which
                        # `_on_uplink_datagram` counts; counting it here too counted it twice.
                        # Plain WireGuard: no paths, no probes: it would reject them.)
                        self.prober.on_authenticated(uplink.name, event.source, now)
                    log.info("handshake.complete peer=far_gate initiator=%s source=%s",
                             event.initiator, _host_port(event.source))  # fmt: skip
                    self._schedule_flush()
                elif event.peer == self.map_key:
                    self._map_rehandshake = False
                    log.info("handshake.complete peer=map source=%s", _host_port(event.source))
                    self._flush_map_pending(now)
            elif isinstance(event, HandshakeFailed):
                log.warning("handshake.failed peer=%s dropped=%d", self._peer_name(event.peer),
                            event.dropped_packets)  # fmt: skip
                if event.peer == self.far_key and self._handshake_state != "established":
                    self._handshake_state = "none"
                elif event.peer == self.map_key:
                    self._map_rehandshake = False  # the next map request tries again
            elif isinstance(event, SessionExpired | KeysZeroed):
                if event.peer == self.far_key:
                    self._handshake_state = "expired"
                log.info("session.expired peer=%s", self._peer_name(event.peer))
            elif isinstance(event, PeerRoamed):
                log.debug("peer.roamed peer=%s old=%s new=%s", self._peer_name(event.peer),
                          event.old, event.new)  # fmt: skip
        self._after_prober()

    def _peer_name(self, key: bytes) -> str:
        return "far_gate" if key == self.far_key else "map" if key == self.map_key else "other"

    def _after_device(self, now: float) -> None:
        device = self.device
        if device.has_outgoing:
            self._send_device_output(None, None)
        if device.has_events:
            self._handle_device_events(None, now)
        self._device_timer.arm(device.next_deadline())

    def _on_device_timer(self) -> None:
        now = self._now()
        self.device.tick(now)
        self._after_device(now)

    def _ensure_session(self, now: float) -> None:
        peer = self.device.peer(self.far_key)
        if (
            peer is not None
            and not peer.has_session
            and not peer.handshake_in_progress
            and self.prober.paths
        ):
            self.device.initiate_handshake(self.far_key, now)
            self._after_device(now)

    # ------------------------------------------------------------------ paths

    def _sending_paths(self, now: float | None = None) -> list[Path]:
        """Paths to put shards on: the active direct ones, else the relay if it is active, else
        (nothing proven yet) the probing direct ones. Of several active paths from one uplink
        to one remote host, one a NAT rebinding replaced is left out
        (`PathProber.drop_superseded`)."""
        direct: list[Path] = []
        relay: list[Path] = []
        probing: list[Path] = []
        for path in self.prober.paths:
            state = path.state
            if path.uplink == RELAY_UPLINK:
                if state is PathState.ACTIVE:
                    relay.append(path)
            elif state is PathState.ACTIVE:
                direct.append(path)
            elif state is PathState.PROBING:
                probing.append(path)
        if direct:
            if len(direct) == 1:
                return direct
            if now is None:
                now = self._now() if self._loop is not None else time.monotonic()
            kept = self.prober.drop_superseded(direct, now)
            if self._loop is not None:
                self._prober_timer.arm(self.prober.next_deadline())  # an early probe, maybe
            return kept
        return relay or probing

    def _update_schedulers(self) -> list[Path]:
        """The sending paths. The tunnels' schedulers spread each block over them, both ends
        balanced (no uplink of ours and no peer address carries more than n - k shards when
        the paths allow: a whole uplink lost at either end loses nothing), and add parity
        while they do not. The schedulers precompute a cycle of assignments, so they are
        updated only when the set, state or quality of the sending paths changed."""
        paths = self._sending_paths()
        relayed = bool(paths) and paths[0].uplink == RELAY_UPLINK
        if relayed != self._relay_in_use:
            self._on_relay_use(relayed)
        signature = tuple(
            (id(p), p.state, _quantize_loss(p.loss), _quantize_rtt(p.rtt)) for p in paths
        )
        if signature != self._sending_signature:
            self._sending_signature = signature
            self._sending = paths
            qualities = path_qualities(paths)
            for tunnel in self.tunnels.values():
                change = tunnel.scheduler.update(qualities, relayed=relayed)
                if change is not None:
                    _log_parity_change(tunnel.name, change)
        return self._sending

    def _on_prober_timer(self) -> None:
        now = self._now()
        probes = self.prober.tick(now)
        peer = self.device.peer(self.far_key)
        has_session = peer is not None and peer.has_session
        for uplink_name, remote, frame in probes:
            uplink = self._link_named(uplink_name)
            if uplink is None:
                continue
            if has_session:
                self._seal_and_send(self.far_key, frame, uplink, remote, now)
            elif self._last_initiation is not None:
                # No session yet: the probe schedule re-sends the pending initiation, so both
                # NATs see outbound traffic during the burst (simultaneous open).
                uplink.send(self._last_initiation, remote)
        if not has_session:
            self._ensure_session(now)
        self._after_prober()

    def _after_prober(self) -> None:
        for event in self.prober.pop_events():
            if isinstance(event, PathStateChanged):
                path = event.path
                level = logging.WARNING if event.new is PathState.DEAD else logging.INFO
                log.log(level, "%s uplink=%s remote=%s rtt_ms=%s", event.name, path.uplink,
                        _host_port(path.remote), _ms(path.rtt))  # fmt: skip
                if event.new is PathState.ACTIVE:
                    self._schedule_flush()
            elif isinstance(event, PathAdded):
                log.info("%s uplink=%s remote=%s source=%s", event.name, event.path.uplink,
                         _host_port(event.path.remote), event.path.source)  # fmt: skip
            elif isinstance(event, PathRemoved):
                log.info("%s uplink=%s remote=%s reason=%s", event.name, event.path.uplink,
                         _host_port(event.path.remote), event.reason)  # fmt: skip
        if self._loop is not None:
            self._check_relay(self._now())
            self._prober_timer.arm(self.prober.next_deadline())

    # ------------------------------------------------------------------ relay

    def _check_relay(self, now: float) -> None:
        """Fall back to the map's relay once no direct path has been active for
        RELAY_FALLBACK_AFTER (since the peer's endpoints became known, or since the last
        direct path died): the relay path is added (probed like any path; it carries data
        only while no direct path is active, `_sending_paths`)."""
        if self.map_client is None or self.map_address is None or self.plain_wireguard:
            return
        if any(p.state is PathState.ACTIVE and p.uplink != RELAY_UPLINK for p in self.prober.paths):
            self._direct_lost_at = None
            self._relay_timer.cancel()
            return
        if self._direct_lost_at is None:
            if not self.map_client.peer_endpoints and not self._static_endpoints:
                return  # nothing to try yet: the peer is not there
            self._direct_lost_at = now
        if self.prober.get(RELAY_UPLINK, self.map_address) is not None:
            return
        due = self._direct_lost_at + RELAY_FALLBACK_AFTER
        if now < due:
            self._relay_timer.arm(due)
            return
        log.info("relay.fallback reason=no_direct_path after_s=%.3f",
                 now - self._direct_lost_at)  # fmt: skip
        self.prober.add_candidate(RELAY_UPLINK, self.map_address, "relay", now)
        self._ensure_session(now)
        self._after_prober()

    def _on_relay_timer(self) -> None:
        now = self._now()
        self._check_relay(now)
        self._prober_timer.arm(self.prober.next_deadline())

    def _on_relay_use(self, relayed: bool) -> None:
        """The data path moved onto the relay, or back to a direct path."""
        now = self._now()
        self._relay_in_use = relayed
        if relayed:
            self._relay_since = now
            log.warning("path.relay.active remote=%s", _host_port(self.map_address))
        else:
            since, self._relay_since = self._relay_since, None
            paths = [p for p in self.prober.active_paths() if p.uplink != RELAY_UPLINK]
            log.info("relay.direct_restored relayed_s=%s paths=%d",
                     "-" if since is None else round(now - since, 3), len(paths))  # fmt: skip

    def _relay_send(self, data: bytes) -> bool:
        """Hand a sealed WireGuard message for the far gate to the map's relay."""
        client = self.map_client
        if client is None or self._loop is None:
            return False
        now = self._now()
        if not client.relay(data, now):
            return False
        for action in client.drain_outgoing():
            self._send_map_frame(action.uplink, action.frame, now)
        return True

    def _on_relayed(self, sender: bytes, payload: bytes, now: float) -> None:
        """A WireGuard message the far gate sent through the map's relay: received on the
        relay path, as if from an uplink (replies go back through the relay)."""
        if sender != self.far_key or self.map_address is None or self.plain_wireguard:
            return
        if self.prober.get(RELAY_UPLINK, self.map_address) is None:
            log.info("relay.fallback reason=peer_relays")
            self.prober.add_candidate(RELAY_UPLINK, self.map_address, "relay", now)
        self._on_uplink_datagram(self._relay_link, payload, self.map_address)

    # ------------------------------------------------------------------ map

    def _after_map(self) -> None:
        client = self.map_client
        if client is None or self._loop is None:
            return
        now = self._now()
        # Events first: a RehandshakeNeeded must start the new handshake (and hold frames)
        # before the retries it comes with are sealed under the dead session and lost.
        for event in client.drain_events():
            if isinstance(event, UplinkRegistered):
                self._map_registered_at = now
                self._map_reflexive[event.uplink] = f"{event.reflexive[0]}:{event.reflexive[1]}"
                if event.changed:
                    log.info("map.registered uplink=%s reflexive=%s:%d", event.uplink,
                             event.reflexive[0], event.reflexive[1])  # fmt: skip
            elif isinstance(event, UplinkExpired):
                self._map_reflexive[event.uplink] = None
                log.warning("map.registration_expired uplink=%s", event.uplink)
            elif isinstance(event, PeerEndpointsChanged):
                endpoints = ",".join(f"{h}:{p}" for h, p in event.endpoints)
                log.info("map.peer_endpoints endpoints=%s pushed=%s", endpoints, event.pushed)
                if event.endpoints and self._lookup_refused.answered():
                    log.info("far_gate.found endpoints=%s", endpoints)
                # Remotes the map no longer lists (a restarted peer's old NAT ports) are
                # forgotten once dead (`PathProber.forget_after`).
                self.prober.map_endpoints_changed(event.endpoints)
                if self.uplinks is not None:
                    for name in self.uplinks.uplinks:
                        for endpoint in event.endpoints:
                            self.prober.add_candidate(name, endpoint, "map", now)
                self._ensure_session(now)
                self._after_prober()
            elif isinstance(event, LookupRefused):
                # Normal at start (the far gate is not up yet): a WARNING only if it lasts.
                log.info("map.lookup_refused code=%s %s", event.code, event.message)
                if self._lookup_refused.since is None:
                    self._lookup_refused.tried(now)
            elif isinstance(event, RehandshakeNeeded):
                if self.map_key is not None:
                    # Hold map frames (`_map_pending`) until this handshake completes.
                    self._map_rehandshake = True
                    log.info("map.rehandshake unanswered=%d", event.unanswered)
                    self.device.initiate_handshake(self.map_key, now, force=True)
                    self._after_device(now)
            elif isinstance(event, MapSwitched):
                if self.map_key is not None and self.map_addresses:
                    # Another instance of the map cluster (same key): a fresh session there;
                    # map frames wait for it (`_map_pending`). Paths to the far gate stay.
                    old = self.map_address
                    self.map_address = self.map_addresses[event.index % len(self.map_addresses)]
                    log.warning("map.failover from=%s to=%s unanswered=%d", _host_port(old),
                                _host_port(self.map_address), event.unanswered)  # fmt: skip
                    self._map_rehandshake = True
                    self.device.initiate_handshake(self.map_key, now, force=True)
                    self._after_device(now)
            elif isinstance(event, MapErrorReceived):
                log.warning("map.error code=%s %s", event.code, event.message)
            elif isinstance(event, RelayReceived):
                self._on_relayed(event.sender, event.payload, now)
            elif isinstance(event, Stopped):
                log.info("map.deregistered acknowledged=%s", event.acknowledged)
        refused = self._lookup_refused
        if refused.due(now) and refused.since is not None:
            log.warning("far_gate.unanswered map_lookup=refused for_s=%.1f likely: far gate not "
                        "running/not registered, or wrong far_gate.public_key",
                        now - refused.since)  # fmt: skip
        for action in client.drain_outgoing():
            self._send_map_frame(action.uplink, action.frame, now)
        self._map_timer.arm(client.next_deadline())

    def _send_map_frame(self, uplink_name: str, frame: bytes, now: float) -> None:
        if self.map_key is None or self.map_address is None or self.uplinks is None:
            return
        uplink = self.uplinks.uplinks.get(uplink_name)
        if uplink is None:
            return
        peer = self.device.peer(self.map_key)
        if peer is None or not peer.has_session or self._map_rehandshake:
            # Held until the session is up, then sent from its own uplink (the map must see
            # each uplink's own reflexive address).
            if len(self._map_pending) < MAP_PENDING_LIMIT:
                self._map_pending.append((uplink_name, frame))
            if peer is not None and not peer.handshake_in_progress and not self._map_rehandshake:
                self.device.initiate_handshake(self.map_key, now)
                self._after_device(now)
            return
        self._seal_and_send(self.map_key, frame, uplink, self.map_address, now)

    def _flush_map_pending(self, now: float) -> None:
        pending, self._map_pending = self._map_pending, []
        for uplink_name, frame in pending:
            self._send_map_frame(uplink_name, frame, now)

    def _on_map_timer(self) -> None:
        if self.map_client is not None:
            self.map_client.tick(self._now())
            self._after_map()

    # ------------------------------------------------------------------ application → wire

    def _plain_sending_uplink(self) -> Uplink | None:
        """Plain WireGuard: the uplink the peer was last heard on, else the first one."""
        uplink = self._plain_uplink
        if uplink is not None and not uplink.closed:
            return uplink
        if self.uplinks is None:
            return None
        return next(iter(self.uplinks.uplinks.values()), None)

    def _on_gate_datagram(self, gate: Gate, payload: bytes) -> bool | None:
        tunnel = self._tunnel_of_gate.get(id(gate))
        if tunnel is None or not payload:
            return None
        now = self._loop.time()  # type: ignore[union-attr]
        if self.plain_wireguard:
            # As WireGuard: only packets whose destination is in the peer's AllowedIPs go.
            if self.device.route(_ip_destination(payload)) != self.far_key:
                # Not a tunnel drop: the tun's own link-local chatter (router solicitations,
                # MLD) always lands here, as in WireGuard ("no route to host").
                self.counters["no_route"] += 1
                return None
            wire = self.device.seal(self.far_key, payload, now)
            peer = self.device.peer(self.far_key)
            uplink = self._plain_sending_uplink()
            if wire is not None and uplink is not None and peer is not None and peer.endpoint:
                uplink.send(wire, peer.endpoint)
            self._after_device(now)
            return None
        transport = tunnel.config.transport
        back_pressure = _has_back_pressure(gate)
        if self._held and back_pressure:
            # Taken with the gate already asked to pause: parked, the gate stops now.
            self.send_queue.push(
                tunnel.tunnel_id, payload, now, transport.send_deadline, transport.priority
            )
            self._paused_gates.add(gate)
            return False
        deadline = transport.send_deadline
        self.send_queue.push(tunnel.tunnel_id, payload, now, deadline, transport.priority)
        sweep_at = self._sweep_at
        if sweep_at is not None and now + deadline < sweep_at:
            # (Only a tunnel with a shorter send_deadline can move the next sweep earlier.)
            self._sweep_at = max(now + deadline, self._last_sweep + STALLED_SWEEP)
        self._schedule_flush()
        if back_pressure and len(self.send_queue) >= SEND_QUEUE_PAUSE:
            self._paused_gates.add(gate)
            return False
        return None

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send queued datagrams: encode, schedule shards over paths, seal, send."""
        self._flush_scheduled = False
        now = self._now()
        queue = self.send_queue
        peer = self.device.peer(self.far_key)
        if peer is None or not peer.has_session:
            self._release(now)
            if len(queue):
                self.counters["no_session"] += self._sweep_stale(now)
                self._ensure_session(now)
            self._resume_gates()
            self._queue_timer.arm(self._sweep_at if len(queue) else None)
            return
        paths = self._update_schedulers()
        uplinks = self.uplinks.uplinks if self.uplinks is not None else {}
        if not paths or not uplinks:
            self._release(now)
            if len(queue):
                self.counters["no_path"] += self._sweep_stale(now)
            self._resume_gates()
            self._queue_timer.arm(self._sweep_at if len(queue) else None)
            return
        relay = self._relay_link
        links: dict[str, Link | None] = {
            p.uplink: relay if p.uplink == RELAY_UPLINK else uplinks.get(p.uplink) for p in paths
        }
        sending = [uplink for uplink in links.values() if uplink is not None]
        if not all(uplink.writable for uplink in sending):
            self._hold(now)
            if len(queue):
                # Datagrams of gates without back-pressure, queued during the hold.
                self._sweep_stale(now)
            self._queue_timer.arm(now + HOLD_RECHECK)
            return
        self._release(now)
        self._sweep_at = None
        seal_many = self.device.seal_many
        far_key = self.far_key
        tunnels = self._tunnels_by_id
        send_failed = 0
        batches: dict[tuple[str, Address], tuple[Link, Path, list[bytes]]] = {}
        items = 0
        while True:
            item = queue.pop(now)
            if item is not None:
                tunnel = tunnels[item.tunnel_id]
                scheduler = tunnel.scheduler
                assign = scheduler.assign
                # The scheduler's shard count: more than n while parity is added.
                for frames in tunnel.encoder.encode(item.datagram, scheduler.effective_n):
                    for wire, path in zip(seal_many(far_key, frames, now), assign(), strict=True):
                        uplink = links[path.uplink]
                        if wire is None or uplink is None:
                            send_failed += 1
                            continue
                        batch = batches.get((path.uplink, path.remote))
                        if batch is None:
                            batches[(path.uplink, path.remote)] = (uplink, path, [wire])
                        else:
                            batch[2].append(wire)
                items += 1
                if items < FLUSH_BATCH:
                    continue
                items = 0
            send_failed += self._send_batches(batches)
            if not all(uplink.writable for uplink in sending):
                self._hold(now)  # an uplink's socket just filled up: take no more
                break
            if item is None:
                break
        if send_failed:
            self.counters["send_failed"] += send_failed
        self._after_device(now)
        if self._held:
            self._queue_timer.arm(now + HOLD_RECHECK)
            return
        self._resume_gates()
        self._queue_timer.arm(queue.next_expiry())

    def _resume_gates(self) -> None:
        """The one place paused gates resume, at the end of every `_flush`: as soon as the
        reasons for a pause are gone (no hold, the queue below SEND_QUEUE_PAUSE), whichever
        way the flush went (sent, no session, no path)."""
        if self._paused_gates and not self._held and len(self.send_queue) < SEND_QUEUE_PAUSE:
            paused, self._paused_gates = self._paused_gates, set()
            for gate in paused:
                gate.resume_reading()

    def _sweep_stale(self, now: float) -> int:
        """While the queue cannot drain: drop what is past its deadline, at the next expiry
        but at most every STALLED_SWEEP (O(queue) per sweep, not per gate datagram). Returns
        how many were dropped; `_sweep_at` is when to sweep next (the queue timer)."""
        queue = self.send_queue
        if self._sweep_at is not None and now < self._sweep_at:
            return 0
        dropped = queue.drop_expired(now)
        self._last_sweep = now
        expiry = queue.next_expiry()
        self._sweep_at = None if expiry is None else max(expiry, now + STALLED_SWEEP)
        return dropped

    @staticmethod
    def _send_batches(batches: dict[tuple[str, Address], tuple[Link, Path, list[bytes]]]) -> int:
        """Send each (uplink, remote) collection; path counters; empties `batches`. Returns
        how many shards were not sent.

        One datagram per shard, not one GSO `Uplink.send_batch`: a GSO super-packet crosses
        software forwarding on the way out (veth, netfilter, a NAT on the same box) as one
        packet, so a single drop there takes every shard of a block on that path and defeats
        the FEC (seen in the lab: residual loss equal to the per-path loss)."""
        failed = 0
        for uplink, path, wires in batches.values():
            send = uplink.send
            remote = path.remote
            for wire in wires:
                if send(wire, remote):
                    path.tx_packets += 1
                    path.tx_bytes += len(wire)
                else:
                    failed += 1
        batches.clear()
        return failed

    def _hold(self, now: float) -> None:
        """Back-pressure on: pause the gates with back-pressure and park what is queued (their
        datagrams' deadline clock stopped: the application waits, not warp). Datagrams of
        gates without back-pressure keep their deadline running (`SendQueue.clock_runs`)."""
        if not self._held:
            self._held = True
            self.holds += 1
        self.send_queue.park(now)
        for tunnel in self.tunnels.values():
            gate = tunnel.gate
            if gate is not None and _has_back_pressure(gate) and gate not in self._paused_gates:
                gate.pause_reading()
                self._paused_gates.add(gate)

    def _release(self, now: float) -> None:
        """Back-pressure off: the parked datagrams go back to the queue, with their budget."""
        if not self._held:
            return
        self._held = False
        self.send_queue.restore(now)
        self._sweep_at = None

    def _rearm(self) -> None:
        self._device_timer.arm(self.device.next_deadline())
        self._after_prober()
        self._after_map()

    # ------------------------------------------------------------------ status

    def snapshot(self) -> dict[str, Any]:
        now = self._now() if self._loop is not None else time.monotonic()
        paths = []
        local_by_uplink: dict[str, str] = {}
        uplink_rows = []
        if self.uplinks is not None:
            for name, uplink in self.uplinks.uplinks.items():
                local = f"{uplink.address}:{uplink.local_port}"
                local_by_uplink[name] = local
                uplink_rows.append(
                    {
                        "name": name,
                        "local_address": local,
                        "state": "down" if uplink.closed else "up",
                        "send_errors": uplink.errors,
                        "tx_dropped": uplink.tx_dropped,
                        "writable": uplink.writable,
                    }
                )
        for path in self.prober.paths:
            # A dead path shows its state and how long since it was heard, no stale figures.
            dead = path.state is PathState.DEAD
            loss = None if dead else path.loss
            rtt = None if dead else path.rtt
            paths.append(
                {
                    "uplink": path.uplink,
                    "local_address": local_by_uplink.get(path.uplink, "?"),
                    "remote_address": f"{path.remote[0]}:{path.remote[1]}",
                    "source": path.source,
                    "state": str(path.state),
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                    "loss_pct": None if loss is None else round(loss * 100, 1),
                    "last_rx_age_s": None
                    if path.last_authenticated is None
                    else round(now - path.last_authenticated, 3),
                    "tx_bytes": path.tx_bytes,
                    "tx_packets": path.tx_packets,
                    "rx_bytes": path.rx_bytes,
                    "rx_packets": path.rx_packets,
                }
            )
        queue_stats = self.send_queue.stats
        tunnels = []
        for tunnel in self.tunnels.values():
            gate = tunnel.gate
            stats = tunnel.decoder.stats
            drops: dict[str, int] = dict(gate.counters.drops) if gate is not None else {}
            tid = tunnel.tunnel_id
            # Real drops only: surplus shards (parity a clean link did not need) are not.
            for reason, count in (
                ("send_deadline", queue_stats.dropped_stale_by_tunnel.get(tid, 0)),
                ("send_queue_full", queue_stats.dropped_overflow_by_tunnel.get(tid, 0)),
                ("blocks_expired", stats.blocks_expired),
                ("blocks_evicted", stats.blocks_evicted),
                ("late_shards", stats.late_shards),
                ("duplicate_shards", stats.duplicates),
            ):
                if count:
                    drops[reason] = count
            for reason, count in stats.rejected.items():
                drops[f"rejected_{reason}"] = count
            tunnels.append(
                {
                    "name": tunnel.name,
                    "tunnel_id": tid,
                    "gate": gate_info(gate) if gate is not None else {"kind": "?", "address": "?"},
                    "datagrams_in": gate.counters.datagrams_in if gate else 0,
                    "datagrams_out": gate.counters.datagrams_out if gate else 0,
                    "bytes_in": gate.counters.bytes_in if gate else 0,
                    "bytes_out": gate.counters.bytes_out if gate else 0,
                    "blocks_rebuilt": stats.blocks_rebuilt,
                    "surplus_shards": stats.surplus_shards,
                    "datagrams_lost": stats.datagrams_lost,
                    "redundancy": _redundancy(tunnel.scheduler),
                    "drops": drops,
                }
            )
        map_status = None
        if self.config.warp_map.address is not None:
            client = self.map_client
            map_status = {
                "address": _host_port(self.map_address)
                if self.map_address is not None
                else str(self.config.warp_map.addresses[0]),
                "registered": bool(client and client.all_registered(now) and client.uplinks),
                "reflexive": dict(self._map_reflexive),
                "last_registration_age_s": None
                if self._map_registered_at is None
                else round(now - self._map_registered_at, 3),
            }
        peer = self.device.peer(self.far_key)
        last_handshake = peer.last_handshake_time if peer is not None else None
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "public_key": encode_key(self.config.public_key),
            "paths": paths,
            "tunnels": tunnels,
            "map": map_status,
            "session": {
                "far_gate": encode_key(self.far_key),
                "handshake_state": self._handshake_state,
                "last_handshake_age_s": None
                if last_handshake is None
                else round(now - last_handshake, 3),
                "rekeys": self._rekeys,
                "handshakes": self._handshakes,
            },
            "uplinks": uplink_rows,
            "counters": dict(self.counters),
        }


def path_qualities(paths: Sequence[Path]) -> list[PathQuality[Path]]:
    """What the schedulers are told of the sending paths: each path's measurements, its
    uplink (our end) and its remote address (one peer uplink: the other end)."""
    return [
        PathQuality(p, loss=p.loss or 0.0, rtt=p.rtt, local=p.uplink, remote=p.remote)
        for p in sorted(paths, key=lambda p: (p.uplink, p.remote))
    ]


def _redundancy(scheduler: ShardScheduler[Path]) -> dict[str, Any]:
    """A tunnel's code and whether it survives losing an uplink (`snapshot`)."""
    return {
        "k": scheduler.k,
        "n": scheduler.n,
        "effective_n": scheduler.effective_n,
        "spread": "survive_uplink_loss",
        "protected": scheduler.protected,
        "protection": scheduler.protection,
    }


def _log_parity_change(tunnel: str, change: ParityChange) -> None:
    fields = (tunnel, change.k, change.n, change.effective_n, change.uplinks, change.peer_addresses)
    if change.added:
        log.info("tunnel.parity_added tunnel=%s k=%d n=%d effective_n=%d uplinks=%d "
                 "peer_addresses=%d", *fields)  # fmt: skip
    else:
        log.info("tunnel.parity_restored tunnel=%s k=%d n=%d effective_n=%d uplinks=%d "
                 "peer_addresses=%d", *fields)  # fmt: skip


def install_event_loop_policy() -> str:
    """Use uvloop when installed (≈5× the datagram rate); say which loop runs."""
    if os.environ.get("WARP_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
