"""Fuzzing the map's parsers and state machines: random and mutated input never raises, never
grows state past its caps, and never makes the map send to an address it was not given."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from warp.map_client.client import MapClient
from warp.map_client.messages import (
    MAX_ENDPOINTS,
    Deregister,
    Endpoint,
    Error,
    ErrorCode,
    Lookup,
    MapMessage,
    MessageError,
    PeerEndpoints,
    Push,
    Register,
    Registered,
    Relay,
    Relayed,
    decode,
    encode,
)
from warp_map_server.registry import Registry

KEYS = [bytes([i]) * 32 for i in range(1, 6)]
SOURCES: list[Endpoint] = [(f"192.0.2.{i}", 1000 + j) for i in range(1, 4) for j in range(3)]

keys = st.sampled_from(KEYS)
sources = st.sampled_from(SOURCES)
u32 = st.integers(0, 2**32 - 1)
small_tag = st.integers(0, 5)
endpoint = st.tuples(
    st.sampled_from(["192.0.2.1", "2001:db8::1", "0.0.0.0", "255.255.255.255"]),
    st.integers(1, 65535),
)
messages: st.SearchStrategy[MapMessage] = st.one_of(
    st.builds(Register, u32, small_tag, keys, st.integers(0, 3)),
    st.builds(Lookup, u32, keys),
    st.builds(Deregister, u32, st.one_of(st.none(), small_tag)),
    st.builds(Relay, keys, st.binary(min_size=1, max_size=64)),
    st.builds(Registered, u32, u32, endpoint, st.floats(0, 1000), st.integers(0, 2**64 - 1)),
    st.builds(
        PeerEndpoints,
        u32,
        keys,
        st.lists(endpoint, max_size=MAX_ENDPOINTS).map(tuple),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(
        Push,
        keys,
        st.lists(endpoint, max_size=4).map(tuple),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(Relayed, keys, st.binary(min_size=1, max_size=64)),
)


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.5 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.75 and data:
            del data[rng.randrange(len(data)) :]
        else:
            data += rng.randbytes(rng.randint(1, 16))
    return bytes(data)


def check_outbox(registry: Registry, request_source: Endpoint) -> None:
    """Every frame the map emits is valid, and goes to the asker or a registered endpoint."""
    registered = {r.endpoint for c in registry.clients.values() for r in c.registrations.values()}
    for deliver in registry.drain():
        decode(deliver.plaintext)
        assert deliver.destination == request_source or deliver.destination in registered


def check_bounds(registry: Registry, now: float) -> None:
    assert len(registry.clients) <= registry.max_clients
    for client in registry.clients.values():
        assert 0 < len(client.registrations) <= registry.max_registrations
    assert len(registry._expiry) <= max(1024, 8 * registry._expiry_live) + 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            keys,
            sources,
            st.one_of(messages.map(encode), st.binary(max_size=80)),
            st.floats(0, 30),
            st.integers(0, 2**32),
        ),
        max_size=60,
    ),
    st.sampled_from(["mutual", "any"]),
)
def test_registry_survives_any_sequence_of_frames(
    steps: list[tuple[bytes, Endpoint, bytes, float, int]], policy: str
) -> None:
    registry = Registry(
        registration_ttl=10.0,
        lookup_policy=policy,  # type: ignore[arg-type]
        max_clients=3,
        max_registrations=2,
        requests_per_second=1000,
        relay_rate=100_000,
    )
    now = 0.0
    for key, source, frame, advance, seed in steps:
        now += advance
        registry.tick(now)
        registry.drain()
        if seed % 3 == 0:
            frame = mutate(frame, random.Random(seed))
        registry.handle(key, frame, source, now)
        check_outbox(registry, source)
        check_bounds(registry, now)
        for client in registry.clients.values():
            for endpoint_ in client.endpoints(now):
                assert any(
                    r.endpoint == endpoint_ and r.expires_at > now
                    for r in client.registrations.values()
                )
    registry.tick(now + 11.0)
    assert registry.clients == {}


@settings(max_examples=500, deadline=None)
@given(st.one_of(messages.map(encode), st.binary(max_size=200)), st.integers(0, 2**32))
def test_client_survives_any_frame(frame: bytes, seed: int) -> None:
    rng = random.Random(seed)
    client = MapClient[str](KEYS[0], rng=rng.randbytes)
    client.add_uplink("u", 0.0)
    for candidate in (frame, mutate(frame, rng)):
        client.receive(candidate, "u", 1.0)
        client.receive(candidate, "unknown-uplink", 1.0)
    client.tick(2.0)
    for send in client.drain_outgoing():
        message = decode(send.frame)
        assert isinstance(message, Register | Lookup | Deregister | Relay)
        assert send.uplink == "u"
    client.drain_events()


def test_twenty_thousand_random_frames_through_decode() -> None:
    rng = random.Random(7)
    accepted = 0
    for _ in range(20_000):
        data = bytes([rng.randrange(0x10, 0x19)]) + rng.randbytes(rng.randint(0, 100))
        try:
            decode(data)
            accepted += 1
        except MessageError:
            pass
    assert accepted < 20_000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.floats(0, 3), st.integers(0, 2**32)), max_size=80))
def test_client_never_loses_track_of_an_uplink(steps: list[tuple[int, float, int]]) -> None:
    """Whatever the map answers (right ids, wrong ids, wrong types), every uplink always has a
    register in flight or one scheduled, and the client always has a next deadline."""
    rng = random.Random(len(steps))
    client = MapClient[str](KEYS[1], refresh_interval=2.0, response_timeout=0.25, rng=rng.randbytes)
    now = 0.0
    names = ["u0", "u1", "u2"]
    for action, advance, seed in steps:
        now += advance
        pick = random.Random(seed)
        pending_ids = list(client._pending) or [seed & 0xFFFF_FFFF]
        request_id = pick.choice(pending_ids)
        tags = [u.tag for u in client._uplinks.values()] or [0]
        if action == 0:
            client.add_uplink(pick.choice(names), now)
        elif action == 1:
            client.remove_uplink(pick.choice(names), now)
        elif action == 2:
            client.uplink_changed(pick.choice(names), now)
        elif action == 3:
            answer: MapMessage = Registered(
                request_id, pick.choice(tags), ("192.0.2.1", 1 + seed % 65535), 5.0, seed % 3
            )
            client.receive(encode(answer), pick.choice(names), now)
        elif action == 4:
            answer = PeerEndpoints(request_id, KEYS[pick.randrange(2)], (), seed, seed % 3)
            client.receive(encode(answer), pick.choice(names), now)
        elif action == 5:
            code = pick.choice(list(ErrorCode))
            client.receive(encode(Error(request_id, code, "x")), pick.choice(names), now)
        elif action == 6:
            client.tick(now)
        elif action == 7 and seed % 5 == 0:
            client.stop(now)
        client.drain_outgoing()
        client.drain_events()
        for state in client._uplinks.values():
            assert state.register_request is None or state.register_request in client._pending
        if client._uplinks and not client._stopping:
            assert client.next_deadline() is not None
