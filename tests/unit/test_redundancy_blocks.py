"""FEC blocks of several datagrams, sans-I/O: data shards at once, parity per block (when it
has k data shards or its window expires), rebuilding, exact counting, bounded memory."""

from __future__ import annotations

import random

from warp.redundancy import (
    Emission,
    RejectReason,
    ShardDecoder,
    ShardEncoder,
    max_shard_payload,
    parse_data_header,
    parse_parity_header,
)
from warp.redundancy.shard import (
    CODED_HEADER_SIZE,
    DATA_FRAME_TYPE,
    DATA_HEADER,
    PARITY_FRAME_TYPE,
    PARITY_HEADER,
)

TUNNEL = 4


def send(encoder: ShardEncoder, datagrams: list[bytes], now: float = 0.0) -> list[Emission]:
    """One send batch: what the session does per flush."""
    out: list[Emission] = []
    for datagram in datagrams:
        out += encoder.push(datagram, now)
    return out + encoder.flush(now)


def blocks_of(frames: list[Emission]) -> list[list[Emission]]:
    """Split a run of emissions into blocks (a block starts at data slot 0)."""
    blocks: list[list[Emission]] = []
    for slot, frame in frames:
        if slot == 0:
            blocks.append([])
        blocks[-1].append((slot, frame))
    return blocks


def receive(decoder: ShardDecoder, frames: list[Emission], now: float = 0.0) -> list[bytes]:
    out: list[bytes] = []
    for _, frame in frames:
        out += decoder.receive(frame, now)
    return out


def test_the_window_closes_a_partial_block_with_the_full_parity() -> None:
    encoder = ShardEncoder(TUNNEL, 3, 5, 1400, epoch=1, window=0.001)
    decoder = ShardDecoder(TUNNEL, 3, 5)
    [(slot, data)] = send(encoder, [b"alone"], now=10.0)
    assert slot == 0  # out at once, no waiting for the block to fill
    assert encoder.next_deadline() == 10.001
    assert encoder.close_due(10.0009) == []
    parity = encoder.close_due(10.001)
    # One data shard, the same two parity shards as a full block, on parity slots 3 and 4.
    assert [slot for slot, _ in parity] == [3, 4]
    headers = [parse_parity_header(frame) for _, frame in parity]
    assert [(h.data_shards, h.parity_shards) for h in headers if h] == [(1, 2), (1, 2)]
    assert encoder.next_deadline() is None
    # The data shard is lost: either parity shard alone rebuilds it.
    assert decoder.receive(parity[1][1], 10.01) == [b"alone"]
    assert decoder.receive(parity[0][1], 10.01) == []
    assert decoder.receive(data, 10.02) == []  # came after all: surplus, no repair
    decoder.tick(20.0)
    assert decoder.stats.blocks_rebuilt == 0
    assert decoder.stats.datagrams_delivered == 1


def test_a_full_block_sends_its_parity_at_once() -> None:
    encoder = ShardEncoder(TUNNEL, 3, 5, 1400, epoch=1)
    frames = send(encoder, [bytes([i]) * 1300 for i in range(3)])
    assert [slot for slot, _ in frames] == [0, 1, 2, 3, 4]
    assert encoder.next_deadline() is None


def test_small_datagrams_share_a_shard_and_a_1400_byte_one_takes_one() -> None:
    encoder = ShardEncoder(TUNNEL, 3, 5, 1472, epoch=1)
    [(_, frame)] = send(encoder, [bytes([i]) * 64 for i in range(20)])
    header = parse_data_header(frame)
    assert header is not None and header.length == 20 * (2 + 64)
    frames = send(encoder, [bytes([i % 256]) * 1400 for i in range(300)])
    data = sum(1 for slot, _ in frames if slot < 3)
    # One data shard each, 2 parity per 3 data shards: 5/3 packets per datagram (with the
    # packed shard before them, 301 data shards: 100 full blocks and one left open).
    assert data == 300 and len(frames) == 300 + 2 * 100
    decoder = ShardDecoder(TUNNEL, 3, 5)
    got = receive(decoder, [(0, frame)] + [f for f in frames if f[0] < 3])
    assert got == [bytes([i]) * 64 for i in range(20)] + [
        bytes([i % 256]) * 1400 for i in range(300)
    ]


def test_every_frame_fits_the_mtu_and_mixed_sizes_round_trip_despite_n_minus_k_losses() -> None:
    rng = random.Random(5)
    for mtu, (k, n) in ((576, (2, 4)), (1400, (3, 5)), (1472, (3, 5)), (9000, (8, 12))):
        encoder = ShardEncoder(TUNNEL, k, n, mtu, epoch=2)
        decoder = ShardDecoder(TUNNEL, k, n, max_shard_size=max_shard_payload(mtu))
        sizes = [1, 2, 3, 64, 511, 512, 1400, mtu, 3 * mtu, 65_534, 65_535]
        sizes += [rng.randint(1, 65_535) for _ in range(40)] + [rng.randint(1, 200)] * 40
        datagrams = [rng.randbytes(size) for size in sizes]
        frames: list[Emission] = []
        for start in range(0, len(datagrams), 7):  # batches of 7
            frames += send(encoder, datagrams[start : start + 7])
        frames += encoder.close_due(1.0)
        assert all(-(-len(frame) // 16) * 16 + 32 <= mtu for _, frame in frames)
        got: list[bytes] = []
        for block in blocks_of(frames):
            rng.shuffle(block)
            got += receive(decoder, block[n - k :])  # n - k shards of every block lost
        got += decoder.tick(10.0)
        assert sorted(got) == sorted(datagrams)
        assert decoder.stats.datagrams_lost == 0


def test_lost_fragments_of_a_large_datagram_are_rebuilt_from_parity() -> None:
    encoder = ShardEncoder(TUNNEL, 3, 5, 1400, epoch=3)
    decoder = ShardDecoder(TUNNEL, 3, 5)
    datagram = random.Random(1).randbytes(4000)  # three fragments: one block
    frames = send(encoder, [datagram])
    assert [slot for slot, _ in frames] == [0, 1, 2, 3, 4]
    fragments = [parse_data_header(frame) for _, frame in frames[:3]]
    assert [(h.fragment_index, h.fragment_count) for h in fragments if h] == [
        (0, 3),
        (1, 3),
        (2, 3),
    ]
    assert receive(decoder, [frames[1], frames[4]]) == []
    assert receive(decoder, [frames[3]]) == [datagram]  # fragments 0 and 2 rebuilt
    assert receive(decoder, [frames[0], frames[2]]) == []  # exactly once
    assert decoder.stats.surplus_shards == 2


def test_the_datagrams_of_a_lost_shard_are_counted_exactly() -> None:
    encoder = ShardEncoder(TUNNEL, 3, 5, 1400, epoch=4)
    decoder = ShardDecoder(TUNNEL, 3, 5, block_timeout=0.5)
    first = send(encoder, [b"a" * 100])
    lost = send(encoder, [bytes([i]) * 50 for i in range(5)])  # one shard: five datagrams
    last = send(encoder, [b"z" * 100])  # the block is full: parity follows, lost too
    assert [slot for slot, _ in first + lost + last] == [0, 1, 2, 3, 4]
    assert receive(decoder, first + last[:1]) == [b"a" * 100, b"z" * 100]
    decoder.tick(1.0)
    assert decoder.stats.datagrams_lost == 5
    assert decoder.stats.datagrams_delivered == 2


def test_a_large_datagram_cut_by_lost_shards_counts_once_with_its_neighbours() -> None:
    encoder = ShardEncoder(TUNNEL, 3, 4, 1400, epoch=4)
    decoder = ShardDecoder(TUNNEL, 3, 4, block_timeout=0.5)
    frames = send(encoder, [b"a" * 100]) + send(encoder, [b"b" * 9000]) + send(encoder, [b"c"])
    frames += encoder.close()
    data = [(slot, f) for slot, f in frames if f[0] == DATA_FRAME_TYPE]
    assert len(data) == 1 + 7 + 1
    # The first, two fragments in the middle (one block: parity cannot cover both) and
    # the last arrive.
    got = receive(decoder, [data[0], data[2], data[3], data[8]])
    assert got == [b"a" * 100, b"c"]
    decoder.tick(2.0)
    assert decoder.stats.datagrams_lost == 1
    assert decoder.stats.datagrams_incomplete == 1


def test_the_retired_shard_type_is_counted_and_never_decoded() -> None:
    decoder = ShardDecoder(TUNNEL, 3, 5)
    reasons: list[RejectReason] = []
    decoder.on_reject = reasons.append
    old = bytes([0x01, 0, TUNNEL, 0, 1, 3, 5, 0, 0, 0, 0, 0, 0, 1, 0, 3]) + b"abc"
    assert decoder.receive(old, 0.0) == []
    assert reasons == [RejectReason.LEGACY]
    assert decoder.stats.rejected == {RejectReason.LEGACY: 1}


def test_a_flood_of_never_closing_blocks_stays_within_the_memory_bound() -> None:
    max_blocks = 64
    mtu = 1400
    decoder = ShardDecoder(
        TUNNEL,
        3,
        5,
        max_blocks_in_flight=max_blocks,
        window=1024,
        max_shard_size=max_shard_payload(mtu),
    )
    rng = random.Random(9)
    size = max_shard_payload(mtu)
    payload = rng.randbytes(size + CODED_HEADER_SIZE)
    for i in range(20_000):
        now = i * 0.0001
        seq = i + 5000 + rng.randrange(1 << 20)  # ahead of the stream: never stale
        # Parity of blocks whose data never comes, and first fragments of datagrams
        # whose other fragments never come, all over the sequence space.
        parity = PARITY_HEADER.pack(PARITY_FRAME_TYPE, TUNNEL, 1, seq, 3, 2, 0, size + 9)
        decoder.receive(parity + payload, now)
        fragment = DATA_HEADER.pack(DATA_FRAME_TYPE, TUNNEL, 1, i, 0, i, 0, 40, size)
        decoder.receive(fragment + payload[:size], now)
        if i % 500 == 0:
            assert decoder.buffered_bytes() <= decoder.memory_bound
            assert decoder.blocks_in_flight <= max_blocks
    assert decoder.buffered_bytes() <= decoder.memory_bound
    stats = decoder.stats
    assert stats.blocks_evicted + stats.blocks_expired > 19_000
    assert stats.datagrams_incomplete > 19_000
    assert decoder.stats.datagrams_delivered == 0


def test_ordered_mode_delivers_packed_and_rebuilt_datagrams_in_order() -> None:
    encoder = ShardEncoder(TUNNEL, 2, 3, 1400, epoch=5)
    decoder = ShardDecoder(TUNNEL, 2, 3, ordered=True, reorder_timeout=0.05)
    a = send(encoder, [b"1", b"2"])  # one shard
    b = send(encoder, [b"3"])  # block full: parity follows
    assert [slot for slot, _ in a + b] == [0, 1, 2]
    assert receive(decoder, b[1:]) == []  # the parity alone rebuilds nothing
    # Data shard 1 (held: datagrams 1 and 2 are missing) and the parity rebuild shard 0.
    assert receive(decoder, b[:1]) == [b"1", b"2", b"3"]
