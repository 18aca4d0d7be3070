"""warp.metrics: a fake StatusSnapshot served on 127.0.0.1:0, scraped over HTTP and parsed."""

from __future__ import annotations

import asyncio
import copy
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from warp.metrics import (
    MetricsError,
    SnapshotCache,
    start_gateway_metrics,
    start_metrics_server,
)

SNAPSHOT: dict[str, Any] = {
    "version": "0.1.0",
    "uptime_s": 12.5,
    "public_key": "A" * 52,
    "paths": [
        {
            "uplink": "wwan0",
            "local_address": "10.0.0.2:40001",
            "remote_address": "198.51.100.7:40002",
            "source": "map",
            "state": "active",
            "rtt_ms": 42.5,
            "loss_pct": 1.5,
            "last_rx_age_s": 0.25,
            "tx_bytes": 1000,
            "tx_packets": 10,
            "rx_bytes": 2000,
            "rx_packets": 20,
        },
        {
            "uplink": "wlan0",
            "local_address": "192.168.1.5:40003",
            "remote_address": "198.51.100.7:40002",
            "source": "static",
            "state": "probing",
            "rtt_ms": None,
            "loss_pct": None,
            "last_rx_age_s": None,
            "tx_bytes": 64,
            "tx_packets": 1,
            "rx_bytes": 0,
            "rx_packets": 0,
        },
    ],
    "tunnels": [
        {
            "name": "wireguard",
            "tunnel_id": 4242,
            "gate": {"kind": "loopback", "address": "127.0.0.1:59401"},
            "datagrams_in": 100,
            "datagrams_out": 90,
            "bytes_in": 140000,
            "bytes_out": 126000,
            "blocks_rebuilt": 7,
            "surplus_shards": 40,
            "datagrams_lost": 2,
            "drops": {"send_deadline": 3, "duplicate_shards": 11},
        },
        {
            "name": "video",
            "tunnel_id": 17,
            "gate": {"kind": "unix", "address": "/run/video.sock"},
            "datagrams_in": 5,
            "datagrams_out": 0,
            "bytes_in": 500,
            "bytes_out": 0,
            "blocks_rebuilt": 0,
            "datagrams_lost": 0,
            "drops": {},
        },
    ],
    "map": {
        "address": "warp-map.example.net:13116",
        "registered": True,
        "reflexive": {"wwan0": "203.0.113.9:40001", "wlan0": None},
        "last_registration_age_s": 3.5,
    },
    "session": {
        "far_gate": "B" * 52,
        "handshake_state": "established",
        "last_handshake_age_s": 30.0,
        "rekeys": 4,
    },
    "uplinks": [
        {"name": "wwan0", "local_address": "10.0.0.2:40001", "state": "up", "send_errors": 0},
        {"name": "wlan0", "local_address": "192.168.1.5:40003", "state": "down", "send_errors": 5},
    ],
    "counters": {"no_path": 6, "unknown_tunnel": 1},
}


def scrape(url: str) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


@pytest.fixture
def served() -> Iterator[str]:
    cache = SnapshotCache()
    cache.update(SNAPSHOT)
    server = start_metrics_server("127.0.0.1", 0, cache, age=cache.age)
    try:
        assert server.port != 0
        yield server.url
    finally:
        server.close()


def test_paths_by_uplink_and_remote(served: str) -> None:
    families = scrape(served)
    remote = "198.51.100.7:40002"
    rtt = families["warp_path_rtt_seconds"]
    assert (
        value(rtt, "warp_path_rtt_seconds", far_gate="default", uplink="wwan0", remote=remote)
        == 0.0425
    )
    # a path without a measurement yet has no RTT sample (not a fake 0)
    assert not [s for s in rtt if s.labels.get("uplink") == "wlan0"]
    loss = families["warp_path_loss_ratio"]
    assert (
        value(loss, "warp_path_loss_ratio", far_gate="default", uplink="wwan0", remote=remote)
        == 0.015
    )
    state = families["warp_path_state"]
    assert (
        value(
            state,
            "warp_path_state",
            far_gate="default",
            uplink="wwan0",
            remote=remote,
            state="active",
        )
        == 1
    )
    assert (
        value(
            state,
            "warp_path_state",
            far_gate="default",
            uplink="wwan0",
            remote=remote,
            state="dead",
        )
        == 0
    )
    assert (
        value(
            state,
            "warp_path_state",
            far_gate="default",
            uplink="wlan0",
            remote=remote,
            state="probing",
        )
        == 1
    )
    sent = families["warp_path_sent_bytes"]
    assert (
        value(sent, "warp_path_sent_bytes_total", far_gate="default", uplink="wwan0", remote=remote)
        == 1000
    )
    assert (
        value(sent, "warp_path_sent_bytes_total", far_gate="default", uplink="wlan0", remote=remote)
        == 64
    )
    received = families["warp_path_received_bytes"]
    assert (
        value(
            received,
            "warp_path_received_bytes_total",
            far_gate="default",
            uplink="wwan0",
            remote=remote,
        )
        == 2000
    )
    pairs = {(s.labels["uplink"], s.labels["remote"]) for s in state}
    assert pairs == {("wwan0", remote), ("wlan0", remote)}


def test_tunnels_and_drops(served: str) -> None:
    families = scrape(served)
    datagrams = families["warp_tunnel_datagrams"]
    name = "warp_tunnel_datagrams_total"
    assert value(datagrams, name, far_gate="default", tunnel="wireguard", direction="in") == 100
    assert value(datagrams, name, far_gate="default", tunnel="wireguard", direction="out") == 90
    assert value(datagrams, name, far_gate="default", tunnel="video", direction="in") == 5
    rebuilt = families["warp_tunnel_blocks_rebuilt"]
    assert (
        value(rebuilt, "warp_tunnel_blocks_rebuilt_total", far_gate="default", tunnel="wireguard")
        == 7
    )
    lost = families["warp_tunnel_datagrams_lost"]
    assert (
        value(lost, "warp_tunnel_datagrams_lost_total", far_gate="default", tunnel="wireguard") == 2
    )
    surplus = families["warp_tunnel_surplus_shards"]
    assert (
        value(surplus, "warp_tunnel_surplus_shards_total", far_gate="default", tunnel="wireguard")
        == 40
    )
    with urllib.request.urlopen(served, timeout=5) as reply:
        text = reply.read().decode()
    assert "# HELP warp_tunnel_surplus_shards_total Shards received after their block" in text
    assert "a data shard never arrived (0 on a clean link)" in text
    drops = families["warp_tunnel_drops"]
    assert (
        value(
            drops,
            "warp_tunnel_drops_total",
            far_gate="default",
            tunnel="wireguard",
            reason="send_deadline",
        )
        == 3
    )
    assert {s.labels["tunnel"] for s in families["warp_tunnel_info"]} == {"wireguard", "video"}
    info = families["warp_tunnel_info"]
    assert (
        value(
            info,
            "warp_tunnel_info",
            far_gate="default",
            tunnel="wireguard",
            tunnel_id="4242",
            gate_kind="loopback",
            gate_address="127.0.0.1:59401",
        )
        == 1
    )


def test_session_map_uplinks_and_counters(served: str) -> None:
    families = scrape(served)
    far = "default"  # a snapshot without far gate names: its one far gate
    handshake = families["warp_session_handshake_state"]
    assert value(handshake, "warp_session_handshake_state", far_gate=far, state="established") == 1
    assert value(handshake, "warp_session_handshake_state", far_gate=far, state="none") == 0
    assert value(families["warp_session_rekeys"], "warp_session_rekeys_total", far_gate=far) == 4
    info = families["warp_far_gate_info"]
    assert value(info, "warp_far_gate_info", far_gate=far, public_key="B" * 52, kind="") == 1
    the_map = "warp-map.example.net:13116"
    assert value(families["warp_map_registered"], "warp_map_registered", map=the_map) == 1
    registered = families["warp_map_uplink_registered"]
    name = "warp_map_uplink_registered"
    assert value(registered, name, map=the_map, uplink="wwan0", reflexive="203.0.113.9:40001") == 1
    assert value(registered, name, map=the_map, uplink="wlan0", reflexive="") == 0
    assert value(families["warp_uplink_up"], "warp_uplink_up", uplink="wlan0") == 0
    errors = families["warp_uplink_send_errors"]
    assert value(errors, "warp_uplink_send_errors_total", uplink="wlan0") == 5
    events = families["warp_gateway_events"]
    assert value(events, "warp_gateway_events_total", event="no_path") == 6
    assert value(families["warp_up"], "warp_up") == 1
    assert value(families["warp_uptime_seconds"], "warp_uptime_seconds") == 12.5
    age = value(families["warp_metrics_snapshot_age_seconds"], "warp_metrics_snapshot_age_seconds")
    assert 0 <= age < 5


def test_no_snapshot_yet_and_failing_snapshot() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    for source in (SnapshotCache(), broken):
        server = start_metrics_server("127.0.0.1", 0, source)
        try:
            families = scrape(server.url)
        finally:
            server.close()
        assert value(families["warp_up"], "warp_up") == 0
        assert "warp_path_state" not in families


def test_malformed_snapshot_fields_are_skipped() -> None:
    bad = copy.deepcopy(SNAPSHOT)
    bad["paths"] = [{"uplink": "x", "rtt_ms": "fast"}, "garbage"]
    bad["tunnels"] = "nope"
    bad["session"] = None
    cache = SnapshotCache()
    cache.update(bad)
    server = start_metrics_server("127.0.0.1", 0, cache)
    try:
        families = scrape(server.url)
    finally:
        server.close()
    assert value(families["warp_up"], "warp_up") == 1
    assert not families["warp_path_rtt_seconds"]
    assert "warp_tunnel_datagrams" not in families


def test_address_in_use_is_one_line_error() -> None:
    server = start_metrics_server("127.0.0.1", 0, SnapshotCache())
    try:
        with pytest.raises(MetricsError) as info:
            start_metrics_server("127.0.0.1", server.port, SnapshotCache())
        assert "\n" not in str(info.value)
        assert f"127.0.0.1:{server.port}" in str(info.value)
    finally:
        server.close()


def test_gateway_exporter_refreshes_on_the_loop() -> None:
    """The node's wiring: the cache is filled on the loop; scrapes read the copy."""
    state = copy.deepcopy(SNAPSHOT)
    calls = 0

    def snapshot() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        state["uptime_s"] = float(calls)
        return state

    async def main() -> tuple[float, float]:
        exporter = start_gateway_metrics(("127.0.0.1", 0), snapshot, interval=0.05)
        task = asyncio.create_task(exporter.refresh_forever())
        try:
            loop = asyncio.get_running_loop()
            first = await loop.run_in_executor(None, scrape, exporter.server.url)
            await asyncio.sleep(0.3)
            later = await loop.run_in_executor(None, scrape, exporter.server.url)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            exporter.close()
        return (
            value(first["warp_uptime_seconds"], "warp_uptime_seconds"),
            value(later["warp_uptime_seconds"], "warp_uptime_seconds"),
        )

    first, later = asyncio.run(main())
    assert first >= 1
    assert later > first


def http_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def test_bad_requests_get_an_http_error_and_the_endpoint_keeps_serving() -> None:
    cache = SnapshotCache()
    cache.update(SNAPSHOT)
    server = start_metrics_server("127.0.0.1", 0, cache)
    try:
        for request, status in (
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
            (b"GET /admin HTTP/1.1\r\n\r\n", b"404"),
            (b"\x16\x03\x01 not http\r\n\r\n", b"400"),
            (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        ):
            assert http_exchange(server.port, request).split(b" ", 2)[1] == status
        head = http_exchange(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert value(scrape(server.url)["warp_up"], "warp_up") == 1
        assert server.rejected["bad_method"] == 1 and server.rejected["head_too_long"] == 1
    finally:
        server.close()


def test_idle_connections_cannot_lock_a_scraper_out() -> None:
    cache = SnapshotCache()
    cache.update(SNAPSHOT)
    server = start_metrics_server("127.0.0.1", 0, cache, max_connections=4, header_timeout=30)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        for _ in range(3):  # the first takes the slot of the oldest idle connection
            assert value(scrape(server.url)["warp_up"], "warp_up") == 1
        assert server.rejected["evicted_idle"] == 1
        idle[0].settimeout(5)
        assert idle[0].recv(10) == b""  # the oldest was closed to make room
    finally:
        for s in idle:
            s.close()
        server.close()


RELAY = "203.0.113.9:13116"


def fleet_path(far_gate: str, remote: str, state: str, tx_bytes: int) -> dict[str, Any]:
    return {
        "uplink": "eth0",
        "local_address": "10.0.0.1:40001",
        "remote_address": remote,
        "source": "relay" if remote == RELAY else "map",
        "state": state,
        "rtt_ms": 30.0,
        "loss_pct": 0.0,
        "last_rx_age_s": 0.1,
        "tx_bytes": tx_bytes,
        "tx_packets": 1,
        "rx_bytes": 0,
        "rx_packets": 0,
        "far_gate": far_gate,
    }


def fleet_tunnel(name: str, far_gate: str, datagrams_in: int) -> dict[str, Any]:
    return {
        "name": name,
        "tunnel_id": 1,  # the same id towards two far gates is allowed
        "gate": {"kind": "loopback", "address": f"127.0.0.1:{59400 + datagrams_in}"},
        "datagrams_in": datagrams_in,
        "datagrams_out": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "blocks_rebuilt": 0,
        "datagrams_lost": datagrams_in // 10,
        "drops": {"send_deadline": 1},
        "far_gate": far_gate,
    }


FLEET: dict[str, Any] = {
    **copy.deepcopy(SNAPSHOT),
    # both vehicles relayed through the same map address from the same uplink: the far_gate
    # label is what keeps their series apart
    "paths": [
        fleet_path("truck1", RELAY, "active", 100),
        fleet_path("truck2", RELAY, "probing", 200),
        fleet_path("truck2", "198.51.100.2:5000", "dead", 300),
    ],
    "tunnels": [
        fleet_tunnel("video1", "truck1", 10),
        fleet_tunnel("video2", "truck2", 20),
        # a tun gate shared by both: one entry per far gate, the same name
        fleet_tunnel("lan", "truck1", 30),
        fleet_tunnel("lan", "truck2", 30),
    ],
    "session": {"far_gate": "T1" * 26, "handshake_state": "established", "rekeys": 0},
    "far_gates": {
        "truck1": {
            "public_key": "T1" * 26,
            "kind": "warp",
            "session": {"handshake_state": "established", "last_handshake_age_s": 3.0,
                        "rekeys": 2, "handshakes": 3},
            "relay": True,
        },
        "truck2": {
            "public_key": "T2" * 26,
            "kind": "wireguard",
            "session": {"handshake_state": "initiating", "last_handshake_age_s": None,
                        "rekeys": 0, "handshakes": 0},
            "relay": False,
        },
    },
}  # fmt: skip


def scrape_snapshot(snapshot: dict[str, Any]) -> dict[str, list[Sample]]:
    cache = SnapshotCache()
    cache.update(snapshot)
    server = start_metrics_server("127.0.0.1", 0, cache)
    try:
        return scrape(server.url)
    finally:
        server.close()


def test_fleet_series_are_labelled_by_far_gate() -> None:
    families = scrape_snapshot(FLEET)
    state = families["warp_path_state"]
    name = "warp_path_state"
    on_relay = {"uplink": "eth0", "remote": RELAY}
    assert value(state, name, far_gate="truck1", **on_relay, state="active") == 1
    assert value(state, name, far_gate="truck2", **on_relay, state="probing") == 1
    sent = families["warp_path_sent_bytes"]
    assert value(sent, "warp_path_sent_bytes_total", far_gate="truck1", **on_relay) == 100
    assert value(sent, "warp_path_sent_bytes_total", far_gate="truck2", **on_relay) == 200
    series = {(s.labels["far_gate"], s.labels["remote"]) for s in sent}
    assert series == {("truck1", RELAY), ("truck2", RELAY), ("truck2", "198.51.100.2:5000")}

    datagrams = families["warp_tunnel_datagrams"]
    name = "warp_tunnel_datagrams_total"
    assert value(datagrams, name, far_gate="truck1", tunnel="video1", direction="in") == 10
    assert value(datagrams, name, far_gate="truck2", tunnel="video2", direction="in") == 20
    # the shared tun gate's tunnel: a series per far gate, not two samples of one series
    assert value(datagrams, name, far_gate="truck1", tunnel="lan", direction="in") == 30
    assert value(datagrams, name, far_gate="truck2", tunnel="lan", direction="in") == 30
    lost = families["warp_tunnel_datagrams_lost"]
    assert value(lost, "warp_tunnel_datagrams_lost_total", far_gate="truck2", tunnel="video2") == 2
    drops = families["warp_tunnel_drops"]
    assert {s.labels["far_gate"] for s in drops} == {"truck1", "truck2"}
    info = families["warp_tunnel_info"]
    assert {(s.labels["far_gate"], s.labels["tunnel"]) for s in info} == {
        ("truck1", "video1"), ("truck2", "video2"), ("truck1", "lan"), ("truck2", "lan"),
    }  # fmt: skip

    handshake = families["warp_session_handshake_state"]
    name = "warp_session_handshake_state"
    assert value(handshake, name, far_gate="truck1", state="established") == 1
    assert value(handshake, name, far_gate="truck2", state="initiating") == 1
    assert value(handshake, name, far_gate="truck2", state="established") == 0
    # one session per far gate: the top-level (compat) session is not counted again
    assert {s.labels["far_gate"] for s in handshake} == {"truck1", "truck2"}
    age = families["warp_session_last_handshake_age_seconds"]
    assert [(s.labels, s.value) for s in age] == [({"far_gate": "truck1"}, 3.0)]
    handshakes = families["warp_session_handshakes"]
    assert value(handshakes, "warp_session_handshakes_total", far_gate="truck1") == 3
    assert (
        value(families["warp_session_rekeys"], "warp_session_rekeys_total", far_gate="truck1") == 2
    )
    far_info = families["warp_far_gate_info"]
    assert value(far_info, "warp_far_gate_info", far_gate="truck2", public_key="T2" * 26,
                 kind="wireguard") == 1  # fmt: skip
    relayed = families["warp_far_gate_relayed"]
    assert value(relayed, "warp_far_gate_relayed", far_gate="truck1") == 1
    assert value(relayed, "warp_far_gate_relayed", far_gate="truck2") == 0


def test_malformed_far_gates_are_skipped() -> None:
    bad = copy.deepcopy(FLEET)
    bad["far_gates"] = {"x": "garbage", "y": {"session": "nope", "relay": "maybe"}}
    families = scrape_snapshot(bad)
    assert value(families["warp_up"], "warp_up") == 1
    assert {s.labels["far_gate"] for s in families["warp_far_gate_info"]} == {"x", "y"}
    assert "warp_session_handshake_state" not in families
    assert "warp_far_gate_relayed" not in families


def test_each_uplinks_nat_mapping_is_a_series() -> None:
    snap = copy.deepcopy(SNAPSHOT)
    snap["map"]["nat_mapping"] = {"wwan0": "endpoint-independent", "wlan0": "unknown"}
    cache = SnapshotCache()
    cache.update(snap)
    server = start_metrics_server("127.0.0.1", 0, cache)
    try:
        families = scrape(server.url)
    finally:
        server.close()
    mapping = families["warp_uplink_nat_mapping"]
    name = "warp_uplink_nat_mapping"
    assert value(mapping, name, uplink="wwan0", mapping="endpoint-independent") == 1
    assert value(mapping, name, uplink="wlan0", mapping="unknown") == 1
