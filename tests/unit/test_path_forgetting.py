"""Paths are forgotten: 20 restarts of the far gate, each with new NAT ports (virtual time).

The far gate sits behind two NATs (two uplinks); each restart it registers from new ports
and the map pushes the new endpoints. We have two uplinks. Documented bound (docs/protocol.md,
`PathProber.forget_after`): a path nothing offers any more is removed at most
`11 × path_timeout` after its last authenticated packet, so the table (and the `warp_path_*`
Prometheus series, one label set per path) holds per uplink the offered remotes plus those
heard within that time."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from tests.unit.test_node import UPLINKS, _config, tmp
from warp.keys import generate_private_key
from warp.metrics import SnapshotCollector
from warp.node import Gateway
from warp.paths.path import Address
from warp.paths.prober import PathProber, make_probe_reply

__all__ = ["tmp"]  # the fixture

HOSTS = ("203.0.113.1", "203.0.113.2")  # the far gate's two NATs
RESTARTS = 20
RESTART_INTERVAL = 12.0
PATH_TIMEOUT = 3.0
FORGOTTEN_WITHIN = 11 * PATH_TIMEOUT  # path_timeout + forget_after (10 × path_timeout)
STEP = 0.05


def _path_series(registry: CollectorRegistry) -> set[tuple[str, str]]:
    """The (uplink, remote) label sets of every `warp_path_*` series a scrape shows."""
    text = generate_latest(registry).decode()
    found = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("warp_path_"):
                found.add((sample.labels["uplink"], sample.labels["remote"]))
    return found


def test_path_table_and_metrics_stay_bounded_over_20_far_gate_restarts(tmp: Path) -> None:
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    gateway = Gateway(_config(tmp, "a", keys, 51820, 2, 4, False), static_uplinks=UPLINKS["a"])
    prober = gateway.session.prober = PathProber(1.0, PATH_TIMEOUT, random.Random(3))
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(gateway.snapshot))
    uplinks = [name for name, _ in UPLINKS["a"]]
    generations_alive = 1 + math.ceil(FORGOTTEN_WITHIN / RESTART_INTERVAL)
    bound = len(uplinks) * len(HOSTS) * generations_alive
    base = time.monotonic()  # the snapshot's clock (no running loop)
    now = base
    current: list[Address] = []
    largest_table = largest_series = 0
    for restart in range(RESTARTS + 3):  # 20 restarts, then time for the last stale ones
        if restart < RESTARTS:
            # The far gate restarts behind its NATs: new ports; the map pushes them.
            current = [(host, 40000 + restart) for host in HOSTS]
            prober.map_endpoints_changed(current)
            for uplink in uplinks:
                for remote in current:
                    prober.add_candidate(uplink, remote, "map", now)
        end = now + RESTART_INTERVAL
        while now < end:
            for uplink, remote, frame in prober.tick(now):
                if remote in current:  # only the running far gate answers
                    reply = make_probe_reply(frame)
                    assert reply is not None
                    prober.on_authenticated(uplink, remote, now + 0.02)
                    prober.on_probe_reply(reply, uplink, remote, now + 0.02)
            for path in prober.paths:
                if path.remote not in current:
                    assert path.last_authenticated is not None
                    age = now - path.last_authenticated
                    assert age <= FORGOTTEN_WITHIN + STEP, (path.key, age)
            largest_table = max(largest_table, len(prober))
            if round((now - base) / STEP) % 20 == 0:  # a scrape every second
                series = _path_series(registry)
                assert series == {(p.uplink, f"{p.remote[0]}:{p.remote[1]}") for p in prober.paths}
                largest_series = max(largest_series, len(series))
            now += STEP
    assert largest_table <= bound, (largest_table, bound)
    assert largest_series <= bound, (largest_series, bound)
    # The last generation is all that is left: one path per uplink and far-gate NAT.
    assert sorted(p.key for p in prober.paths) == sorted(
        (uplink, remote) for uplink in uplinks for remote in current
    )
    assert _path_series(registry) == {
        (uplink, f"{host}:{port}") for uplink in uplinks for host, port in current
    }
