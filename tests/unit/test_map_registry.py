"""warp-map's registry, sans-I/O with virtual time: every message and expiry rule."""

from __future__ import annotations

from typing import Any

import pytest

from warp.map_client.messages import (
    MAX_RELAY_PAYLOAD,
    Deregister,
    Endpoint,
    Error,
    ErrorCode,
    Lookup,
    MapMessage,
    PeerEndpoints,
    Push,
    Register,
    Registered,
    Relay,
    Relayed,
    decode,
    encode,
)
from warp_map_server.ratelimit import TokenBucketTable
from warp_map_server.registry import Deliver, Registry, normalize

A = b"A" * 32
B = b"B" * 32
C = b"C" * 32  # a stranger
A1: Endpoint = ("203.0.113.1", 1001)
A2: Endpoint = ("198.51.100.1", 1002)
B1: Endpoint = ("203.0.113.2", 2001)
B2: Endpoint = ("198.51.100.2", 2002)
C1: Endpoint = ("192.0.2.3", 3001)
TTL = 60.0
BOOT = 77


def make(**kwargs: Any) -> Registry:
    params: dict[str, Any] = {"registration_ttl": TTL, "boot_id": BOOT}
    params.update(kwargs)
    return Registry(**params)


def send(
    registry: Registry, key: bytes, source: Endpoint, message: MapMessage, now: float
) -> list[tuple[bytes, Endpoint, MapMessage]]:
    registry.handle(key, encode(message), source, now)
    return out(registry)


def out(registry: Registry) -> list[tuple[bytes, Endpoint, MapMessage]]:
    return [(d.peer, d.destination, decode(d.plaintext)) for d in registry.drain()]


def register(
    registry: Registry,
    key: bytes,
    source: Endpoint,
    far: bytes,
    now: float,
    uplink: int = 1,
    instance: int = 1,
) -> list[tuple[bytes, Endpoint, MapMessage]]:
    return send(registry, key, source, Register(uplink, uplink, far, instance), now)


def pushes(items: list[tuple[bytes, Endpoint, MapMessage]]) -> list[tuple[bytes, Endpoint, Push]]:
    return [(k, d, m) for k, d, m in items if isinstance(m, Push)]


# ----------------------------------------------------------------------------------- register


def test_register_reply_carries_the_reflexive_address_and_goes_to_the_source() -> None:
    registry = make()
    replies = register(registry, A, A1, far=B, now=0.0, uplink=7)
    assert replies == [(A, A1, Registered(7, 7, A1, TTL, BOOT))]
    assert registry.endpoints_of(A, 0.0) == (A1,)
    assert registry.next_deadline() == TTL


def test_two_uplinks_register_two_endpoints_freshest_first() -> None:
    registry = make()
    register(registry, A, A1, B, 0.0, uplink=1)
    register(registry, A, A2, B, 1.0, uplink=2)
    assert registry.endpoints_of(A, 1.0) == (A2, A1)
    registry.heard(A, A1, 2.0)
    assert registry.endpoints_of(A, 2.0) == (A1, A2)


def test_an_uplink_whose_nat_mapping_moved_replaces_its_endpoint() -> None:
    registry = make()
    register(registry, A, A1, B, 0.0, uplink=1)
    moved: Endpoint = ("203.0.113.1", 4444)
    replies = register(registry, A, moved, B, 5.0, uplink=1)
    assert replies[0][2] == Registered(1, 1, moved, TTL, BOOT)
    assert registry.endpoints_of(A, 5.0) == (moved,)


def test_a_new_tag_from_the_same_socket_replaces_the_old_tag() -> None:
    registry = make()
    register(registry, A, A1, B, 0.0, uplink=1)
    register(registry, A, A1, B, 1.0, uplink=2)
    assert registry.endpoints_of(A, 1.0) == (A1,)
    assert registry.registration_count == 1


def test_a_restarted_client_instance_replaces_all_its_old_registrations() -> None:
    registry = make()
    register(registry, A, A1, B, 0.0, uplink=1, instance=1)
    register(registry, A, A2, B, 0.0, uplink=2, instance=1)
    register(registry, A, ("192.0.2.99", 9), B, 3.0, uplink=1, instance=2)
    assert registry.endpoints_of(A, 3.0) == (("192.0.2.99", 9),)


def test_registrations_per_client_are_capped() -> None:
    registry = make(max_registrations=2)
    register(registry, A, A1, B, 0.0, uplink=1)
    register(registry, A, A2, B, 0.0, uplink=2)
    replies = register(registry, A, ("192.0.2.9", 9), B, 0.0, uplink=3)
    assert len(replies) == 1
    error = replies[0][2]
    assert isinstance(error, Error) and error.code is ErrorCode.LIMIT_REACHED
    assert error.request_id == 3
    assert registry.endpoints_of(A, 0.0) == (A1, A2)
    # refreshing an existing one still works at the cap
    assert isinstance(register(registry, A, A1, B, 1.0, uplink=1)[0][2], Registered)


def test_clients_are_capped() -> None:
    registry = make(max_clients=1)
    register(registry, A, A1, B, 0.0)
    replies = register(registry, C, C1, B, 0.0)
    error = replies[0][2]
    assert isinstance(error, Error) and error.code is ErrorCode.LIMIT_REACHED
    assert registry.counters["clients.refused"] == 1
    assert C not in registry.clients


# ----------------------------------------------------------------------------------- expiry


def test_expiry_is_exactly_at_the_ttl() -> None:
    registry = make()
    register(registry, A, A1, B, 10.0)
    assert registry.next_deadline() == 10.0 + TTL
    registry.tick(10.0 + TTL - 1e-6)
    assert registry.endpoints_of(A, 10.0 + TTL - 1e-6) == (A1,)
    # a lookup at exactly the TTL does not see it, even before the timer ran
    assert registry.endpoints_of(A, 10.0 + TTL) == ()
    registry.tick(10.0 + TTL)
    assert A not in registry.clients
    assert registry.counters["registrations.expired"] == 1
    assert registry.next_deadline() is None


def test_a_refresh_moves_the_expiry_and_the_old_deadline_does_nothing() -> None:
    registry = make()
    register(registry, A, A1, B, 0.0)
    register(registry, A, A1, B, 30.0)
    registry.tick(TTL)
    assert registry.endpoints_of(A, TTL) == (A1,)
    assert registry.next_deadline() == 30.0 + TTL
    registry.tick(30.0 + TTL)
    assert registry.endpoints_of(A, 30.0 + TTL) == ()


def test_expiry_of_one_uplink_pushes_the_shrunk_list_to_the_watcher() -> None:
    registry = make()
    register(registry, A, A1, B, 0.0, uplink=1)
    register(registry, A, A2, B, 20.0, uplink=2)
    register(registry, B, B1, A, 20.0)
    registry.drain()
    register(registry, A, A2, B, 50.0, uplink=2)  # only uplink 2 is refreshed
    register(registry, B, B1, A, 50.0)
    registry.drain()
    registry.tick(TTL)
    sent = pushes(out(registry))
    assert [(k, d) for k, d, _ in sent] == [(B, B1)]
    assert sent[0][2].key == A and sent[0][2].endpoints == (A2,)


def test_the_expiry_heap_stays_bounded_under_refreshes() -> None:
    registry = make()
    for i in range(20_000):
        register(registry, A, A1, B, i * 0.001)
    assert len(registry._expiry) <= 1024 + 8


# ----------------------------------------------------------------------------------- lookup


def test_mutual_policy_refuses_a_stranger() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    replies = send(registry, C, C1, Lookup(5, A), 1.0)
    assert replies == [(C, C1, Error(5, ErrorCode.NOT_PERMITTED, "lookup not permitted"))]
    assert registry.counters["lookup.refused"] == 1


def test_mutual_policy_answers_the_far_gate() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0, uplink=1)
    register(registry, A, A2, far=B, now=0.0, uplink=2)
    replies = send(registry, B, B1, Lookup(5, A), 1.0)
    assert len(replies) == 1
    key, destination, answer = replies[0]
    assert (key, destination) == (B, B1)
    assert isinstance(answer, PeerEndpoints)
    assert set(answer.endpoints) == {A1, A2}
    assert answer.key == A and answer.boot == BOOT and answer.version >= 1


def test_mutual_refusal_does_not_tell_an_unknown_key_from_a_refused_one() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    refused_known = send(registry, C, C1, Lookup(1, A), 1.0)[0][2]
    refused_unknown = send(registry, C, C1, Lookup(1, b"Z" * 32), 1.0)[0][2]
    assert refused_known == refused_unknown


def test_any_policy_answers_a_stranger_and_unknown_keys_get_an_empty_list() -> None:
    registry = make(lookup_policy="any")
    register(registry, A, A1, far=B, now=0.0)
    answer = send(registry, C, C1, Lookup(5, A), 1.0)[0][2]
    assert isinstance(answer, PeerEndpoints) and answer.endpoints == (A1,)
    empty = send(registry, C, C1, Lookup(6, b"Z" * 32), 1.0)[0][2]
    assert isinstance(empty, PeerEndpoints) and empty.endpoints == ()


def test_a_client_may_always_look_itself_up() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    answer = send(registry, A, A1, Lookup(5, A), 1.0)[0][2]
    assert isinstance(answer, PeerEndpoints) and answer.endpoints == (A1,)


# ----------------------------------------------------------------------------------- push


def test_push_reaches_both_sides_when_the_second_registers() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0, uplink=1)
    register(registry, A, A2, far=B, now=0.0, uplink=2)
    assert pushes(out(registry)) == []  # B is not there yet: nobody to tell
    replies = register(registry, B, B1, far=A, now=1.0)
    sent = pushes(replies)
    to_a = [(d, m) for k, d, m in sent if k == A]
    to_b = [(d, m) for k, d, m in sent if k == B]
    # A hears of B at each of A's endpoints; B hears of A (both start punching at once)
    assert {d for d, _ in to_a} == {A1, A2}
    assert all(m.key == B and m.endpoints == (B1,) for _, m in to_a)
    assert [d for d, _ in to_b] == [B1]
    assert to_b[0][1].key == A and set(to_b[0][1].endpoints) == {A1, A2}
    assert registry.counters["push.sent"] == 3


def test_pushes_follow_each_change_in_order() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    seen: list[Push] = []
    for step, action in enumerate(["grow", "refresh", "shrink", "grow"]):
        now = 1.0 + step
        if action in ("grow", "refresh"):
            items = register(registry, B, B2, far=A, now=now, uplink=2)
        else:
            items = send(registry, B, B1, Deregister(9, 2), now)
        seen.extend(m for k, _d, m in pushes(items) if k == A)
    assert [m.endpoints for m in seen] == [(B2, B1), (B1,), (B2, B1)]
    assert [m.version for m in seen] == sorted({m.version for m in seen})


def test_no_push_to_a_watcher_that_may_not_see_the_client() -> None:
    registry = make()
    register(registry, C, C1, far=A, now=0.0)  # C wants A, but A does not want C
    registry.drain()
    sent = pushes(register(registry, A, A1, far=B, now=1.0))
    assert sent == []


def test_any_policy_pushes_to_every_watcher() -> None:
    registry = make(lookup_policy="any")
    register(registry, C, C1, far=A, now=0.0)
    sent = pushes(register(registry, A, A1, far=B, now=1.0))
    assert [(k, d) for k, d, _ in sent] == [(C, C1)]


def test_changing_far_gate_starts_pushes_for_the_new_pair() -> None:
    registry = make()
    register(registry, A, A1, far=C, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    sent = pushes(register(registry, A, A1, far=B, now=1.0))
    assert {(k, d) for k, d, _ in sent} == {(B, B1), (A, A1)}


def test_the_old_far_gate_is_told_when_it_may_no_longer_see_a_client() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    sent = pushes(register(registry, A, A1, far=C, now=1.0))
    to_b = [m for k, d, m in sent if k == B]
    assert [m.endpoints for m in to_b] == [()]
    refused = send(registry, B, B1, Lookup(1, A), 2.0)[0][2]
    assert isinstance(refused, Error) and refused.code is ErrorCode.NOT_PERMITTED


# ----------------------------------------------------------------------------------- deregister


def test_deregistering_one_endpoint_keeps_the_other() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0, uplink=1)
    register(registry, A, A2, far=B, now=0.0, uplink=2)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    replies = send(registry, A, A2, Deregister(42, 1), 5.0)
    answer = [m for k, d, m in replies if k == A and isinstance(m, PeerEndpoints)]
    assert answer[0].request_id == 42 and answer[0].endpoints == (A2,)
    assert registry.endpoints_of(A, 5.0) == (A2,)
    to_b = [m for k, d, m in pushes(replies) if k == B]
    assert to_b[0].endpoints == (A2,)


def test_deregistering_all_removes_the_client_and_tells_the_watcher() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0, uplink=1)
    register(registry, A, A2, far=B, now=0.0, uplink=2)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    replies = send(registry, A, A1, Deregister(43, None), 5.0)
    acks = [m for k, d, m in replies if (k, d) == (A, A1) and isinstance(m, PeerEndpoints)]
    assert len(acks) == 1 and acks[0].request_id == 43 and acks[0].endpoints == ()
    assert A not in registry.clients
    to_b = [m for k, d, m in pushes(replies) if k == B]
    assert to_b[0].endpoints == ()
    # and the far gate's lookup now says: not permitted (A is gone)
    refused = send(registry, B, B1, Lookup(1, A), 6.0)[0][2]
    assert isinstance(refused, Error) and refused.code is ErrorCode.NOT_PERMITTED


def test_deregistering_an_unknown_tag_changes_nothing() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0, uplink=1)
    replies = send(registry, A, A1, Deregister(1, 999), 1.0)
    assert pushes(replies) == []
    assert registry.endpoints_of(A, 1.0) == (A1,)


# ----------------------------------------------------------------------------------- relay


def test_relay_goes_to_the_targets_freshest_endpoint() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0, uplink=1)
    register(registry, B, B2, far=A, now=1.0, uplink=2)
    registry.drain()
    registry.heard(B, B1, 2.0)
    replies = send(registry, A, A1, Relay(B, b"sealed"), 2.5)
    assert replies == [(B, B1, Relayed(A, b"sealed", A1))]
    assert registry.counters["relay.forwarded"] == 1


def test_relay_goes_to_the_target_endpoint_named_and_says_where_it_came_from() -> None:
    """A gateway relays over each uplink pair: the map delivers to the endpoint named (not the
    freshest) and tells the target which of the sender's endpoints it came from; an endpoint
    the target does not hold gets nothing."""
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0, uplink=1)
    register(registry, B, B2, far=A, now=1.0, uplink=2)
    registry.drain()
    registry.heard(B, B1, 2.0)
    replies = send(registry, A, A1, Relay(B, b"sealed", B2), 2.5)
    assert replies == [(B, B2, Relayed(A, b"sealed", A1))]
    assert send(registry, A, A1, Relay(B, b"sealed", C1), 2.5) == []
    assert registry.counters["relay.no_target"] == 1


def test_relay_to_a_stranger_is_refused_under_mutual() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    assert send(registry, C, C1, Relay(A, b"spam"), 1.0) == []
    assert registry.counters["relay.refused"] == 1


def test_relay_disabled_drops() -> None:
    registry = make(relay_enabled=False)
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    assert send(registry, A, A1, Relay(B, b"x"), 1.0) == []
    assert registry.counters["relay.disabled"] == 1


def test_relay_without_a_registered_target_drops() -> None:
    registry = make(lookup_policy="any")
    assert send(registry, A, A1, Relay(B, b"x"), 1.0) == []
    assert registry.counters["relay.no_target"] == 1


def test_relay_rate_limit_in_bits_per_second() -> None:
    rate = 8_000_000  # 1 MB/s; burst: a quarter second = 250 kB
    registry = make(relay_rate=rate)
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    payload = b"p" * 1000
    forwarded = 0
    # 2 MB offered over 1 s of virtual time (2x the rate)
    for i in range(2000):
        registry.handle(A, encode(Relay(B, payload)), A1, i * 0.0005)
        forwarded += len(registry.drain())
    expected = (rate * 0.25 + rate * 1.0) / 8 / 1000  # burst + one second at the rate
    assert abs(forwarded - expected) <= 2
    assert registry.counters["relay.dropped"] == 2000 - forwarded
    # B's own relay budget is separate
    assert len(send(registry, B, B1, Relay(A, payload), 1.0)) == 1


def test_relay_burst_admits_a_maximum_payload_even_at_a_tiny_rate() -> None:
    registry = make(relay_rate=1000)
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    assert len(send(registry, A, A1, Relay(B, b"x" * MAX_RELAY_PAYLOAD), 1.0)) == 1


# ----------------------------------------------------------------------------------- limits


def test_requests_are_rate_limited_per_source_ip() -> None:
    registry = make(requests_per_second=10)
    answered = 0
    for _ in range(50):
        answered += len(send(registry, A, A1, Lookup(1, A), 0.0))
    assert answered == 10
    assert registry.counters["requests.rate_limited"] == 40
    # another source address is not affected, and time refills the bucket
    assert len(send(registry, A, ("192.0.2.200", 1), Lookup(1, A), 0.0)) == 1
    assert len(send(registry, A, A1, Lookup(1, A), 0.5)) == 1


def test_relay_is_not_counted_against_the_request_rate() -> None:
    registry = make(requests_per_second=5)
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    for _ in range(100):
        registry.handle(A, encode(Relay(B, b"x")), A1, 0.0)
    assert len(registry.drain()) == 100


def test_invalid_frames_get_bad_request_within_the_rate_limit() -> None:
    registry = make(requests_per_second=5)
    replies = []
    for _ in range(20):
        registry.handle(A, b"\x12\x00\x05garbage", A1, 0.0)
        replies.extend(out(registry))
    assert len(replies) == 5
    assert all(isinstance(m, Error) and m.code is ErrorCode.BAD_REQUEST for _, _, m in replies)
    assert registry.counters["requests.invalid"] == 20


def test_server_to_client_messages_are_bad_requests() -> None:
    registry = make()
    replies = send(registry, A, A1, Push(B, (), 1, 1), 0.0)
    error = replies[0][2]
    assert isinstance(error, Error) and error.code is ErrorCode.BAD_REQUEST


def test_forget_removes_a_client_and_tells_its_watchers() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    register(registry, B, B1, far=A, now=0.0)
    registry.drain()
    registry.forget(A, 1.0)
    sent = [(k, d, m) for k, d, m in out(registry)]
    assert sent[0][0] == B and isinstance(sent[0][2], Push) and sent[0][2].endpoints == ()
    assert A not in registry.clients and registry.registration_count == 1


def test_summary_has_gauges_and_counters() -> None:
    registry = make()
    register(registry, A, A1, far=B, now=0.0)
    summary = registry.summary(0.0)
    assert summary["clients"] == 1 and summary["registrations"] == 1
    assert summary["requests.register"] == 1


def test_deliver_is_a_small_frozen_dataclass() -> None:
    d = Deliver(A, b"x", A1)
    with pytest.raises(AttributeError):
        d.peer = B  # type: ignore[misc]


def test_normalize_maps_v4_mapped_ipv6_and_drops_scope_and_flowinfo() -> None:
    assert normalize(("::ffff:192.0.2.1", 5, 0, 0)) == ("192.0.2.1", 5)
    assert normalize(("fe80::1%eth0", 6, 0, 2)) == ("fe80::1", 6)
    assert normalize(("192.0.2.1", 7)) == ("192.0.2.1", 7)


# ----------------------------------------------------------------------------------- buckets


def test_token_bucket_table_is_bounded_and_refills() -> None:
    table = TokenBucketTable[int](rate=1.0, burst=2.0, max_entries=100)
    for key in range(10_000):
        table.allow(key, 0.0)
    assert len(table) <= 100
    assert table.allow(5, 100.0) and table.allow(5, 100.0) and not table.allow(5, 100.0)
    assert table.allow(5, 101.0)
    table.gc(1000.0)
    assert len(table) == 0


def test_token_bucket_gc_drops_only_refilled_buckets() -> None:
    table = TokenBucketTable[str](rate=1.0, burst=5.0, max_entries=10)
    for _ in range(5):
        table.allow("busy", 0.0)
    table.allow("idle", 0.0)
    assert table.gc(0.5) == 0
    assert table.gc(1.0) == 1  # "idle" (4 + 1 = 5 tokens) is full again, "busy" is not
    assert "busy" in table and "idle" not in table


# ----------------------------------------------------------------------------------- fleets

V1 = b"1" * 32
V2 = b"2" * 32
V1_1: Endpoint = ("192.0.2.11", 1101)
V2_1: Endpoint = ("192.0.2.12", 1201)


def test_an_operator_naming_several_far_gates_is_seen_by_each_under_mutual() -> None:
    """A gateway with a fleet names every far gate in its Register (``also``): each vehicle
    may look it up and relay to it, each is pushed its endpoints, and it is pushed theirs."""
    registry = make()
    register(registry, V1, V1_1, far=A, now=0.0)
    register(registry, V2, V2_1, far=A, now=0.0)
    registry.drain()
    sent = send(registry, A, A1, Register(1, 1, V1, 1, None, (V2,)), 1.0)
    pushed = {(k, d, m.key, m.endpoints) for k, d, m in pushes(sent)}
    assert pushed == {
        (V1, V1_1, A, (A1,)),  # each vehicle hears of the operator...
        (V2, V2_1, A, (A1,)),
        (A, A1, V1, (V1_1,)),  # ...and the operator of each vehicle
        (A, A1, V2, (V2_1,)),
    }
    for vehicle, source in ((V1, V1_1), (V2, V2_1)):
        answer = send(registry, vehicle, source, Lookup(5, A), 2.0)[0][2]
        assert isinstance(answer, PeerEndpoints) and answer.endpoints == (A1,)
        relayed = send(registry, vehicle, source, Relay(A, b"sealed"), 2.0)
        assert relayed == [(A, A1, Relayed(vehicle, b"sealed", source))]
    refused = send(registry, C, C1, Lookup(6, A), 2.0)[0][2]
    assert isinstance(refused, Error) and refused.code is ErrorCode.NOT_PERMITTED


def test_a_far_gate_dropped_from_the_fleet_is_told_and_refused() -> None:
    registry = make()
    register(registry, V2, V2_1, far=A, now=0.0)
    send(registry, A, A1, Register(1, 1, V1, 1, None, (V2,)), 0.0)
    registry.drain()
    sent = pushes(send(registry, A, A1, Register(2, 1, V1, 1), 1.0))
    assert [(k, m.key, m.endpoints) for k, _, m in sent] == [(V2, A, ())]
    refused = send(registry, V2, V2_1, Lookup(1, A), 2.0)[0][2]
    assert isinstance(refused, Error) and refused.code is ErrorCode.NOT_PERMITTED
    assert send(registry, V2, V2_1, Relay(A, b"x"), 2.0) == []
    assert registry.counters["relay.refused"] == 1


def test_the_operator_leaving_unwatches_every_far_gate() -> None:
    registry = make()
    send(registry, A, A1, Register(1, 1, V1, 1, None, (V2,)), 0.0)
    send(registry, A, A1, Deregister(2, None), 1.0)
    registry.drain()
    # V1 and V2 change: no push for a client that left
    assert pushes(register(registry, V1, V1_1, far=A, now=2.0)) == []
    assert pushes(register(registry, V2, V2_1, far=A, now=2.0)) == []
