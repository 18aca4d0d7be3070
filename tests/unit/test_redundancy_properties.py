"""Hypothesis properties of the FEC engine: encode then decode, whatever arrives."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warp.redundancy import MAX_DATAGRAM_SIZE, ShardDecoder, ShardEncoder

GEOMETRIES = [(1, 1), (1, 3), (2, 2), (2, 4), (3, 5), (4, 6), (5, 8), (8, 12), (3, 20)]
MTUS = [576, 1280, 1400, 1500, 9000]

geometry = st.sampled_from(GEOMETRIES)
mtu = st.sampled_from(MTUS)


def datagram_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@settings(max_examples=300, deadline=None)
@given(
    geometry=geometry,
    mtu=mtu,
    size=st.integers(1, 20_000),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_any_k_distinct_shards_rebuild_each_block_byte_exact(
    geometry: tuple[int, int], mtu: int, size: int, seed: int, data: st.DataObject
) -> None:
    k, n = geometry
    datagram = datagram_of(size, seed)
    encoder = ShardEncoder(3, k, n, mtu)
    decoder = ShardDecoder(3, k, n)
    delivered: list[bytes] = []
    blocks = encoder.encode(datagram)
    # Blocks may arrive in any order too.
    for block in data.draw(st.permutations(blocks)):
        chosen = data.draw(st.permutations(range(n)))[:k]
        for index in chosen:
            delivered += decoder.receive(block[index], 0.0)
    assert delivered == [datagram]
    assert decoder.stats.blocks_decoded == len(blocks)
    assert decoder.blocks_in_flight == 0


@settings(max_examples=200, deadline=None)
@given(geometry=geometry, size=st.integers(1, 10_000), seed=st.integers(0, 2**32), data=st.data())
def test_fewer_than_k_shards_of_a_block_never_yield_output(
    geometry: tuple[int, int], size: int, seed: int, data: st.DataObject
) -> None:
    k, n = geometry
    encoder = ShardEncoder(3, k, n, 1400)
    decoder = ShardDecoder(3, k, n)
    blocks = encoder.encode(datagram_of(size, seed))
    starved = data.draw(st.integers(0, len(blocks) - 1))
    delivered: list[bytes] = []
    for position, block in enumerate(blocks):
        count = data.draw(st.integers(0, k - 1)) if position == starved else k
        indexes = data.draw(st.permutations(range(n)))[:count]
        # Repeating a shard must not count twice towards k.
        for index in indexes + indexes:
            delivered += decoder.receive(block[index], 0.0)
    delivered += decoder.tick(10.0)
    assert delivered == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    geometry=geometry,
    sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
    junk=st.lists(st.binary(max_size=64), max_size=20),
    data=st.data(),
)
def test_foreign_duplicate_and_random_frames_never_raise_nor_corrupt(
    geometry: tuple[int, int],
    sizes: list[int],
    seed: int,
    junk: list[bytes],
    data: st.DataObject,
) -> None:
    k, n = geometry
    rng = random.Random(seed)
    datagrams = [datagram_of(size, seed + i) for i, size in enumerate(sizes)]
    ours = ShardEncoder(3, k, n, 1400, epoch=1)
    # Same tunnel and epoch but an independent sequence space: its shards collide with
    # ours on sequence numbers and must never be mixed into our blocks as valid data.
    stranger = ShardEncoder(4, k, n, 1400, epoch=1)
    # Another geometry in the same tunnel and epoch is followed per block (a peer may change
    # its parity): its own datagrams may come out, never mixed with ours.
    other_geometry = ShardEncoder(3, min(k + 1, 255), min(n + 2, 255), 1400, epoch=1)
    other_datagrams = [datagram_of(size, seed + 1000 + i) for i, size in enumerate(sizes[:2])]
    # The same tunnel after a sender restart (new epoch): legitimate, delivered or not.
    restarted = ShardEncoder(3, k, n, 1400, epoch=2)
    restarted_datagrams = [datagram_of(size, seed - 1 - i) for i, size in enumerate(sizes[:2])]
    frames: list[bytes] = []
    for datagram in datagrams:
        for block in ours.encode(datagram):
            frames += [*block, rng.choice(block)]  # every shard plus a duplicate
    for datagram in datagrams[:2]:
        frames += [f for block in stranger.encode(datagram) for f in block]
    for datagram in other_datagrams:
        frames += [f for block in other_geometry.encode(datagram) for f in block]
    for datagram in restarted_datagrams:
        frames += [f for block in restarted.encode(datagram) for f in block]
    frames += junk
    frames += [b"\x01" + bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in junk]
    order = data.draw(st.permutations(range(len(frames))))
    decoder = ShardDecoder(3, k, n, max_blocks_in_flight=64, window=128)
    delivered: list[bytes] = []
    # 1 ms apart: a stream that begins no block for block_timeout is silent, and a same-epoch
    # sender heard after a silence is a restart (its stream is followed from then on).
    for position in order:
        delivered += decoder.receive(frames[position], position / 1000)
    delivered += decoder.tick(1e9)
    # Never a wrong datagram, never one twice.
    legitimate = datagrams + restarted_datagrams + other_datagrams
    assert all(d in legitimate for d in delivered)
    for datagram in legitimate:
        assert delivered.count(datagram) <= legitimate.count(datagram)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, MAX_DATAGRAM_SIZE), geometry=geometry, seed=st.integers(0, 2**32))
def test_sizes_from_1_to_65535_round_trip(size: int, geometry: tuple[int, int], seed: int) -> None:
    k, n = geometry
    encoder = ShardEncoder(9, k, n, 1400)
    decoder = ShardDecoder(9, k, n)
    datagram = datagram_of(size, seed)
    blocks = encoder.encode(datagram)
    rng = random.Random(seed)
    delivered: list[bytes] = []
    for block in blocks:
        for index in rng.sample(range(n), n):
            delivered += decoder.receive(block[index], 0.0)
    assert delivered == [datagram]
    assert all(len(frame) <= 1400 - 32 for block in blocks for frame in block)


def test_every_size_round_trips_exhaustively_around_block_boundaries() -> None:
    # Boundaries where the block count or the padding changes, for k = 3 at mtu 1400.
    encoder = ShardEncoder(1, 3, 5, 1400)
    decoder = ShardDecoder(1, 3, 5)
    capacity = encoder.block_capacity
    sizes = set(range(1, 40))
    for blocks in range(1, 18):
        sizes |= set(range(blocks * capacity - 3, blocks * capacity + 4))
    sizes |= set(range(MAX_DATAGRAM_SIZE - 5, MAX_DATAGRAM_SIZE + 1))
    for size in sorted(s for s in sizes if 1 <= s <= MAX_DATAGRAM_SIZE):
        datagram = datagram_of(size, size)
        delivered: list[bytes] = []
        for block in encoder.encode(datagram):
            for index in (4, 1, 3, 0, 2):
                delivered += decoder.receive(block[index], 0.0)
        assert delivered == [datagram], size


@settings(max_examples=300, deadline=None)
@given(
    geometry=geometry,
    epochs=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    count=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_sender_restarts_and_fail_backs_never_deliver_twice(
    geometry: tuple[int, int], epochs: list[int], count: int, seed: int, data: st.DataObject
) -> None:
    # Several sender instances of one tunnel (one epoch each), interleaved, with silences
    # long enough for the decoder to fail back to an instance it had left.
    k, n = geometry
    rng = random.Random(seed)
    encoders = {epoch: ShardEncoder(3, k, n, 1400, epoch=epoch) for epoch in set(epochs)}
    sent: list[bytes] = []
    frames: list[bytes] = []
    for i in range(count):
        payload = datagram_of(rng.randrange(1, 3000), seed + i)
        sent.append(payload)
        encoder = encoders[rng.choice(epochs)]
        frames += [f for block in encoder.encode(payload) for f in block if rng.random() < 0.8]
    order = data.draw(st.permutations(range(len(frames))))
    # The window must exceed the reordering depth, as WireGuard's replay window ensures in
    # production: a shard a full window behind is taken for a restarted sender.
    decoder = ShardDecoder(3, k, n, block_timeout=0.5, max_blocks_in_flight=8, window=1024)
    delivered: list[bytes] = []
    now = 0.0
    for position in order:
        now += rng.choice((0.001, 0.01, 1.5))
        delivered += decoder.receive(frames[position], now)
        delivered += decoder.tick(now)
    for datagram in delivered:
        assert delivered.count(datagram) <= sent.count(datagram)
        assert datagram in sent
