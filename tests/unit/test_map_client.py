"""MapClient, sans-I/O with virtual time, against the real Registry over a virtual network.

The WireGuard layer is left out: a client's MapSend is delivered to the registry as if it had
arrived, authenticated, from that uplink's address; the registry's Deliver goes to whichever
client uplink owns the destination address.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from warp.map_client.client import (
    LookupRefused,
    MapClient,
    MapEvent,
    PeerEndpointsChanged,
    RehandshakeNeeded,
    RelayReceived,
    Stopped,
    UplinkExpired,
    UplinkRegistered,
)
from warp.map_client.messages import (
    Deregister,
    Endpoint,
    Lookup,
    PeerEndpoints,
    Push,
    Register,
    Registered,
    Relay,
    decode,
    encode,
)
from warp_map_server.registry import Registry
from warp_map_server.validation import AddressValidator

A = b"A" * 32
B = b"B" * 32
C = b"C" * 32
R = 2.0  # refresh interval
T = 0.25  # response timeout


def rng(seed: int) -> Any:
    generator = random.Random(seed)
    return generator.randbytes


@dataclass
class Node:
    key: bytes
    client: MapClient[str]
    addresses: dict[str, Endpoint]
    events: list[MapEvent[str]] = field(default_factory=list)
    stale: bool = False  # its WireGuard session with the map is gone until it re-handshakes


class Net:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.nodes: dict[bytes, Node] = {}
        self.map_down = False
        self.sent: list[tuple[bytes, str, object]] = []  # (client, uplink, decoded request)
        self.refused: list[Any] = []  # Delivers the map's address validation held back

    def add(self, key: bytes, far: bytes, uplinks: dict[str, Endpoint], seed: int = 1) -> Node:
        client = MapClient[str](far, refresh_interval=R, response_timeout=T, rng=rng(seed))
        node = Node(key, client, dict(uplinks))
        self.nodes[key] = node
        return node

    def restart_map(self, boot: int) -> None:
        old = self.registry
        self.registry = Registry(registration_ttl=old.ttl, lookup_policy=old.policy, boot_id=boot)
        for node in self.nodes.values():
            node.stale = True

    def pump(self, now: float) -> None:
        for _ in range(20):
            moved = False
            for node in self.nodes.values():
                events = node.client.drain_events()
                node.events.extend(events)
                if any(isinstance(e, RehandshakeNeeded) for e in events):
                    node.stale = False
                for send in node.client.drain_outgoing():
                    moved = True
                    self.sent.append((node.key, send.uplink, decode(send.frame)))
                    if self.map_down or node.stale:
                        continue
                    source = node.addresses[send.uplink]
                    validator = self.registry.validator
                    if validator is not None:  # as the map's server: 32 B of WireGuard around it
                        validator.received(node.key, source, len(send.frame) + 32)
                    self.registry.handle(node.key, send.frame, source, now)
            for deliver in self.registry.drain():
                moved = True
                validator = self.registry.validator
                if validator is not None and not validator.may_send(
                    deliver.peer,
                    deliver.destination,
                    len(deliver.plaintext) + 32,
                    challenge=deliver.challenge,
                ):
                    self.refused.append(deliver)
                    continue
                for node in self.nodes.values():
                    if node.key != deliver.peer:
                        continue
                    for uplink, address in node.addresses.items():
                        if address == deliver.destination:
                            node.client.receive(deliver.plaintext, uplink, now)
            if not moved:
                return

    def run(self, start: float, end: float) -> float:
        now = start
        while True:
            deadlines = [n.client.next_deadline() for n in self.nodes.values()]
            deadlines.append(self.registry.next_deadline())
            due = [d for d in deadlines if d is not None]
            t = max(now, min(due)) if due else end
            if t > end:
                break
            now = t
            for node in self.nodes.values():
                node.client.tick(now)
            self.registry.tick(now)
            self.pump(now)
        self.pump(end)
        return end


def two_site_net(**registry_args: Any) -> tuple[Net, Node, Node]:
    net = Net(Registry(registration_ttl=60.0, boot_id=1, **registry_args))
    a = net.add(A, B, {"a-lte": ("203.0.113.1", 1001), "a-wifi": ("198.51.100.1", 1002)}, 1)
    b = net.add(B, A, {"b-lte": ("203.0.113.2", 2001), "b-wifi": ("198.51.100.2", 2002)}, 2)
    return net, a, b


def start(net: Net, node: Node, now: float) -> None:
    for uplink in node.addresses:
        node.client.add_uplink(uplink, now)
    net.pump(now)


def of(events: list[MapEvent[str]], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# ---------------------------------------------------------------------------------- register


def test_each_uplink_registers_with_its_own_packet_and_learns_its_reflexive_address() -> None:
    net, a, _ = two_site_net()
    start(net, a, 0.0)
    registers = [(u, m) for k, u, m in net.sent if isinstance(m, Register)]
    assert sorted(u for u, _ in registers) == ["a-lte", "a-wifi"]
    assert len({m.uplink for _, m in registers}) == 2  # distinct tags
    assert {m.far_gate for _, m in registers} == {B}
    registered = of(a.events, UplinkRegistered)
    assert {(e.uplink, e.reflexive) for e in registered} == set(a.addresses.items())
    assert all(e.changed for e in registered)
    assert a.client.reflexive_addresses(0.0) == a.addresses
    assert a.client.all_registered(0.0)


def test_each_uplink_proves_its_address_to_the_map_at_once_then_gets_pushes() -> None:
    net, a, b = two_site_net(validator=AddressValidator(bytes(32)))
    start(net, a, 0.0)
    start(net, b, 0.0)
    validator = net.registry.validator
    assert validator is not None
    for node in (a, b):
        for address in node.addresses.values():
            assert validator.is_validated(node.key, address)
    registers = [(k, u, m) for k, u, m in net.sent if isinstance(m, Register)]
    assert len(registers) == 8  # each uplink: its register, then the echo of its challenge
    assert sum(1 for _, _, m in registers if m.challenge is not None) == 4
    # what was held back went to addresses not yet proven, and nothing since
    net.refused.clear()
    b.addresses["b-lte"] = ("203.0.113.22", 2001)  # b's NAT moved one mapping
    b.client.uplink_changed("b-lte", 0.5)
    net.run(0.5, 1.0)
    assert a.client.peer_endpoints[0] == ("203.0.113.22", 2001)
    assert validator.is_validated(B, ("203.0.113.22", 2001))
    assert all(d.destination == ("203.0.113.22", 2001) for d in net.refused)


def test_refresh_every_interval_and_at_once_on_change() -> None:
    net, a, _ = two_site_net()
    start(net, a, 0.0)
    net.sent.clear()
    net.run(0.0, 3 * R + 0.01)
    times = [m for k, u, m in net.sent if isinstance(m, Register) and u == "a-lte"]
    assert len(times) == 3
    net.sent.clear()
    a.addresses["a-lte"] = ("203.0.113.1", 5555)  # the NAT gave this uplink a new mapping
    a.client.uplink_changed("a-lte", 3 * R + 0.5)
    net.pump(3 * R + 0.5)
    assert [u for k, u, m in net.sent if isinstance(m, Register)] == ["a-lte"]
    last = of(a.events, UplinkRegistered)[-1]
    assert last.reflexive == ("203.0.113.1", 5555) and last.changed
    assert net.registry.endpoints_of(A, 3 * R + 0.5)[0] == ("203.0.113.1", 5555)


def test_refresh_never_lets_the_registration_lapse() -> None:
    net, a, _ = two_site_net()
    start(net, a, 0.0)
    net.run(0.0, 300.0)
    assert not of(a.events, UplinkExpired)
    assert len(net.registry.endpoints_of(A, 300.0)) == 2


def test_refresh_follows_a_short_map_ttl() -> None:
    net = Net(Registry(registration_ttl=1.0, boot_id=1))
    a = net.add(A, B, {"x": ("192.0.2.1", 1)})
    start(net, a, 0.0)
    net.run(0.0, 10.0)
    assert not of(a.events, UplinkExpired)
    assert net.registry.endpoints_of(A, 10.0) == (("192.0.2.1", 1),)


# ---------------------------------------------------------------------------------- lookup/push


def test_push_reaches_both_sides_on_a_change() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    refused = of(a.events, LookupRefused)  # B not there yet: mutual policy says no
    assert len(refused) == 1 and refused[0].key == B
    start(net, b, 5.0)
    # in the same instant B registered, both know each other's endpoints
    a_view = of(a.events, PeerEndpointsChanged)
    b_view = of(b.events, PeerEndpointsChanged)
    assert a_view and a_view[-1].pushed and set(a_view[-1].endpoints) == set(b.addresses.values())
    assert b_view and set(b_view[-1].endpoints) == set(a.addresses.values())
    assert set(a.client.peer_endpoints) == set(b.addresses.values())
    assert set(b.client.peer_endpoints) == set(a.addresses.values())


def test_a_lookup_answer_sets_the_peer_endpoints() -> None:
    net, a, b = two_site_net()
    start(net, b, 0.0)
    start(net, a, 1.0)
    answers = [e for e in of(a.events, PeerEndpointsChanged) if not e.pushed]
    pushed = [e for e in of(a.events, PeerEndpointsChanged) if e.pushed]
    assert answers or pushed
    assert set(a.client.peer_endpoints) == set(b.addresses.values())
    net.sent.clear()
    net.run(1.0, 1.0 + R + 0.01)
    assert [m for k, u, m in net.sent if k == A and isinstance(m, Lookup)]


def test_a_stranger_is_refused_and_learns_nothing() -> None:
    net, a, _ = two_site_net()
    stranger = net.add(C, A, {"c": ("192.0.2.3", 3001)}, 3)
    start(net, a, 0.0)
    start(net, stranger, 0.0)
    net.run(0.0, 10.0)
    assert of(stranger.events, LookupRefused)
    assert stranger.client.peer_endpoints == ()
    assert not of(stranger.events, PeerEndpointsChanged)


def test_an_old_push_does_not_undo_a_newer_one() -> None:
    client = MapClient[str](B, rng=rng(5))
    client.add_uplink("u", 0.0)
    new = encode(Push(B, (("192.0.2.1", 1),), 10, 7))
    old = encode(Push(B, (("192.0.2.9", 9),), 9, 7))
    assert client.receive(new, "u", 0.1)
    assert client.receive(old, "u", 0.2)
    assert client.peer_endpoints == (("192.0.2.1", 1),)
    # after a map restart (another boot id) versions start over
    assert client.receive(encode(Push(B, (("192.0.2.5", 5),), 1, 8)), "u", 0.3)
    assert client.peer_endpoints == (("192.0.2.5", 5),)


def test_pushes_about_other_keys_are_ignored() -> None:
    client = MapClient[str](B, rng=rng(5))
    client.add_uplink("u", 0.0)
    client.receive(encode(Push(C, (("192.0.2.1", 1),), 10, 7)), "u", 0.1)
    assert client.peer_endpoints == ()


def test_non_map_plaintexts_are_not_consumed_and_bad_frames_are_counted() -> None:
    client = MapClient[str](B, rng=rng(5))
    assert not client.receive(b"\x45" + bytes(19), "u", 0.0)
    assert not client.receive(b"", "u", 0.0)
    assert client.receive(b"\x13\x00\x09garbage!!", "u", 0.0)
    assert client.stats.invalid == 1


# ---------------------------------------------------------------------------------- failures


def test_unanswered_requests_retry_with_backoff_then_ask_for_a_rehandshake() -> None:
    net, a, _ = two_site_net()
    net.map_down = True
    start(net, a, 0.0)
    net.run(0.0, 10.0)
    lte = [m for k, u, m in net.sent if u == "a-lte" and isinstance(m, Register)]
    assert len({m.request_id for m in lte}) == 1  # retries of one request, not new ones
    assert 4 <= len(lte) <= 16
    rehandshakes = of(a.events, RehandshakeNeeded)
    # at most one per rehandshake_interval (R / 4 here): a dead map costs one initiation per
    # interval, never a flood
    assert a.client.rehandshake_interval == R / 4
    assert 1 <= len(rehandshakes) <= 10.0 / a.client.rehandshake_interval + 1
    assert not a.client.all_registered(10.0)


def test_registration_expiry_is_reported_when_refreshes_fail() -> None:
    net = Net(Registry(registration_ttl=4.0, boot_id=1))
    a = net.add(A, B, {"x": ("192.0.2.1", 1)})
    start(net, a, 0.0)
    net.map_down = True
    net.run(0.0, 5.0)
    assert of(a.events, UplinkExpired) == [UplinkExpired("x")]
    assert a.client.reflexive_addresses(5.0) == {}


def test_both_clients_re_register_within_one_refresh_interval_of_a_map_restart() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    net.run(0.0, 10.3)
    net.map_down = True
    net.run(10.3, 10.3 + R)  # down for one refresh interval: the clients notice
    net.restart_map(boot=2)
    net.map_down = False
    restarted = 10.3 + R
    done = None
    now = restarted
    while now < restarted + 3 * R:
        now = net.run(now, now + 0.01)
        if len(net.registry.endpoints_of(A, now)) == 2 == len(net.registry.endpoints_of(B, now)):
            done = now
            break
    assert done is not None
    assert done - restarted <= R
    assert set(a.client.peer_endpoints) == set(b.addresses.values())
    assert set(b.client.peer_endpoints) == set(a.addresses.values())


def test_an_instant_map_restart_is_noticed_at_the_next_refresh() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    net.run(0.0, 10.3)
    net.restart_map(boot=2)  # no downtime at all: only the sessions are gone
    now = 10.3
    while now < 10.3 + 3 * R and not (
        len(net.registry.endpoints_of(A, now)) == 2 == len(net.registry.endpoints_of(B, now))
    ):
        now = net.run(now, now + 0.01)
    # next refresh (<= R), two timeouts (T + 2T), then the re-handshake and the retries
    assert now - 10.3 <= R + 3 * T + 0.05


# ---------------------------------------------------------------------------------- stop/remove


def test_stop_deregisters_every_uplink_and_reports_the_ack() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    a.client.stop(1.0)
    net.pump(1.0)
    deregisters = [(u, m) for k, u, m in net.sent if k == A and isinstance(m, Deregister)]
    assert sorted(u for u, _ in deregisters) == ["a-lte", "a-wifi"]
    assert all(m.uplink is None for _, m in deregisters)
    assert of(a.events, Stopped) == [Stopped(True)]
    assert a.client.stopped
    assert net.registry.endpoints_of(A, 1.0) == ()
    assert b.client.peer_endpoints == ()  # B was told at once
    net.sent.clear()
    net.run(1.0, 30.0)
    assert not [m for k, u, m in net.sent if k == A]  # and A stays quiet


def test_stop_gives_up_after_a_few_attempts_when_the_map_is_gone() -> None:
    net, a, _ = two_site_net()
    start(net, a, 0.0)
    net.map_down = True
    a.client.stop(1.0)
    net.run(1.0, 10.0)
    assert of(a.events, Stopped) == [Stopped(False)]
    assert len([m for k, u, m in net.sent if isinstance(m, Deregister)]) == 3 * 2


def test_removing_an_uplink_deregisters_it_through_another() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    net.sent.clear()
    a.client.remove_uplink("a-wifi", 1.0)
    net.pump(1.0)
    sent = [(u, m) for k, u, m in net.sent if isinstance(m, Deregister)]
    assert len(sent) == 1 and sent[0][0] == "a-lte" and sent[0][1].uplink is not None
    assert net.registry.endpoints_of(A, 1.0) == (a.addresses["a-lte"],)
    assert b.client.peer_endpoints == (a.addresses["a-lte"],)
    assert a.client.uplinks == ["a-lte"]


# ---------------------------------------------------------------------------------- relay


def test_relay_carries_a_payload_to_the_far_gate() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    assert a.client.relay(b"\x04sealed-wireguard-message", 1.0, "a-lte")
    net.pump(1.0)
    (received,) = of(b.events, RelayReceived)
    assert (received.sender, received.payload) == (A, b"\x04sealed-wireguard-message")
    assert received.source == a.addresses["a-lte"]  # the map says which uplink it came from


@pytest.mark.parametrize("far_uplink", ["b-lte", "b-wifi"])
def test_relay_goes_from_the_uplink_asked_to_the_far_gate_uplink_asked(far_uplink: str) -> None:
    """Relayed paths are per uplink pair: the Relay leaves from the uplink asked and the map
    delivers it to the far gate's endpoint named, whichever is freshest."""
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    net.sent.clear()
    endpoint = b.addresses[far_uplink]
    assert a.client.relay(b"\x04sealed", 1.0, "a-wifi", endpoint=endpoint)
    net.pump(1.0)
    assert [u for k, u, m in net.sent if isinstance(m, Relay)] == ["a-wifi"]
    (received,) = of(b.events, RelayReceived)
    assert (received.uplink, received.source) == (far_uplink, a.addresses["a-wifi"])


def test_relay_to_an_endpoint_the_far_gate_does_not_hold_is_dropped() -> None:
    net, a, b = two_site_net()
    start(net, a, 0.0)
    start(net, b, 0.0)
    assert a.client.relay(b"\x04sealed", 1.0, "a-lte", endpoint=("192.0.2.99", 9))
    net.pump(1.0)
    assert of(b.events, RelayReceived) == []
    assert net.registry.counters["relay.no_target"] == 1


def test_relay_without_uplinks_is_refused_locally() -> None:
    client = MapClient[str](B, rng=rng(1))
    assert not client.relay(b"x", 0.0)


def test_a_confused_answer_never_leaves_an_uplink_without_a_register_in_flight() -> None:
    client = MapClient[str](B, refresh_interval=R, response_timeout=T, rng=rng(9))
    client.add_uplink("u", 0.0)
    requests = [decode(s.frame) for s in client.drain_outgoing()]
    (request,) = [m for m in requests if isinstance(m, Register)]
    # answered with the wrong message type, then with the wrong uplink tag
    bogus = PeerEndpoints(request.request_id, B, (), 1, 1)
    client.receive(encode(bogus), "u", 0.1)
    wrong_tag = Registered(request.request_id, request.uplink ^ 1, ("192.0.2.1", 1), 60.0, 1)
    client.receive(encode(wrong_tag), "u", 0.1)
    assert not client.registered("u", 0.2)
    client.tick(0.1 + T)
    retry = [decode(s.frame) for s in client.drain_outgoing()]
    assert any(isinstance(m, Register) for m in retry)


# ---------------------------------------------------------------------------------- fleets


def test_a_fleet_client_looks_up_each_far_gate_and_relays_to_the_one_named() -> None:
    """One client for several far gates (an operator and two vehicles): each far gate is
    looked up on its own, each answer is reported under its key, and a relayed message goes
    to the far gate it names."""
    net = Net(Registry(registration_ttl=60.0, boot_id=1))
    op = MapClient[str]([B, C], refresh_interval=R, response_timeout=T, rng=rng(1))
    operator = Node(A, op, {"op": ("203.0.113.1", 1001)})
    net.nodes[A] = operator
    truck_b = net.add(B, A, {"b": ("203.0.113.2", 2001)}, 2)
    truck_c = net.add(C, A, {"c": ("203.0.113.3", 3001)}, 3)
    for node in (truck_b, truck_c, operator):
        start(net, node, 0.0)
    net.run(0.0, 2 * R)
    lookups = {m.key for k, _, m in net.sent if k == A and isinstance(m, Lookup)}
    assert lookups == {B, C}
    found = {e.key: e.endpoints for e in of(operator.events, PeerEndpointsChanged)}
    assert found == {B: (("203.0.113.2", 2001),), C: (("203.0.113.3", 3001),)}
    assert op.endpoints_of(C) == (("203.0.113.3", 3001),)
    assert op.peer_endpoints == op.endpoints_of(B)  # the first far gate's, as before
    op.relay(b"sealed for C", 2 * R, to=C)
    op.relay(b"not a far gate", 2 * R, to=b"D" * 32)
    relayed = [decode(s.frame) for s in op.drain_outgoing()]
    assert [(m.key, m.payload) for m in relayed] == [(C, b"sealed for C")]  # type: ignore[union-attr]


def test_a_reload_adds_a_far_gate_at_once_and_forgets_a_removed_one() -> None:
    """`set_far_gates` (a live reload): the new far gate is looked up at once (the map is
    told the new list: mutual policy), the kept one keeps what the map said, the removed one
    is neither looked up nor reported any more."""
    net = Net(Registry(registration_ttl=60.0, boot_id=1))
    op = MapClient[str]([B], refresh_interval=R, response_timeout=T, rng=rng(1))
    operator = Node(A, op, {"op": ("203.0.113.1", 1001)})
    net.nodes[A] = operator
    truck_b = net.add(B, A, {"b": ("203.0.113.2", 2001)}, 2)
    truck_c = net.add(C, A, {"c": ("203.0.113.3", 3001)}, 3)
    for node in (truck_b, truck_c, operator):
        start(net, node, 0.0)
    net.run(0.0, R / 2)
    assert op.endpoints_of(B) == (("203.0.113.2", 2001),)
    assert op.endpoints_of(C) == ()

    net.sent.clear()
    op.set_far_gates([B, C], R / 2)
    net.pump(R / 2)
    net.run(R / 2, R / 2 + 0.1)  # well before the next refresh or lookup period
    lookups = [m.key for k, _, m in net.sent if k == A and isinstance(m, Lookup)]
    assert lookups == [C]
    registers = [m for k, _, m in net.sent if k == A and isinstance(m, Register)]
    assert registers and all(m.far_gates == (B, C) for m in registers)
    assert op.endpoints_of(C) == (("203.0.113.3", 3001),)
    assert op.endpoints_of(B) == (("203.0.113.2", 2001),)  # kept, not looked up again

    op.set_far_gates([C], R)
    net.sent.clear()
    net.run(R, 3 * R)
    assert {m.key for k, _, m in net.sent if k == A and isinstance(m, Lookup)} == {C}
    assert op.endpoints_of(B) == ()
