"""Shard frame layout and sender-side sizing."""

from __future__ import annotations

import random

import pytest

from warp.frames import FrameType, PlaintextKind, classify
from warp.redundancy import (
    MAX_DATAGRAM_SIZE,
    SHARD_HEADER_SIZE,
    ShardEncoder,
    ShardHeader,
    max_frame_size,
    parse_shard_header,
    shard_tunnel_id,
)


def test_header_layout_is_sixteen_bytes_at_documented_offsets() -> None:
    encoder = ShardEncoder(0x0102, 3, 5, 1400, epoch=0x0304, initial_seq=0x05060708)
    frames = encoder.encode(b"A" * 10)[0]
    assert SHARD_HEADER_SIZE == 16
    assert len(frames) == 5
    frame = frames[4]
    assert frame[:16] == bytes(
        [0x01, 0x01, 0x02, 0x03, 0x04, 3, 5, 4, 0x05, 0x06, 0x07, 0x08, 0, 1, 0, 10]
    )
    assert len(frame) == 16 + 4  # ceil(10 / 3)
    assert classify(frame) is PlaintextKind.WARP
    assert frame[0] == FrameType.SHARD


def test_parse_and_route() -> None:
    frame = ShardEncoder(77, 2, 4, 1400, epoch=9).encode(b"xyz")[0][3]
    assert shard_tunnel_id(frame) == 77
    assert shard_tunnel_id(memoryview(frame)) == 77
    assert parse_shard_header(frame) == ShardHeader(77, 9, 0, 3, 2, 4, 0, 1, 3)
    assert parse_shard_header(frame + bytes(15)) is not None  # WireGuard padding
    assert parse_shard_header(frame[:-1]) is None
    assert shard_tunnel_id(b"\x02" + frame[1:]) is None
    assert shard_tunnel_id(frame[:15]) is None
    assert parse_shard_header(b"") is None


@pytest.mark.parametrize("mtu", [576, 1280, 1400, 1420, 1472, 1500, 9000])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 2), (2, 4), (3, 5), (8, 12)])
def test_every_frame_fits_the_mtu_after_wireguard_and_its_padding(mtu: int, k: int, n: int) -> None:
    encoder = ShardEncoder(1, k, n, mtu)
    sizes = (1, mtu, 3 * mtu, encoder.block_capacity, encoder.block_capacity + 1, 65535)
    for size in (size for size in sizes if size <= MAX_DATAGRAM_SIZE):
        for block in encoder.encode(random.randbytes(size)):
            assert len(block) == n
            for frame in block:
                assert len(frame) <= mtu - 32
                padded = -(-len(frame) // 16) * 16
                assert 32 + padded <= mtu


def test_max_frame_size_is_a_multiple_of_16_within_mtu_minus_32() -> None:
    assert max_frame_size(1400) == 1360
    assert max_frame_size(1432) == 1392  # 1432 - 32 = 1400 -> 1392
    for mtu in range(100, 9001):
        size = max_frame_size(mtu)
        assert size % 16 == 0
        assert mtu - 32 - 15 <= size <= mtu - 32


def test_large_datagrams_split_into_near_equal_consecutive_blocks() -> None:
    encoder = ShardEncoder(1, 3, 5, 1400, initial_seq=10)
    blocks = encoder.encode(bytes(10_000))
    headers = [parse_shard_header(block[0]) for block in blocks]
    assert [h.block_seq for h in headers if h] == [10, 11, 12]
    assert [h.fragment_index for h in headers if h] == [0, 1, 2]
    assert {h.fragment_count for h in headers if h} == {3}
    lengths = [h.block_length for h in headers if h]
    assert sum(lengths) == 10_000
    assert max(lengths) - min(lengths) <= 1
    assert encoder.next_seq == 13


def test_sequence_wraps_modulo_2_to_the_32() -> None:
    encoder = ShardEncoder(1, 3, 5, 1400, initial_seq=2**32 - 1)
    encoder.encode(b"a")
    assert encoder.next_seq == 0


def test_invalid_parameters_and_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        ShardEncoder(1, 0, 5, 1400)
    with pytest.raises(ValueError):
        ShardEncoder(1, 6, 5, 1400)
    with pytest.raises(ValueError):
        ShardEncoder(1, 3, 256, 1400)
    with pytest.raises(ValueError):
        ShardEncoder(70000, 3, 5, 1400)
    with pytest.raises(ValueError):
        ShardEncoder(1, 1, 2, 300)  # 65535 B would need more than 255 blocks
    encoder = ShardEncoder(1, 3, 5, 1400)
    with pytest.raises(ValueError):
        encoder.encode(b"")
    with pytest.raises(ValueError):
        encoder.encode(bytes(MAX_DATAGRAM_SIZE + 1))


def test_smallest_usable_mtu_still_carries_the_largest_datagram() -> None:
    # k = 1 needs 257 B of payload per shard (255 blocks); frames are whole 16 B units.
    smallest = 32 + 16 * -(-(SHARD_HEADER_SIZE + 257) // 16)
    with pytest.raises(ValueError):
        ShardEncoder(1, 1, 2, smallest - 1)
    blocks = ShardEncoder(1, 1, 2, smallest).encode(bytes(MAX_DATAGRAM_SIZE))
    assert len(blocks) <= 255
    assert all(len(frame) <= smallest - 32 for block in blocks for frame in block)
