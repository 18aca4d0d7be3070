"""Hypothesis properties of the FEC engine: encode then decode, whatever arrives."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warp.redundancy import MAX_DATAGRAM_SIZE, Emission, ShardDecoder, ShardEncoder
from warp.redundancy.shard import DATA_FRAME_TYPE

GEOMETRIES = [(1, 1), (1, 3), (2, 2), (2, 4), (3, 5), (4, 6), (5, 8), (8, 12), (3, 20)]
MTUS = [576, 1280, 1400, 1500, 9000]

geometry = st.sampled_from(GEOMETRIES)
mtu = st.sampled_from(MTUS)


def datagram_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def blocks_of(encoder: ShardEncoder, datagrams: list[bytes], batch: int = 1) -> list[list[bytes]]:
    """Send `datagrams` in batches, each block closed at the end (as its window would
    close it): the frames of each block, its data shards first."""
    out: list[Emission] = []
    for start in range(0, len(datagrams), batch):
        for datagram in datagrams[start : start + batch]:
            out += encoder.push(datagram, 0.0)
        out += encoder.flush(0.0) + encoder.close()
    blocks: list[list[bytes]] = []
    for slot, frame in out:
        if slot == 0:
            blocks.append([])
        blocks[-1].append(frame)
    return blocks


def data_count(block: list[bytes]) -> int:
    return sum(1 for frame in block if frame[0] == DATA_FRAME_TYPE)


@settings(max_examples=300, deadline=None)
@given(
    geometry=geometry,
    mtu=mtu,
    sizes=st.lists(st.integers(1, 20_000), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_any_k_distinct_shards_of_each_block_deliver_everything_byte_exact(
    geometry: tuple[int, int], mtu: int, sizes: list[int], seed: int, data: st.DataObject
) -> None:
    k, n = geometry
    datagrams = [datagram_of(size, seed + i) for i, size in enumerate(sizes)]
    encoder = ShardEncoder(3, k, n, mtu)
    decoder = ShardDecoder(3, k, n)
    delivered: list[bytes] = []
    blocks = blocks_of(encoder, datagrams, batch=data.draw(st.integers(1, 4)))
    # Blocks may arrive in any order too.
    for block in data.draw(st.permutations(blocks)):
        needed = data_count(block) if len(block) > data_count(block) else len(block)
        for index in data.draw(st.permutations(range(len(block))))[:needed]:
            delivered += decoder.receive(block[index], 0.0)
    delivered += decoder.tick(10.0)
    assert sorted(delivered) == sorted(datagrams)
    assert decoder.blocks_in_flight == 0


@settings(max_examples=200, deadline=None)
@given(geometry=geometry, size=st.integers(1, 10_000), seed=st.integers(0, 2**32), data=st.data())
def test_fewer_than_k_shards_of_a_block_never_yield_a_datagram_with_bytes_there(
    geometry: tuple[int, int], size: int, seed: int, data: st.DataObject
) -> None:
    k, n = geometry
    encoder = ShardEncoder(3, k, n, 1400)
    decoder = ShardDecoder(3, k, n)
    blocks = blocks_of(encoder, [datagram_of(size, seed)])
    starved = data.draw(st.integers(0, len(blocks) - 1))
    delivered: list[bytes] = []
    for position, block in enumerate(blocks):
        needed = data_count(block)
        count = data.draw(st.integers(0, needed - 1)) if position == starved else len(block)
        indexes = data.draw(st.permutations(range(len(block))))[:count]
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
    # Another tunnel, same epoch: its shards collide with ours on sequence numbers and
    # must never be mixed into our blocks.
    stranger = ShardEncoder(4, k, n, 1400, epoch=1)
    # The same tunnel after a sender restart (new epoch): legitimate, delivered or not.
    restarted = ShardEncoder(3, k, n, 1400, epoch=2)
    restarted_datagrams = [datagram_of(size, seed - 1 - i) for i, size in enumerate(sizes[:2])]
    frames: list[bytes] = []
    for block in blocks_of(ours, datagrams, batch=2):
        frames += [*block, rng.choice(block)]  # every shard plus a duplicate
    frames += [f for block in blocks_of(stranger, datagrams[:2]) for f in block]
    frames += [f for block in blocks_of(restarted, restarted_datagrams) for f in block]
    frames += junk
    for kind in (0x01, 0x04, 0x05):
        frames += [bytes([kind]) + rng.randbytes(rng.randrange(40)) for _ in junk]
    order = data.draw(st.permutations(range(len(frames))))
    decoder = ShardDecoder(3, k, n, max_blocks_in_flight=64, window=128)
    delivered: list[bytes] = []
    # 1 ms apart: a stream that begins no block for block_timeout is silent, and a same-epoch
    # sender heard after a silence is a restart (its stream is followed from then on).
    for position in order:
        delivered += decoder.receive(frames[position], position / 1000)
    delivered += decoder.tick(1e9)
    # Never a wrong datagram, never one twice.
    legitimate = datagrams + restarted_datagrams
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
    blocks = blocks_of(encoder, [datagram])
    rng = random.Random(seed)
    delivered: list[bytes] = []
    for block in blocks:
        for index in rng.sample(range(len(block)), len(block)):
            delivered += decoder.receive(block[index], 0.0)
    assert delivered == [datagram]
    assert all(len(frame) <= 1400 - 32 for block in blocks for frame in block)


def test_every_size_round_trips_exhaustively_around_shard_boundaries() -> None:
    # Boundaries where the fragment count changes, for k = 3 at mtu 1400.
    encoder = ShardEncoder(1, 3, 5, 1400)
    decoder = ShardDecoder(1, 3, 5)
    capacity = encoder.capacity
    sizes = set(range(1, 40))
    for fragments in range(1, 50):
        sizes |= set(range(fragments * capacity - 3, fragments * capacity + 4))
    sizes |= set(range(MAX_DATAGRAM_SIZE - 5, MAX_DATAGRAM_SIZE + 1))
    for size in sorted(s for s in sizes if 1 <= s <= MAX_DATAGRAM_SIZE):
        datagram = datagram_of(size, size)
        delivered: list[bytes] = []
        for block in blocks_of(encoder, [datagram]):
            for frame in reversed(block):  # parity first
                delivered += decoder.receive(frame, 0.0)
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
        blocks = blocks_of(encoder, [payload])
        frames += [f for block in blocks for f in block if rng.random() < 0.8]
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
