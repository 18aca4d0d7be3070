"""Added parity, sans-I/O: the scheduler's code, the encoder's blocks of that many shards,
and a whole uplink lost at either end losing nothing."""

from __future__ import annotations

import pytest

from warp.paths.scheduler import PathQuality, ShardScheduler
from warp.redundancy import ShardDecoder, ShardEncoder
from warp.redundancy.shard import parse_shard_header

Path = tuple[str, str]


def mesh(locals_: str, remotes: str) -> list[PathQuality[Path]]:
    return [
        PathQuality((local, remote), local=local, remote=remote)
        for local in locals_
        for remote in remotes
    ]


def test_encoder_emits_a_block_of_the_given_n_with_its_geometry_in_every_header() -> None:
    encoder = ShardEncoder(7, 3, 5, 1400, epoch=9)
    (six,) = encoder.encode(b"x" * 1000, 6)
    (five,) = encoder.encode(b"y" * 1000)
    assert len(six) == 6 and len(five) == 5
    for index, frame in enumerate(six):
        header = parse_shard_header(frame)
        assert header is not None
        assert (header.k, header.n, header.shard_index, header.block_seq) == (3, 6, index, 0)
    assert [parse_shard_header(f).n for f in five] == [5] * 5  # type: ignore[union-attr]
    decoder = ShardDecoder(7, 3, 6)
    # Any 3 of the 6 rebuild the block: here the last three, all parity.
    assert decoder.receive(six[5], 0.0) == []
    assert decoder.receive(six[4], 0.0) == []
    assert decoder.receive(six[3], 0.0) == [b"x" * 1000]
    with pytest.raises(ValueError):
        encoder.encode(b"z", 256)
    with pytest.raises(ValueError):
        encoder.encode(b"z", 2)


@pytest.mark.parametrize("dead", ["a", "b", "x", "y"])
def test_three_of_five_on_two_uplinks_a_side_survives_any_one_uplink(dead: str) -> None:
    """(3, 5) over 2 x 2 paths: with the configured code one uplink carries 3 shards of 5 and
    its loss loses the block; the scheduler adds a sixth shard and each uplink, ours or
    the peer's, carries 3: any one of them cut, every datagram still decodes."""
    scheduler: ShardScheduler[Path] = ShardScheduler(3, 5, add_parity=True)
    scheduler.update(mesh("ab", "xy"))
    assert scheduler.effective_n == 6
    encoder = ShardEncoder(1, 3, 5, 1400)
    decoder = ShardDecoder(1, 3, scheduler.effective_n)
    sent = [bytes([i % 256]) * (100 + i) for i in range(300)]
    got: list[bytes] = []
    for i, datagram in enumerate(sent):
        now = i * 0.002
        for frames in encoder.encode(datagram, scheduler.effective_n):
            for frame, (local, remote) in zip(frames, scheduler.assign(), strict=True):
                if dead not in (local, remote):
                    got += decoder.receive(frame, now)
    assert got == sent


def test_parity_goes_back_to_n_when_the_uplinks_return() -> None:
    scheduler: ShardScheduler[Path] = ShardScheduler(3, 5, add_parity=True)
    encoder = ShardEncoder(1, 3, 5, 1400)
    scheduler.update(mesh("ab", "xy"))
    assert len(encoder.encode(b"d", scheduler.effective_n)[0]) == 6
    scheduler.update(mesh("abc", "xyz"))
    assert scheduler.effective_n == 5
    (frames,) = encoder.encode(b"d", scheduler.effective_n)
    assert len(frames) == len(scheduler.assign()) == 5
