"""The map message codec: every message round-trips, padding is ignored, bad input is refused."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp.frames import FrameType, PlaintextKind, classify
from warp.map_client.messages import (
    HEADER,
    MAX_FAR_GATES,
    Deregister,
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
    is_map_frame,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))

EXAMPLES: list[MapMessage] = [
    Register(1, 0xDEADBEEF, KEY_B, 2**64 - 1),
    Registered(7, 3, ("203.0.113.9", 40000), 60.0, 12345),
    Registered(8, 4, ("2001:db8::1", 1), 0.25, 0),
    Register(2, 1, KEY_B, 3, b"\x01" * 8),
    Register(3, 2, KEY_B, 4, None, (KEY_A, bytes(range(64, 96)))),
    Registered(9, 3, ("203.0.113.9", 40000), 60.0, 12345, b"\xff" * 8),
    Lookup(9, KEY_B),
    PeerEndpoints(10, KEY_B, (("198.51.100.1", 5), ("2001:db8::2", 65535)), 3, 99),
    PeerEndpoints(11, KEY_B, (), 0, 99),
    Push(KEY_A, (("192.0.2.1", 13116),), 2**40, 1),
    Deregister(12, 5),
    Deregister(13, None),
    Relay(KEY_B, b"\x04" + bytes(100)),
    Relayed(KEY_A, b"x" * 9216),
    Relay(KEY_B, b"\x04", ("2001:db8::1", 51820)),
    Relayed(KEY_A, b"\x04", ("198.51.100.7", 40002)),
    Error(14, ErrorCode.NOT_PERMITTED, "lookup not permitted"),
    Error(None, ErrorCode.BAD_REQUEST, ""),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_with_and_without_wireguard_padding(message: MapMessage) -> None:
    frame = encode(message)
    assert decode(frame) == message
    padded = frame + bytes(-len(frame) % 16)
    assert decode(padded) == message
    assert decode(frame + bytes(64)) == message
    assert is_map_frame(frame)
    assert classify(frame) is PlaintextKind.WARP


def test_frame_layout_is_type_length_msgpack() -> None:
    frame = encode(Lookup(5, KEY_B))
    frame_type, length = HEADER.unpack_from(frame)
    assert frame_type == FrameType.MAP_LOOKUP
    assert length == len(frame) - 3
    assert msgpack.unpackb(frame[3:]) == {"q": 5, "k": KEY_B}


def test_every_truncation_is_refused() -> None:
    frame = encode(PeerEndpoints(10, KEY_B, (("198.51.100.1", 5),), 3, 99))
    for cut in range(len(frame)):
        with pytest.raises(MessageError):
            decode(frame[:cut])


def _raw(frame_type: FrameType, body: object) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return HEADER.pack(int(frame_type), len(packed)) + packed


@pytest.mark.parametrize(
    "frame",
    [
        _raw(FrameType.MAP_LOOKUP, {"q": 1, "k": b"short"}),
        _raw(FrameType.MAP_LOOKUP, {"q": True, "k": KEY_B}),  # bool is not an int here
        _raw(FrameType.MAP_LOOKUP, {"q": -1, "k": KEY_B}),
        _raw(FrameType.MAP_LOOKUP, {"q": 2**32, "k": KEY_B}),
        _raw(FrameType.MAP_LOOKUP, [1, KEY_B]),
        _raw(FrameType.MAP_REGISTER, {"q": 1, "u": 1, "f": KEY_B}),  # instance missing
        _raw(FrameType.MAP_REGISTERED, {"q": 1, "u": 1, "a": [b"\x01\x02\x03", 5], "t": 1, "b": 0}),
        _raw(FrameType.MAP_REGISTERED, {"q": 1, "u": 1, "a": [bytes(4), 0], "t": 1, "b": 0}),
        _raw(FrameType.MAP_PUSH, {"k": KEY_B, "e": [[bytes(4), 1]] * 65, "v": 1, "b": 1}),
        _raw(FrameType.MAP_RELAY, {"k": KEY_B, "p": b""}),
        _raw(FrameType.MAP_ERROR, {"c": 200, "m": "?"}),
        _raw(FrameType.MAP_ERROR, {"c": 1, "m": b"bytes"}),
        _raw(FrameType.SHARD, {}),
        HEADER.pack(FrameType.MAP_LOOKUP, 3) + b"\xc1\xc1\xc1",  # reserved msgpack byte
        HEADER.pack(FrameType.MAP_LOOKUP, 1) + b"\xdd",  # array32 header, cut
        b"",
        b"\x10",
    ],
)
def test_invalid_frames_raise_message_error(frame: bytes) -> None:
    with pytest.raises(MessageError):
        decode(frame)


def test_unknown_keys_are_ignored() -> None:
    frame = _raw(FrameType.MAP_LOOKUP, {"q": 1, "k": KEY_B, "future": [1, 2, 3]})
    assert decode(frame) == Lookup(1, KEY_B)


def test_a_challenge_answer_is_never_larger_than_the_register_it_answers() -> None:
    """The map may send an unvalidated address no more than it received from it: the
    Registered carrying the challenge must fit in what the smallest Register brings (it is
    padded), for the widest fields and an IPv6 reflexive address (sealed: padded to 16, plus
    32), or the challenge could not be delivered."""

    def sealed(frame: bytes) -> int:
        return 32 + len(frame) + (-len(frame) % 16)

    smallest_register = sealed(encode(Register(0, 0, KEY_B, 0)))
    largest_answer = sealed(
        encode(Registered(2**32 - 1, 2**32 - 1, ("ffff::ffff", 65535), 4e6, 2**64 - 1, bytes(8)))
    )
    assert largest_answer <= smallest_register


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(ValueError):
        encode(Lookup(2**32, KEY_B))
    with pytest.raises(ValueError):
        encode(Relay(KEY_B, b"x" * 9217))
    with pytest.raises(ValueError):
        encode(Registered(1, 1, ("not an ip", 5), 1.0, 0))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    for candidate in (data, bytes([0x10 + data[0] % 9]) + data[1:] if data else data):
        with contextlib.suppress(MessageError):
            decode(candidate)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_frames_never_raise_anything_else(message: MapMessage, data: st.DataObject) -> None:
    frame = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(MessageError):
        decode(bytes(frame))


def test_a_fleet_register_names_its_further_far_gates_up_to_the_bound() -> None:
    keys = tuple(bytes([i]) * 32 for i in range(MAX_FAR_GATES))
    widest = Register(1, 1, keys[0], 1, bytes(8), keys[1:])
    assert decode(encode(widest)).far_gates == keys
    assert decode(encode(Register(1, 1, KEY_B, 1))).also == ()  # no "g": one far gate
    with pytest.raises(MessageError):
        encode(Register(1, 1, KEY_B, 1, None, (*keys[1:], KEY_A)))  # one too many
    for bad in ([b"short"], [KEY_A, 7], b"not a list"):
        frame = _raw(FrameType.MAP_REGISTER, {"q": 1, "u": 1, "f": KEY_B, "i": 1, "g": bad})
        with pytest.raises(MessageError):
            decode(frame)
