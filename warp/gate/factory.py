"""The gates of `warp run`: each tunnel's configured loopback, Unix or tun gate."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from warp.config import LoopbackGate, TunnelConfig, UnixGate
from warp.gate.base import Gate, OnDatagram
from warp.gate.loopback import LoopbackGate as LoopbackGateRuntime
from warp.gate.unix import UnixGate as UnixGateRuntime

__all__ = ["GateFactory", "socket_gate"]

#: Makes a tunnel's gate: ``(tunnel name, tunnel config, on_datagram) -> Gate`` (not started).
GateFactory = Callable[[str, TunnelConfig, OnDatagram], Gate]


def socket_gate(name: str, tunnel_config: TunnelConfig, on_datagram: OnDatagram) -> Gate:
    """The configured gate of `warp run`: a loopback, Unix or tun gate."""
    gate_config = tunnel_config.gate
    if isinstance(gate_config, LoopbackGate):
        return LoopbackGateRuntime(
            on_datagram,
            application_to_gate=gate_config.application_to_gate,
            ipv4=gate_config.ipv4,
            gate_to_application=gate_config.gate_to_application,
        )
    if isinstance(gate_config, UnixGate):
        return UnixGateRuntime(
            on_datagram,
            path=gate_config.path,
            application_path=gate_config.application_path,
            group=gate_config.group,
            allowed_uids=gate_config.allowed_uids,
            allowed_gids=gate_config.allowed_gids,
            allow_shared_directory=gate_config.allow_shared_directory,
        )
    tun_module = importlib.import_module("warp.gate.tun")  # needs root; loaded on demand
    return tun_module.TunGate(  # type: ignore[no-any-return]
        on_datagram,
        name=gate_config.name,
        addresses=gate_config.address,
        mtu=gate_config.mtu,
        allowed_ips=gate_config.allowed_ips,
    )
