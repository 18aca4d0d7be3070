"""Data and parity frame layouts and sender-side sizing."""

from __future__ import annotations

import random

import pytest

from warp.frames import FrameType, PlaintextKind, classify
from warp.redundancy import (
    DATA_HEADER_SIZE,
    MAX_DATAGRAM_SIZE,
    PARITY_HEADER_SIZE,
    DataHeader,
    Emission,
    ParityHeader,
    ShardEncoder,
    max_frame_size,
    max_shard_payload,
    parse_data_header,
    parse_parity_header,
    shard_tunnel_id,
)


def send(encoder: ShardEncoder, datagrams: list[bytes]) -> list[Emission]:
    out: list[Emission] = []
    for datagram in datagrams:
        out += encoder.push(datagram, 0.0)
    return out + encoder.flush(0.0)


def test_headers_are_at_their_documented_offsets() -> None:
    encoder = ShardEncoder(0x0102, 3, 5, 1400, epoch=0x0304, initial_seq=0x05060708)
    frames = send(encoder, [b"A" * 10, b"B"]) + encoder.close()
    assert DATA_HEADER_SIZE == 18 and PARITY_HEADER_SIZE == 14
    assert [slot for slot, _ in frames] == [0, 3, 4]
    data, parity = frames[0][1], frames[1][1]
    assert data[:18] == bytes(
        [0x04, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 1, 0, 15]
    )
    assert data[18:] == b"\x00\x0a" + b"A" * 10 + b"\x00\x01B"  # two records
    assert parity[:14] == bytes(
        [0x05, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 1, 2, 0, 0, 24]
    )
    assert len(parity) == 14 + 9 + 15
    for frame in (data, parity):
        assert classify(frame) is PlaintextKind.WARP
    assert data[0] == FrameType.DATA_SHARD and parity[0] == FrameType.PARITY_SHARD


def test_parse_and_route() -> None:
    frames = send(ShardEncoder(77, 2, 4, 1400, epoch=9), [b"xyz", b"w" * 2000])
    assert [slot for slot, _ in frames] == [0, 1, 2, 3, 0]
    data, parity = frames[0][1], frames[3][1]
    assert shard_tunnel_id(data) == shard_tunnel_id(memoryview(parity)) == 77
    assert parse_data_header(data) == DataHeader(77, 9, 0, 0, 0, 0, 1, 5)
    assert parse_parity_header(parity) == ParityHeader(77, 9, 0, 2, 2, 1, 9 + 1000)
    assert parse_data_header(data + bytes(15)) is not None  # WireGuard padding
    assert parse_data_header(data[:-1]) is None
    assert parse_parity_header(parity[:-1]) is None
    assert parse_parity_header(data) is None and parse_data_header(parity) is None
    assert shard_tunnel_id(b"\x02" + data[1:]) is None
    assert shard_tunnel_id(data[:13]) is None
    assert shard_tunnel_id(b"\x01" + data[1:]) == 77  # the retired type: routed, then counted
    assert parse_data_header(b"") is None


@pytest.mark.parametrize("mtu", [576, 1280, 1400, 1420, 1472, 1500, 9000])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 2), (2, 4), (3, 5), (8, 12)])
def test_every_frame_fits_the_mtu_after_wireguard_and_its_padding(mtu: int, k: int, n: int) -> None:
    encoder = ShardEncoder(1, k, n, mtu)
    sizes = (1, mtu, 3 * mtu, encoder.capacity - 2, encoder.capacity + 1, 65535)
    frames = send(encoder, [random.randbytes(s) for s in sizes if s <= MAX_DATAGRAM_SIZE])
    frames += encoder.close()
    for _, frame in frames:
        assert len(frame) <= mtu - 32
        padded = -(-len(frame) // 16) * 16
        assert 32 + padded <= mtu


def test_max_frame_size_is_a_multiple_of_16_within_mtu_minus_32() -> None:
    assert max_frame_size(1400) == 1360
    assert max_frame_size(1432) == 1392  # 1432 - 32 = 1400 -> 1392
    assert max_shard_payload(1472) == 1440 - 23  # a 1400-byte datagram fits one shard
    for mtu in range(100, 9001):
        size = max_frame_size(mtu)
        assert size % 16 == 0
        assert mtu - 32 - 15 <= size <= mtu - 32


def test_large_datagrams_split_into_near_equal_consecutive_fragments() -> None:
    encoder = ShardEncoder(1, 3, 5, 1400, initial_seq=10)
    frames = [f for slot, f in send(encoder, [bytes(10_000)]) if slot < 3]
    headers = [parse_data_header(frame) for frame in frames]
    assert [h.seq for h in headers if h] == list(range(10, 18))
    assert [h.fragment_index for h in headers if h] == list(range(8))
    assert {h.fragment_count for h in headers if h} == {8}
    lengths = [h.length for h in headers if h]
    assert sum(lengths) == 10_000
    assert max(lengths) - min(lengths) <= 1
    assert encoder.next_seq == 18


def test_sequence_wraps_modulo_2_to_the_32() -> None:
    encoder = ShardEncoder(1, 3, 5, 1400, initial_seq=2**32 - 1)
    send(encoder, [b"a"])
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
        ShardEncoder(1, 1, 2, 300)  # 65535 B would need more than 255 fragments
    with pytest.raises(ValueError):
        ShardEncoder(1, 3, 5, 1400, window=-0.001)
    encoder = ShardEncoder(1, 3, 5, 1400)
    with pytest.raises(ValueError):
        encoder.push(b"", 0.0)
    with pytest.raises(ValueError):
        encoder.push(bytes(MAX_DATAGRAM_SIZE + 1), 0.0)


def test_smallest_usable_mtu_still_carries_the_largest_datagram() -> None:
    # 257 B of payload per shard (255 fragments), room for the parity header: whole 16s.
    smallest = 32 + 16 * -(-(23 + 257) // 16)
    with pytest.raises(ValueError):
        ShardEncoder(1, 1, 2, smallest - 1)
    encoder = ShardEncoder(1, 1, 2, smallest)
    frames = send(encoder, [bytes(MAX_DATAGRAM_SIZE)])
    assert sum(1 for slot, _ in frames if slot == 0) <= 255
    assert all(len(frame) <= smallest - 32 for _, frame in frames)
