"""Fuzzing the map's return-routability rule and its decoder's new fields.

The registry and its AddressValidator get random authenticated frames (from random clients and
source addresses, challenges echoed right, wrong or from elsewhere) and decide what goes out, as
warp-map's server does. Whatever happens: an address is only ever sent more than it sent the map
once it echoed its own challenge, and before that it gets nothing but the challenge."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from warp.frames import FrameType
from warp.map_client.messages import (
    HEADER,
    Endpoint,
    Lookup,
    MessageError,
    Register,
    Registered,
    Relay,
    decode,
    encode,
)
from warp_map_server.registry import Registry
from warp_map_server.validation import AddressValidator

KEYS = [bytes([i]) * 32 for i in range(1, 4)]
SOURCES: list[Endpoint] = [("192.0.2.1", 1000), ("192.0.2.1", 1001), ("2001:db8::7", 9)]
WIREGUARD_OVERHEAD = 32


def sealed_size(plaintext: bytes) -> int:
    return WIREGUARD_OVERHEAD + len(plaintext) + (-len(plaintext) % 16)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KEYS),
            st.sampled_from(SOURCES),
            st.integers(0, 5),  # what to send
            st.sampled_from(KEYS),  # far gate / target
            st.floats(0, 20),
        ),
        max_size=60,
    )
)
def test_unvalidated_addresses_get_only_their_challenge_within_what_they_sent(
    steps: list[tuple[bytes, Endpoint, int, bytes, float]],
) -> None:
    validator = AddressValidator(bytes(32))
    registry = Registry(requests_per_second=10_000, validator=validator, relay_rate=None)
    received: Counter[tuple[bytes, Endpoint]] = Counter()
    sent: Counter[tuple[bytes, Endpoint]] = Counter()
    challenges: dict[tuple[bytes, Endpoint], bytes] = {}
    now = 0.0
    for request_id, (key, source, action, other, advance) in enumerate(steps):
        now += advance
        if action == 0:
            frame = encode(Register(request_id, 1, other, 1))
        elif action == 1:  # echo the challenge this address got (if any)
            frame = encode(Register(request_id, 1, other, 1, challenges.get((key, source))))
        elif action == 2:  # echo another address's challenge
            stolen = next(iter(challenges.values()), bytes(8))
            frame = encode(Register(request_id, 2, other, 1, stolen))
        elif action == 3:
            frame = encode(Lookup(request_id, other))
        elif action == 4:
            frame = encode(Relay(other, bytes(200)))
        else:
            frame = bytes([0x10, 0xFF])
        validator.received(key, source, sealed_size(frame))
        received[key, source] += sealed_size(frame)
        registry.handle(key, frame, source, now)
        registry.tick(now)
        for deliver in registry.drain():
            size = sealed_size(deliver.plaintext)
            target = (deliver.peer, deliver.destination)
            was_validated = validator.is_validated(*target)
            if not validator.may_send(
                deliver.peer, deliver.destination, size, challenge=deliver.challenge
            ):
                continue
            if was_validated:
                continue
            # sent to an address that has not proven itself: only its challenge, within credit
            message = decode(deliver.plaintext)
            assert isinstance(message, Registered) and message.challenge is not None
            challenges[target] = message.challenge
            sent[target] += size
            assert sent[target] <= received[target]
    assert all(address in SOURCES for _, address in sent)


registered_fields: dict[str, st.SearchStrategy[Any]] = {
    "q": st.integers(-1, 2**33),
    "u": st.integers(-1, 2**33),
    "f": st.binary(max_size=40),
    "i": st.integers(-1, 2**64 - 1) | st.text(max_size=3),
    "c": st.binary(max_size=12) | st.integers(-(2**63), 2**63) | st.none() | st.text(max_size=8),
    "x": st.binary(max_size=20) | st.integers(-5, 5),
    "a": st.lists(st.binary(max_size=17) | st.integers(-1, 70000), max_size=3),
    "t": st.integers(-1, 2**33),
    "b": st.integers(-1, 2**64 - 1),
}


@settings(max_examples=2000, deadline=None)
@given(
    st.sampled_from([FrameType.MAP_REGISTER, FrameType.MAP_REGISTERED]),
    st.fixed_dictionaries({}, optional=registered_fields),
)
def test_register_and_registered_bodies_decode_or_raise_message_error(
    frame_type: FrameType, body: dict[str, Any]
) -> None:
    packed = msgpack.packb(body, use_bin_type=True)
    frame = HEADER.pack(int(frame_type), len(packed)) + packed
    with contextlib.suppress(MessageError):
        message = decode(frame)
        assert decode(encode(message)) == message
        assert isinstance(message, Register | Registered)
        if "c" in body:
            assert message.challenge == body["c"]
