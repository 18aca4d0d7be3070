"""SimNet's NATs on their own, then the map (MapCore) and its clients (the sans-I/O MapClient
with a WireGuard device each) through them, in virtual time."""

from __future__ import annotations

import random

import pytest

from tests.sim.hosts import PUBLIC, MapClientHost, MapHost, map_config
from tests.sim.network import IidLoss
from tests.sim.simnet import NEVER, Address, Nat, NatKind, SimNet
from warp.map_client.client import PeerEndpointsChanged
from warp.wireguard import generate_private_key, public_key_of

MAP: Address = ("198.51.100.1", 13116)
REMOTE_A: Address = ("203.0.113.7", 4000)
REMOTE_B: Address = ("203.0.113.8", 5000)
INSIDE: Address = ("192.168.1.2", 51820)


# ------------------------------------------------------------------------------------ NAT


def test_cone_keeps_one_port_symmetric_takes_a_random_port_per_remote() -> None:
    cone = Nat.of_kind("port-restricted-cone", "100.64.0.1", random.Random(1), 30.0)
    assert cone.outbound(INSIDE, REMOTE_A, 0.0) == cone.outbound(INSIDE, REMOTE_B, 0.1)
    symmetric = Nat.of_kind("symmetric", "100.64.0.2", random.Random(1), 30.0)
    ports = {symmetric.outbound(INSIDE, (f"203.0.113.{i}", 4000), 0.0)[1] for i in range(50)}
    assert len(ports) == 50  # one per remote
    assert len({p // 1024 for p in ports}) > 20  # random, not sequential
    # the same remote keeps its port while the binding lives
    first = symmetric.outbound(INSIDE, REMOTE_A, 1.0)
    assert symmetric.outbound(INSIDE, REMOTE_A, 2.0) == first


@pytest.mark.parametrize(
    ("kind", "same_ip_other_port", "other_ip"),
    [
        ("full-cone", True, True),
        ("restricted-cone", True, False),
        ("port-restricted-cone", False, False),
        ("symmetric", False, False),
    ],
)
def test_filtering(kind: NatKind, same_ip_other_port: bool, other_ip: bool) -> None:
    nat = Nat.of_kind(kind, "100.64.0.1", random.Random(2), 30.0)
    public = nat.outbound(INSIDE, REMOTE_A, 0.0)
    assert nat.inbound(public[1], REMOTE_A, 0.1) == INSIDE  # the remote it sent to
    assert (nat.inbound(public[1], (REMOTE_A[0], 4001), 0.2) == INSIDE) is same_ip_other_port
    assert (nat.inbound(public[1], REMOTE_B, 0.3) == INSIDE) is other_ip
    assert nat.inbound(public[1] ^ 1, REMOTE_A, 0.4) is None  # no binding on that port
    assert nat.stats["no_binding"] == 1
    assert nat.stats["filtered"] == (not same_ip_other_port) + (not other_ip)


def test_conntrack_timeout_and_rebinding_move_the_public_port() -> None:
    nat = Nat.of_kind("port-restricted-cone", "100.64.0.1", random.Random(3), timeout=30.0)
    public = nat.outbound(INSIDE, REMOTE_A, 0.0)
    # replies keep the binding alive as much as datagrams out do (conntrack sees both)
    for t in range(20, 200, 20):
        assert nat.inbound(public[1], REMOTE_A, float(t)) == INSIDE
    assert nat.outbound(INSIDE, REMOTE_A, 200.0) == public
    # idle for the timeout: gone; what comes in is dropped, what goes out gets a new port
    assert nat.inbound(public[1], REMOTE_A, 230.0) is None
    assert nat.stats["expired"] == 1
    renewed = nat.outbound(INSIDE, REMOTE_A, 230.0)
    assert renewed != public
    nat.rebind()
    assert nat.inbound(renewed[1], REMOTE_A, 230.1) is None
    rebound = nat.outbound(INSIDE, REMOTE_A, 230.2)
    assert rebound not in (public, renewed)


# ------------------------------------------------------------------------------------ SimNet


class Sim:
    """A map on a public address and map client hosts behind NATs."""

    def __init__(self, seed: int, *, refresh: float = 10.0, **map_settings: object) -> None:
        self.net = SimNet(seed)
        keys = random.Random(seed)
        self.map_key = generate_private_key(keys.randbytes)
        self.map = MapHost(
            map_config(self.map_key, MAP, **map_settings), rng=self.net.rng_bytes(), now=0.0
        )
        self.net.add_host("map", self.map, observe=self.map.observe)
        self.net.add_uplink("map", PUBLIC, MAP)
        self.refresh = refresh
        self.keys = {name: generate_private_key(keys.randbytes) for name in ("a", "b")}

    def client(self, name: str, far: str, nats: list[Nat], *, loss: float = 0.0) -> MapClientHost:
        host = MapClientHost(
            name,
            self.keys[name],
            public_key_of(self.map_key),
            MAP,
            public_key_of(self.keys[far]),
            rng=self.net.rng_bytes(),
            uplinks=[f"{name}{i}" for i in range(len(nats))],
            now=self.net.now,
            refresh_interval=self.refresh,
        )
        self.net.add_host(name, host)
        for i, nat in enumerate(nats):
            losses = [IidLoss(loss, self.net.child_rng())] if loss else []
            self.net.add_uplink(
                name,
                f"{name}{i}",
                (f"192.168.{i}.2", 51820),
                nat=nat,
                egress_losses=losses,
                ingress_losses=losses,
            )
        return host

    def registered(self, host: MapClientHost) -> bool:
        return host.client.all_registered(self.net.now)


def test_registration_through_nats_reports_each_uplinks_public_binding() -> None:
    """Each uplink's registration reaches the map through its own NAT: the reflexive address
    the map reports is that NAT's binding for the uplink, and the far gate learns both.
    First registration after one handshake and one request (2 round trips of 40 ms)."""
    sim = Sim(1)
    nats = [
        sim.net.nat("100.64.0.1", "port-restricted-cone"),
        sim.net.nat("100.64.1.1", "symmetric"),
    ]
    a = sim.client("a", "b", nats)
    b = sim.client("b", "a", [sim.net.nat("100.64.2.1", "restricted-cone")])
    registered_at = sim.net.run_while(lambda: not sim.registered(a), limit=5.0)
    assert registered_at == pytest.approx(0.080, abs=0.002)
    sim.net.run_for(0.5)
    uplinks = sim.net.hosts["a"].uplinks
    expected = {name: uplinks[name].public(MAP) for name in ("a0", "a1")}
    assert a.client.reflexive_addresses(sim.net.now) == expected
    assert set(b.client.peer_endpoints) == set(expected.values())
    assert set(a.client.peer_endpoints) == {sim.net.hosts["b"].uplinks["b0"].public(MAP)}
    assert sim.map.core.stats(sim.net.now)["registry.registrations"] == 3


# Which NAT pairs let a direct path through once both sides punch towards the endpoints the
# map gave (RFC 5128): a symmetric NAT's port towards the far gate is not the one the map saw,
# so it needs a far side that admits an unknown port (full cone) or an unknown port from a
# known IP (restricted cone).
NAT_MATRIX: list[tuple[NatKind, NatKind, bool]] = [
    ("full-cone", "symmetric", True),
    ("restricted-cone", "symmetric", True),
    ("port-restricted-cone", "port-restricted-cone", True),
    ("port-restricted-cone", "symmetric", False),
    ("symmetric", "symmetric", False),
]


@pytest.mark.parametrize(("kind_a", "kind_b", "direct"), NAT_MATRIX)
def test_nat_matrix_punching_and_relay(kind_a: NatKind, kind_b: NatKind, direct: bool) -> None:
    sim = Sim(2)
    a = sim.client("a", "b", [sim.net.nat("100.64.0.1", kind_a)])
    b = sim.client("b", "a", [sim.net.nat("100.64.1.1", kind_b)])
    sim.net.run_for(2.0)
    assert sim.registered(a) and sim.registered(b)
    assert bool(a.direct) is direct and bool(b.direct) is direct
    if direct:
        # the direct path is up within a few punch intervals of learning the endpoints
        assert max(a.direct.values()) < 1.0
    # the relay through the map works whatever the NATs
    sent = sim.net.now
    sim.net.at(sent, lambda now: a.relay(b"sealed wireguard message", now))
    sim.net.run_for(0.1)
    ((at, sender, payload),) = b.relayed
    assert (sender, payload) == (public_key_of(sim.keys["a"]), b"sealed wireguard message")
    assert at - sent == pytest.approx(0.040)  # two access links each way, no detour


def test_rebinding_is_pushed_to_the_far_gate_at_the_next_refresh() -> None:
    """A's NAT forgets its bindings (conntrack flush): A's next registration comes from a new
    port, the map's set changes and B gets a push with it within one refresh interval."""
    sim = Sim(3, refresh=2.0)
    nat = sim.net.nat("100.64.0.1", "port-restricted-cone")
    sim.client("a", "b", [nat])
    b = sim.client("b", "a", [sim.net.nat("100.64.1.1", "port-restricted-cone")])
    sim.net.run_for(1.0)
    before = b.client.peer_endpoints
    assert before == (nat.public_address(("192.168.0.2", 51820)),)
    sim.net.at(1.5, lambda now: nat.rebind())
    moved = sim.net.run_while(lambda: b.client.peer_endpoints == before, limit=10.0)
    after = nat.public_address(("192.168.0.2", 51820))
    assert after is not None and after != before[0]
    assert after in b.client.peer_endpoints
    assert moved - 1.5 <= sim.refresh + 0.1
    pushes = [e for _, e in b.events if isinstance(e, PeerEndpointsChanged) and e.pushed]
    assert pushes and after in pushes[-1].endpoints


def test_map_restart_every_uplink_registers_again() -> None:
    """The map restarts (sessions, registrations gone): two unanswered requests, a fresh
    handshake, every uplink registered again; B sees A's endpoints again."""
    sim = Sim(4, refresh=2.0)
    nats = [
        sim.net.nat("100.64.0.1", "port-restricted-cone"),
        sim.net.nat("100.64.1.1", "full-cone"),
    ]
    a = sim.client("a", "b", nats)
    b = sim.client("b", "a", [sim.net.nat("100.64.2.1", "symmetric")])
    sim.net.run_for(1.0)
    sim.net.at(1.0, sim.map.restart)
    sim.net.run_for(0.01)
    assert sim.map.core.registry.registration_count == 0
    back = sim.net.run_while(lambda: sim.map.core.registry.registration_count < 3, limit=20.0)
    assert back - 1.0 < 2.0 + 2 * 1.0 + 1.0  # next refresh, two timeouts, handshake margin
    sim.net.run_for(1.0)
    assert len(b.client.peer_endpoints) == 2 and sim.registered(a)


def test_lossy_uplinks_still_register_and_runs_are_a_function_of_the_seed() -> None:
    def run(seed: int) -> tuple[float, tuple[Address, ...], int]:
        sim = Sim(seed)
        a = sim.client("a", "b", [sim.net.nat("100.64.0.1", "full-cone")], loss=0.3)
        b = sim.client("b", "a", [sim.net.nat("100.64.1.1", "full-cone")], loss=0.3)
        done = sim.net.run_while(
            lambda: not (sim.registered(a) and b.client.peer_endpoints), limit=60.0
        )
        lost = sum(
            u.egress.stats.lost + u.ingress.stats.lost
            for h in sim.net.hosts.values()
            for u in h.uplinks.values()
        )
        return done, b.client.peer_endpoints, lost

    first = run(5)
    assert first[0] != NEVER and first[2] > 0
    assert run(5) == first
    assert run(6) != first
