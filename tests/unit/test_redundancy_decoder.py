"""Receiver side: validation, dedup, timeouts, memory bounds, epochs, wrap-around, order."""

from __future__ import annotations

import random

import pytest

from warp.redundancy import RejectReason, ShardDecoder, ShardEncoder
from warp.redundancy.shard import DATA_HEADER, DATA_HEADER_SIZE, PARITY_HEADER

K, N, TUNNEL, EPOCH = 3, 5, 7, 0x1234


def encoder(**kwargs: int) -> ShardEncoder:
    options = {"epoch": EPOCH, **kwargs}
    return ShardEncoder(TUNNEL, K, N, 1400, **options)


def decoder(**kwargs: object) -> ShardDecoder:
    return ShardDecoder(TUNNEL, K, N, **kwargs)  # type: ignore[arg-type]


def one(enc: ShardEncoder, datagram: bytes, now: float = 0.0) -> list[bytes]:
    """A datagram sent alone, its block closed at once: data shards, then parity."""
    return [f for _, f in enc.push(datagram, now) + enc.flush(now) + enc.close()]


def feed(dec: ShardDecoder, frames: list[bytes], now: float = 0.0) -> list[bytes]:
    return [d for f in frames for d in dec.receive(f, now)]


def data_with(frame: bytes, **fields: int) -> bytes:
    """A copy of a data shard with some header fields replaced."""
    names = ["type", "tunnel", "epoch", "seq", "position", "datagram", "frag_index"]
    names += ["frag_count", "length"]
    values = dict(zip(names, DATA_HEADER.unpack_from(frame), strict=True))
    values.update(fields)
    return DATA_HEADER.pack(*values.values()) + frame[DATA_HEADER_SIZE:]


def parity_with(frame: bytes, **fields: int) -> bytes:
    names = ["type", "tunnel", "epoch", "first", "data", "parity", "index", "size"]
    values = dict(zip(names, PARITY_HEADER.unpack_from(frame), strict=True))
    values.update(fields)
    return PARITY_HEADER.pack(*values.values()) + frame[PARITY_HEADER.size :]


def test_data_shards_deliver_at_once_in_any_order_without_a_decode_call() -> None:
    enc, dec = encoder(), decoder()
    datagrams = [random.randbytes(size) for size in (1, 100, 3000, 20_000)]
    frames = [f for d in datagrams for f in one(enc, d) if f[0] == 0x04]
    random.Random(3).shuffle(frames)
    assert sorted(feed(dec, frames)) == sorted(datagrams)
    assert dec.stats.decode_calls == 0


def test_parity_rebuild_decodes_once_and_later_shards_are_surplus() -> None:
    enc, dec = encoder(), decoder()
    datagram = random.randbytes(3000)  # three fragments: one full block
    frames = one(enc, datagram)
    assert feed(dec, frames[2:]) == [datagram]  # data 2 + both parity
    assert dec.stats.decode_calls == 1
    assert feed(dec, frames[:2]) == []
    assert dec.stats.surplus_shards == 2


def test_a_repeated_parity_index_does_not_count_twice() -> None:
    enc, dec = encoder(), decoder()
    frames = one(enc, random.randbytes(3000))
    assert feed(dec, [frames[0], frames[3], frames[3]]) == []
    assert dec.stats.duplicates == 1
    assert dec.blocks_in_flight == 1


def test_trailing_bytes_and_views_into_a_reused_buffer() -> None:
    enc, dec = encoder(), decoder()
    datagram = random.randbytes(2000)
    frames = one(enc, datagram)
    buffer = bytearray(4000)
    out = []
    for frame in frames[1:]:  # data shard 0 is rebuilt from what is kept of the others
        buffer[: len(frame) + 15] = frame + bytes(15)  # WireGuard padding
        out += dec.receive(memoryview(buffer)[: len(frame) + 15], 0.0)
        buffer[:] = bytes(len(buffer))  # the caller reuses its buffer
    assert out == [datagram]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:17], RejectReason.SHORT),
        (lambda f: b"", RejectReason.SHORT),
        (lambda f: b"\x02" + f[1:], RejectReason.NOT_SHARD),
        (lambda f: b"\x01" + f[1:], RejectReason.LEGACY),
        (lambda f: data_with(f, tunnel=TUNNEL + 1), RejectReason.TUNNEL),
        (lambda f: data_with(f, position=255), RejectReason.INDEX),
        (lambda f: data_with(f, frag_index=1, frag_count=1), RejectReason.FRAGMENT),
        (lambda f: data_with(f, frag_index=0, frag_count=0), RejectReason.FRAGMENT),
        (lambda f: data_with(f, length=0), RejectReason.LENGTH),
        (lambda f: data_with(f, length=65535), RejectReason.LENGTH),
        (lambda f: f[:-1], RejectReason.LENGTH),
        (lambda f: data_with(f, length=5), RejectReason.LENGTH),  # records do not fit
    ],
)
def test_malformed_data_shards_are_rejected_and_counted(
    mutate: object, reason: RejectReason
) -> None:
    enc = encoder()
    other, frame = one(enc, random.randbytes(600))[0], one(enc, random.randbytes(600))[0]
    for start_with_valid in (False, True):
        dec = decoder()
        if start_with_valid:
            dec.receive(other, 0.0)
        assert dec.receive(mutate(frame), 0.0) == []  # type: ignore[operator]
        assert dec.stats.rejected == {reason: 1}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:13], RejectReason.SHORT),
        (lambda f: parity_with(f, tunnel=TUNNEL + 1), RejectReason.TUNNEL),
        (lambda f: parity_with(f, data=0), RejectReason.GEOMETRY),
        (lambda f: parity_with(f, parity=0), RejectReason.GEOMETRY),
        (lambda f: parity_with(f, data=200, parity=56), RejectReason.GEOMETRY),
        (lambda f: parity_with(f, index=2), RejectReason.INDEX),
        (lambda f: parity_with(f, size=9), RejectReason.LENGTH),
        (lambda f: parity_with(f, size=65535), RejectReason.LENGTH),
        (lambda f: f[:-1], RejectReason.LENGTH),
    ],
)
def test_malformed_parity_shards_are_rejected_and_counted(
    mutate: object, reason: RejectReason
) -> None:
    parity = one(encoder(), random.randbytes(600))[-1]
    dec = decoder()
    assert dec.receive(mutate(parity), 0.0) == []  # type: ignore[operator]
    assert dec.stats.rejected == {reason: 1}


def test_parity_disagreeing_with_its_block_is_rejected_as_inconsistent() -> None:
    enc, dec = encoder(), decoder()
    frames = one(enc, random.randbytes(3000))
    dec.receive(frames[3], 0.0)
    assert dec.receive(parity_with(frames[4], size=100), 0.0) == []
    assert dec.stats.rejected == {RejectReason.INCONSISTENT: 1}


def test_max_shard_size_limits_what_a_peer_can_make_us_hold() -> None:
    enc = ShardEncoder(TUNNEL, K, N, 9000, epoch=EPOCH)
    dec = decoder(max_shard_size=1337)
    frames = one(enc, random.randbytes(8000))
    assert feed(dec, frames) == []
    assert dec.stats.rejected == {RejectReason.LENGTH: len(frames)}


def test_blocks_without_enough_shards_expire_and_their_late_data_is_refused() -> None:
    enc, dec = encoder(), decoder(block_timeout=0.5)
    first = one(enc, b"a" * 3000)  # 3 data shards, 2 parity
    last = one(enc, b"z")
    assert feed(dec, [first[0], first[3], *last[:1]], 0.0) == [b"z"]
    assert dec.blocks_in_flight == 1
    assert dec.next_deadline() == 0.5
    dec.tick(0.5)
    assert dec.stats.blocks_expired == 1
    assert dec.stats.datagrams_lost == 1
    assert dec.stats.datagrams_incomplete == 1
    assert feed(dec, first[1:3], 0.6) == []
    assert dec.stats.late_shards == 2
    assert dec.stats.datagrams_lost == 1


def test_sequence_numbers_wrap_around() -> None:
    enc, dec = encoder(initial_seq=2**32 - 3), decoder()
    datagrams = [random.randbytes(2000) for _ in range(4)]  # 2 data shards each
    out: list[bytes] = []
    for datagram in datagrams:
        frames = one(enc, datagram)
        out += feed(dec, frames[::-1])
        out += feed(dec, frames)  # all surplus now
    assert out == datagrams
    assert enc.next_seq == 5


def test_shards_far_behind_the_window_are_rejected_as_stale() -> None:
    enc, dec = encoder(), decoder(max_blocks_in_flight=4, window=8)
    old = one(enc, b"old" * 10)
    for _ in range(10):
        feed(dec, one(enc, b"new" * 10)[:1])
    assert dec.receive(old[0], 0.0) == []
    assert dec.stats.rejected == {RejectReason.STALE: 1}


def test_a_restarted_sender_is_followed_and_its_old_epoch_refused() -> None:
    dec = decoder()
    first = ShardEncoder(TUNNEL, K, N, 1400, epoch=1)
    second = ShardEncoder(TUNNEL, K, N, 1400, epoch=2)  # numbering restarts at 0
    a, b = one(first, b"a" * 100), one(second, b"b" * 100)
    late_a = one(first, b"c" * 100)
    assert feed(dec, a[:1]) == [b"a" * 100]
    assert feed(dec, b[:1]) == [b"b" * 100]
    assert dec.stats.epoch_changes == 1
    assert feed(dec, late_a) == []
    assert dec.stats.rejected == {RejectReason.STALE_EPOCH: 3}


def test_invalid_configuration_is_refused() -> None:
    for kwargs in (
        {"k": 4, "n": 3},
        {"n": 256},
        {"max_blocks_in_flight": 0},
        {"window": 1000},
        {"block_timeout": 0},
        {"max_shard_size": 0},
    ):
        options = {"k": 3, "n": 5, **kwargs}
        k, n = options.pop("k"), options.pop("n")
        with pytest.raises(ValueError):
            ShardDecoder(1, k, n, **options)  # type: ignore[arg-type]


def test_a_restart_that_draws_the_same_epoch_is_followed_once_the_old_stream_is_silent() -> None:
    # 1 chance in 65536 per restart. Sequence numbers a full window behind cannot be
    # stragglers (WireGuard's replay window is far shorter), so they mean a new stream.
    dec = decoder(max_blocks_in_flight=8, window=16, block_timeout=1.0)
    old = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)
    for i in range(40):
        assert feed(dec, one(old, bytes([i]) * 10)[:1]) == [bytes([i]) * 10]
    restarted = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)
    # While the old stream may still be alive: refused.
    assert feed(dec, one(restarted, b"first")[:1], 0.5) == []
    assert dec.stats.rejected == {RejectReason.STALE: 1}
    # Silent for a block timeout: the new stream is followed.
    assert feed(dec, one(restarted, b"second")[:1], 1.0) == [b"second"]
    assert dec.stats.resyncs == 1


def test_a_same_epoch_restart_within_the_window_is_delivered_after_a_silence() -> None:
    dec = decoder()
    old = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)
    now = 0.0
    for i in range(500):
        now += 0.0002
        assert feed(dec, one(old, i.to_bytes(4) + b"old"), now) == [i.to_bytes(4) + b"old"]
    restarted = ShardEncoder(TUNNEL, K, N, 1400, epoch=5)  # numbers from 0 again
    now += 1.0  # the restart took a second
    out = []
    for i in range(500):
        now += 0.0002
        out += feed(dec, one(restarted, i.to_bytes(4) + b"new"), now)
    assert out == [i.to_bytes(4) + b"new" for i in range(500)]
    assert dec.stats.resyncs == 1


def test_copies_after_a_silence_are_no_restart() -> None:
    dec, enc = decoder(), encoder()
    blocks = [one(enc, bytes([i]) * 100) for i in range(10)]
    assert len(feed(dec, [f for block in blocks for f in block])) == 10
    assert feed(dec, [f for block in blocks for f in block], 5.0) == []
    assert dec.stats.resyncs == 0
    assert dec.stats.surplus_shards == 10 * 5  # 2 parity, then 3 copies, per block


def test_a_retired_epoch_comes_back_only_when_the_current_one_is_silent() -> None:
    dec = decoder(block_timeout=0.5)
    a = ShardEncoder(TUNNEL, K, N, 1400, epoch=1)
    b = ShardEncoder(TUNNEL, K, N, 1400, epoch=2)
    assert feed(dec, one(a, b"a1"), 0.0) == [b"a1"]
    assert feed(dec, one(b, b"b1"), 0.1) == [b"b1"]  # a restarted as b
    assert feed(dec, one(a, b"a2"), 0.2) == []  # a straggler, or a second instance
    assert feed(dec, one(b, b"b2"), 0.3) == [b"b2"]
    assert feed(dec, one(a, b"a3"), 1.3) == [b"a3"]  # b silent for 1 s: fail back to a
    assert dec.stats.epoch_changes == 2
    # Nothing a sent before the switch is taken again after the fail-back.
    assert feed(dec, one(ShardEncoder(TUNNEL, K, N, 1400, epoch=1), b"a1"), 1.4) == []


# ---- ordered delivery --------------------------------------------------------------------


def ordered_decoder(**kwargs: object) -> ShardDecoder:
    return decoder(ordered=True, reorder_timeout=0.05, **kwargs)


def test_ordered_waits_for_a_gap_then_delivers_in_sequence() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [one(enc, bytes([i]) * 50) for i in range(4)]
    assert feed(dec, blocks[0][:1]) == [bytes([0]) * 50]
    assert feed(dec, blocks[2][:1] + blocks[3][:1], 0.01) == []  # held: 1 is missing
    assert dec.next_deadline() == pytest.approx(0.06)
    assert feed(dec, blocks[1][1:2], 0.02) == [bytes([i]) * 50 for i in (1, 2, 3)]  # parity
    dec.tick(2.02)
    assert dec.stats.blocks_rebuilt == 1
    assert dec.stats.datagrams_lost == 0
    assert dec.next_deadline() is None
    assert dec.stats.blocks_skipped == 0


def test_ordered_skips_a_gap_after_reorder_timeout_and_drops_what_comes_later() -> None:
    enc, dec = encoder(), ordered_decoder()
    blocks = [one(enc, bytes([i]) * 50) for i in range(3)]
    assert feed(dec, blocks[0][:1]) == [bytes([0]) * 50]
    assert feed(dec, blocks[2][:1], 0.01) == []
    assert dec.next_deadline() == pytest.approx(0.06)
    assert dec.tick(0.0601) == [bytes([2]) * 50]
    assert dec.stats.blocks_skipped == 1
    assert feed(dec, blocks[1][:1], 0.07) == []  # its place was skipped
    assert dec.stats.datagrams_late == 1
    dec.tick(5.0)
    assert dec.stats.datagrams_lost == 1


def test_ordered_buffer_is_bounded() -> None:
    enc, dec = encoder(), ordered_decoder(max_blocks_in_flight=4, window=8)
    one(enc, b"never")  # datagram 0 never arrives
    out = [d for i in range(10) for d in feed(dec, one(enc, bytes([i]) * 10)[:1])]
    assert out  # the bound skipped the gap before reorder_timeout
    assert dec.buffered_bytes() <= dec.memory_bound


def test_reset_flushes_what_ordered_mode_held() -> None:
    enc, dec = encoder(), ordered_decoder()
    one(enc, b"lost")
    assert feed(dec, one(enc, b"held")[:1]) == []
    assert dec.reset() == [b"held"]


def test_ticking_exactly_at_next_deadline_always_makes_progress() -> None:
    rng = random.Random(11)
    enc, dec = encoder(), ordered_decoder(block_timeout=0.3)
    now = 0.0
    for _ in range(300):
        frames = one(enc, rng.randbytes(rng.choice((10, 2000, 5000))), now)
        feed(dec, [f for f in frames if rng.random() < 0.6], now)
        now += rng.random() * 0.02
        deadline = dec.next_deadline()
        while deadline is not None and deadline <= now:
            dec.tick(deadline)
            after = dec.next_deadline()
            assert after is None or after > deadline
            deadline = after


# ---- counters: repairs, surplus, lost datagrams -------------------------------------------


def test_a_clean_stream_shows_no_repair_and_no_drop_and_the_parity_as_surplus() -> None:
    # Parity often arrives before the last data shard (shards take different paths): the
    # block is decoded with parity at once, but that is no repair once the data shows up.
    rng = random.Random(2)
    for k, n in ((3, 5), (2, 4), (1, 2), (4, 8)):
        enc = ShardEncoder(TUNNEL, k, n, 1400, epoch=EPOCH)
        dec = ShardDecoder(TUNNEL, k, n)
        parity = 0
        for i in range(200):
            frames = one(enc, rng.randbytes(rng.randrange(1, 6000)), i * 0.001)
            parity += sum(1 for f in frames if f[0] == 0x05)
            rng.shuffle(frames)
            feed(dec, frames, i * 0.001)
        dec.tick(10.0)
        stats = dec.stats
        assert (stats.blocks_rebuilt, stats.datagrams_lost, stats.blocks_expired) == (0, 0, 0)
        assert stats.surplus_shards == parity
        assert stats.datagrams_delivered == 200


def test_repairs_count_exactly_the_blocks_that_lacked_a_data_shard() -> None:
    enc, dec = encoder(), decoder()
    repaired = 0
    for i in range(100):
        frames = one(enc, bytes([i]) * 3000, i * 0.01)
        lose = i % 3 == 0
        repaired += lose
        feed(dec, frames[1:] if lose else frames, i * 0.01)
    dec.tick(10.0)
    assert dec.stats.blocks_rebuilt == repaired
    assert dec.stats.datagrams_delivered == 100


@pytest.mark.parametrize("ordered", [False, True])
def test_datagrams_lost_is_what_the_application_did_not_get(ordered: bool) -> None:
    rng = random.Random(7)
    enc = encoder()
    dec = decoder(ordered=ordered, block_timeout=0.2)
    sent = 0
    got: list[bytes] = []
    now = 0.0
    for _ in range(400):
        batch = [rng.randbytes(rng.choice((5, 50, 700, 3000))) for _ in range(rng.randint(1, 4))]
        sent += len(batch)
        frames = [f for d in batch for _, f in enc.push(d, now)]
        frames += [f for _, f in enc.flush(now) + enc.close()]
        got += feed(dec, [f for f in frames if rng.random() < 0.7], now)
        now += 0.01
        got += dec.tick(now)
    got += feed(dec, one(enc, b"end"), now)  # the last gap is known
    sent += 1
    got += dec.tick(now + 10)
    assert len(got) == dec.stats.datagrams_delivered
    assert dec.stats.datagrams_lost == sent - len(got)
