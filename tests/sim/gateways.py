"""Whole gateways in :mod:`tests.sim.simnet`: each a :class:`~warp.core.GatewayCore` built from a
configuration as users write it, driven as the asyncio shell (``warp/node.py``) drives it,
with applications that send numbered datagrams into its tunnels and check what comes out.

:class:`Fleet` builds the usual world: the map on a public address, gateways with one or more
uplinks, each behind its own NAT (or public), and per-tunnel traffic whose delivery is
recorded per datagram (first arrival time, duplicates, corruption).
"""

from __future__ import annotations

import itertools
import math
import random
import struct
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests.sim.hosts import PUBLIC, SECONDARY, MapHost, map_config
from tests.sim.network import LossModel
from tests.sim.simnet import Address, Nat, NatKind, SimNet, Uplink
from warp.config import GatewayConfig, parse_gateway_config
from warp.core import GatePaused, GateResumed, GatewayCore
from warp.keys import encode_key
from warp.wireguard import generate_private_key, public_key_of

MAP: Address = ("198.51.100.1", 13116)
#: makes one direction's loss models from its own generator
LossFactory = Callable[[random.Random], Sequence[LossModel]]
#: a datagram: 8-byte sequence number, 8-byte send time (virtual), then filler
HEADER = struct.Struct("!Qd")
FILLER = bytes(range(256)) * 8


@dataclass
class Stream:
    """What one tunnel's application sent and what the far application got."""

    sent: int = 0
    sent_at: array[float] = field(default_factory=lambda: array("d"))
    received_at: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    corrupt: int = 0
    refused: int = 0  # not sent: the gate was paused (a blocked application)

    @property
    def delivered(self) -> int:
        return len(self.received_at)

    def lost_between(self, start: float, stop: float) -> list[int]:
        """Sequence numbers sent in [start, stop) that never arrived."""
        return [
            seq
            for seq, at in enumerate(self.sent_at)
            if start <= at < stop and seq not in self.received_at
        ]

    def first_delivery(self) -> float:
        return min(self.received_at.values(), default=math.inf)

    def max_gap(self, start: float, stop: float) -> float:
        """The longest time without a delivery between start and stop."""
        times = sorted(t for t in self.received_at.values() if start <= t < stop)
        edges = [start, *times, stop]
        return max(b - a for a, b in itertools.pairwise(edges))


class GatewayHost:
    """One gateway: its core, the uplinks it was told about, its tunnels' streams (keyed by
    tunnel name, on the receiving side)."""

    def __init__(
        self, name: str, config: GatewayConfig, *, seed: int, now: float, net: SimNet
    ) -> None:
        self.name = name
        self.config = config
        self.net = net
        self.core = GatewayCore(config, rng=random.Random(seed), now=now)
        #: (sending gateway, tunnel) -> stream, filled in by :meth:`Fleet.stream`
        self.inbound: dict[str, Stream] = {}
        self.paused: set[str] = set()
        #: tunnel -> how many times its gate was paused
        self.pauses: Counter[str] = Counter()

    def send(self, tunnel: str, stream: Stream, size: int, now: float) -> None:
        if tunnel in self.paused:
            stream.refused += 1  # the application's send would block: it waits, sends nothing
            return
        seq = stream.sent
        stream.sent += 1
        stream.sent_at.append(now)
        payload = HEADER.pack(seq, now) + FILLER[: size - HEADER.size]
        if not self.core.gate_datagram(tunnel, payload, now):
            self._pause(tunnel)  # until a GateResumed, as the shell does

    def _pause(self, tunnel: str) -> None:
        if tunnel not in self.paused:
            self.paused.add(tunnel)
            self.pauses[tunnel] += 1

    # Host
    def datagram_received(self, uplink: str, source: Address, data: bytes, now: float) -> None:
        self.core.datagram_received(uplink, source, data, now)

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def datagrams_to_send(self) -> list[tuple[str, Address, bytes]]:
        self._serve_socket_requests()
        return self.core.datagrams_to_send()

    def _serve_socket_requests(self) -> None:
        """Extra sockets (birthday probing's hard side), as the shell opens them: on the
        uplink's address and NAT, ports 40000 and up."""
        slot = self.net.hosts[self.name]
        for request in self.core.socket_requests():
            if not request.open:
                for name in request.names:
                    uplink = slot.uplinks.get(name)
                    if uplink is not None:
                        self.net.remove_uplink(uplink)
                continue
            base = slot.uplinks.get(request.uplink)
            if base is None:
                continue
            for name in request.names:
                address = (base.address[0], 40000 + int(name.rsplit("~", 1)[1]) % 20000)
                self.net.add_uplink(self.name, name, address, nat=base.nat, delay=base.egress.delay)
            self.core.extra_sockets_opened(request.names, self.net.now)

    def low_ttl_datagrams_to_send(self) -> list[tuple[str, Address, bytes, int]]:
        return self.core.low_ttl_datagrams_to_send()

    def observe(self, now: float) -> None:
        for tunnel, datagram in self.core.gate_deliveries():
            stream = self.inbound.get(tunnel)
            if stream is None:
                continue
            seq, _ = HEADER.unpack_from(datagram)
            if datagram[HEADER.size :] != FILLER[: len(datagram) - HEADER.size]:
                stream.corrupt += 1
            elif seq in stream.received_at:
                stream.duplicates += 1
            else:
                stream.received_at[seq] = now
        for event in self.core.events():
            if isinstance(event, GatePaused):
                self._pause(event.tunnel)
            elif isinstance(event, GateResumed):
                self.paused.discard(event.tunnel)


@dataclass
class Peer:
    """A far gate as a gateway's config names it: the other gateway, and our tunnel to it."""

    name: str
    tunnel: str
    endpoints: Sequence[Address] = ()


class Fleet:
    """A SimNet with the map on :data:`MAP` and gateways around it."""

    def __init__(
        self,
        seed: int,
        *,
        lookup_policy: str = "mutual",
        map_ttl: float = 60.0,
        map_secondary_port: int | None = None,
    ) -> None:
        self.net = SimNet(seed)
        self.seed = seed
        self.keys: dict[str, bytes] = {}
        self.map_private = self.key("map")
        self.map = MapHost(
            map_config(
                self.map_private,
                MAP,
                lookup_policy=lookup_policy,
                registration_ttl=map_ttl,
                **({} if map_secondary_port is None else {"secondary_port": map_secondary_port}),
            ),
            rng=self.net.rng_bytes(),
            now=0.0,
        )
        self.net.add_host("map", self.map, observe=self.map.observe)
        self.net.add_uplink("map", PUBLIC, MAP)
        if map_secondary_port is not None:
            self.net.add_uplink("map", SECONDARY, (MAP[0], map_secondary_port))
        self.gateways: dict[str, GatewayHost] = {}
        self._next_nat = 0

    def key(self, name: str) -> bytes:
        """``name``'s private key: a function of the seed and the name (which of two peers
        has the lower key decides who re-initiates after crossed handshakes, so runs with
        the same names connect alike)."""
        if name not in self.keys:
            self.keys[name] = generate_private_key(random.Random(f"{self.seed}:{name}").randbytes)
        return self.keys[name]

    def config(
        self,
        name: str,
        peers: Sequence[Peer],
        *,
        k: int = 2,
        n: int = 4,
        send_deadline: float = 0.1,
        listen_port: int = 0,
        use_map: bool = True,
        unix_gates: bool = False,
        interfaces: Sequence[str] = (),
        redundancy: Sequence[str] = (),
        transport: Sequence[str] = (),
    ) -> GatewayConfig:
        """The configuration an operator writes for gateway ``name``: one ``[far_gates.*]``
        table and one tunnel per peer, with a loopback gate (never paused: a UDP sender does
        not wait) or a Unix gate (paused under back-pressure). ``interfaces`` and ``redundancy``:
        more TOML lines for those tables (``adaptive = true`` ...), ``transport`` for the
        transport table (``spread = "aggregate"``)."""
        lines = [f'private_key = "{encode_key(self.key(name))}"', f"listen_port = {listen_port}"]
        if use_map:
            lines += [
                "[warp_map]",
                f'address = "{MAP[0]}:{MAP[1]}"',
                f'public_key = "{encode_key(public_key_of(self.map_private))}"',
            ]
        lines += ["[interfaces]", *interfaces]
        for i, peer in enumerate(peers):
            endpoints = ", ".join(f'"{h}:{p}"' for h, p in peer.endpoints)
            lines += [
                f"[far_gates.{peer.name}]",
                f'public_key = "{encode_key(public_key_of(self.key(peer.name)))}"',
                f"endpoints = [{endpoints}]",
                f"[tunnels.{peer.tunnel}]",
                f'far_gate = "{peer.name}"',
                (
                    f'gate = {{ path = "/run/warp-sim/{name}-{peer.tunnel}.sock" }}'
                    if unix_gates
                    else f"gate = {{ application_to_gate = {59401 + i} }}"
                ),
                f"[tunnels.{peer.tunnel}.transport]",
                f'send_deadline = "{send_deadline}s"',
                *transport,
                f"[tunnels.{peer.tunnel}.transport.redundancy]",
                f"num_shards = {n}",
                f"required_shards = {k}",
                *redundancy,
            ]
        return parse_gateway_config("\n".join(lines) + "\n")

    def gateway(
        self,
        name: str,
        config: GatewayConfig,
        uplinks: Sequence[NatKind | None],
        *,
        delay: float = 0.010,
        egress: Sequence[LossFactory | None] = (),
        ingress: Sequence[LossFactory | None] = (),
        port: int = 51820,
        nat_timeout: float = 30.0,
        egress_rates: Sequence[float | None] = (),
        queue_time: float = 0.030,
    ) -> GatewayHost:
        """Gateway ``name`` with one uplink per entry of ``uplinks`` (``wan0``, ``wan1`` ...),
        each behind a NAT of that kind of its own (None: a public address); ``egress[i]`` and
        ``ingress[i]`` make uplink i's loss models for each direction; the NATs forget a
        binding unused for ``nat_timeout`` seconds. ``egress_rates[i]`` (bytes/s): uplink i's
        upload is shaped to that rate with a queue of ``queue_time`` at the rate (at least
        three 1500-byte packets), as ``tc tbf`` or a modem."""
        host = GatewayHost(
            name, config, seed=self.net.rng.getrandbits(64), now=self.net.now, net=self.net
        )
        self.gateways[name] = host
        self.net.add_host(name, host, observe=host.observe)
        core = host.core
        if config.warp_map.address:
            core.set_map_addresses([MAP])
        for far_name, far in config.far_gates.items():
            if far.endpoints:
                core.set_static_endpoints(far_name, [(h, p) for h, p in far.endpoints])
        core.start(self.net.now)
        for i, kind in enumerate(uplinks):
            rate = egress_rates[i] if i < len(egress_rates) else None
            self._next_nat += 1
            public_ip = f"100.64.{self._next_nat}.1"
            nat = None if kind is None else self.net.nat(public_ip, kind, timeout=nat_timeout)
            address = (
                (f"192.168.{i}.2", port) if nat is not None else (f"203.0.{self._next_nat}.2", port)
            )
            self.net.add_uplink(
                name,
                f"wan{i}",
                address,
                nat=nat,
                delay=delay,
                egress_losses=self._losses(egress, i),
                ingress_losses=self._losses(ingress, i),
                egress_rate=rate,
                egress_queue=0 if rate is None else max(int(rate * queue_time), 4500),
            )
            core.uplink_added(f"wan{i}", self.net.now)
        return host

    def _losses(self, factories: Sequence[LossFactory | None], index: int) -> list[LossModel]:
        factory = factories[index] if index < len(factories) else None
        return [] if factory is None else list(factory(self.net.child_rng()))

    def uplink(self, gateway: str, index: int) -> Uplink:
        return self.net.hosts[gateway].uplinks[f"wan{index}"]

    def nat(self, gateway: str, index: int) -> Nat:
        nat = self.uplink(gateway, index).nat
        assert nat is not None
        return nat

    def stream(
        self,
        sender: str,
        tunnel: str,
        receiver: str | None,
        *,
        rate: float,
        start: float,
        stop: float,
        size: int = 200,
    ) -> Stream:
        """``rate`` datagrams/s of ``size`` bytes into ``sender``'s ``tunnel`` from ``start``
        to ``stop``, recorded as they come out of ``receiver``'s tunnel of the same name (None:
        a far gate that is not running)."""
        stream = Stream()
        if receiver is not None:
            self.gateways[receiver].inbound[tunnel] = stream
        host = self.gateways[sender]
        self.net.every(
            1.0 / rate,
            lambda now: host.send(tunnel, stream, size, now),
            start=start,
            stop=stop,
            touches=sender,
        )
        return stream
