"""Hard NATs in virtual time: each uplink's NAT mapping learned from the map's secondary port
(as ``tailscale netcheck``), shown in the status snapshot."""

from __future__ import annotations

import random

from tests.sim.gateways import MAP, Fleet, Peer
from tests.sim.hosts import map_config
from warp.core.snapshot import snapshot
from warp.map_client.messages import Register, Registered, decode, encode
from warp.wireguard import Device, generate_private_key, public_key_of
from warp_map_server.core import MapCore

SECONDARY_PORT = 13117


def test_status_tells_a_cone_uplink_from_a_symmetric_one() -> None:
    fleet = Fleet(7, map_secondary_port=SECONDARY_PORT)
    config = fleet.config("a", [Peer("b", "t")])
    host = fleet.gateway("a", config, ["port-restricted-cone", "symmetric"])
    fleet.net.run_until(3.0)
    status = snapshot(host.core, 3.0, uptime=3.0, uplink_rows=[], gates={})["map"]
    assert status is not None
    assert status["nat_mapping"] == {
        "wan0": "endpoint-independent",
        "wan1": "address-dependent",
    }


def test_without_a_secondary_port_the_mapping_stays_unknown() -> None:
    fleet = Fleet(7)
    config = fleet.config("a", [Peer("b", "t")])
    host = fleet.gateway("a", config, ["port-restricted-cone", "symmetric"])
    fleet.net.run_until(3.0)
    status = snapshot(host.core, 3.0, uptime=3.0, uplink_rows=[], gates={})["map"]
    assert status is not None
    assert status["nat_mapping"] == {"wan0": "unknown", "wan1": "unknown"}


def test_secondary_port_answers_only_a_sessions_register_and_registers_nothing() -> None:
    """Hostile or stray input on the secondary port: garbage and handshakes get no answer
    (counted); a Register over an established session is answered with the address seen
    there and leaves the registry as it was."""
    rng = random.Random(1)
    map_key, client_key = generate_private_key(rng.randbytes), generate_private_key(rng.randbytes)
    core = MapCore(
        map_config(map_key, MAP, secondary_port=SECONDARY_PORT), now=0.0, rng=rng.randbytes
    )
    client = Device(client_key, rng=rng.randbytes)
    client.add_peer(public_key_of(map_key), endpoint=MAP)
    source = ("203.0.113.5", 40000)
    client.initiate_handshake(public_key_of(map_key), 0.0)
    initiation = client.drain_outgoing()[0].data

    core.datagram_received(source, b"\x04" + bytes(40), 0.0, secondary=True)
    core.datagram_received(source, initiation, 0.0, secondary=True)
    assert core.secondary_datagrams_to_send() == [] and core.datagrams_to_send() == []
    assert core.counters["secondary.dropped"] == 2

    core.datagram_received(source, initiation, 0.0)  # the session, on the map's port
    for out in core.datagrams_to_send():
        client.receive(out[1], MAP, 0.01)
    client.drain_outgoing()
    register = encode(Register(5, 1, public_key_of(client_key), 9))
    sealed = client.seal(public_key_of(map_key), register, 0.02)
    assert sealed is not None
    seen_there = ("203.0.113.5", 40001)
    core.datagram_received(seen_there, sealed, 0.02, secondary=True)
    [(destination, answer)] = core.secondary_datagrams_to_send()
    assert destination == seen_there
    received = client.receive(answer, (MAP[0], SECONDARY_PORT), 0.03)
    assert received is not None
    message = decode(received.plaintext)
    assert isinstance(message, Registered) and message.reflexive == seen_there
    assert core.registry.registration_count == 0
