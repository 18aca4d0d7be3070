"""One running gateway: the thin asyncio shell around a `GatewayCore` (`warp.core`).

The core decides everything (handshakes, paths, scheduling, FEC, back-pressure, relay
fallback, the map) for every far gate; this shell owns what touches the system: the uplink
sockets (`UplinkManager`), the gates, one timer (`TimerSlot`, re-armed only when the core's
`next_deadline` moves), the control socket, metrics and signals.

After every input (a batch of uplink datagrams, a gate datagram, an uplink change, the timer)
the shell drains the core's outputs in one place (`_drain`): datagrams to send, one
`send_many` per uplink (an uplink whose socket filled up is reported back with
`uplink_writable`), datagrams for
the gates, gates to pause or resume, and the next deadline.

Back-pressure (decided per far gate in `FarGateSession`): while an uplink a far gate's
shards would go to is unwritable, its Unix gates are paused (their blocking sender then
waits in `send()`; loopback and TUN gates are never paused) and what warp had already
taken is parked with its deadline clock stopped; other far gates keep sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Sequence
from typing import Any

from warp.config import (
    ConfigError,
    GatewayConfig,
    TunGate,
    TunnelConfig,
    load_gateway_config,
)
from warp.core import FarGateSession, GatePaused, GatewayCore
from warp.core.reload import ReloadRefused, plan_fields, plan_reload
from warp.core.snapshot import snapshot
from warp.event_loop import TimerSlot
from warp.gate.base import Gate, GateError
from warp.gate.factory import GateFactory, socket_gate
from warp.keys import encode_key
from warp.metrics import MetricsExporter, start_gateway_metrics
from warp.paths.path import Address
from warp.paths.uplinks import Uplink, UplinkEvent, UplinkEventKind, UplinkManager
from warp.status import ControlServer
from warp.usage_file import keep_usage, load_usage

log = logging.getLogger("warp.node")

#: Deregistering from the map at shutdown waits at most this long for its confirmation.
STOP_WAIT = 1.0


class Gateway:
    """A running warp instance (`warp run`): the asyncio shell of a `GatewayCore`.

    ``static_uplinks`` replaces interface discovery with fixed local addresses (the loopback
    demo and tests without root); ``control_socket`` overrides ``control.socket``;
    ``rekey_signal``: SIGUSR1 forces a handshake with every far gate (`rekey`).
    ``gate_factory`` makes each tunnel's gate (default `socket_gate`, the configured one;
    `warp.embed` passes in-memory gates, with ``embedded`` giving every tunnel back-pressure);
    ``control``: False serves no control socket (an embedded gateway's status is
    `snapshot`); ``config_path``: the file `reload` re-reads (SIGHUP, ``warp reload``; None:
    no reload).
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        static_uplinks: Sequence[tuple[str, str]] | None = None,
        control_socket: str | None = None,
        rng: random.Random | None = None,
        rekey_signal: bool = True,
        gate_factory: GateFactory = socket_gate,
        embedded: bool = False,
        control: bool = True,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self._gate_factory = gate_factory
        self._serve_control = control
        self.config_path = config_path
        self._reload_lock = asyncio.Lock()
        self._started = False
        self._rekey_signal = rekey_signal
        self._rekey_signal_installed = False
        self._static_uplinks = static_uplinks
        self._control_path = control_socket or config.control.socket
        self.core = GatewayCore(
            config, rng=rng or random.Random(), now=time.monotonic(), embedded=embedded
        )
        #: each tunnel's running gate (None until started)
        self.gates: dict[str, Gate | None] = dict.fromkeys(config.tunnels)
        self._tunnel_of_gate: dict[int, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: TimerSlot | None = None
        self.uplinks: UplinkManager | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsExporter | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._usage_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._closed = False

    @property
    def session(self) -> FarGateSession:
        """The first far gate's session (the only one of a single-``[far_gate]`` config)."""
        return next(iter(self.core.sessions.values()))

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then deregister from the map and close everything."""
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.close()

    async def start(self) -> None:
        """Claim the gates and sockets, start the core and the uplinks. On an exception the
        caller must still `close` (which releases whatever was claimed)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._timer = TimerSlot(loop, self._on_timer)
        # Claim everything local first (gates, control socket, metrics port): if one is
        # taken we stop before sending anything, so a failed start never handshakes with
        # a far gate or registers/deregisters at the map (`warp run` also holds the key
        # and control-socket locks before this).
        await self._start_gates()
        if self._serve_control:
            self.control = ControlServer(
                self._control_path,
                self.snapshot,
                reload=self.reload if self.config_path is not None else None,
            )
            await self.control.start()
        if self.config.metrics.listen is not None:
            # Raises MetricsError (one line) if the address is taken.
            self.metrics = start_gateway_metrics(self.config.metrics.listen, self.snapshot)
            self._metrics_task = loop.create_task(
                self.metrics.refresh_forever(), name="warp.metrics"
            )
        if self.config.warp_map.address is not None:
            addresses: list[Address] = []
            for host_port in self.config.warp_map.addresses:
                for address in await self._resolve_all(host_port):
                    if address not in addresses:
                        addresses.append(address)
            self.core.set_map_addresses(addresses)
        for name, far_gate in self.config.far_gates.items():
            endpoints = [(await self._resolve_all(e))[0] for e in far_gate.endpoints]
            self.core.set_static_endpoints(name, endpoints)
        usage_file = self.config.interfaces.usage_file
        load_usage(self.core.usage, usage_file)
        self._usage_task = loop.create_task(keep_usage(self.core.usage, usage_file))
        self.core.start(loop.time())
        await self._start_uplinks()
        # The gates read only now: the first packet from a gate (a fresh tun sends its
        # own router solicitation at once) starts a handshake that needs an uplink.
        for gate in self.gates.values():
            if gate is not None:
                gate.resume_reading()
        sessions = self.core.sessions
        log.info(
            "gateway.started public_key=%s %s=%s tunnels=%s uplinks=%s",
            encode_key(self.config.public_key),
            "far_gate" if len(sessions) == 1 else "far_gates",
            ",".join(
                encode_key(s.key) if len(sessions) == 1 else f"{n}:{encode_key(s.key)}"
                for n, s in sessions.items()
            ),
            ",".join(self.config.tunnels),
            ",".join(self.uplinks.uplinks) if self.uplinks else "",
        )
        self._drain()
        self._install_rekey_signal(loop)
        self._started = True

    def _install_rekey_signal(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGUSR1 forces a new handshake with every far gate (`kill -USR1 <pid>`)."""
        if not self._rekey_signal:
            return
        try:
            loop.add_signal_handler(signal.SIGUSR1, self.rekey)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
            return
        self._rekey_signal_installed = True

    def rekey(self) -> None:
        """Start a new handshake with every far gate now (sessions stay usable meanwhile)."""
        if self._loop is None:
            return
        self.core.rekey(self._loop.time())
        self._drain()

    # ------------------------------------------------------------------ live reload

    def request_reload(self) -> None:
        """SIGHUP: `reload` in a task (the outcome is logged)."""
        loop = self._loop
        if loop is None or not self._started:
            log.warning("reload.refused reason=not_started (the gateway is still starting)")
            return
        loop.create_task(self.reload(), name="warp.reload")

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what changed (`GatewayCore.reconfigure`). The
        reply of ``warp reload``: ``{"reloaded": true, "changes": {...}}``, or
        ``{"reloaded": false, "problems": [[toml_path, why], ...]}`` with the running config
        untouched (an invalid file, a change that needs a restart, a gate that cannot open)."""
        async with self._reload_lock:
            if self.config_path is None or self._loop is None or not self._started:
                return self._refused([("", "this gateway cannot reload (not started from a file)")])
            try:
                config = load_gateway_config(self.config_path)
            except ConfigError as exc:
                return self._refused([(path or exc.source, why) for path, why in exc.problems])
            return await self._apply(config)

    def _refused(self, problems: list[tuple[str, str]]) -> dict[str, Any]:
        for path, why in problems:
            log.warning("reload.refused path=%s reason=%s", path or "-", why.replace(" ", "_"))
        log.warning("reload.refused problems=%d (the running config stays)", len(problems))
        return {"reloaded": False, "problems": [list(problem) for problem in problems]}

    async def _apply(self, config: GatewayConfig) -> dict[str, Any]:
        socket_changed = config.control.socket != self.config.control.socket
        try:
            plan = plan_reload(self.config, config, control_socket_changed=socket_changed)
        except ReloadRefused as exc:
            return self._refused(exc.problems)
        endpoints: dict[str, list[Address]] = {}
        for name in plan.far_gates_added:
            try:
                endpoints[name] = [
                    (await self._resolve_all(e))[0] for e in config.far_gates[name].endpoints
                ]
            except OSError as exc:
                return self._refused([(f"far_gates.{name}.endpoints", f"cannot resolve: {exc}")])
        # New gates open before anything changes: a gate that cannot open refuses the reload.
        # (A changed gate is closed first: its new one may want the same address.)
        new_names = [name for name in plan.gates_opened if name not in self.config.tunnels]
        opened: dict[str, Gate] = {}
        for name in new_names:
            try:
                opened[name] = await self._open_gate(name, config.tunnels[name])
            except (GateError, OSError) as exc:
                for gate in opened.values():
                    await gate.close()
                return self._refused([(f"tunnels.{name}.gate", str(exc))])
        assert self._loop is not None
        plan = self.core.reconfigure(
            config,
            self._loop.time(),
            static_endpoints=endpoints,
            control_socket_changed=socket_changed,
        )
        self.config = config
        for name in plan.gates_closed:
            await self._close_gate(name)
        failed: list[tuple[str, str]] = []
        for name in plan.gates_opened:
            if name in opened:
                gate = opened[name]
            else:
                try:
                    gate = await self._open_gate(name, config.tunnels[name])
                except (GateError, OSError) as exc:
                    log.error("gate.failed tunnel=%s %s", name, exc)
                    failed.append((f"tunnels.{name}.gate", str(exc)))
                    continue
            self.gates[name] = gate
            self._tunnel_of_gate[id(gate)] = name
            gate.resume_reading()
        if plan.patterns_changed:
            self._update_uplink_patterns()
        log.info("reload.applied %s", plan.summary())
        self._drain()
        reply: dict[str, Any] = {"reloaded": True, "changes": plan_fields(plan)}
        if failed:
            reply["gate_errors"] = [list(problem) for problem in failed]
        return reply

    async def _close_gate(self, name: str) -> None:
        gate = self.gates.pop(name, None)
        if gate is None:
            return
        self._tunnel_of_gate.pop(id(gate), None)
        with contextlib.suppress(Exception):
            await gate.close()
        log.info("gate.closed tunnel=%s", name)

    def _update_uplink_patterns(self) -> None:
        """The new interface patterns (and tun gates, never uplinks): rescan now."""
        manager = self.uplinks
        if manager is None or self._static_uplinks is not None:
            return
        interfaces = self.config.interfaces
        tun_gates = [t.gate for t in self.config.tunnels.values() if isinstance(t.gate, TunGate)]
        manager.inclusion = list(interfaces.inclusion_patterns)
        manager.exclusion = list(interfaces.exclusion_patterns)
        manager.own_tuns = frozenset(gate.name for gate in tun_gates)
        manager.tunnel_networks = [net for gate in tun_gates for net in gate.allowed_ips]
        manager.request_rescan()

    async def _resolve_all(self, host_port: Any) -> list[Address]:
        host, port = host_port.host, host_port.port
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
        return [(str(info[4][0]), int(info[4][1])) for info in infos]

    async def _start_gates(self) -> None:
        for name, tunnel_config in self.config.tunnels.items():
            gate = await self._open_gate(name, tunnel_config)
            self.gates[name] = gate
            self._tunnel_of_gate[id(gate)] = name

    async def _open_gate(self, name: str, tunnel_config: TunnelConfig) -> Gate:
        """Start a tunnel's gate, not reading yet (`resume_reading` once it may)."""
        gate = self._gate_factory(name, tunnel_config, self._on_gate_datagram)
        await gate.start()
        gate.pause_reading()  # until the uplinks are up (`start`)
        log.info("gate.started tunnel=%s %s %s", name, gate.kind, gate.address)
        return gate

    async def _start_uplinks(self) -> None:
        interfaces = self.config.interfaces
        if self._static_uplinks is not None:
            self.uplinks = UplinkManager.from_static(
                self._static_uplinks,
                on_datagram=self._on_uplink_datagram,
                on_change=self._on_uplink_change,
                on_writable=self._on_uplink_writable,
                on_read_done=self._on_uplink_read_done,
                listen_port=self.config.listen_port,
                max_consecutive_failures=interfaces.max_consecutive_failures,
            )
        else:
            # Never carry the tunnel over itself: our own tun gates, any WireGuard/TUN link and
            # any interface addressed inside a tun gate's allowed_ips are never uplinks.
            tun_gates = [
                t.gate for t in self.config.tunnels.values() if isinstance(t.gate, TunGate)
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
                on_read_done=self._on_uplink_read_done,
            )
        await self.uplinks.start()

    async def close(self) -> None:
        """Deregister from the map (waiting briefly) and close everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self.uplinks is not None and self.uplinks.uplinks:
            # Deregister, waiting briefly for the map's confirmation.
            self.core.stop(self._loop.time())
            self._drain()
            for _ in range(round(STOP_WAIT / 0.05)):
                if self.core.map_stopped:
                    break
                await asyncio.sleep(0.05)
        self.core.stopping = True
        if self._timer is not None:
            self._timer.cancel()
        if self._rekey_signal_installed and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGUSR1)
            self._rekey_signal_installed = False
        for gate in self.gates.values():
            if gate is not None:
                with contextlib.suppress(Exception):
                    await gate.close()
        for task in (self._metrics_task, self._usage_task):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._metrics_task = self._usage_task = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.control is not None:
            await self.control.close()
        if self.uplinks is not None:
            await self.uplinks.close()
        log.info("gateway.stopped")

    # ------------------------------------------------------------------ inputs

    def _on_uplink_change(self, event: UplinkEvent) -> None:
        # (UplinkManager logs uplink.added/removed/rebuilt itself: one line per event.)
        if self._loop is None:
            return
        now = self._loop.time()
        name = event.uplink.name
        if event.kind is UplinkEventKind.REMOVED:
            self.core.uplink_removed(name, now)
        elif event.kind is UplinkEventKind.ADDED:
            self.core.uplink_added(name, now)
        else:
            self.core.uplink_changed(name, now)
        self._drain()

    def _on_uplink_writable(self, uplink: Uplink) -> None:
        self.core.uplink_writable(uplink.name, True)
        self._drain()

    def _on_uplink_datagram(self, uplink: Uplink, data: bytes, source: Address) -> None:
        self.core.datagram_received(uplink.name, source, data, self._loop.time())  # type: ignore[union-attr]

    def _on_uplink_read_done(self, uplink: Uplink) -> None:
        self._drain()  # once per batch of received datagrams: their sends go out together

    def _on_gate_datagram(self, gate: Gate, payload: bytes) -> bool | None:
        tunnel = self._tunnel_of_gate.get(id(gate))
        if tunnel is None or self._loop is None:
            return None
        go_on = self.core.gate_datagram(tunnel, payload, self._loop.time())
        self._drain()
        return None if go_on else False

    def _extras_opened(self, names: list[str]) -> None:
        if self._loop is not None:
            self.core.extra_sockets_opened(names, self._loop.time())
            self._drain()

    def _on_timer(self) -> None:
        if self._loop is None:
            return
        if self.uplinks is not None:
            # An uplink whose socket drained without a resume_writing callback (torn down
            # and rebuilt under a hold) is writable again: the hold re-checks every 50 ms.
            for name, uplink in self.uplinks.uplinks.items():
                if not self.core.uplinks.get(name, True) and uplink.writable:
                    self.core.uplink_writable(name, True)
        self.core.handle_timer(self._loop.time())
        self._drain()

    # ------------------------------------------------------------------ outputs

    def _drain(self) -> None:
        """Carry out what the core decided: send, deliver, pause/resume gates, re-arm."""
        core = self.core
        manager = self.uplinks
        if manager is not None:
            for req in core.socket_requests():  # birthday probing's extra sockets
                manager.request_extra(req.open, req.uplink, req.names, self._extras_opened)
            manager.send_with_ttl(core.low_ttl_datagrams_to_send())
            failed, full = manager.send_all(core.datagrams_to_send())
        else:  # not started or stopped: nothing can go out
            core.socket_requests(), core.low_ttl_datagrams_to_send()
            failed, full = core.datagrams_to_send(), []
        for name, remote, data in failed:
            core.send_failed(name, remote, data)
        for name in full:
            core.uplink_writable(name, False)
        gates = self.gates
        for tunnel, datagram in core.gate_deliveries():
            gate = gates.get(tunnel)
            if gate is not None:
                gate.deliver(datagram)
        for event in core.events():
            gate = gates.get(event.tunnel)
            if gate is None:
                continue
            if isinstance(event, GatePaused):
                gate.pause_reading()
            else:
                gate.resume_reading()
        if self._timer is not None:
            self._timer.arm(core.next_deadline())

    # ------------------------------------------------------------------ status

    def snapshot(self) -> dict[str, Any]:
        now = self._loop.time() if self._loop is not None else time.monotonic()
        rows = []
        if self.uplinks is not None:
            for name, uplink in self.uplinks.uplinks.items():
                rows.append(
                    {
                        "name": name,
                        "local_address": f"{uplink.address}:{uplink.local_port}",
                        "state": "down" if uplink.closed else "up",
                        "send_errors": uplink.errors,
                        "tx_dropped": uplink.tx_dropped,
                        "writable": uplink.writable,
                    }
                )
        uptime = time.monotonic() - self._started_at
        return snapshot(self.core, now, uptime=uptime, uplink_rows=rows, gates=self.gates)
