"""The gateway's status snapshot (`warp status --json`, metrics), built from a `GatewayCore`
and what the shell knows of its sockets and gates (plain data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from warp import __version__
from warp.core.gateway import GatewayCore
from warp.core.session import FarGateSession, Tunnel, host_port, relayed_over
from warp.gate.base import Gate
from warp.keys import encode_key
from warp.paths.path import PathState
from warp.paths.scheduler import ShardScheduler
from warp.status import gate_info


def _redundancy(tunnel: Tunnel) -> dict[str, Any]:
    """A tunnel's code, whether it survives losing an uplink, and the application rates its
    spread carries: usable at the tunnel's application bytes per wire byte so far (the
    uplinks full, its blocks are full), protected whatever the datagrams' timing (a rate
    promised without loss must hold also where the FEC window closes blocks early)."""
    scheduler = tunnel.scheduler
    ratio = tunnel.app_bytes / tunnel.wire_bytes if tunnel.wire_bytes else None
    if ratio is None:
        ratio = scheduler.k / scheduler.effective_n

    def app_rate(wire: float | None) -> float | None:
        return None if wire is None else round(wire * ratio)

    protected = scheduler.protected_rate
    protected_app = None if protected is None else tunnel.app_rate_within(protected)

    return {
        "k": scheduler.k,
        "n": scheduler.n,
        "effective_n": scheduler.effective_n,
        "spread": scheduler.spread,
        "protected": scheduler.protected,
        "protection": scheduler.protection,
        # Application bytes/s: what the uplinks carry with this spread, and what may be sent
        # with nothing lost when any one uplink goes (None: not protected, or not measured).
        "usable_rate": app_rate(scheduler.usable_rate),
        "protected_rate": app_rate(protected) if protected_app is None else round(protected_app),
        **_adaptive(scheduler),
    }


def _capacity(session: FarGateSession, now: float) -> dict[str, Any]:
    """Per uplink: what it carries towards this far gate (bytes/s on the wire)."""
    rows: dict[str, Any] = {}
    for uplink, estimator in sorted(session.prober.capacities.items()):
        capacity = estimator.capacity
        pacing = estimator.pacing_rate(now)
        rows[uplink] = {
            "capacity": None if capacity is None else round(capacity),
            # False: never saturated, the capacity is only what it carried (a lower bound)
            "measured": estimator.saturated_at is not None,
            "pacing_rate": None if pacing is None else round(pacing),
            "saturations": estimator.saturations,
        }
    return rows


def _adaptive(scheduler: ShardScheduler[Any]) -> dict[str, Any]:
    """Adaptive parity: its bounds, target, the parity now and its predicted residual loss
    (nothing for a fixed code: its fields stay as they were)."""
    adaptive = scheduler.adaptive
    if adaptive is None:
        return {}
    return {
        "adaptive": True,
        "target_loss": adaptive.target_loss,
        "min_parity": adaptive.min_parity,
        "max_parity": adaptive.max_parity,
        "parity": scheduler.effective_n - scheduler.k,
        "residual_loss": scheduler.residual_loss,
    }


def snapshot(
    core: GatewayCore,
    now: float,
    *,
    uptime: float,
    uplink_rows: Sequence[Mapping[str, Any]],
    gates: Mapping[str, Gate | None],
) -> dict[str, Any]:
    """The whole snapshot. ``uplink_rows``: one row per uplink socket (``name``,
    ``local_address``, ...); ``gates``: each tunnel's running gate."""
    config = core.config
    local_by_uplink = {str(row["name"]): str(row["local_address"]) for row in uplink_rows}
    paths = []
    tunnels = []
    far_gates: dict[str, Any] = {}
    for name, session in core.sessions.items():
        far_gates[name] = {
            "public_key": encode_key(session.key),
            "kind": session.config.kind,
            "session": session.status(now),
            "relay": session.relay_in_use,
            "uplink_capacity": _capacity(session, now),
            "paced_waits": session.paced_waits,
            "relay_reason": session.relay_reason,
        }
        for path in session.prober.paths:
            # A dead path shows its state and how long since it was heard, no stale figures.
            dead = path.state is PathState.DEAD
            loss = None if dead else path.loss
            rtt = None if dead else path.rtt
            paths.append(
                {
                    "far_gate": name,
                    "uplink": path.uplink,
                    # a relayed path ("relay:wan0") leaves from its uplink's socket
                    "local_address": local_by_uplink.get(
                        relayed_over(path.uplink) or path.uplink, "?"
                    ),
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
        queue_stats = session.send_queue.stats
        for tunnel in session.tunnels.values():
            gate = gates.get(tunnel.name)
            stats = tunnel.decoder.stats
            drops: dict[str, int] = dict(gate.counters.drops) if gate is not None else {}
            drops.update(tunnel.drops)
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
                    "far_gate": name,
                    "tunnel_id": tid,
                    "gate": gate_info(gate) if gate is not None else {"kind": "?", "address": "?"},
                    "datagrams_in": gate.counters.datagrams_in if gate else 0,
                    "datagrams_out": gate.counters.datagrams_out if gate else 0,
                    "bytes_in": gate.counters.bytes_in if gate else 0,
                    "bytes_out": gate.counters.bytes_out if gate else 0,
                    "blocks_rebuilt": stats.blocks_rebuilt,
                    "surplus_shards": stats.surplus_shards,
                    "datagrams_lost": stats.datagrams_lost,
                    "redundancy": _redundancy(tunnel),
                    "drops": drops,
                }
            )
    map_status = None
    if config.warp_map.address is not None:
        client = core.map_client
        map_status = {
            "address": host_port(core.map_address)
            if core.map_address is not None
            else str(config.warp_map.addresses[0]),
            "registered": bool(client and client.all_registered(now) and client.uplinks),
            "reflexive": dict(core.map_reflexive),
            "nat_mapping": {
                name: core.nat_mapping.mapping(name) for name in sorted(core.map_reflexive)
            },
            "last_registration_age_s": None
            if core.map_registered_at is None
            else round(now - core.map_registered_at, 3),
        }
    first = next(iter(core.sessions.values()))
    return {
        "version": __version__,
        "uptime_s": round(uptime, 3),
        "public_key": encode_key(config.public_key),
        "paths": paths,
        "tunnels": tunnels,
        "map": map_status,
        # The first far gate's session (scripts written for one far gate).
        "session": {"far_gate": encode_key(first.key), **first.status(now)},
        "far_gates": far_gates,
        "uplinks": list(uplink_rows),
        "counters": dict(core.counters),
        # Per uplink with traffic: tier, period, bytes used (both ways), budget, exhausted.
        "uplink_usage": core.usage.status(),
    }
