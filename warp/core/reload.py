"""Live reload, sans-I/O: what changed between two gateway configs, and what the running
gateway can apply without a restart (`plan_reload`; `GatewayCore.reconfigure` applies it).

Applied live: far gates added, removed or changed (a changed far gate is a new peer: new
session, new handshake), tunnels added or removed (the shell opens / closes their gates), a
tunnel's transport (redundancy, priority, send_deadline, ...) changed in place, and the
interface patterns. Anything else (the private key, the control socket, listen_port, the
map, metrics, log settings, other interface settings, engarde mode) needs a restart: the
reload is refused with each such TOML path, and the running config stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from warp.config import GatewayConfig, TunnelConfig

#: Top-level settings a running gateway cannot change (each a restart).
_RESTART_ONLY = ("private_key", "listen_port", "warp_map", "metrics", "log")
#: `[interfaces]` settings the shell applies live (the uplink manager's patterns).
_LIVE_INTERFACE_SETTINGS = ("inclusion_patterns", "exclusion_patterns")


class ReloadRefused(Exception):
    """The new config cannot be applied live. ``problems``: (TOML path, why) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {why}" for path, why in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes. The shell opens the gates of ``gates_opened`` before the core
    applies the plan and closes those of ``gates_closed`` after; ``patterns_changed``: give
    the uplink manager the new interface patterns."""

    far_gates_added: tuple[str, ...] = ()
    far_gates_removed: tuple[str, ...] = ()
    tunnels_added: tuple[str, ...] = ()
    tunnels_removed: tuple[str, ...] = ()
    tunnels_changed: tuple[str, ...] = ()
    gates_opened: tuple[str, ...] = ()
    gates_closed: tuple[str, ...] = ()
    patterns_changed: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.far_gates_added
            or self.far_gates_removed
            or self.tunnels_added
            or self.tunnels_removed
            or self.tunnels_changed
            or self.patterns_changed
        )

    def summary(self) -> str:
        """The plan as log fields (``reload.applied ...``)."""
        fields = [
            ("far_gates_added", self.far_gates_added),
            ("far_gates_removed", self.far_gates_removed),
            ("tunnels_added", self.tunnels_added),
            ("tunnels_removed", self.tunnels_removed),
            ("tunnels_changed", self.tunnels_changed),
        ]
        text = " ".join(f"{name}={','.join(names) or '-'}" for name, names in fields)
        return f"{text} patterns_changed={str(self.patterns_changed).lower()}"


def _engarde(config: GatewayConfig) -> bool:
    return config.engarde_tunnel is not None


def _session_identity(tunnel: TunnelConfig) -> tuple[object, ...]:
    """What a tunnel's runtime is built from besides its transport: a change here is a new
    tunnel (its queue and FEC state restart)."""
    return (tunnel.tunnel_id, tunnel.far_gate, tunnel.gate)


def _plain_routes_moved(old: GatewayConfig, new: GatewayConfig, far_gate: str) -> bool:
    """A plain WireGuard far gate without allowed_ips routes its tun gates' allowed_ips
    (its WireGuard peer is set up with them): a change of those gates is a new peer."""
    far = new.far_gates[far_gate]
    if far.kind != "wireguard" or far.allowed_ips:
        return False
    gates = [t.gate for t in old.tunnels_of(far_gate).values()]
    return gates != [t.gate for t in new.tunnels_of(far_gate).values()]


def plan_reload(
    old: GatewayConfig, new: GatewayConfig, *, control_socket_changed: bool = False
) -> ReloadPlan:
    """What applying ``new`` over the running ``old`` changes; `ReloadRefused` with every
    setting that needs a restart. ``control_socket_changed``: the shell's own control
    socket path (``control.socket`` unless ``--socket`` overrode it) differs."""
    problems: list[tuple[str, str]] = []
    if old.private_key != new.private_key:
        problems.append(("private_key", "changing the gateway's key needs a restart"))
    if control_socket_changed:
        problems.append(("control.socket", "changing the control socket needs a restart"))
    for name in _RESTART_ONLY[1:]:
        if getattr(old, name) != getattr(new, name):
            problems.append((name, "changing this needs a restart"))
    for name in type(old.interfaces).model_fields:
        if name in _LIVE_INTERFACE_SETTINGS:
            continue
        if getattr(old.interfaces, name) != getattr(new.interfaces, name):
            problems.append((f"interfaces.{name}", "changing this needs a restart"))
    engarde = _engarde(old) or _engarde(new)
    if engarde and (old.tunnels != new.tunnels or old.far_gates != new.far_gates):
        problems.append(("tunnels", "an engarde-mode gateway needs a restart to change"))
    if problems:
        raise ReloadRefused(problems)

    replaced = {
        name
        for name, far in old.far_gates.items()
        if name in new.far_gates
        and (new.far_gates[name] != far or _plain_routes_moved(old, new, name))
    }
    far_removed = tuple(
        name for name in old.far_gates if name not in new.far_gates or name in replaced
    )
    far_added = tuple(
        name for name in new.far_gates if name not in old.far_gates or name in replaced
    )
    tunnels_added: list[str] = []
    tunnels_changed: list[str] = []
    tunnels_removed = [name for name in old.tunnels if name not in new.tunnels]
    for name, tunnel in new.tunnels.items():
        before = old.tunnels.get(name)
        if before is None:
            tunnels_added.append(name)
        elif _session_identity(before) != _session_identity(tunnel):
            # A new tunnel under the old name (its gate reopened only if the gate changed).
            tunnels_removed.append(name)
            tunnels_added.append(name)
        elif before.transport != tunnel.transport:
            tunnels_changed.append(name)
    gates_closed = tuple(
        name
        for name, tunnel in old.tunnels.items()
        if name not in new.tunnels or new.tunnels[name].gate != tunnel.gate
    )
    gates_opened = tuple(
        name
        for name, tunnel in new.tunnels.items()
        if name not in old.tunnels or old.tunnels[name].gate != tunnel.gate
    )
    patterns_changed = any(
        getattr(old.interfaces, name) != getattr(new.interfaces, name)
        for name in _LIVE_INTERFACE_SETTINGS
    ) or (
        # Tun gates are never uplinks: a tun gate added or removed changes what is excluded.
        bool(gates_opened or gates_closed)
    )
    return ReloadPlan(
        far_gates_added=far_added,
        far_gates_removed=far_removed,
        tunnels_added=tuple(tunnels_added),
        tunnels_removed=tuple(tunnels_removed),
        tunnels_changed=tuple(tunnels_changed),
        gates_opened=gates_opened,
        gates_closed=gates_closed,
        patterns_changed=patterns_changed,
    )


def plan_fields(plan: ReloadPlan) -> dict[str, Any]:
    """A plan as the ``warp reload`` reply's ``changes``."""
    return {
        "far_gates_added": list(plan.far_gates_added),
        "far_gates_removed": list(plan.far_gates_removed),
        "tunnels_added": list(plan.tunnels_added),
        "tunnels_removed": list(plan.tunnels_removed),
        "tunnels_changed": list(plan.tunnels_changed),
        "patterns_changed": plan.patterns_changed,
    }
