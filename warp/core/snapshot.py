"""The gateway's status snapshot (`warp status --json`, metrics), built from a `GatewayCore`
and what the shell knows of its sockets and gates (plain data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from warp import __version__
from warp.core.gateway import GatewayCore
from warp.core.session import host_port, relayed_over
from warp.gate.base import Gate
from warp.keys import encode_key
from warp.paths.path import PathState
from warp.paths.scheduler import ShardScheduler
from warp.status import gate_info


def _redundancy(scheduler: ShardScheduler[Any]) -> dict[str, Any]:
    """A tunnel's code and whether it survives losing an uplink."""
    return {
        "k": scheduler.k,
        "n": scheduler.n,
        "effective_n": scheduler.effective_n,
        "spread": "survive_uplink_loss",
        "protected": scheduler.protected,
        "protection": scheduler.protection,
        **_adaptive(scheduler),
    }


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
                    "redundancy": _redundancy(tunnel.scheduler),
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
    }
