"""engarde's wire format, so that one side can move to warp while the other still runs engarde.

engarde (github.com/porech/engarde) carries raw WireGuard datagrams, no header of its own:

* **client**: every datagram from the local WireGuard is sent once from every uplink, each
  uplink to its own destination: its ``dstOverrides`` entry, else the server's ``dstAddr``
  (3 uplinks: 3 copies, whatever the number of distinct destinations); whatever any uplink
  receives from those addresses goes back to WireGuard;
* **server**: one UDP port; each datagram from a client address goes to the local WireGuard,
  and each datagram from WireGuard is sent to *every* client address heard from within
  ``clientTimeout`` (30 s by default).

`EngardeGateway` does the same with warp's pieces: the `UplinkManager` (one UDP socket per
uplink, ``SO_BINDTODEVICE``, netlink discovery) and the loopback gate (WireGuard's
``Endpoint``). A config selects it with a ``[tunnels.<name>.engarde]`` table (warp/config.py);
`warp run` then runs it instead of `warp.node.Gateway`. There is no FEC, no warp
encryption (WireGuard's protects the data) and no handshake: it is a duplicator, exactly as
engarde, and costs N× the bandwidth for N uplinks.

Its status snapshot has the shape of `warp.status.StatusSnapshot` (paths are uplink ×
remote address with counters; ``map`` and ``session`` are None; an extra ``engarde`` entry),
so `warp status` and the ``[metrics]`` endpoint work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from warp import __version__
from warp.config import EngardeConfig, GatewayConfig, HostPort, LoopbackGate, TunnelConfig
from warp.gate.base import Gate
from warp.gate.loopback import LoopbackGate as LoopbackGateRuntime
from warp.metrics import MetricsExporter, start_gateway_metrics
from warp.paths.path import Address
from warp.paths.uplinks import Uplink, UplinkEvent, UplinkEventKind, UplinkManager
from warp.status import ControlServer, gate_info

__all__ = ["ClientDestinations", "ClientTable", "EngardeGateway", "PathCounters"]

log = logging.getLogger("warp.engarde")


@dataclass(slots=True)
class PathCounters:
    """Counters of one (uplink, remote address) pair."""

    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    last_rx: float | None = None


class ClientTable:
    """The server's client addresses: (uplink name, address) → last time heard from.

    Bounded (``max_clients``; the least recently heard is evicted) and expiring: `live`
    drops the addresses not heard from within ``timeout`` (engarde's ``clientTimeout``).
    Insertion order is kept as "least recently heard first", so expiry and eviction are O(1)
    per entry.
    """

    def __init__(self, timeout: float, max_clients: int) -> None:
        self.timeout = timeout
        self.max_clients = max_clients
        self._seen: OrderedDict[tuple[str, Address], float] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._seen)

    def heard(self, uplink: str, address: Address, now: float) -> bool:
        """Record a datagram from ``address`` on ``uplink``; True if the address is new."""
        key = (uplink, address)
        new = key not in self._seen
        if not new:
            self._seen.move_to_end(key)
        self._seen[key] = now
        while len(self._seen) > self.max_clients:
            self._seen.popitem(last=False)
            self.evicted += 1
        return new

    def live(self, now: float) -> list[tuple[str, Address]]:
        """The addresses heard from within the timeout (the others are forgotten)."""
        seen = self._seen
        while seen:
            key, last = next(iter(seen.items()))
            if now - last <= self.timeout:
                break
            del seen[key]
            self.expired += 1
        return list(seen)

    def forget_uplink(self, uplink: str) -> None:
        for key in [k for k in self._seen if k[0] == uplink]:
            del self._seen[key]


class ClientDestinations:
    """An engarde client's destination per uplink: its ``dst_overrides`` entry, else the
    server's address (engarde's ``getDstByIfname``). One copy per uplink, never one per
    uplink × address."""

    def __init__(self, default: Address, overrides: dict[str, Address]) -> None:
        self.default = default
        self.overrides = overrides
        self.addresses = frozenset([default, *overrides.values()])

    def of(self, uplink: str) -> Address:
        return self.overrides.get(uplink, self.default)

    def targets(self, uplinks: Sequence[str]) -> list[tuple[str, Address]]:
        """(uplink, destination) for one datagram sent from each of ``uplinks``."""
        return [(name, self.of(name)) for name in uplinks]


class EngardeGateway:
    """A gateway that speaks engarde's wire format (``[tunnels.<name>.engarde]``).

    ``static_uplinks`` replaces interface discovery with fixed local addresses (tests without
    root); ``control_socket`` overrides ``control.socket``.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        static_uplinks: Sequence[tuple[str, str]] | None = None,
        control_socket: str | None = None,
    ) -> None:
        found = config.engarde_tunnel
        if found is None:
            raise ValueError("the config has no [tunnels.<name>.engarde] table")
        self.config = config
        self.tunnel_name: str = found[0]
        self.tunnel: TunnelConfig = found[1]
        assert self.tunnel.engarde is not None
        self.engarde: EngardeConfig = self.tunnel.engarde
        self.role = self.engarde.role
        self._static_uplinks = static_uplinks
        self._control_path = control_socket or config.control.socket
        self.clients = ClientTable(self.engarde.client_timeout, self.engarde.max_clients)
        self.endpoints: list[Address] = []
        self.destinations: ClientDestinations | None = None
        self.paths: dict[tuple[str, Address], PathCounters] = {}
        self.gate: LoopbackGateRuntime | None = None
        self.uplinks: UplinkManager | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsExporter | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self.counters: dict[str, int] = {
            "no_uplink": 0,  # a gate datagram found no open uplink
            "no_client": 0,  # server: a gate datagram found no client heard within the timeout
            "send_failed": 0,  # one copy could not be sent on one uplink
            "unknown_source": 0,  # client: a datagram from an address not in far_gate.endpoints
            "copies_sent": 0,  # datagrams put on the wire (client: one per open uplink)
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then close everything (socket files removed)."""
        loop = asyncio.get_running_loop()

        async def resolve(endpoint: HostPort) -> Address:
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=2)  # SOCK_DGRAM
            address = infos[0][4]
            return (str(address[0]), int(address[1]))

        for endpoint in next(iter(self.config.far_gates.values())).endpoints:
            self.endpoints.append(await resolve(endpoint))
        if self.role == "client":
            overrides = {
                name: await resolve(endpoint)
                for name, endpoint in self.engarde.dst_overrides.items()
            }
            self.destinations = ClientDestinations(self.endpoints[0], overrides)
        try:
            await self._start_uplinks()
            gate_config = self.tunnel.gate
            assert isinstance(gate_config, LoopbackGate)
            self.gate = LoopbackGateRuntime(
                self._on_gate_datagram,
                application_to_gate=gate_config.application_to_gate,
                ipv4=gate_config.ipv4,
                gate_to_application=gate_config.gate_to_application,
            )
            await self.gate.start()
            self.control = ControlServer(self._control_path, self.snapshot)
            await self.control.start()
            if self.config.metrics.listen is not None:
                self.metrics = start_gateway_metrics(self.config.metrics.listen, self.snapshot)
                self._metrics_task = loop.create_task(
                    self.metrics.refresh_forever(), name="warp.metrics"
                )
            log.info(
                "engarde.started role=%s tunnel=%s gate=%s %s=%s uplinks=%s",
                self.role,
                self.tunnel_name,
                self.gate.address,
                "server" if self.role == "client" else "listen_port",
                ",".join(
                    [f"{h}:{p}" for h, p in self.endpoints]
                    + [f"{n}>{h}:{p}" for n, (h, p) in sorted(self.destinations.overrides.items())]
                )
                if self.destinations is not None
                else self.config.listen_port,
                ",".join(self.uplinks.uplinks) if self.uplinks else "",
            )
            await stop.wait()
        finally:
            await self._shutdown()

    async def _start_uplinks(self) -> None:
        interfaces = self.config.interfaces
        if self._static_uplinks is not None:
            self.uplinks = UplinkManager.from_static(
                self._static_uplinks,
                on_datagram=self._on_uplink_datagram,
                on_change=self._on_uplink_change,
                listen_port=self.config.listen_port,
                max_consecutive_failures=interfaces.max_consecutive_failures,
            )
        else:
            self.uplinks = UplinkManager(
                inclusion_patterns=[p.pattern for p in interfaces.inclusion_patterns],
                exclusion_patterns=[p.pattern for p in interfaces.exclusion_patterns],
                bind_to_device=interfaces.bind_to_device,
                listen_port=self.config.listen_port,
                scan_interval=interfaces.interface_scan_interval,
                max_consecutive_failures=interfaces.max_consecutive_failures,
                on_datagram=self._on_uplink_datagram,
                on_change=self._on_uplink_change,
            )
        await self.uplinks.start()

    async def _shutdown(self) -> None:
        if self.gate is not None:
            with contextlib.suppress(Exception):
                await self.gate.close()
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
        log.info("engarde.stopped")

    # ------------------------------------------------------------------ datagrams

    def _on_uplink_change(self, event: UplinkEvent) -> None:
        uplink = event.uplink
        log.info("%s uplink=%s address=%s %s", event.name, uplink.name, uplink.address,
                 event.reason)  # fmt: skip
        if event.kind is UplinkEventKind.REMOVED:
            self.clients.forget_uplink(uplink.name)

    def _on_uplink_datagram(self, uplink: Uplink, data: bytes, source: Address) -> None:
        now = time.monotonic()
        if self.destinations is not None:
            if source not in self.destinations.addresses:
                self.counters["unknown_source"] += 1
                return
        elif self.clients.heard(uplink.name, source, now):
            log.info("engarde.client_heard uplink=%s address=%s:%s", uplink.name, *source)
            if len(self.paths) >= 2 * self.engarde.max_clients:
                self._prune_paths(now)
        path = self.paths.get((uplink.name, source))
        if path is None:
            path = self.paths[(uplink.name, source)] = PathCounters()
        path.rx_packets += 1
        path.rx_bytes += len(data)
        path.last_rx = now
        if self.gate is not None:
            self.gate.deliver(data)

    def _on_gate_datagram(self, gate: Gate, payload: bytes) -> None:
        uplinks = self.uplinks
        if uplinks is None:
            return
        if self.destinations is not None:
            open_uplinks = {n: u for n, u in uplinks.uplinks.items() if not u.closed}
            targets = [
                (open_uplinks[name], remote)
                for name, remote in self.destinations.targets(list(open_uplinks))
            ]
            if not targets:
                self.counters["no_uplink"] += 1
                return
        else:
            targets = []
            for name, remote in self.clients.live(time.monotonic()):
                uplink = uplinks.uplinks.get(name)
                if uplink is not None and not uplink.closed:
                    targets.append((uplink, remote))
            if not targets:
                self.counters["no_client"] += 1
                return
        size = len(payload)
        for uplink, remote in targets:
            if not uplink.send(payload, remote):
                self.counters["send_failed"] += 1
                continue
            self.counters["copies_sent"] += 1
            path = self.paths.get((uplink.name, remote))
            if path is None:
                path = self.paths[(uplink.name, remote)] = PathCounters()
            path.tx_packets += 1
            path.tx_bytes += size

    def _prune_paths(self, now: float) -> None:
        """Server: forget the counters of client addresses no longer in the table (bounded)."""
        live = set(self.clients.live(now))
        for key in [k for k in self.paths if k not in live]:
            del self.paths[key]

    # ------------------------------------------------------------------ status

    def _path_state(self, name: str, remote: Address, path: PathCounters, now: float) -> str:
        if self.uplinks is None or name not in self.uplinks.uplinks:
            return "dead"
        if path.last_rx is None:
            return "probing"
        return "active" if now - path.last_rx <= self.engarde.client_timeout else "dead"

    def snapshot(self) -> dict[str, Any]:
        """A `warp.status.StatusSnapshot` (``map`` and ``session`` None) + ``engarde``."""
        now = time.monotonic()
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
        paths = []
        for (name, remote), path in self.paths.items():
            paths.append(
                {
                    "uplink": name,
                    "local_address": local_by_uplink.get(name, "?"),
                    "remote_address": f"{remote[0]}:{remote[1]}",
                    "source": "static" if self.role == "client" else "learned",
                    "state": self._path_state(name, remote, path, now),
                    "rtt_ms": None,
                    "loss_pct": None,
                    "last_rx_age_s": None if path.last_rx is None else round(now - path.last_rx, 3),
                    "tx_bytes": path.tx_bytes,
                    "tx_packets": path.tx_packets,
                    "rx_bytes": path.rx_bytes,
                    "rx_packets": path.rx_packets,
                }
            )
        gate = self.gate
        drops: dict[str, int] = dict(gate.counters.drops) if gate is not None else {}
        for reason in ("no_uplink", "no_client"):
            if self.counters[reason]:
                drops[reason] = self.counters[reason]
        tunnel = {
            "name": self.tunnel_name,
            "tunnel_id": self.tunnel.tunnel_id,
            "gate": gate_info(gate) if gate is not None else {"kind": "?", "address": "?"},
            "datagrams_in": gate.counters.datagrams_in if gate else 0,
            "datagrams_out": gate.counters.datagrams_out if gate else 0,
            "bytes_in": gate.counters.bytes_in if gate else 0,
            "bytes_out": gate.counters.bytes_out if gate else 0,
            "blocks_rebuilt": 0,
            "datagrams_lost": 0,
            "drops": drops,
        }
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "paths": paths,
            "tunnels": [tunnel],
            "map": None,
            "session": None,
            "uplinks": uplink_rows,
            "counters": dict(self.counters),
            "engarde": {
                "role": self.role,
                "client_timeout_s": self.engarde.client_timeout,
                "server": [f"{h}:{p}" for h, p in self.endpoints],
                "dst_overrides": {
                    name: f"{h}:{p}"
                    for name, (h, p) in (
                        self.destinations.overrides if self.destinations else {}
                    ).items()
                },
                "listen_port": self.config.listen_port,
                "clients": len(self.clients),
                "clients_expired": self.clients.expired,
                "clients_evicted": self.clients.evicted,
            },
        }
