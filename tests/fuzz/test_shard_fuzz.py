"""Shard parsers and the decoder fed random and mutated input: nothing raises, memory
stays bounded, and the decoder keeps working for the honest shards that follow.

Mutated payloads can rebuild into wrong bytes: that is for WireGuard's AEAD to stop (a
forged or corrupted shard never reaches the decoder), so it is not asserted here."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from warp.redundancy import (
    SHARD_HEADER_SIZE,
    ShardDecoder,
    ShardEncoder,
    parse_data_header,
    parse_parity_header,
    shard_tunnel_id,
)

TUNNEL, K, N = 3, 3, 5


def honest_frames(seed: int, count: int = 20) -> list[bytes]:
    rng = random.Random(seed)
    encoder = ShardEncoder(TUNNEL, K, N, 1400, epoch=77)
    datagrams = [rng.randbytes(rng.choice((1, 50, 1400, 5000, 20_000))) for _ in range(count)]
    return [f for _, f in send(encoder, datagrams)]


def send(encoder: ShardEncoder, datagrams: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for datagram in datagrams:
        out += encoder.push(datagram, 0.0) + encoder.flush(0.0)
    return out + encoder.close()


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    choice = rng.randrange(6)
    if choice == 0:  # flip bits anywhere in the header
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(SHARD_HEADER_SIZE)] ^= 1 << rng.randrange(8)
    elif choice == 1:  # overwrite one header byte
        data[rng.randrange(SHARD_HEADER_SIZE)] = rng.randrange(256)
    elif choice == 2:  # truncate
        del data[rng.randrange(len(data)) :]
    elif choice == 3:  # extend with junk
        data += rng.randbytes(rng.randrange(1, 2000))
    elif choice == 4:  # extreme values in the numeric fields
        data[rng.randrange(5, SHARD_HEADER_SIZE)] = rng.choice((0, 1, 254, 255))
    else:  # random bytes behind a plausible prefix
        data[SHARD_HEADER_SIZE:] = rng.randbytes(rng.randrange(0, 3000))
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_parsers_never_raise_on_random_bytes(data: bytes) -> None:
    tunnel = shard_tunnel_id(data)
    for header in (parse_data_header(data), parse_parity_header(data)):
        if header is not None:
            assert tunnel == header.tunnel_id
    decoder = ShardDecoder(TUNNEL, K, N)
    assert decoder.receive(data, 0.0) == []
    assert decoder.receive(memoryview(data), 0.0) == []
    assert decoder.tick(100.0) == []


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from((b"\x04", b"\x05")),
    st.binary(min_size=0, max_size=200),
)
def test_decoder_never_raises_on_frames_of_the_honest_stream(kind: bytes, tail: bytes) -> None:
    # Same type, tunnel and epoch as an honest stream: everything else is random.
    frame = kind + b"\x00\x03\x00\x4d" + tail
    frames = honest_frames(1, count=1)
    decoder = ShardDecoder(TUNNEL, K, N, max_blocks_in_flight=16, window=32)
    decoder.receive(frames[0], 0.0)
    for _ in range(3):
        decoder.receive(frame, 0.0)
    decoder.tick(10.0)
    assert decoder.buffered_bytes() <= decoder.memory_bound


def test_mutated_shards_mixed_into_honest_traffic() -> None:
    rng = random.Random(2024)
    for round_ in range(40):
        frames = honest_frames(round_)
        for ordered in (False, True):
            decoder = ShardDecoder(
                TUNNEL,
                K,
                N,
                max_blocks_in_flight=32,
                window=64,
                ordered=ordered,
                max_shard_size=1400,
            )
            now = 0.0
            for frame in frames:
                for _ in range(rng.randrange(4)):
                    decoder.receive(mutate(rng.choice(frames), rng), now)
                decoder.receive(frame, now)
                now += 0.001
                decoder.tick(now)
                assert decoder.buffered_bytes() <= decoder.memory_bound
                assert decoder.blocks_in_flight <= 32
            decoder.tick(now + 100)
            assert decoder.buffered_bytes() == 0
            assert decoder.next_deadline() is None
            # Still a working decoder for what comes next (a new sender epoch, say).
            encoder = ShardEncoder(TUNNEL, K, N, 1400, epoch=78)
            fresh = b"after the storm" * 10
            out = [d for _, f in send(encoder, [fresh]) for d in decoder.receive(f, now)]
            out += decoder.tick(now + 200)
            assert out == [fresh]


def test_random_frames_in_bulk() -> None:
    rng = random.Random(99)
    decoder = ShardDecoder(TUNNEL, K, N, max_blocks_in_flight=64, window=128)
    for i in range(200_000):
        length = rng.randrange(0, 600)
        frame = rng.randbytes(length)
        if i % 2:
            # The honest stream's prefix: most of them get past the first checks.
            frame = (b"\x04", b"\x05")[i % 4 // 2] + b"\x00\x03\x00\x4d" + frame
        decoder.receive(frame, i * 1e-4)
        if i % 1000 == 0:
            decoder.tick(i * 1e-4)
            assert decoder.buffered_bytes() <= decoder.memory_bound
    assert sum(decoder.stats.rejected.values()) > 100_000
