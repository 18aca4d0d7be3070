"""Receiver side: validation, dedup, timeouts, memory bounds, epochs, wrap-around, order."""

from __future__ import annotations

import random

import pytest

from warp.redundancy import (
    SHARD_HEADER_SIZE,
    RejectReason,
    ShardDecoder,
    ShardEncoder,
)
from warp.redundancy.shard import SHARD_HEADER

K, N, TUNNEL, EPOCH = 3, 5, 7, 0x1234


def encoder(**kwargs: int) -> ShardEncoder:
    options = {"epoch": EPOCH, **kwargs}
    return ShardEncoder(TUNNEL, K, N, 1400, **options)


def decoder(**kwargs: object) -> ShardDecoder:
    return ShardDecoder(TUNNEL, K, N, **kwargs)  # type: ignore[arg-type]


def frame_with(frame: bytes, **fields: int) -> bytes:
    """A copy of `frame` with some header fields replaced."""
    names = ["type", "tunnel", "epoch", "k", "n", "index", "seq", "frag_index", "frag_count"]
    values = dict(zip([*names, "length"], SHARD_HEADER.unpack_from(frame), strict=True))
    values.update(fields)
    return SHARD_HEADER.pack(*values.values()) + frame[SHARD_HEADER_SIZE:]


def test_all_data_shards_rebuild_without_a_decode_call_in_any_order() -> None:
    enc, dec = encoder(), decoder()
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        datagram = random.randbytes(1000)
        block = enc.encode(datagram)[0]
        out = [d for i in order for d in dec.receive(block[i], 0.0)]
        assert out == [datagram]
    assert dec.stats.decode_calls == 0
    assert dec.stats.blocks_decoded == 3
    assert dec.stats.blocks_rebuilt == 0


def test_parity_rebuild_calls_decode_once_and_later_shards_are_surplus() -> None:
    enc, dec = encoder(), decoder()
    datagram = random.randbytes(1400)
    block = enc.encode(datagram)[0]
    out: list[bytes] = []
    for index in (4, 1, 3, 0, 2, 4):
        out += dec.receive(block[index], 0.0)
    assert out == [datagram]
    assert dec.stats.decode_calls == 1
    assert dec.stats.surplus_shards == 3
    assert dec.stats.duplicates == 0
    assert dec.blocks_in_flight == 0
    # The data shards came after the parity: decoded with parity, but no repair.
    dec.tick(5.0)
    assert dec.stats.blocks_rebuilt == 0


def test_repeated_shard_index_does_not_count_twice() -> None:
    enc, dec = encoder(), decoder()
    block = enc.encode(b"x" * 300)[0]
    for _ in range(5):
        assert dec.receive(block[0], 0.0) == []
    assert dec.receive(block[3], 0.0) == []
    assert dec.receive(block[4], 0.0) == [b"x" * 300]
    assert dec.stats.duplicates == 4


def test_trailing_bytes_after_the_payload_are_ignored() -> None:
    # WireGuard pads plaintexts with zeros to a multiple of 16.
    enc, dec = encoder(), decoder()
    datagram = b"hello, world"
    block = enc.encode(datagram)[0]
    out = [d for f in block[:3] for d in dec.receive(f + bytes(15), 0.0)]
    assert out == [datagram]


def test_views_into_a_reused_buffer_are_copied() -> None:
    enc, dec = encoder(), decoder()
    datagram = random.randbytes(900)
    block = enc.encode(datagram)[0]
    buffer = bytearray(2048)
    out: list[bytes] = []
    for index in (4, 0, 2):
        buffer[: len(block[index])] = block[index]
        out += dec.receive(memoryview(buffer)[: len(block[index])], 0.0)
        buffer[:] = bytes(2048)  # the caller reuses its receive buffer
    assert out == [datagram]
    out = []
    block = enc.encode(datagram)[0]
    for index in (1, 3, 2):
        out += dec.receive(bytearray(block[index]), 0.0)
    assert out == [datagram]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:15], RejectReason.SHORT),
        (lambda f: b"", RejectReason.SHORT),
        (lambda f: b"\x02" + f[1:], RejectReason.NOT_SHARD),
        (lambda f: frame_with(f, tunnel=TUNNEL + 1), RejectReason.TUNNEL),
        (lambda f: frame_with(f, k=6), RejectReason.GEOMETRY),
        (lambda f: frame_with(f, k=0), RejectReason.GEOMETRY),
        (lambda f: frame_with(f, k=0, n=0), RejectReason.GEOMETRY),
        (lambda f: frame_with(f, index=5), RejectReason.INDEX),
        (lambda f: frame_with(f, index=255), RejectReason.INDEX),
        (lambda f: frame_with(f, frag_index=1, frag_count=1), RejectReason.FRAGMENT),
        (lambda f: frame_with(f, frag_index=0, frag_count=0), RejectReason.FRAGMENT),
        (lambda f: frame_with(f, length=0), RejectReason.LENGTH),
        (lambda f: frame_with(f, length=65535), RejectReason.LENGTH),
        (lambda f: f[:-1], RejectReason.LENGTH),
    ],
)
def test_malformed_shards_are_rejected_and_counted(mutate: object, reason: RejectReason) -> None:
    enc = encoder()
    other = enc.encode(random.randbytes(600))[0]
    block = enc.encode(random.randbytes(600))[0]
    for start_with_valid in (False, True):
        dec = decoder()
        if start_with_valid:
            dec.receive(other[1], 0.0)  # takes the fast path once the epoch is known
        assert dec.receive(mutate(block[0]), 0.0) == []  # type: ignore[operator]
        assert dec.stats.rejected == {reason: 1}


def test_shard_disagreeing_with_its_block_is_rejected_as_inconsistent() -> None:
    enc, dec = encoder(), decoder()
    block = enc.encode(random.randbytes(600))[0]
    dec.receive(block[0], 0.0)
    assert dec.receive(frame_with(block[1], length=599), 0.0) == []
    assert dec.receive(frame_with(block[1], frag_count=2), 0.0) == []
    assert dec.stats.rejected == {RejectReason.INCONSISTENT: 2}


def test_max_shard_size_limits_what_a_peer_can_make_us_hold() -> None:
    enc = ShardEncoder(TUNNEL, K, N, 9000, epoch=EPOCH)
    dec = decoder(max_shard_size=1352)
    block = enc.encode(random.randbytes(8000))[0]
    assert dec.receive(block[0], 0.0) == []
    assert dec.stats.rejected == {RejectReason.LENGTH: 1}


def test_unfinished_blocks_expire_after_block_timeout_and_late_shards_are_ignored() -> None:
    enc, dec = encoder(), decoder(block_timeout=0.5)
    block = enc.encode(b"late" * 100)[0]
    dec.receive(block[0], 1.0)
    dec.receive(block[1], 1.2)
    assert dec.next_deadline() == pytest.approx(1.5)
    assert dec.tick(1.49) == []
    assert dec.blocks_in_flight == 1
    assert dec.tick(1.5) == []
    assert dec.blocks_in_flight == 0
    assert dec.stats.blocks_expired == 1
    assert dec.next_deadline() is None
    # The rest of the block arrives too late: never delivered, cheaply dropped.
    assert [d for f in block[2:] for d in dec.receive(f, 1.6)] == []
    assert dec.stats.late_shards == 3
    assert dec.stats.datagrams_lost == 1
    assert dec.blocks_in_flight == 0


def test_in_flight_blocks_are_bounded_by_evicting_the_oldest() -> None:
    enc, dec = encoder(), decoder(max_blocks_in_flight=8, window=16)
    blocks = [enc.encode(bytes([i]) * 500)[0] for i in range(20)]
    for block in blocks:
        dec.receive(block[0], 0.0)
    assert dec.blocks_in_flight == 8
    assert dec.stats.blocks_evicted == 12
    # The newest 8 can still complete; the evicted ones cannot.
    out = [d for block in blocks for f in block[1:3] for d in dec.receive(f, 0.0)]
    assert out == [bytes([i]) * 500 for i in range(12, 20)]


def test_multi_block_datagram_with_a_lost_block_is_abandoned_after_timeout() -> None:
    enc, dec = encoder(), decoder(block_timeout=1.0)
    datagram = random.randbytes(20_000)
    blocks = enc.encode(datagram)
    assert len(blocks) == 5
    for position, block in enumerate(blocks):
        for f in block[: 2 if position == 2 else 3]:
            assert dec.receive(f, 0.0) == []
    assert dec.buffered_bytes() > 0
    dec.tick(1.0)
    assert dec.stats.blocks_expired == 1
    assert dec.stats.datagrams_incomplete == 1
    assert dec.buffered_bytes() == 0
    assert dec.next_deadline() is None


def test_multi_block_datagrams_interleaved_and_reordered() -> None:
    enc, dec = encoder(), decoder()
    datagrams = [random.randbytes(size) for size in (9000, 30, 15000, 4033)]
    frames = [f for d in datagrams for block in enc.encode(d) for f in block]
    random.Random(5).shuffle(frames)
    out = [d for f in frames for d in dec.receive(f, 0.0)]
    assert sorted(out) == sorted(datagrams)


def test_sequence_numbers_wrap_around() -> None:
    enc, dec = encoder(initial_seq=2**32 - 3), decoder()
    datagrams = [random.randbytes(5000) for _ in range(4)]  # 2 blocks each: crosses 2**32
    out: list[bytes] = []
    for datagram in datagrams:
        blocks = enc.encode(datagram)
        for block in reversed(blocks):
            out += [d for f in block[2:] for d in dec.receive(f, 0.0)]
            out += [d for f in block for d in dec.receive(f, 0.0)]  # all duplicates now
    assert out == datagrams
    assert enc.next_seq == 5


def test_shards_far_behind_the_window_are_rejected_as_stale() -> None:
    enc, dec = encoder(), decoder(max_blocks_in_flight=4, window=8)
    old = enc.encode(b"old" * 10)[0]
    newer = [enc.encode(b"new" * 10)[0] for _ in range(10)]
    for block in newer:
        dec.receive(block[0], 0.0)
    assert dec.receive(old[0], 0.0) == []
    assert dec.stats.rejected == {RejectReason.STALE: 1}


def test_a_restarted_sender_is_followed_and_its_old_epoch_refused() -> None:
    dec = decoder()
    first = ShardEncoder(TUNNEL, K, N, 1400, epoch=1)
    second = ShardEncoder(TUNNEL, K, N, 1400, epoch=2)  # sequence restarts at 0
    a, b = first.encode(b"a" * 100)[0], second.encode(b"b" * 100)[0]
    late_a = first.encode(b"c" * 100)[0]
    assert [d for f in a[:3] for d in dec.receive(f, 0.0)] == [b"a" * 100]
    assert [d for f in b[:3] for d in dec.receive(f, 0.0)] == [b"b" * 100]
    assert dec.stats.epoch_changes == 1
    assert [d for f in late_a for d in dec.receive(f, 0.0)] == []
    assert dec.stats.rejected == {RejectReason.STALE_EPOCH: 5}


def test_memory_stays_under_the_bound_under_a_flood_of_incomplete_blocks() -> None:
    enc = ShardEncoder(TUNNEL, K, N, 1400, epoch=EPOCH)
    dec = decoder(max_blocks_in_flight=64, window=128, max_shard_size=1352)
    for _ in range(2000):
        for block in enc.encode(random.randbytes(random.randrange(1, 12_000))):
            for f in block[: K - 1]:
                dec.receive(f, 0.0)
        assert dec.buffered_bytes() <= dec.memory_bound
    assert dec.blocks_in_flight == 64


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_of_one_delivers_on_the_first_shard(k: int) -> None:
    enc = ShardEncoder(TUNNEL, k, 3, 1400, epoch=EPOCH)
    dec = ShardDecoder(TUNNEL, k, 3)
    datagram = random.randbytes(1000)
    [block] = enc.encode(datagram)
    out = [d for f in block[::-1] for d in dec.receive(f, 0.0)]
    assert out == [datagram]


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        ShardDecoder(1, 4, 3)
    with pytest.raises(ValueError):
        ShardDecoder(1, 3, 256)
    with pytest.raises(ValueError):
        ShardDecoder(1, 3, 5, max_blocks_in_flight=0)
    with pytest.raises(ValueError):
        ShardDecoder(1, 3, 5, window=1000)
    with pytest.raises(ValueError):
        ShardDecoder(1, 3, 5, block_timeout=0)


# ---- ordered delivery --------------------------------------------------------------------


def ordered_decoder(**kwargs: object) -> ShardDecoder:
    return decoder(ordered=True, reorder_timeout=0.05, **kwargs)


def test_ordered_waits_for_a_gap_then_delivers_in_sequence() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [enc.encode(bytes([i]) * 50)[0] for i in range(4)]
    assert dec.receive(blocks[0][0], 0.0) == []
    assert [d for f in blocks[0][1:3] for d in dec.receive(f, 0.0)] == [bytes([0]) * 50]
    # 2 and 3 complete before 1: held.
    assert [d for b in blocks[2:] for f in b[:3] for d in dec.receive(f, 0.01)] == []
    assert dec.next_deadline() == pytest.approx(0.06)
    out = [d for f in blocks[1][2:] for d in dec.receive(f, 0.02)]
    assert out == [bytes([i]) * 50 for i in (1, 2, 3)]
    # Left: the check of the gap block 1 was (it came), and block 1's repair check (it
    # needed parity: data shards 0 and 1 never came).
    dec.tick(2.02)
    assert dec.stats.blocks_rebuilt == 1
    assert dec.stats.datagrams_lost == 0
    assert dec.next_deadline() is None
    assert dec.stats.blocks_skipped == 0


def test_ordered_skips_a_gap_after_reorder_timeout_and_drops_what_comes_later() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [enc.encode(bytes([i]) * 50)[0] for i in range(4)]
    first = [d for f in blocks[0][:3] for d in dec.receive(f, 0.0)]
    assert first == [bytes([0]) * 50]
    assert [d for f in blocks[2][:3] for d in dec.receive(f, 0.10)] == []
    assert [d for f in blocks[3][:3] for d in dec.receive(f, 0.12)] == []
    assert dec.tick(0.1499) == []
    assert dec.tick(0.1501) == [bytes([2]) * 50, bytes([3]) * 50]
    assert dec.stats.blocks_skipped == 1
    # Block 1 completes after its place was skipped: dropped, order is kept.
    assert [d for f in blocks[1][:3] for d in dec.receive(f, 0.2)] == []
    assert dec.stats.datagrams_late == 1


def test_ordered_multi_block_datagrams_keep_their_order() -> None:
    enc, dec = encoder(), ordered_decoder()
    datagrams = [random.randbytes(size) for size in (9000, 100, 12000, 5)]
    encoded = [enc.encode(d) for d in datagrams]
    out: list[bytes] = []
    for blocks in reversed(encoded):
        for block in blocks:
            out += [d for f in block[1:4] for d in dec.receive(f, 0.0)]
    assert out == datagrams


def test_ordered_stream_start_waits_for_earlier_datagrams_reordered_before_it() -> None:
    enc, dec = encoder(initial_seq=1000), ordered_decoder()
    blocks = [enc.encode(bytes([i]) * 20)[0] for i in range(3)]
    # We join a stream that did not start at 0: the first datagram to complete might not
    # be the first one sent, so it waits (once) for reorder_timeout.
    assert [d for f in blocks[1][:3] for d in dec.receive(f, 0.0)] == []
    assert [d for f in blocks[0][:3] for d in dec.receive(f, 0.01)] == []
    assert dec.next_deadline() == pytest.approx(0.05)
    assert dec.tick(0.05) == [b"\0" * 20, b"\1" * 20]
    assert [d for f in blocks[2][:3] for d in dec.receive(f, 0.06)] == [b"\2" * 20]
    late_joiner = ordered_decoder()
    assert [d for f in blocks[2][:3] for d in late_joiner.receive(f, 0.0)] == []
    assert late_joiner.tick(0.05) == [b"\2" * 20]
    assert late_joiner.stats.blocks_skipped == 0


def test_ordered_buffer_is_bounded() -> None:
    enc, dec = encoder(), ordered_decoder(max_blocks_in_flight=4, window=8)
    blocks = [enc.encode(bytes([i]) * 20)[0] for i in range(12)]
    out = [d for f in blocks[0][:3] for d in dec.receive(f, 0.0)]
    for block in blocks[2:]:  # block 1 never comes
        out += [d for f in block[:3] for d in dec.receive(f, 0.0)]
    # Holding more than 4 forced the gap to be skipped without waiting.
    assert out == [bytes([i]) * 20 for i in (0, *range(2, 12))]


def test_reset_flushes_what_ordered_mode_held() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [enc.encode(bytes([i]) * 20)[0] for i in range(3)]
    dec.receive(blocks[0][0], 0.0)
    dec.receive(blocks[0][1], 0.0)
    dec.receive(blocks[0][2], 0.0)
    for f in blocks[2][:3]:
        dec.receive(f, 0.0)
    assert dec.reset() == [bytes([2]) * 20]
    assert dec.buffered_bytes() == 0


def test_ticking_exactly_at_next_deadline_always_makes_progress() -> None:
    # Timer drivers call tick(next_deadline()); float rounding must not leave the
    # deadline unchanged (an event loop would spin on it).
    enc = encoder()
    rng = random.Random(3)
    for ordered in (False, True):
        dec = decoder(block_timeout=0.3, ordered=ordered, reorder_timeout=0.07)
        now = 0.0
        for _ in range(300):
            now += rng.random() / 7
            for block in enc.encode(random.randbytes(rng.choice((50, 6000)))):
                for f in block[: rng.choice((2, 3))]:
                    dec.receive(f, now)
            deadline = dec.next_deadline()
            while deadline is not None and deadline <= now + rng.random():
                dec.tick(deadline)
                after = dec.next_deadline()
                assert after is None or after > deadline
                deadline = after


def test_a_restart_that_draws_the_same_epoch_is_followed_once_the_old_stream_is_silent() -> None:
    # 1 chance in 65536 per restart. Sequence numbers a full window behind cannot be
    # stragglers (WireGuard's replay window is far shorter), so they mean a new stream.
    dec = decoder(max_blocks_in_flight=8, window=16, block_timeout=1.0)
    old = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)
    for i in range(40):
        [block] = old.encode(bytes([i]) * 10)
        assert [d for f in block[:3] for d in dec.receive(f, 0.0)] == [bytes([i]) * 10]
    restarted = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)
    [first] = restarted.encode(b"first")
    # While the old stream may still be alive: refused.
    assert [d for f in first[:3] for d in dec.receive(f, 0.5)] == []
    assert dec.stats.rejected == {RejectReason.STALE: 3}
    # Silent for a block timeout: the new stream is followed.
    [second] = restarted.encode(b"second")
    assert [d for f in second[:3] for d in dec.receive(f, 1.0)] == [b"second"]
    assert dec.stats.resyncs == 1


def test_a_same_epoch_restart_within_the_window_is_delivered_after_a_silence() -> None:
    # The old code checked for a finished block before the silence: 0 of 5 000 delivered.
    dec = decoder()
    old = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)
    now = 0.0
    for i in range(5000):
        now += 0.0002
        [block] = old.encode(i.to_bytes(4) + b"old")
        assert [d for f in block for d in dec.receive(f, now)] == [i.to_bytes(4) + b"old"]
    restarted = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)  # numbers from 0 again
    now += 1.0  # the restart took a second
    out = []
    for i in range(5000):
        now += 0.0002
        [block] = restarted.encode(i.to_bytes(4) + b"new")
        out += [d for f in block for d in dec.receive(f, now)]
    assert out == [i.to_bytes(4) + b"new" for i in range(5000)]
    assert dec.stats.resyncs == 1


def test_late_shards_and_copies_after_a_silence_are_no_restart() -> None:
    # Stragglers (indexes not received yet) and copies (the same bytes) of finished blocks
    # arriving after a silence are dropped, never taken for a restarted sender.
    for k, n in ((1, 2), (3, 6)):
        dec = ShardDecoder(TUNNEL, k, n)
        enc = ShardEncoder(TUNNEL, k, n, 1400, epoch=EPOCH)
        blocks = [enc.encode(bytes([i]) * 100)[0] for i in range(10)]
        out = [d for block in blocks for f in block[:k] for d in dec.receive(f, 0.0)]
        assert len(out) == 10
        for block in blocks:
            for f in block:  # k copies and n - k late shards, 5 s later
                assert dec.receive(f, 5.0) == []
        assert dec.stats.resyncs == 0
        assert dec.stats.surplus_shards == 10 * n


def test_a_retired_epoch_comes_back_only_when_the_current_one_is_silent() -> None:
    dec = decoder(block_timeout=0.5)
    a = ShardEncoder(TUNNEL, K, N, 1400, epoch=1)
    b = ShardEncoder(TUNNEL, K, N, 1400, epoch=2)

    def send(encoder: ShardEncoder, payload: bytes, now: float) -> list[bytes]:
        return [d for block in encoder.encode(payload) for f in block for d in dec.receive(f, now)]

    assert send(a, b"a1", 0.0) == [b"a1"]
    assert send(b, b"b1", 0.1) == [b"b1"]  # a restarted as b
    assert send(a, b"a2", 0.2) == []  # a straggler, or a second instance: b is alive
    assert send(b, b"b2", 0.3) == [b"b2"]
    assert send(a, b"a3", 1.3) == [b"a3"]  # b silent for 1 s: fail back to a
    assert dec.stats.epoch_changes == 2
    # Nothing a sent before the switch is taken again after the fail-back.
    [old_block] = ShardEncoder(TUNNEL, K, N, 1400, epoch=1).encode(b"a1")
    assert [d for f in old_block for d in dec.receive(f, 1.4)] == []


# ---- counters: repairs, surplus, lost datagrams -------------------------------------------


def test_a_clean_stream_shows_no_repair_and_no_drop_and_n_minus_k_surplus_per_block() -> None:
    # Parity often arrives before the last data shard (shards take different paths): the
    # block is decoded with parity at once, but that is no repair once the data shows up.
    for k, n in ((3, 5), (2, 4), (1, 2), (4, 8)):
        enc = ShardEncoder(TUNNEL, k, n, 1400, epoch=EPOCH)
        dec = ShardDecoder(TUNNEL, k, n)
        rng = random.Random(k)
        delivered = 0
        for i in range(1000):
            [block] = enc.encode(random.randbytes(rng.randrange(1, 1300)))
            order = list(range(n))
            rng.shuffle(order)
            delivered += len([d for j in order for d in dec.receive(block[j], i * 0.001)])
        dec.tick(10.0)
        stats = dec.stats
        assert delivered == 1000
        assert stats.decode_calls > 0  # some blocks were decoded with parity first
        assert stats.blocks_rebuilt == 0
        assert stats.surplus_shards == 1000 * (n - k)
        assert stats.datagrams_lost == 0
        assert stats.late_shards == stats.duplicates == stats.rejected_total == 0
        assert stats.blocks_expired == stats.blocks_evicted == 0


def test_repairs_count_exactly_the_blocks_that_lacked_a_data_shard() -> None:
    enc, dec = encoder(), decoder()
    rng = random.Random(7)
    lacking = 0
    for i in range(2000):
        [block] = enc.encode(random.randbytes(1200))
        lost = set(rng.sample(range(N), rng.choice((0, 0, 1, 2))))
        lacking += any(j < K for j in lost)
        order = [j for j in range(N) if j not in lost]
        rng.shuffle(order)
        assert [d for j in order for d in dec.receive(block[j], i * 0.001)] != []
    dec.tick(10.0)
    assert dec.stats.blocks_rebuilt == lacking > 0
    assert dec.stats.datagrams_lost == 0


def _lost_after(dec: ShardDecoder, frames: list[bytes], start: float = 0.0) -> tuple[int, int]:
    """Feed frames 1 ms apart, then time out everything: (delivered, datagrams_lost)."""
    delivered = 0
    now = start
    for frame in frames:
        now += 0.001
        delivered += len(dec.tick(now)) + len(dec.receive(frame, now))
    delivered += len(dec.tick(now + 60.0))
    return delivered, dec.stats.datagrams_lost


@pytest.mark.parametrize("ordered", [False, True])
def test_a_block_of_which_no_shard_arrived_is_a_lost_datagram(ordered: bool) -> None:
    enc, dec = encoder(), decoder(ordered=ordered)
    blocks = [enc.encode(bytes([i]) * 100)[0] for i in range(5)]
    frames = [f for i, block in enumerate(blocks) if i != 2 for f in block]
    assert _lost_after(dec, frames) == (4, 1)
    # Its shards turn up after it was given up: dropped, never delivered late.
    assert [d for f in blocks[2] for d in dec.receive(f, 100.0)] == []
    assert dec.stats.datagrams_lost == 1


@pytest.mark.parametrize("ordered", [False, True])
def test_a_multi_block_datagram_counts_once_however_many_blocks_are_missing(
    ordered: bool,
) -> None:
    enc, dec = encoder(), decoder(ordered=ordered)
    first, big, last = b"a" * 100, random.randbytes(30_000), b"z" * 100
    frames = [f for block in enc.encode(first) for f in block]
    big_blocks = enc.encode(big)
    assert len(big_blocks) == 8
    for position, block in enumerate(big_blocks):
        if position in (1, 2):
            continue  # no shard at all
        keep = 2 if position in (4, 6) else N  # incomplete
        frames += block[:keep]
    frames += [f for block in enc.encode(last) for f in block]
    assert _lost_after(dec, frames) == (2, 1)


def test_ordered_skip_then_expiry_counts_the_datagram_once() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [enc.encode(bytes([i]) * 50)[0] for i in range(4)]
    frames = [*blocks[0][:3], blocks[1][0], *blocks[2][:3], *blocks[3][:3]]
    delivered, lost = _lost_after(dec, frames)
    assert (delivered, lost) == (3, 1)
    assert dec.stats.blocks_skipped == 1 and dec.stats.blocks_expired == 1


def test_ordered_a_datagram_completed_after_its_place_was_skipped_is_lost_once() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [enc.encode(bytes([i]) * 50)[0] for i in range(3)]
    out = [d for f in blocks[0][:3] for d in dec.receive(f, 0.0)]
    out += [d for f in blocks[2][:3] for d in dec.receive(f, 0.0)]
    out += dec.tick(0.1)  # gap skipped
    out += [d for f in blocks[1][:3] for d in dec.receive(f, 0.2)]  # late: dropped
    out += dec.tick(10.0)
    assert out == [bytes([0]) * 50, bytes([2]) * 50]
    assert dec.stats.datagrams_lost == 1


@pytest.mark.parametrize("ordered", [False, True])
def test_datagrams_lost_is_what_the_application_did_not_get(ordered: bool) -> None:
    for seed in range(8):
        rng = random.Random(seed)
        enc, dec = encoder(), decoder(ordered=ordered)
        sizes = [rng.choice((50, 1400, 4000, 9000, 20_000)) for _ in range(300)]
        frames: list[bytes] = []
        for position, size in enumerate(sizes):
            for block in enc.encode(random.randbytes(size)):
                edge = position in (0, len(sizes) - 1)  # the ends arrive whole
                fate = rng.random()
                if edge or fate < 0.8:
                    kept = list(block)
                elif fate < 0.9:
                    kept = rng.sample(block, rng.randrange(1, K))  # too few
                else:
                    kept = []  # not a shard
                frames += kept
        # Some reordering between neighbouring shards.
        for i in range(0, len(frames) - 1, 3):
            if rng.random() < 0.3:
                frames[i], frames[i + 1] = frames[i + 1], frames[i]
        delivered, lost = _lost_after(dec, frames)
        assert delivered + lost == len(sizes), (seed, delivered, lost)
        assert lost > 0


# ---- per-block geometry -----------------------------------------------------------------


def test_each_block_is_decoded_with_the_geometry_its_shards_carry() -> None:
    # Configured (3, 5); the peer sends (3, 6) while it adds parity, and its own (2, 4).
    dec = decoder()
    senders = [
        ShardEncoder(TUNNEL, 3, 5, 1400, epoch=EPOCH),
        ShardEncoder(TUNNEL, 3, 6, 1400, epoch=EPOCH, initial_seq=1000),
        ShardEncoder(TUNNEL, 2, 4, 1400, epoch=EPOCH, initial_seq=2000),
        ShardEncoder(TUNNEL, 1, 2, 1400, epoch=EPOCH, initial_seq=3000),
    ]
    rng = random.Random(1)
    sent, out = [], []
    for i in range(400):
        enc = senders[i % len(senders)]
        datagram = random.randbytes(rng.randrange(1, 6000))
        sent.append(datagram)
        for block in enc.encode(datagram):
            n = len(block)
            chosen = rng.sample(range(n), enc.k + rng.randrange(n - enc.k + 1))
            out += [d for j in chosen for d in dec.receive(block[j], i * 0.001)]
    assert sorted(out) == sorted(sent)
    assert dec.stats.rejected_total == 0


def test_shards_of_one_block_disagreeing_on_geometry_are_rejected() -> None:
    dec = decoder()
    [block] = ShardEncoder(TUNNEL, 3, 5, 1400, epoch=EPOCH).encode(b"x" * 600)
    [other] = ShardEncoder(TUNNEL, 3, 6, 1400, epoch=EPOCH).encode(b"y" * 600)  # same seq
    [fewer] = ShardEncoder(TUNNEL, 2, 5, 1400, epoch=EPOCH).encode(b"z" * 600)
    assert dec.receive(block[0], 0.0) == []
    assert dec.receive(other[1], 0.0) == []
    assert dec.receive(fewer[1], 0.0) == []
    assert dec.stats.rejected == {RejectReason.INCONSISTENT: 2}
    assert [d for f in block[1:3] for d in dec.receive(f, 0.0)] == [b"x" * 600]


def test_a_peer_cycling_through_geometries_stays_within_the_memory_bound() -> None:
    dec = decoder(max_blocks_in_flight=64, window=128, max_shard_size=1360)
    rejected: list[RejectReason] = []
    dec.on_reject = rejected.append
    rng = random.Random(2)
    seq = 0
    for _ in range(300):
        k = rng.randrange(1, 120)
        n = rng.randrange(k, 256)
        enc = ShardEncoder(TUNNEL, k, n, 1400, epoch=EPOCH, initial_seq=seq)
        for block in enc.encode(random.randbytes(rng.randrange(1, 65_535))):
            for f in block[: max(1, k - 1)]:
                dec.receive(f, 0.0)
        seq = enc.next_seq
        assert dec.buffered_bytes() <= dec.memory_bound
    assert dec.memory_bound == 3 * 64 * 3 * 1360 + 65_535
    assert len(rejected) == dec.stats.rejected_total
