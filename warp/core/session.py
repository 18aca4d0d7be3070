"""`FarGateSession`: everything a gateway decides about one far gate, sans-I/O.

One per far gate inside a `GatewayCore`: the WireGuard peer's handshake bookkeeping (crossed
initiations, rekeys, unanswered handshakes), the paths to it (`PathProber`, superseded paths,
relay fallback), its tunnels' FEC engines and schedulers, and its own send queue with
back-pressure. A far gate that is down holds only its own queue and pauses only its own
gates: the others keep sending.

It owns no socket and reads no clock: the core passes ``now`` in and sends what the session
emits through `GatewayCore.emit` (or the map's relay, for the relay path).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from warp.config import FarGateConfig, TunGate, TunnelConfig, UnixGate
from warp.frames import FrameType
from warp.paths.capacity import TokenBucket
from warp.paths.natcheck import NatMapping
from warp.paths.path import Address, Path, PathState
from warp.paths.prober import (
    PathAdded,
    PathProber,
    PathRemoved,
    PathStateChanged,
    encode_probe,
    make_probe_reply,
)
from warp.paths.punch import (
    BirthdayProbe,
    BirthdaySettings,
    RelayReason,
    Role,
    encode_nat_info,
    parse_nat_info,
    plan_birthday,
    relay_reason,
)
from warp.paths.scheduler import (
    AdaptiveParity,
    ParityChange,
    PathQuality,
    ShardScheduler,
    data_shard_rate_within,
)
from warp.redundancy import (
    Emission,
    RejectReason,
    SendQueue,
    ShardDecoder,
    ShardEncoder,
    max_shard_payload,
    shard_tunnel_id,
)
from warp.unanswered import Unanswered
from warp.wireguard import Outgoing

if TYPE_CHECKING:
    from warp.core.gateway import GatewayCore

log = logging.getLogger("warp.core")

# Data and parity shards, and the retired shard type (the decoder counts and drops it).
_SHARD_TYPES = frozenset(
    (int(FrameType.DATA_SHARD), int(FrameType.PARITY_SHARD), int(FrameType.SHARD))
)
_PROBE = int(FrameType.PROBE)
_PROBE_REPLY = int(FrameType.PROBE_REPLY)
_NAT_INFO = int(FrameType.NAT_INFO)

#: Datagrams held while the tunnel cannot send (no session, no path, uplinks saturated).
SEND_QUEUE_LENGTH = 4096
#: Gates pause (back-pressure) while this many datagrams wait to be sent.
SEND_QUEUE_PAUSE = 1024
#: While the far gate cannot be sent to (no session, no path, held), expired datagrams are
#: swept from the queue at their deadline but at most this often: each sweep is O(queue), so a
#: gate's steady stream costs O(1) per datagram, not O(queue). (`SendQueue.pop` drops anything
#: past its deadline anyway: the sweep bounds memory and makes room.)
STALLED_SWEEP = 0.1
#: Gates with back-pressure pause while the pacers hold this many datagrams back (or one is
#: this close to its deadline), and resume once fewer than PACED_RESUME wait.
PACED_PAUSE = 16
PACED_PAUSE_BEFORE = 0.050
PACED_RESUME = 4
#: While held by full uplinks, the flush also re-checks this often (an uplink rebuilt or
#: removed under the hold reports no writability).
HOLD_RECHECK = 0.050
#: `shard.rejected` is logged at most this often per tunnel (with the count since the last).
REJECT_LOG_INTERVAL = 10.0
#: A flush seals this many queued datagrams, then hands them to the shell and continues on the
#: next turn (the shell reports uplinks that filled up meanwhile): 16 x (3, 5) shards of
#: 1400 B ≈ 42 KiB, well inside an uplink's write buffer limit.
FLUSH_BATCH = 16
#: After crossed initiations, the lower key re-initiates after this long (random, seconds):
#: past the responder's 20 ms initiation rate limit, well inside the 5 s retransmission.
COLLISION_RETRY_MIN = 0.030
COLLISION_RETRY_MAX = 0.080
#: A forced rekey waits this long after our previous initiation (responders, wireguard-go
#: included, drop initiations less than 20 ms apart).
REKEY_SPACING = 0.030
#: Relayed paths go through the map, one per (local uplink, far gate endpoint), under the pseudo
#: uplink name ``relay:<uplink>``: a shard leaves in a Relay sent from that uplink's map session
#: naming the far gate's endpoint (its uplink) the map delivers it to. So relayed shards are
#: spread over the uplinks at both ends as direct ones are, and a cut uplink costs only its share.
RELAY_PREFIX = "relay:"
#: No direct path active this long after the peer's endpoints are known (or after the last
#: direct path died): fall back to the map's relay for the data path (direct paths keep being
#: probed; traffic moves back as soon as one is active).
RELAY_FALLBACK_AFTER = 2.5
#: A burst towards a peer address never heard from starts with this long of low-TTL punches
#: (`interfaces.punch_ttl`): the first probe and the handshake initiation with it open our NAT
#: without reaching the peer's; from the second probe (50 ms) on, full TTL. The two sides learn
#: each other's address from the map within about one map round trip of each other, so each
#: has opened its NAT before the other's first full-TTL packet arrives.
LOW_TTL_WINDOW = 0.04
#: A handshake unanswered for this many initiations, the first at least UNANSWERED_AFTER
#: seconds ago, is logged as a WARNING naming the likely cause, once per episode.
UNANSWERED_TRIES = 3
UNANSWERED_AFTER = 10.0
#: A backup uplink takes the traffic once no primary path has been heard for this long (the
#: primaries are probed every PRIMARY_PROBE_INTERVAL while a backup uplink is up, so a live
#: one is heard several times in that span).
BACKUP_AFTER = 0.6
PRIMARY_PROBE_INTERVAL = 0.15
#: The map still refuses to say where the far gate is this long after the first refusal.
LOOKUP_REFUSED_WARN_AFTER = 20.0


def relay_path_uplink(uplink: str) -> str:
    """The pseudo uplink name of the relayed paths that leave from ``uplink``."""
    return RELAY_PREFIX + uplink


def relayed_over(name: str) -> str | None:
    """The uplink a relayed path's pseudo uplink ``name`` leaves from (None: a direct path)."""
    return name[len(RELAY_PREFIX) :] if name.startswith(RELAY_PREFIX) else None


def host_port(address: Address | None) -> str:
    """``host:port`` (``[v6]:port``) for logs: one word, as log fields split on spaces."""
    if address is None:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def has_back_pressure(tunnel: TunnelConfig) -> bool:
    """Whether pausing the tunnel's gate makes its application wait rather than queue.

    A Unix datagram socket's sender blocks in `send()` while warp does not read: real
    back-pressure. A UDP (loopback) or TUN sender never waits: its packets would pile up in a
    kernel queue and be read later, stale, with a fresh `send_deadline`. Those gates are never
    paused: their datagrams queue with the deadline running and are dropped at the queue."""
    return isinstance(tunnel.gate, UnixGate)


def ip_destination(packet: bytes) -> bytes:
    """The destination address of an IPv4/IPv6 packet (empty if it is neither)."""
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return packet[16:20]
    if version == 6 and len(packet) >= 40:
        return packet[24:40]
    return b""


def ip_source(packet: bytes) -> bytes:
    """The source address of an IPv4/IPv6 packet (empty if it is neither)."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        return packet[12:16]
    if version == 6 and len(packet) >= 40:
        return packet[8:24]
    return b""


def _quantize_loss(loss: float | None, *, fine: bool = False) -> int:
    """Loss in 5 % steps: finer changes do not move the shard shares enough to recompute.
    `fine` (a tunnel with adaptive parity): every step of the probe window (1/32), as a few
    percent more loss can take another parity shard."""
    if loss is None:
        return 0
    return round(loss * 64) if fine else round(loss * 20)


def _quantize_rtt(rtt: float | None) -> int:
    """RTT in ~25 % (log) steps above 1 ms; below that the scheduler sees no difference."""
    if rtt is None or rtt < 0.001:
        return 0
    return 1 + int(math.log(rtt * 1000, 1.25))


def _quantize_rate(rate: float | None) -> int:
    """An uplink rate in ~5 % (log) steps: finer changes do not move the shares enough."""
    if rate is None or rate <= 1.0:
        return -1
    return int(math.log(rate, 1.05))


def path_qualities(
    paths: Sequence[Path],
    uplink_rates: Mapping[str, float | None] | None = None,
    known_rates: Mapping[str, float | None] | None = None,
    uplink_of: Mapping[str, str] | None = None,
) -> list[PathQuality[Path]]:
    """What the schedulers are told of the sending paths: each path's measurements, its
    uplink (our end: an extra socket counts as its uplink, ``uplink_of``), its remote address
    (one peer uplink: the other end) and its part of its uplink's rates (`uplink_rates` to
    weigh its shards, `known_rates` for the rates status promises; the uplink's sending paths
    share them evenly)."""
    uplink_of = uplink_of or {}
    per_uplink: dict[str, int] = {}
    for p in paths:
        local = uplink_of.get(p.uplink, p.uplink)
        per_uplink[local] = per_uplink.get(local, 0) + 1

    def part(rates: Mapping[str, float | None] | None, path: Path) -> float | None:
        local = uplink_of.get(path.uplink, path.uplink)
        rate = None if rates is None else rates.get(local)
        return None if rate is None else rate / per_uplink[local]

    return [
        PathQuality(
            p,
            loss=p.loss or 0.0,
            rtt=p.rtt,
            local=uplink_of.get(p.uplink, p.uplink),
            remote=p.remote,
            rate=part(uplink_rates, p),
            known_rate=part(known_rates, p),
        )
        for p in sorted(paths, key=lambda p: (p.uplink, p.remote))
    ]


def _log_parity_change(tunnel: str, change: ParityChange) -> None:
    fields = (tunnel, change.k, change.n, change.effective_n, change.uplinks, change.peer_addresses)
    if change.loss is not None:
        log.info("tunnel.parity_adapted tunnel=%s from=%d to=%d loss=%.4f k=%d uplinks=%d "
                 "peer_addresses=%d", tunnel, change.previous_n, change.effective_n, change.loss,
                 change.k, change.uplinks, change.peer_addresses)  # fmt: skip
    elif change.added:
        log.info("tunnel.parity_added tunnel=%s k=%d n=%d effective_n=%d uplinks=%d "
                 "peer_addresses=%d", *fields)  # fmt: skip
    else:
        log.info("tunnel.parity_restored tunnel=%s k=%d n=%d effective_n=%d uplinks=%d "
                 "peer_addresses=%d", *fields)  # fmt: skip


@dataclass(slots=True, eq=False)
class Tunnel:
    """One tunnel towards one far gate: its FEC engines and scheduler. (A tun gate shared by
    several far gates has one `Tunnel` per far gate, all delivering to the one gate.)"""

    name: str
    far_gate: str
    config: TunnelConfig
    tunnel_id: int
    encoder: ShardEncoder
    decoder: ShardDecoder
    scheduler: ShardScheduler[Path]
    """Spreads each block over the paths (both ends balanced) and sets its shard count."""
    back_pressure: bool
    block_paths: tuple[Path, ...] = ()
    """The path of each slot of the block the encoder has open (its data shards go out as
    they are packed, its parity later)."""
    # `shard.rejected` log rate limit: when it was last logged, rejections since.
    reject_logged_at: float = -math.inf
    rejects_unlogged: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    """Drops decided by the session (e.g. ``source_not_allowed``), by reason."""
    #: application bytes sent and the wire bytes they took (status: application rates)
    app_bytes: int = 0
    wire_bytes: int = 0
    #: shards sent, and how many of them data shards (the rest parity)
    shards: int = 0
    data_shards: int = 0

    def app_rate_within(self, wire_rate: float) -> float | None:
        """Application bytes/s that stay within `wire_rate` wire bytes/s whatever the
        datagrams' timing (`data_shard_rate_within`: blocks closed early by the window cost
        full parity), at the bytes per shard measured so far; None before any was sent."""
        if not self.data_shards:
            return None
        shards = data_shard_rate_within(
            wire_rate * self.shards / self.wire_bytes,
            self.encoder.k,
            self.scheduler.effective_n - self.encoder.k,
            self.encoder.window,
        )
        return shards * self.app_bytes / self.data_shards

    def count_drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def reconfigure(self, config: TunnelConfig) -> None:
        """A reload changed the transport (same tunnel id and gate). Priority and
        send_deadline are read per datagram; a new (k, n) or mtu gets a new encoder that
        continues the old one's epoch and sequence (the far gate's decoder sees one stream)
        and a new scheduler (the open block's parity is not sent: that block goes without);
        the decoder decodes any (k, n) and is rebuilt only if its own settings changed (what
        it holds is then lost)."""
        old = self.config.transport
        new = config.transport
        self.config = config
        # (built as at start, so the new scheduler and decoder are set up as any other)
        fresh = Tunnel.make(self.name, self.far_gate, config)
        if (old.redundancy, old.mtu, old.spread) != (new.redundancy, new.mtu, new.spread):
            encoder = fresh.encoder
            self.encoder = ShardEncoder(
                self.tunnel_id,
                encoder.k,
                encoder.n,
                new.mtu,
                window=new.redundancy.window,
                epoch=self.encoder.epoch,
                initial_seq=self.encoder.next_seq,
                initial_datagram=self.encoder.next_datagram,
            )
            self.block_paths = ()
            self.scheduler = fresh.scheduler
        if (old.mtu, old.ordered, old.reorder_timeout) != (
            new.mtu,
            new.ordered,
            new.reorder_timeout,
        ):
            fresh.decoder.on_reject = self.decoder.on_reject
            self.decoder = fresh.decoder

    @classmethod
    def make(
        cls, name: str, far_gate: str, config: TunnelConfig, *, back_pressure: bool | None = None
    ) -> Tunnel:
        """``back_pressure``: None decides by the gate type (`has_back_pressure`)."""
        transport = config.transport
        k = transport.redundancy.required_shards
        n = transport.redundancy.num_shards
        return cls(
            name=name,
            far_gate=far_gate,
            config=config,
            tunnel_id=config.tunnel_id,
            encoder=ShardEncoder(
                config.tunnel_id, k, n, transport.mtu, window=transport.redundancy.window
            ),
            # Whatever (k, n) the peer's shards carry is decoded; the memory bound comes from
            # our configured (k, n) and mtu (docs/operations.md, Counters).
            decoder=ShardDecoder(
                config.tunnel_id,
                k,
                n,
                ordered=transport.ordered,
                reorder_timeout=transport.reorder_timeout,
                max_shard_size=max_shard_payload(transport.mtu),
            ),
            # The default spread, survive_uplink_loss: parity is added while the paths are too
            # few for (k, n) to survive losing an uplink at either end.
            scheduler=ShardScheduler(
                k,
                n,
                add_parity=True,
                spread=transport.spread,
                adaptive=AdaptiveParity(
                    transport.redundancy.min_parity,
                    transport.redundancy.max_parity,
                    transport.redundancy.target_loss,
                )
                if transport.redundancy.adaptive
                else None,
            ),
            back_pressure=has_back_pressure(config) if back_pressure is None else back_pressure,
        )


class FarGateSession:
    """One far gate of a `GatewayCore` (see the module docstring)."""

    def __init__(
        self, core: GatewayCore, name: str, config: FarGateConfig, tunnels: Sequence[Tunnel]
    ) -> None:
        self.core = core
        self.name = name
        self.config = config
        self.key = config.public_key
        # A plain WireGuard far gate (no warp): IP packets travel bare, exactly as WireGuard.
        self.plain_wireguard = config.kind == "wireguard"
        self.set_log_fields(several=len(core.config.far_gates) > 1)
        interfaces = core.config.interfaces
        self.prober = PathProber(
            interfaces.holepunch_keep_alive_interval,
            interfaces.path_timeout,
            core.rng,
            low_ttl_window=LOW_TTL_WINDOW if interfaces.punch_ttl else 0.0,
        )
        self.punch_ttl = interfaces.punch_ttl
        self.tunnels: dict[str, Tunnel] = {t.name: t for t in tunnels}
        self.tunnels_by_id: dict[int, Tunnel] = {t.tunnel_id: t for t in tunnels}
        # Cryptokey routing on receive, as WireGuard: a far gate with allowed_ips may only put
        # packets whose source address is its own into a tun gate (else one vehicle could
        # speak with another's address through a shared tun gate).
        self._source_checked: frozenset[str] = frozenset(
            t.name
            for t in tunnels
            if isinstance(t.config.gate, TunGate)
            and config.allowed_ips
            and not self.plain_wireguard
        )
        for tunnel in tunnels:
            tunnel.decoder.on_reject = functools.partial(self._on_shard_rejected, tunnel)
        self.send_queue = SendQueue(SEND_QUEUE_LENGTH)
        for tunnel in tunnels:
            if not tunnel.back_pressure:
                self.send_queue.clock_runs.add(tunnel.tunnel_id)
        # Per uplink: paced below what it carries (`PathProber.pacing_rate`; none: unpaced).
        self.pacers: dict[str, TokenBucket] = {}
        #: flushes that waited for a pacer (the uplinks carry less than is offered)
        self.paced_waits = 0
        # Tunnels whose packed datagrams or open block the next flush continues before it
        # waits for the pacers (`flush`), by tunnel id.
        self._filling: dict[int, Tunnel] = {}
        # Gates paused because the pacers hold the queue back (`_pause_when_paced_behind`).
        self.paced_pause = False
        self.static_endpoints: list[Address] = []
        self.peer_endpoints: tuple[Address, ...] = ()
        # What the schedulers were last told (`update_schedulers`): the sending paths and a
        # signature of their state and quality; None forces a recomputation.
        self._sending: list[Path] = []
        self._sending_signature: tuple[object, ...] | None = None
        #: tunnels whose gate this session asked to pause (`gate_datagram`, `_hold`)
        self.paused: set[str] = set()
        # Back-pressure (`_hold`): the send queue is parked (deadline clocks stopped for gates
        # with back-pressure).
        self.held = False
        self.holds = 0
        # Stalled queue (`_sweep_stale`): no sweep before this time (None: sweep now).
        self._sweep_at: float | None = None
        self._last_sweep = -math.inf
        # When the queue next needs the flush (None: not before an input asks for it).
        self.flush_at: float | None = None
        # Relay fallback (`check_relay`): the relay path is added once no direct path has been
        # active for RELAY_FALLBACK_AFTER since `_direct_lost_at`.
        self._direct_lost_at: float | None = None
        self._relay_due: float | None = None
        #: relayed paths wanted (the fallback was due, or the far gate relays to us); they stay
        #: once added, probed, ready for the next time no direct path is active
        self._relay_wanted = False
        self.relay_in_use = False
        self._relay_since: float | None = None
        # Why relayed (`relay_reason`), from our uplinks' NAT mappings and the far gate's
        # (its NAT_INFO frame: reflexive address -> mapping).
        self.peer_nat: dict[Address, NatMapping] = {}
        self.relay_reason: RelayReason | None = None
        self._nat_info_sent = False
        # Birthday probing (`_start_birthday`): at most one attempt per relay episode; the
        # hard side's extra sockets (the winner's stays while the uplink does).
        self.birthday: BirthdayProbe | None = None
        self._birthday_uplink = ""
        self._birthday_sockets: list[str] = []
        self._birthday_pending: tuple[str, Address] | None = None
        self._birthday_tried = False
        self._birthday_started_at = 0.0
        # Simultaneous initiation (both sides initiate at once, e.g. on the same map push):
        # each answers the other's initiation, which replaces its own initiator state, so both
        # responses are dropped. The side with the lower public key re-initiates shortly
        # after; the other stays responder (`on_response_sent`).
        self._initiating = False
        self.last_initiation: bytes | None = None
        self.last_initiation_at = -1.0
        self._reinitiate_at: float | None = None
        self._rekey_at: float | None = None
        self.collisions = 0
        self.handshake_state = "none"
        self.rekeys = 0
        self.handshakes = 0
        # Plain WireGuard: the uplink the peer was last heard on.
        self._plain_uplink: str | None = None
        # Loud misconfiguration: handshakes / lookups that keep getting no answer.
        self._unanswered = Unanswered(UNANSWERED_TRIES, UNANSWERED_AFTER)
        self.lookup_refused = Unanswered(1, LOOKUP_REFUSED_WARN_AFTER)

    # ------------------------------------------------------------------ live reload

    def set_log_fields(self, *, several: bool) -> None:
        """Log fields naming the far gate, only when there are several (a single far gate's
        lines stay as they were)."""
        self.tag = f"far_gate={self.name} " if several else ""
        self.suffix = f" far_gate={self.name}" if several else ""

    def add_tunnel(self, tunnel: Tunnel) -> None:
        """A tunnel added by a reload (its paths are this far gate's: no new handshake)."""
        self.tunnels[tunnel.name] = tunnel
        self.tunnels_by_id[tunnel.tunnel_id] = tunnel
        tunnel.decoder.on_reject = functools.partial(self._on_shard_rejected, tunnel)
        if not tunnel.back_pressure:
            self.send_queue.clock_runs.add(tunnel.tunnel_id)
        gate_is_tun = isinstance(tunnel.config.gate, TunGate)
        if gate_is_tun and self.config.allowed_ips and not self.plain_wireguard:
            self._source_checked = self._source_checked | {tunnel.name}
        self._sending_signature = None  # its scheduler must be told the paths

    def remove_tunnel(self, name: str) -> None:
        """A tunnel removed by a reload: what it still has queued is dropped at send time."""
        tunnel = self.tunnels.pop(name, None)
        if tunnel is None:
            return
        self.tunnels_by_id.pop(tunnel.tunnel_id, None)
        self._filling.pop(tunnel.tunnel_id, None)
        self.send_queue.clock_runs.discard(tunnel.tunnel_id)
        self._source_checked = self._source_checked - {name}
        self.paused.discard(name)

    def update_transport(self, name: str, config: TunnelConfig) -> None:
        """A reload changed a tunnel's transport: applied in place (`Tunnel.reconfigure`)."""
        tunnel = self.tunnels.get(name)
        if tunnel is not None:
            tunnel.reconfigure(config)
            self._sending_signature = None

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        deadline = self.prober.next_deadline()
        birthday = None if self.birthday is None else self.birthday.next_deadline()
        for t in (
            self.flush_at, self._relay_due, self._reinitiate_at, self._rekey_at, birthday
        ):  # fmt: skip
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        for tunnel in self.tunnels.values():
            t = tunnel.decoder.next_deadline()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
            t = tunnel.encoder.next_deadline()
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        return deadline

    def handle_timer(self, now: float) -> None:
        due = self.prober.next_deadline()
        if due is not None and due <= now:
            self._on_prober_timer(now)
        if self._relay_due is not None and self._relay_due <= now:
            self._relay_due = None
            self.check_relay(now)
        if self._reinitiate_at is not None and self._reinitiate_at <= now:
            self._reinitiate_at = None
            self._on_reinitiate(now)
        if self._rekey_at is not None and self._rekey_at <= now:
            self._rekey_at = None
            self.rekey(now)
        if self.birthday is not None:
            due = self.birthday.next_deadline()
            if due is not None and due <= now:
                self._birthday_tick(now)
        for tunnel in self.tunnels.values():
            due = tunnel.encoder.next_deadline()
            if due is not None and due <= now:
                # The block's window expired: its parity goes out over fewer data shards.
                failed = self._send_shards(tunnel, tunnel.encoder.close_due(now), now)
                if failed:
                    self.core.counters["send_failed"] += failed
                self.core.after_device(now)
            due = tunnel.decoder.next_deadline()
            if due is not None and due <= now:
                checked = tunnel.name in self._source_checked
                for datagram in tunnel.decoder.tick(now):
                    if checked and not self.core.source_allowed(self.key, datagram):
                        tunnel.count_drop("source_not_allowed")
                        continue
                    self.core.deliver(tunnel.name, datagram)
        if self.flush_at is not None and self.flush_at <= now:
            self.flush(now)

    def schedule_flush(self, now: float) -> None:
        self.flush_at = now

    # ------------------------------------------------------------------ handshakes

    @property
    def has_session(self) -> bool:
        peer = self.core.device.peer(self.key)
        return peer is not None and peer.has_session

    def ensure_session(self, now: float) -> None:
        peer = self.core.device.peer(self.key)
        if (
            peer is not None
            and not peer.has_session
            and not peer.handshake_in_progress
            and self.prober.paths
        ):
            self.core.device.initiate_handshake(self.key, now)
            self.core.after_device(now)

    def rekey(self, now: float) -> None:
        """Start a new handshake now (the session stays usable meanwhile). Not within 30 ms of
        our previous initiation: WireGuard responders drop initiations closer than 20 ms."""
        wait = self.last_initiation_at + REKEY_SPACING - now
        if wait > 0:
            self._rekey_at = now + wait
            return
        log.info("handshake.rekey_requested peer=far_gate%s", self.suffix)
        self.core.device.initiate_handshake(self.key, now, force=True)
        self.core.after_device(now)

    def on_response_sent(self, now: float) -> None:
        """We answered the far gate's initiation: if ours was pending, both crossed and both
        responses will be dropped. The side with the lower public key re-initiates after a
        short random delay (past the responder's 20 ms initiation rate limit); the other side
        only answers. Without this, nothing completes before the 5 s retransmission."""
        if not self._initiating:
            return
        self._initiating = False
        self.collisions += 1
        if self.core.public_key >= self.key:
            return
        delay = self.core.rng.uniform(COLLISION_RETRY_MIN, COLLISION_RETRY_MAX)
        self._reinitiate_at = now + delay
        log.info("handshake.collision peer=far_gate %sretry_ms=%d", self.tag,
                 round(delay * 1000))  # fmt: skip

    def _on_reinitiate(self, now: float) -> None:
        peer = self.core.device.peer(self.key)
        if peer is None or peer.has_session or self.core.stopping:
            return
        self.core.device.initiate_handshake(self.key, now, force=True)
        self.core.after_device(now)

    def send_initiation(self, out: Outgoing, now: float) -> None:
        self._initiating = True
        self.last_initiation_at = now
        self.last_initiation = out.data
        if self.handshake_state != "established":
            self.handshake_state = "initiating"
        targets = [(p.uplink, p.remote) for p in self.prober.paths]
        if not targets and out.destination is not None:
            targets = [(name, out.destination) for name in self.core.uplinks]
        for uplink, remote in targets:
            self.emit(uplink, remote, out.data, now)
        if targets:
            self._initiation_sent(now)

    def _initiation_sent(self, now: float) -> None:
        """One more handshake try: a WARNING once per episode when they keep going unanswered,
        naming the likely causes (cleared when a handshake completes)."""
        far = self._unanswered
        far.tried(now)
        if far.due(now) and far.since is not None:
            log.warning("far_gate.unanswered %shandshakes=%d for_s=%.1f paths=%d "
                        "likely: far gate not running/not registered, or wrong "
                        "far_gate.public_key", self.tag, far.count, now - far.since,
                        len(self.prober))  # fmt: skip

    def send_to_peer(self, out: Outgoing, now: float) -> None:
        """A transport/keepalive the WireGuard core emitted by itself (staged flush,
        keepalive timer)."""
        if self.plain_wireguard:
            uplink = self._plain_sending_uplink()
            if uplink is not None and out.destination is not None:
                self.emit(uplink, out.destination, out.data, now)
            return
        paths = self.sending_paths(now)
        if paths:
            self.emit(paths[0].uplink, paths[0].remote, out.data, now)

    def on_handshake_complete(
        self, initiator: bool, source: Address, uplink: str | None, now: float
    ) -> None:
        if self._unanswered.answered():
            log.info("far_gate.answered%s", self.suffix)
        self._initiating = False
        self.handshakes += 1
        if self.handshake_state == "established":
            self.rekeys += 1
        self.handshake_state = "established"
        if uplink is not None and not self.plain_wireguard and initiator:
            # The handshake response is an authenticated packet on this path. (Responder:
            # completion comes with the first transport packet, which `on_authenticated`
            # counts; counting it here too counted it twice. Plain WireGuard: no paths.)
            self.prober.on_authenticated(uplink, source, now)
        log.info("handshake.complete peer=far_gate %sinitiator=%s source=%s",
                 self.tag, initiator, host_port(source))  # fmt: skip
        self.schedule_flush(now)

    def on_handshake_failed(self) -> None:
        if self.handshake_state != "established":
            self.handshake_state = "none"

    def on_session_expired(self) -> None:
        self.handshake_state = "expired"

    # ------------------------------------------------------------------ wire → application

    def on_received(
        self, uplink: str, source: Address, plaintext: bytes, size: int, now: float
    ) -> None:
        """An authenticated packet from this far gate (``size``: its bytes on the wire)."""
        if self.plain_wireguard:
            if relayed_over(uplink) is None:
                self._plain_uplink = uplink
            if plaintext:
                for tunnel in self.tunnels.values():
                    if isinstance(tunnel.config.gate, TunGate):
                        self.core.deliver(tunnel.name, plaintext)
                        break
            return
        if self.birthday is not None and self.birthday.running:
            self._birthday_answered(uplink, source, now)
        path = self.prober.on_authenticated(uplink, source, now, size)
        if path is not None and path.state_since == now:
            # A path just learned or just active: log it and reschedule now.
            self.after_prober(now)
        if not plaintext:
            return  # keepalive
        kind = plaintext[0]
        if kind in _SHARD_TYPES:
            self.on_shard(plaintext, now)
        elif kind == _PROBE:
            # With the path's receive report: the far gate's capacity estimate of it.
            received = None if path is None else (path.rx_bytes, path.rx_packets)
            reply = make_probe_reply(plaintext, received)
            if reply is not None:
                self._seal_and_send(reply, uplink, source, now)
        elif kind == _PROBE_REPLY:
            self.prober.on_probe_reply(plaintext, uplink, source, now)
            self.after_prober(now)
        elif kind == _NAT_INFO:
            self.on_nat_info(plaintext, now)
        else:
            self.core.counters["unknown_frame"] += 1

    def on_shard(self, frame: bytes, now: float) -> None:
        tunnel = self.tunnels_by_id.get(shard_tunnel_id(frame) or -1)
        if tunnel is None:
            self.core.counters["unknown_tunnel"] += 1
            return
        checked = tunnel.name in self._source_checked
        for datagram in tunnel.decoder.receive(frame, now):
            if checked and not self.core.source_allowed(self.key, datagram):
                tunnel.count_drop("source_not_allowed")
                continue
            self.core.deliver(tunnel.name, datagram)

    def _on_shard_rejected(self, tunnel: Tunnel, reason: RejectReason) -> None:
        tunnel.rejects_unlogged += 1
        now = self.core.now
        if now - tunnel.reject_logged_at >= REJECT_LOG_INTERVAL:
            log.warning("shard.rejected tunnel=%s %sreason=%s count=%d", tunnel.name,
                        self.tag, reason, tunnel.rejects_unlogged)  # fmt: skip
            tunnel.reject_logged_at = now
            tunnel.rejects_unlogged = 0

    def _seal_and_send(self, plaintext: bytes, uplink: str, remote: Address, now: float) -> bool:
        wire = self.core.device.seal(self.key, plaintext, now)
        if wire is None:
            self.core.after_device(now)
            return False
        return self.emit(uplink, remote, wire, now)

    def emit(self, uplink: str, remote: Address, data: bytes, now: float) -> bool:
        """Send towards this far gate: through the map for a relayed path, else from an
        uplink (path counters for transport messages on a known path)."""
        via = relayed_over(uplink)
        if via is not None:
            if not self.core.relay(self.key, data, now, via, remote):
                return False
        else:
            path = self.prober.get(uplink, remote)
            ttl = self.punch_ttl if path is not None and path.low_ttl(now) else None
            if not self.core.emit(uplink, remote, data, ttl=ttl):
                return False
        if data[0] == 4:  # a transport message
            self.prober.record_tx(uplink, remote, len(data))
        return True

    # ------------------------------------------------------------------ uplinks and map

    def uplink_up(self, name: str, now: float) -> None:
        """An uplink was added or changed: try the far gate's known addresses from it."""
        self._watch_primaries()
        far = self.core.device.peer(self.key)
        if (
            far is not None
            and not far.has_session
            and far.handshake_in_progress
            and len(self.core.uplinks) == 1
        ):
            # The pending initiation (packets are staged) had no uplink to go out on: send a
            # fresh one now rather than at the 5 s retransmission.
            self.core.device.initiate_handshake(self.key, now, force=True)
            self.core.after_device(now)
        if not self.plain_wireguard:
            for endpoint in self.static_endpoints:
                self.prober.add_candidate(name, endpoint, "static", now)
            for endpoint in self.peer_endpoints:
                self.prober.add_candidate(name, endpoint, "map", now)
        self.ensure_session(now)

    def uplink_removed(self, name: str, now: float) -> None:
        self.prober.remove_uplink(name)
        self.prober.remove_uplink(relay_path_uplink(name))
        self._watch_primaries()
        self.after_prober(now)

    def _watch_primaries(self) -> None:
        """While a backup uplink is up, the primaries are probed often enough to tell within
        BACKUP_AFTER that none answers."""
        policy = self.core.usage.policy
        tiers = {name: policy(name).tier for name in self.core.uplinks}
        watched = frozenset(n for n, t in tiers.items() if t == "primary")
        self.prober.fast_uplinks = watched if "backup" in tiers.values() else frozenset()
        self.prober.fast_interval = min(PRIMARY_PROBE_INTERVAL, self.prober.keepalive_interval)

    def map_endpoints_changed(
        self, endpoints: tuple[Address, ...], pushed: bool, now: float
    ) -> None:
        self.peer_endpoints = endpoints
        text = ",".join(f"{h}:{p}" for h, p in endpoints)
        log.info("map.peer_endpoints %sendpoints=%s pushed=%s", self.tag, text, pushed)
        if endpoints and self.lookup_refused.answered():
            log.info("far_gate.found %sendpoints=%s", self.tag, text)
        # Remotes the map no longer lists (a restarted peer's old NAT ports) are forgotten
        # once dead (`PathProber.forget_after`).
        self.prober.map_endpoints_changed(endpoints)
        if not self.plain_wireguard:
            for name in self.core.uplinks:
                for endpoint in endpoints:
                    self.prober.add_candidate(name, endpoint, "map", now)
        self.ensure_session(now)
        self.after_prober(now)

    def on_lookup_refused(self, code: object, message: str, now: float) -> None:
        # Normal at start (the far gate is not up yet): a WARNING only if it lasts.
        log.info("map.lookup_refused %scode=%s %s", self.tag, code, message)
        if self.lookup_refused.since is None:
            self.lookup_refused.tried(now)

    def check_lookup_refused(self, now: float) -> None:
        refused = self.lookup_refused
        if refused.due(now) and refused.since is not None:
            log.warning("far_gate.unanswered %smap_lookup=refused for_s=%.1f likely: "
                        "far gate not running/not registered, or wrong far_gate.public_key",
                        self.tag, now - refused.since)  # fmt: skip

    # ------------------------------------------------------------------ paths

    def sending_paths(self, now: float) -> list[Path]:
        """Paths to put shards on: the active direct ones, else the active relayed ones, else
        (nothing proven yet) the probing direct ones. Of several active paths from one uplink
        to one remote host, one a NAT rebinding replaced is left out
        (`PathProber.drop_superseded`)."""
        direct: list[Path] = []
        backup: list[Path] = []
        relay: list[Path] = []
        probing: list[Path] = []
        usage = self.core.usage
        exhausted = usage.exhausted
        for path in self.prober.paths:
            state = path.state
            if path.uplink.startswith(RELAY_PREFIX):
                if state is PathState.ACTIVE:
                    relay.append(path)
            elif path.uplink in exhausted:
                continue  # its data budget ran out: probes only
            elif state is PathState.ACTIVE:
                if usage.policy(path.uplink).tier == "backup":
                    backup.append(path)
                else:
                    direct.append(path)
            elif state is PathState.PROBING:
                probing.append(path)
        if direct and backup:
            # Backups carry only probes while a primary path is heard from.
            heard = max(p.last_authenticated or -math.inf for p in direct)
            if now - heard > BACKUP_AFTER:
                direct = []
        direct = direct or backup
        if direct:
            if len(direct) == 1:
                return direct
            return self.prober.drop_superseded(direct, now)
        return relay or probing

    def update_schedulers(self, now: float) -> list[Path]:
        """The sending paths. The tunnels' schedulers spread each block over them, both ends
        balanced, and add parity while they cannot survive losing an uplink. The schedulers
        precompute a cycle of assignments, so they are updated only when the set, state or
        quality of the sending paths changed."""
        paths = self.sending_paths(now)
        relayed = bool(paths) and paths[0].uplink.startswith(RELAY_PREFIX)
        if relayed != self.relay_in_use:
            self._on_relay_use(relayed, now)
        # A tunnel with adaptive parity: its scheduler hears of every loss step.
        fine = any(t.scheduler.adaptive is not None for t in self.tunnels.values())
        rates = {p.uplink: self.prober.share_rate(p.uplink, now) for p in paths}
        signature = (
            tuple(
                (id(p), p.state, _quantize_loss(p.loss, fine=fine), _quantize_rtt(p.rtt))
                for p in paths
            ),
            tuple((uplink, _quantize_rate(rate)) for uplink, rate in rates.items()),
        )
        if signature != self._sending_signature:
            self._sending_signature = signature
            self._sending = paths
            known = {uplink: self.prober.known_rate(uplink) for uplink in rates}
            qualities = path_qualities(paths, rates, known, self.core.extra_sockets)
            for tunnel in self.tunnels.values():
                change = tunnel.scheduler.update(qualities)
                if change is not None:
                    _log_parity_change(tunnel.name, change)
        return self._sending

    def _on_prober_timer(self, now: float) -> None:
        probes = self.prober.tick(now)
        has_session = self.has_session
        for uplink, remote, frame in probes:
            if (relayed_over(uplink) or uplink) not in self.core.uplinks:
                continue
            if has_session:
                self._seal_and_send(frame, uplink, remote, now)
            elif self.last_initiation is not None:
                # No session yet: the probe schedule re-sends the pending initiation, so both
                # NATs see outbound traffic during the burst (simultaneous open).
                self.emit(uplink, remote, self.last_initiation, now)
        if not has_session:
            self.ensure_session(now)
        self.after_prober(now)

    def after_prober(self, now: float) -> None:
        for event in self.prober.pop_events():
            if isinstance(event, PathStateChanged):
                path = event.path
                level = logging.WARNING if event.new is PathState.DEAD else logging.INFO
                log.log(level, "%s %suplink=%s remote=%s rtt_ms=%s", event.name,
                        self.tag, path.uplink, host_port(path.remote), _ms(path.rtt))  # fmt: skip
                if event.new is PathState.ACTIVE:
                    self.schedule_flush(now)
            elif isinstance(event, PathAdded):
                log.info("%s %suplink=%s remote=%s source=%s", event.name, self.tag,
                         event.path.uplink, host_port(event.path.remote),
                         event.path.source)  # fmt: skip
            elif isinstance(event, PathRemoved):
                log.info("%s %suplink=%s remote=%s reason=%s", event.name, self.tag,
                         event.path.uplink, host_port(event.path.remote),
                         event.reason)  # fmt: skip
        self.check_relay(now)

    # ------------------------------------------------------------------ relay

    def check_relay(self, now: float) -> None:
        """Fall back to the map's relay once no direct path has been active for
        RELAY_FALLBACK_AFTER (since the peer's endpoints became known, or since the last direct
        path died): a relayed path is added from each uplink to each of the far gate's
        endpoints (probed like any path; they carry data only while no direct path is active,
        `sending_paths`). While no direct path is active, uplinks and endpoints that appear
        get theirs."""
        if self.core.map_client is None or self.core.map_address is None or self.plain_wireguard:
            return
        if any(
            p.state is PathState.ACTIVE and not p.uplink.startswith(RELAY_PREFIX)
            for p in self.prober.paths
        ):
            self._direct_lost_at = None
            self._relay_due = None
            return
        if self._direct_lost_at is None:
            if not self.peer_endpoints and not self.static_endpoints:
                return  # nothing to try yet: the peer is not there
            self._direct_lost_at = now
        if not self._relay_wanted:
            due = self._direct_lost_at + RELAY_FALLBACK_AFTER
            if now < due:
                self._relay_due = due
                return
            log.info("relay.fallback %sreason=no_direct_path after_s=%.3f", self.tag,
                     now - self._direct_lost_at)  # fmt: skip
            self._relay_wanted = True
        if self._add_relay_paths(now):
            self.ensure_session(now)
            self.after_prober(now)

    def _add_relay_paths(self, now: float) -> int:
        """Add the relayed paths missing: each uplink to each far gate endpoint the map lists
        (to the map's address, standing for "wherever the map delivers", while it lists
        none). Returns how many were added."""
        map_address = self.core.map_address
        remotes = self.peer_endpoints or ((map_address,) if map_address is not None else ())
        added = 0
        for uplink in self.core.uplinks:
            name = relay_path_uplink(uplink)
            for remote in remotes:
                if self.prober.get(name, remote) is None:
                    added += self.prober.add_candidate(name, remote, "relay", now) is not None
        return added

    def _on_relay_use(self, relayed: bool, now: float) -> None:
        """The data path moved onto the relay, or back to a direct path."""
        self.relay_in_use = relayed
        self._nat_info_sent = False
        self._birthday_tried = False
        if not relayed:
            self._stop_birthday("direct", now)
        if relayed:
            self._relay_since = now
            paths = [p for p in self.prober.active_paths() if p.uplink.startswith(RELAY_PREFIX)]
            log.warning("path.relay.active %sremote=%s paths=%d", self.tag,
                        host_port(self.core.map_address), len(paths))  # fmt: skip
            self.send_nat_info(now)
        else:
            since, self._relay_since = self._relay_since, None
            paths = [p for p in self.prober.active_paths() if not p.uplink.startswith(RELAY_PREFIX)]
            log.info("relay.direct_restored %srelayed_s=%s paths=%d", self.tag,
                     "-" if since is None else round(now - since, 3), len(paths))  # fmt: skip
        self.update_relay_reason()

    # ------------------------------------------------------------------ NAT info

    def send_nat_info(self, now: float) -> None:
        """Tell the far gate our uplinks' reflexive addresses and NAT mappings (while relayed:
        both sides can then say why, `relay_reason`)."""
        paths = self.sending_paths(now)
        entries = self.core.nat_mapping.reflexive_mappings()
        if not paths or not entries or not self.has_session:
            return
        self._nat_info_sent = True
        self._seal_and_send(encode_nat_info(entries), paths[0].uplink, paths[0].remote, now)
        self.update_relay_reason()

    def on_nat_info(self, frame: bytes, now: float) -> None:
        entries = parse_nat_info(frame)
        if entries is None:
            self.core.counters["bad_nat_info"] = self.core.counters.get("bad_nat_info", 0) + 1
            return
        self.peer_nat = entries
        if self.relay_in_use and not self._nat_info_sent:
            self.send_nat_info(now)  # (the far gate learns ours too, even if it spoke first)
        self.update_relay_reason()

    def update_relay_reason(self) -> None:
        """While relayed: why no direct path (logged as ``relay.reason`` when it changes)."""
        reason: RelayReason | None = None
        if self.relay_in_use:
            local = [m for _, m in self.core.nat_mapping.reflexive_mappings()]
            reason = relay_reason(local, list(self.peer_nat.values()))
        if reason == "birthday_needed" and not self._birthday_tried:
            self._start_birthday(self.core.now)
        if reason != self.relay_reason:
            self.relay_reason = reason
            if reason is not None:
                peer = ",".join(f"{host_port(a)}@{m}" for a, m in sorted(self.peer_nat.items()))
                log.info("relay.reason %sreason=%s peer_nat=%s", self.tag, reason,
                         peer or "-")  # fmt: skip

    # ------------------------------------------------------------------ birthday probing

    def _start_birthday(self, now: float) -> None:
        """Relayed between a cone and a symmetric NAT: one bounded birthday attempt. Both
        sides pick the same pair of uplinks, the one whose (cone side's reflexive address,
        symmetric side's reflexive address) sorts first (`warp/paths/punch.py`)."""
        self._birthday_tried = True
        # A socket kept by an earlier attempt's success: relayed again, its path is gone.
        self.core.close_extra_sockets(self._birthday_sockets)
        self._birthday_sockets = []
        if not self.core.config.interfaces.birthday_probing:
            log.info("punch.birthday_skipped %sreason=disabled", self.tag)
            return
        pairs: list[tuple[tuple[Address, Address], Role, str, Address]] = []
        for uplink, reflexive, mine in self.core.nat_mapping.uplink_mappings():
            if uplink not in self.core.uplinks:
                continue
            for peer, theirs in self.peer_nat.items():
                plan = plan_birthday(mine, theirs, enabled=True).role
                if plan is not None:
                    key = (reflexive, peer) if plan == "easy" else (peer, reflexive)
                    pairs.append((key, plan, uplink, peer))
        if not pairs:
            return
        _, role, uplink, peer = min(pairs)
        if role == "easy":
            self._run_birthday(BirthdayProbe("easy", peer, now, self.core.rng), uplink)
        else:
            self._birthday_sockets = self.core.open_extra_sockets(uplink, BirthdaySettings().ports)
            if self._birthday_sockets:
                self._birthday_pending = (uplink, peer)
            else:
                log.info("punch.birthday_skipped %sreason=sockets_busy", self.tag)

    def extra_sockets_opened(self, opened: frozenset[str], now: float) -> None:
        pending = self._birthday_pending
        if pending is None or not opened.intersection(self._birthday_sockets):
            return
        self._birthday_pending = None
        # (a socket the shell could not open is left out: the attempt uses the others)
        self._birthday_sockets = [n for n in self._birthday_sockets if n in opened]
        uplink, peer = pending
        settings = dataclasses.replace(BirthdaySettings(), ports=len(self._birthday_sockets))
        self._run_birthday(BirthdayProbe("hard", peer, now, self.core.rng, settings), uplink)

    def _run_birthday(self, attempt: BirthdayProbe, uplink: str) -> None:
        self.birthday = attempt
        self._birthday_uplink = uplink
        self._birthday_started_at = attempt.started
        log.info("punch.birthday_started %srole=%s uplink=%s peer=%s", self.tag, attempt.role,
                 uplink, host_port(attempt.peer))  # fmt: skip
        self._birthday_tick(attempt.started)

    def _birthday_tick(self, now: float) -> None:
        attempt = self.birthday
        if attempt is None:
            return
        # The hard side's probes only need to open its own NAT (the cone side's filter drops
        # them): low TTL, so a cone router without a firewall does not pin its port on them.
        ttl = (self.punch_ttl or None) if attempt.role == "hard" else None
        for probe in attempt.tick(now):
            uplink = (
                self._birthday_uplink if probe.socket is None
                else self._birthday_sockets[probe.socket]
            )  # fmt: skip
            wire = self.core.device.seal(self.key, encode_probe(0, now), now)
            if wire is not None:
                self.core.emit(uplink, probe.remote, wire, ttl=ttl)
        if attempt.state == "exhausted":
            self._stop_birthday("exhausted", now)

    def _birthday_answered(self, uplink: str, source: Address, now: float) -> None:
        attempt = self.birthday
        if attempt is None:
            return
        if attempt.role == "hard":
            if uplink not in self._birthday_sockets:
                return
            socket: int | None = self._birthday_sockets.index(uplink)
        elif uplink == self._birthday_uplink:
            socket = None
        else:
            return
        if attempt.answered(socket, source, now):
            log.info("punch.birthday_succeeded %srole=%s uplink=%s remote=%s probes=%d "
                     "after_s=%.3f", self.tag, attempt.role, uplink, host_port(source),
                     attempt.sent, now - self._birthday_started_at)  # fmt: skip
            self._stop_birthday("succeeded", now)

    def _stop_birthday(self, why: str, now: float) -> None:
        """The attempt ends: the hard side closes its extra sockets but the winner's."""
        if self.birthday is None and self._birthday_pending is None:
            return  # (none running; a winner's socket stays)
        attempt, self.birthday = self.birthday, None
        self._birthday_pending = None
        keep = None
        if attempt is not None and attempt.winner is not None and attempt.role == "hard":
            index = attempt.winner.socket
            keep = None if index is None else self._birthday_sockets[index]
        self.core.close_extra_sockets([n for n in self._birthday_sockets if n != keep])
        self._birthday_sockets = [keep] if keep is not None else []
        if attempt is not None and why == "exhausted":
            log.info("punch.birthday_exhausted %srole=%s probes=%d", self.tag, attempt.role,
                     attempt.sent)  # fmt: skip

    def on_relayed(self, uplink: str, source: Address, now: float) -> None:
        """The far gate sent us a WireGuard message through the map's relay, from its endpoint
        ``source``, and it arrived on ``uplink``: make sure that relayed path exists (replies
        go back on it), and the others (the far gate relays: so do we)."""
        name = relay_path_uplink(uplink)
        if self.prober.get(name, source) is None:
            if not self._relay_wanted:
                log.info("relay.fallback %sreason=peer_relays", self.tag)
                self._relay_wanted = True
            self.prober.add_candidate(name, source, "relay", now)
            self._add_relay_paths(now)

    # ------------------------------------------------------------------ application → wire

    def _plain_sending_uplink(self) -> str | None:
        """Plain WireGuard: the uplink the peer was last heard on, else the first one."""
        uplink = self._plain_uplink
        if uplink is not None and uplink in self.core.uplinks:
            return uplink
        return next(iter(self.core.uplinks), None)

    def gate_datagram(self, tunnel: Tunnel, payload: bytes, now: float) -> bool:
        """A datagram from the tunnel's gate. False: pause that gate (back-pressure)."""
        device = self.core.device
        if self.plain_wireguard:
            # As WireGuard: only packets whose destination is in the peer's AllowedIPs go.
            if device.route(ip_destination(payload)) != self.key:
                # Not a tunnel drop: the tun's own link-local chatter (router solicitations,
                # MLD) always lands here, as in WireGuard ("no route to host").
                self.core.counters["no_route"] += 1
                return True
            wire = device.seal(self.key, payload, now)
            peer = device.peer(self.key)
            uplink = self._plain_sending_uplink()
            if wire is not None and uplink is not None and peer is not None and peer.endpoint:
                self.emit(uplink, peer.endpoint, wire, now)
            self.core.after_device(now)
            return True
        transport = tunnel.config.transport
        queue = self.send_queue
        if self.held and tunnel.back_pressure:
            # Taken with the gate already asked to pause: parked, the gate stops now.
            queue.push(tunnel.tunnel_id, payload, now, transport.send_deadline, transport.priority)
            self.paused.add(tunnel.name)
            return False
        deadline = transport.send_deadline
        queue.push(tunnel.tunnel_id, payload, now, deadline, transport.priority)
        sweep_at = self._sweep_at
        if sweep_at is not None and now + deadline < sweep_at:
            # (Only a tunnel with a shorter send_deadline can move the next sweep earlier.)
            self._sweep_at = max(now + deadline, self._last_sweep + STALLED_SWEEP)
        self.flush_at = now
        if tunnel.back_pressure and len(queue) >= SEND_QUEUE_PAUSE:
            self.paused.add(tunnel.name)
            return False
        return True

    def flush(self, now: float) -> None:
        """Send queued datagrams: encode, schedule shards over paths, seal, emit. At most
        FLUSH_BATCH datagrams per call: with more queued, `flush_at` stays due."""
        self.flush_at = None
        queue = self.send_queue
        if not self.has_session:
            self._release(now)
            if len(queue):
                self.core.counters["no_session"] += self._sweep_stale(now)
                self.ensure_session(now)
            self._resume_gates()
            self.flush_at = self._sweep_at if len(queue) else None
            return
        paths = self.update_schedulers(now)
        uplinks = self.core.uplinks
        if not paths or not uplinks:
            self._release(now)
            if len(queue):
                self.core.counters["no_path"] += self._sweep_stale(now)
            self._resume_gates()
            self.flush_at = self._sweep_at if len(queue) else None
            return
        sending = {relayed_over(p.uplink) or p.uplink for p in paths}
        sending &= uplinks.keys()
        if not all(uplinks[name] for name in sending):
            self._hold(now)
            if len(queue):
                # Datagrams of gates without back-pressure, queued during the hold.
                self._sweep_stale(now)
            self.flush_at = now + HOLD_RECHECK
            return
        self._release(now)
        self._sweep_at = None
        pacers = self._pace(paths, now)
        tunnels = self.tunnels_by_id
        send_failed = 0
        # Tunnels with datagrams packed but not yet in a data shard (the batch ends with
        # their shard going out, unless the pacers hold the queue back) or a block open.
        pushed, self._filling = self._filling, {}
        paced = False
        for _ in range(FLUSH_BATCH):
            if pacers:
                ready = max(pacer.ready_at(now) for pacer in pacers)
                # The pacers wait between blocks, not inside one: a block left open while
                # they hold the rest back would be closed by its window with fewer than k
                # data shards and the full parity (more wire bytes per datagram just when
                # the uplinks are full). A block overdraws the pacers by at most n shards.
                if ready > now and not any(t.encoder.block_open for t in pushed.values()):
                    # The uplinks carry less than is offered: the rest waits in the queue
                    # (dropped there by deadline and priority, gates with back-pressure
                    # paused), never in a modem's queue.
                    self.paced_waits += 1
                    self.flush_at = ready
                    self._pause_when_paced_behind(now)
                    paced = True
                    break
            item = queue.pop(now)
            if item is None:
                break
            tunnel = tunnels.get(item.tunnel_id)
            if tunnel is None:  # queued before a reload removed its tunnel
                self.core.counters["tunnel_removed"] += 1
                continue
            pushed[item.tunnel_id] = tunnel
            tunnel.app_bytes += len(item.datagram)
            # The scheduler's shard count for blocks opened now: more than n while parity
            # is added, or as adaptive parity chose.
            frames = tunnel.encoder.push(item.datagram, now, tunnel.scheduler.effective_n)
            if frames:
                send_failed += self._send_shards(tunnel, frames, now)
        else:
            if len(queue):
                self.flush_at = now  # more next turn, once the shell sent these
        if paced:
            # What is packed waits with the queue and leads the next block (sent now, its
            # shard would open a block that the window closes while the pacers wait).
            self._filling = pushed
        else:
            for tunnel in pushed.values():
                # End of the batch: what is packed goes out now (packing adds no delay).
                send_failed += self._send_shards(tunnel, tunnel.encoder.flush(now), now)
            if self.flush_at == now:
                # Cut off by FLUSH_BATCH: the blocks left open fill first on the next turn.
                self._filling = {i: t for i, t in pushed.items() if t.encoder.block_open}
        if send_failed:
            self.core.counters["send_failed"] += send_failed
        self.core.after_device(now)
        if self.flush_at is None:
            self._resume_gates()
            self.flush_at = queue.next_expiry()

    def _send_shards(self, tunnel: Tunnel, frames: list[Emission], now: float) -> int:
        """Seal and send a tunnel's shard frames, each on the path the scheduler gave its
        slot when its block opened (slot 0). Returns how many could not be sent."""
        if not frames:
            return 0
        uplinks = self.core.uplinks
        emit = self.core.emit
        failed = 0
        sealed = self.core.device.seal_many(self.key, [frame for _, frame in frames], now)
        for (slot, _), wire in zip(frames, sealed, strict=True):
            if slot == 0:
                tunnel.block_paths = tunnel.scheduler.assign()
            paths = tunnel.block_paths
            if wire is None or slot >= len(paths):
                failed += 1
                continue
            path = paths[slot]
            uplink = path.uplink
            if uplink in uplinks or uplink in self.core.extra_sockets:
                sent = emit(uplink, path.remote, wire)
                pacer = self.pacers.get(uplink)
                if pacer is not None:
                    pacer.consume(len(wire), now)
            else:
                via = relayed_over(uplink)
                sent = via is not None and self.core.relay(self.key, wire, now, via, path.remote)
            if sent:
                path.tx_packets += 1
                path.tx_bytes += len(wire)
                tunnel.wire_bytes += len(wire)
                tunnel.shards += 1
                if slot < tunnel.encoder.k:
                    tunnel.data_shards += 1
            else:
                failed += 1
        return failed

    def _pace(self, paths: Sequence[Path], now: float) -> list[TokenBucket]:
        """Set each sending uplink's pacer to its pacing rate; returns the pacers of uplinks
        the schedulers give shards to (what a block waits for)."""
        rates = {p.uplink: self.prober.pacing_rate(p.uplink, now) for p in paths}
        pacers = self.pacers
        for uplink in [u for u in pacers if rates.get(u) is None]:
            del pacers[uplink]
        used: set[str] = set()
        for tunnel in self.tunnels.values():
            used.update(p.uplink for p, share in tunnel.scheduler.shares.items() if share > 0)
        waits_for: list[TokenBucket] = []
        for uplink, rate in rates.items():
            if rate is None:
                continue
            pacer = pacers.get(uplink)
            if pacer is None:
                pacer = pacers[uplink] = TokenBucket(rate, now)
            elif pacer.rate != rate:
                pacer.set_rate(rate, now)
            if uplink in used:
                waits_for.append(pacer)
        return waits_for

    def _pause_when_paced_behind(self, now: float) -> None:
        """The pacers hold the queue back: once PACED_PAUSE datagrams wait, or one is within
        PACED_PAUSE_BEFORE of its deadline, gates with back-pressure pause (their
        applications wait instead of losing datagrams at the deadline) until the queue is
        down to PACED_RESUME."""
        queue = self.send_queue
        expiry = queue.next_expiry()
        if len(queue) < PACED_PAUSE and (expiry is None or expiry - now > PACED_PAUSE_BEFORE):
            return
        self.paced_pause = True
        for tunnel in self.tunnels.values():
            if tunnel.back_pressure and tunnel.name not in self.paused:
                self.paused.add(tunnel.name)
                self.core.gate_flow(tunnel.name, paused=True)

    def _resume_gates(self) -> None:
        """The one place paused gates resume: as soon as the reasons for a pause are gone (no
        hold, the queue below SEND_QUEUE_PAUSE, or PACED_RESUME after a pause for the
        pacers), whichever way the flush went."""
        if self.paced_pause:
            if len(self.send_queue) >= PACED_RESUME:
                return
            self.paced_pause = False
        if self.paused and not self.held and len(self.send_queue) < SEND_QUEUE_PAUSE:
            paused, self.paused = self.paused, set()
            for tunnel in paused:
                self.core.gate_flow(tunnel, paused=False)

    def _sweep_stale(self, now: float) -> int:
        """While the queue cannot drain: drop what is past its deadline, at the next expiry but
        at most every STALLED_SWEEP. Returns how many were dropped; `_sweep_at` is when to
        sweep next."""
        queue = self.send_queue
        if self._sweep_at is not None and now < self._sweep_at:
            return 0
        dropped = queue.drop_expired(now)
        self._last_sweep = now
        expiry = queue.next_expiry()
        self._sweep_at = None if expiry is None else max(expiry, now + STALLED_SWEEP)
        return dropped

    def _hold(self, now: float) -> None:
        """Back-pressure on: pause this far gate's gates with back-pressure and park what is
        queued (their deadline clock stopped: the application waits, not warp). Datagrams of
        gates without back-pressure keep their deadline running (`SendQueue.clock_runs`)."""
        if not self.held:
            self.held = True
            self.holds += 1
        self.send_queue.park(now)
        for tunnel in self.tunnels.values():
            if tunnel.back_pressure and tunnel.name not in self.paused:
                self.paused.add(tunnel.name)
                self.core.gate_flow(tunnel.name, paused=True)

    def _release(self, now: float) -> None:
        """Back-pressure off: the parked datagrams go back to the queue, with their budget."""
        if not self.held:
            return
        self.held = False
        self.send_queue.restore(now)
        self._sweep_at = None

    def uplink_writable(self, now: float) -> None:
        if self.held:
            self.flush_at = now

    # ------------------------------------------------------------------ status

    def status(self, now: float) -> dict[str, Any]:
        """The far gate's row of the snapshot (`warp status --json` ``far_gates``)."""
        peer = self.core.device.peer(self.key)
        last = peer.last_handshake_time if peer is not None else None
        return {
            "handshake_state": self.handshake_state,
            "last_handshake_age_s": None if last is None else round(now - last, 3),
            "rekeys": self.rekeys,
            "handshakes": self.handshakes,
        }
