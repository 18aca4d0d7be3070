"""The gateway's decisions, sans-I/O: `GatewayCore` and one `FarGateSession` per far gate.

The asyncio shell (`warp.node.Gateway`) owns the sockets, gates, timers, the control socket
and signals; everything it decides goes through a `GatewayCore` (aioquic / h11 style): no
socket, no clock, no asyncio inside; ``now`` and a ``random.Random`` are passed in.

Inputs (``now`` in seconds, any monotonic clock):

* ``GatewayCore(config, *, rng, now)``; ``set_map_addresses([address, ...])`` and
  ``set_static_endpoints(far_gate, [address, ...])`` once resolved; ``start(now)``;
* ``uplink_added(name, now)``, ``uplink_changed(name, now)``, ``uplink_removed(name, now)``,
  ``uplink_writable(name, writable)`` (False once a send left its socket's buffer full, True
  when it drained);
* ``datagram_received(uplink, source, data, now)``: a datagram from an uplink socket;
* ``gate_datagram(tunnel, payload, now) -> bool``: a datagram from a tunnel's gate; False
  means "pause that gate" (back-pressure, per far gate) until a `GateResumed` event;
* ``handle_timer(now)``: run whatever is due (early calls are harmless);
* ``rekey(now)`` (SIGUSR1), ``stop(now)`` (deregister from the map; ``map_stopped``);
* ``send_failed(uplink, remote, data)``: the shell could not send one (counters);
* ``reconfigure(config, now)`` (live reload, `warp.core.reload`): applies a new config and
  returns the `ReloadPlan` (gates for the shell to open / close, new interface patterns), or
  raises `ReloadRefused` (TOML paths) for what needs a restart, changing nothing.

Outputs, drained by the shell after every input, in order:

* ``datagrams_to_send()`` → ``[(uplink, remote, data)]``: the relay path is internal (the
  core turns relayed messages into map frames sent from an uplink);
* ``gate_deliveries()`` → ``[(tunnel, datagram)]``;
* ``events()`` → `GatePaused` / `GateResumed` (frozen dataclasses) for gates to pause/resume;
* ``next_deadline()`` → when to call ``handle_timer`` next (None: only on input). The core
  also logs its decisions with stable dotted names (``path.active``, ``handshake.complete``,
  ``relay.fallback`` ...), each with ``far_gate=<name>``.

State for status: ``sessions`` (name → `FarGateSession`: ``prober``, ``tunnels``,
``send_queue``, ``handshake_state`` ...), ``counters``, ``map_client``; `warp.core.snapshot`
builds ``warp status --json`` from it.

A `FarGateSession` composes one far gate's WireGuard peer bookkeeping (on the core's one
`Device`), its `PathProber`, its tunnels' encoders/decoders/schedulers, its send queue with
back-pressure, and its relay fallback. Tunnels name their far gate; a tun gate shared by
several far gates routes each packet by destination over the far gates' ``allowed_ips``.
"""

from warp.core.gateway import CoreEvent, GatePaused, GateResumed, GatewayCore
from warp.core.session import RELAY_PREFIX, FarGateSession, Tunnel

__all__ = [
    "RELAY_PREFIX",
    "CoreEvent",
    "FarGateSession",
    "GatePaused",
    "GateResumed",
    "GatewayCore",
    "Tunnel",
]
