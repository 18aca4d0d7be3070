"""Map cluster, sans-I/O in virtual time: two Registry instances joined as the Valkey link joins
them (announces to the other's mirror, forwards to the owner), MapClients that fail over.

The WireGuard layer is left out (as in test_map_client): a MapSend reaches the registry of the
instance the client currently uses, as if authenticated, from that uplink's address, unless
that instance is down.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from warp.config import validate_gateway_config
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.map_client.client import MapClient, MapSwitched, UplinkRegistered
from warp.map_client.messages import Endpoint, Register, Relay, encode
from warp_map_server.cluster import (
    ClusterMessageError,
    RelayIn,
    decode,
    encode_forward,
    encode_record,
    redis_url,
)
from warp_map_server.registry import Announce, ClientRecord, Forward, Registry

A, B, C = b"A" * 32, b"B" * 32, b"C" * 32
R = 10.0  # refresh interval: failover must not wait for it
T = 0.3  # response timeout (the gateway's)
STEP = 0.01


def rng(seed: int) -> Any:
    return random.Random(seed).randbytes


class Cluster:
    """Instances 0..n-1, the clients attached to them, a virtual clock."""

    def __init__(self, instances: int = 2, max_clients: int = 10_000) -> None:
        self.maps = [
            Registry(
                registration_ttl=30.0, boot_id=100 + i, clustered=True, max_clients=max_clients
            )
            for i in range(instances)
        ]
        self.down: set[int] = set()
        self.store_down = False  # Valkey unreachable: announces and forwards are lost
        self.clients: dict[bytes, tuple[MapClient[str], Endpoint, list[object]]] = {}
        self.now = 0.0

    def add(
        self, key: bytes, far: bytes | list[bytes], address: Endpoint, start_at: int
    ) -> MapClient[str]:
        client = MapClient[str](
            far, refresh_interval=R, response_timeout=T, map_count=len(self.maps), rng=rng(7)
        )
        client.map_index = start_at
        self.clients[key] = (client, address, [])
        client.add_uplink("u", self.now)
        self.pump()
        return client

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            for key, (client, address, events) in self.clients.items():
                events.extend(client.drain_events())
                for send in client.drain_outgoing():
                    moved = True
                    if client.map_index not in self.down:
                        self.maps[client.map_index].handle(key, send.frame, address, self.now)
            for index, registry in enumerate(self.maps):
                for output in registry.drain_cluster():
                    moved = True
                    if index in self.down or self.store_down:
                        continue
                    for other_index, other in enumerate(self.maps):
                        if other_index == index or other_index in self.down:
                            continue
                        if isinstance(output, Announce):
                            other.remote_update(output.record, self.now)
                        elif isinstance(output, Forward) and output.owner == other.boot_id:
                            other.relay_from_cluster(
                                output.sender,
                                output.target,
                                output.payload,
                                self.now,
                                output.source,
                                output.endpoint,
                            )
                for deliver in registry.drain():
                    moved = True
                    if index in self.down:
                        continue
                    for key, (client, address, _) in self.clients.items():
                        if key == deliver.peer and address == deliver.destination:
                            client.receive(deliver.plaintext, "u", self.now)
            if not moved:
                return

    def run_until(self, until: float) -> None:
        while self.now < until:
            self.now = round(self.now + STEP, 6)
            for client, _, _ in self.clients.values():
                client.tick(self.now)
            for index, registry in enumerate(self.maps):
                if index not in self.down:
                    registry.tick(self.now)
            self.pump()

    def events(self, key: bytes) -> list[object]:
        return self.clients[key][2]


def test_clients_on_two_instances_see_each_other_at_once() -> None:
    cluster = Cluster()
    a = cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    b = cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    cluster.run_until(0.05)
    assert a.peer_endpoints == (("203.0.113.2", 5000),)
    assert b.peer_endpoints == (("198.51.100.1", 4000),)
    # each holds its own client and mirrors the other's
    assert set(cluster.maps[0].clients) == {A} and set(cluster.maps[0].remote) == {B}
    assert set(cluster.maps[1].clients) == {B} and set(cluster.maps[1].remote) == {A}


def test_instance_killed_client_re_registers_on_the_next_within_two_seconds() -> None:
    cluster = Cluster()
    a = cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    b = cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    cluster.run_until(3.0)
    killed_at = cluster.now
    cluster.down.add(0)
    cluster.maps[0] = Registry(boot_id=999, clustered=True)  # whatever it held is gone
    registered_on_1 = None
    while cluster.now < killed_at + 5.0 and registered_on_1 is None:
        cluster.run_until(cluster.now + STEP)
        if A in cluster.maps[1].clients:
            registered_on_1 = cluster.now
    assert registered_on_1 is not None and registered_on_1 - killed_at <= 2.0
    switches = [e for e in cluster.events(A) if isinstance(e, MapSwitched)]
    assert [(s.previous, s.index) for s in switches] == [(0, 1)]
    assert isinstance(cluster.events(A)[-1], UplinkRegistered)
    assert a.map_index == 1
    # the far gate's view never went empty: A's record moved, it did not lapse
    assert b.peer_endpoints == (("198.51.100.1", 4000),)
    cluster.run_until(cluster.now + 3.0)
    assert a.peer_endpoints == (("203.0.113.2", 5000),)
    assert a.stats.failovers == 1  # it stays on the instance that answers


def test_full_cluster_still_takes_a_client_failing_over_and_refuses_a_new_one() -> None:
    cluster = Cluster(max_clients=2)
    a = cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    cluster.run_until(1.0)
    cluster.add(C, A, ("192.0.2.3", 6000), start_at=1)  # a third key: the cluster is full
    cluster.run_until(1.5)
    assert C not in cluster.maps[1].clients
    assert cluster.maps[1].counters["clients.refused"] >= 1
    cluster.down.add(0)
    cluster.run_until(5.0)
    assert a.map_index == 1 and A in cluster.maps[1].clients


def test_mutual_policy_across_instances_revokes_and_ignores_stale_records() -> None:
    """X (instance 1) stops naming W (instance 0) as its far gate: W is told X is gone, as on
    one map; an older record arriving late changes nothing."""
    cluster = Cluster()
    w = cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    x = cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    cluster.run_until(0.1)
    assert w.peer_endpoints == (("203.0.113.2", 5000),)
    old_record = cluster.maps[0].remote[B]
    frame = encode(Register(99, 1, C, x.instance))  # X now names C
    cluster.maps[1].handle(B, frame, ("203.0.113.2", 5000), cluster.now)
    cluster.pump()
    assert w.peer_endpoints == ()
    assert cluster.maps[0].remote[B].far_gate == C
    assert not cluster.maps[0].may_see(A, B)
    stale = ClientRecord(B, A, old_record.endpoints, old_record.version, old_record.owner, 30.0)
    cluster.maps[0].remote_update(stale, cluster.now)
    assert cluster.maps[0].remote[B].far_gate == C and not cluster.maps[0].may_see(A, B)


def test_an_operator_with_several_far_gates_is_seen_by_each_across_instances() -> None:
    """The operator (instance 0) names B and C; B and C register with instance 1: under
    mutual both see the operator and it sees both, through the mirrored records."""
    cluster = Cluster()
    operator = cluster.add(A, [B, C], ("198.51.100.1", 4000), start_at=0)
    b = cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    c = cluster.add(C, A, ("203.0.113.3", 6000), start_at=1)
    cluster.run_until(0.2)
    assert b.peer_endpoints == c.peer_endpoints == (("198.51.100.1", 4000),)
    assert operator.endpoints_of(B) == (("203.0.113.2", 5000),)
    assert operator.endpoints_of(C) == (("203.0.113.3", 6000),)
    assert cluster.maps[1].remote[A].far_gates == (B, C)
    assert cluster.maps[1].may_see(C, A)


def test_one_instance_does_not_fail_over_or_probe_often() -> None:
    cluster = Cluster(instances=1)
    a = cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    cluster.run_until(5.0)
    # a single map: lookups at the refresh interval only (no 0.5 s liveness lookups)
    assert cluster.maps[0].counters["requests.lookup"] == 1
    cluster.down.add(0)
    cluster.run_until(8.0)
    assert not any(isinstance(e, MapSwitched) for e in cluster.events(A))
    assert a.map_index == 0


def test_relay_across_instances_respects_policy_and_rate() -> None:
    cluster = Cluster()
    cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    cluster.add(C, C, ("192.0.2.3", 6000), start_at=1)  # names nobody: unreachable by A
    cluster.run_until(0.1)
    a_client = cluster.clients[A][0]
    for i in range(5):
        assert a_client.relay(b"\x7fpayload" + bytes([i]), cluster.now)
    # a relay to C by hand (A's client only relays to its far gate)
    cluster.maps[0].handle(A, encode(Relay(C, b"\x7fjunk")), ("198.51.100.1", 4000), cluster.now)
    cluster.pump()
    relayed_b = [e for e in cluster.events(B) if type(e).__name__ == "RelayReceived"]
    relayed_c = [e for e in cluster.events(C) if type(e).__name__ == "RelayReceived"]
    assert [e.payload for e in relayed_b] == [b"\x7fpayload" + bytes([i]) for i in range(5)]
    # the receiver hears which of the sender's endpoints it came from (its relayed path)
    assert {e.source for e in relayed_b} == {("198.51.100.1", 4000)}
    # a target endpoint named is checked by the instance holding the target
    a_client.relay(b"\x7fnamed", cluster.now, endpoint=("203.0.113.2", 5000))
    a_client.relay(b"\x7fnot-held", cluster.now, endpoint=("203.0.113.2", 5999))
    cluster.pump()
    relayed_b = [e for e in cluster.events(B) if type(e).__name__ == "RelayReceived"]
    assert [e.payload for e in relayed_b][5:] == [b"\x7fnamed"]
    assert relayed_c == []
    assert cluster.maps[0].counters["relay.refused"] == 1
    # a forward naming a target the other instance does not hold is dropped and counted there
    cluster.maps[1].relay_from_cluster(A, b"Z" * 32, b"\x7fx", cluster.now)
    assert cluster.maps[1].counters["cluster.relay_no_target"] == 1


def test_map_address_accepts_a_list() -> None:
    map_key, peer = (encode_key(public_key_of(generate_private_key())) for _ in range(2))
    data = {
        "private_key": encode_key(generate_private_key()),
        "warp_map": {"address": ["map1.example.net:13116", "[2001:db8::1]:13116"]},
        "far_gate": {"public_key": peer},
        "tunnels": {"t": {"gate": {"application_to_gate": 59401}}},
    }
    data["warp_map"]["public_key"] = map_key  # type: ignore[index]
    config = validate_gateway_config(data)
    assert [str(a) for a in config.warp_map.addresses] == [
        "map1.example.net:13116",
        "[2001:db8::1]:13116",
    ]


def test_cluster_store_down_keeps_mirrored_clients_then_forgets_the_dead() -> None:
    """Valkey down for longer than the TTL: each instance keeps serving the other's clients
    (their instances cannot refresh them meanwhile); back up, a client whose instance is gone
    lapses after one TTL, one whose instance re-announces stays."""
    cluster = Cluster(instances=3)
    ttl = cluster.maps[0].ttl
    cluster.add(A, B, ("198.51.100.1", 4000), start_at=0)
    b = cluster.add(B, A, ("203.0.113.2", 5000), start_at=1)
    cluster.add(C, C, ("192.0.2.3", 6000), start_at=2)
    cluster.run_until(0.1)
    cluster.store_down = True
    for registry in cluster.maps:
        registry.cluster_lost()
    cluster.run_until(ttl * 1.5)
    assert set(cluster.maps[1].remote) == {A, C}
    assert b.peer_endpoints == (("198.51.100.1", 4000),)
    # the store is back; instance 2 (C's) died meanwhile
    cluster.store_down = False
    cluster.down.add(2)
    del cluster.clients[C]
    for index in (0, 1):
        cluster.maps[index].cluster_back(cluster.now)
    cluster.pump()
    cluster.run_until(cluster.now + ttl + 1.0)
    assert set(cluster.maps[1].remote) == {A}
    assert b.peer_endpoints == (("198.51.100.1", 4000),)


def test_cluster_example_config_loads() -> None:
    from pathlib import Path

    from warp.config import load_map_config

    config = load_map_config(Path(__file__).parents[2] / "configs" / "warp-map-cluster.toml")
    assert config.cluster is not None and config.cluster.url.startswith("valkey://")


def test_cluster_codec_round_trip() -> None:
    record = ClientRecord(A, B, (("198.51.100.1", 4000), ("2001:db8::7", 5)), 42, 9, 12.5)
    assert decode(encode_record(record)) == record
    # a gateway with several far gates: an eighth field, only then (a one-far-gate record
    # stays readable by instances that predate it)
    fleet = ClientRecord(A, B, (("198.51.100.1", 4000),), 43, 9, 12.5, (C, b"D" * 32))
    assert decode(encode_record(fleet)) == fleet
    assert len(msgpack.unpackb(encode_record(record))) == 7
    assert len(msgpack.unpackb(encode_record(fleet))) == 8
    forward = Forward(9, A, B, b"\x04sealed")
    assert decode(encode_forward(forward)) == RelayIn(A, B, b"\x04sealed")
    assert len(msgpack.unpackb(encode_forward(forward))) == 4  # readable by older instances
    source, target = ("198.51.100.1", 4000), ("2001:db8::7", 5)
    for endpoint in (target, None):
        forward = Forward(9, A, B, b"\x04sealed", source, endpoint)
        assert decode(encode_forward(forward)) == RelayIn(A, B, b"\x04sealed", source, endpoint)
    assert redis_url("valkey://h:6379/0") == "redis://h:6379/0"
    assert redis_url("valkeys://u:p@h/1") == "rediss://u:p@h/1"


@given(st.binary(max_size=300))
def test_cluster_decode_of_garbage_raises_only_its_own_error(data: bytes) -> None:
    with contextlib.suppress(ClusterMessageError):
        decode(data)


@given(
    st.lists(
        st.one_of(
            st.text(max_size=3),
            st.binary(max_size=40),
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.lists(st.one_of(st.binary(max_size=17), st.integers(0, 70000)), max_size=3),
        ),
        max_size=8,
    )
)
def test_cluster_decode_of_wrong_shapes_raises_only_its_own_error(items: list[object]) -> None:
    import msgpack

    for head in ("r", "f"):
        with contextlib.suppress(ClusterMessageError):
            decode(msgpack.packb([head, *items]))
