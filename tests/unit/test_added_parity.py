"""Added parity, sans-I/O: the scheduler's code, the encoder's blocks of that many shards,
and a whole uplink lost at either end losing nothing."""

from __future__ import annotations

import pytest

from warp.paths.scheduler import PathQuality, ShardScheduler
from warp.redundancy import ShardDecoder, ShardEncoder
from warp.redundancy.shard import parse_parity_header

Path = tuple[str, str]


def mesh(locals_: str, remotes: str) -> list[PathQuality[Path]]:
    return [
        PathQuality((local, remote), local=local, remote=remote)
        for local in locals_
        for remote in remotes
    ]


def test_encoder_emits_a_block_of_the_given_n_with_its_geometry_in_every_parity_header() -> None:
    encoder = ShardEncoder(7, 3, 5, 1400, epoch=9)
    six = encoder.push(b"x" * 3000, 0.0, 6)  # three fragments: a full block
    five = encoder.push(b"y" * 3000, 0.0, 5)
    assert [slot for slot, _ in six] == [0, 1, 2, 3, 4, 5]
    assert [slot for slot, _ in five] == [0, 1, 2, 3, 4]
    for index, (_, frame) in enumerate(six[3:]):
        header = parse_parity_header(frame)
        assert header is not None
        assert (header.data_shards, header.parity_shards, header.parity_index) == (3, 3, index)
        assert header.first_seq == 0
    assert [parse_parity_header(f).parity_shards for _, f in five[3:]] == [2, 2]  # type: ignore[union-attr]
    decoder = ShardDecoder(7, 3, 6)
    # Any 3 of the 6 rebuild the block: here the last three, all parity.
    assert decoder.receive(six[5][1], 0.0) == []
    assert decoder.receive(six[4][1], 0.0) == []
    assert decoder.receive(six[3][1], 0.0) == [b"x" * 3000]
    with pytest.raises(ValueError):
        encoder.push(b"z", 0.0, 256)
    with pytest.raises(ValueError):
        encoder.push(b"z", 0.0, 2)


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
    paths: tuple[Path, ...] = ()
    for i, datagram in enumerate(sent):
        now = i * 0.002
        frames = encoder.push(datagram, now, scheduler.effective_n) + encoder.flush(now)
        frames += encoder.close_due(now + 0.001)  # the block's window
        for slot, frame in frames:
            if slot == 0:
                paths = scheduler.assign()
            local, remote = paths[slot]
            if dead not in (local, remote):
                got += decoder.receive(frame, now)
    assert got == sent


def test_parity_goes_back_to_n_when_the_uplinks_return() -> None:
    scheduler: ShardScheduler[Path] = ShardScheduler(3, 5, add_parity=True)
    encoder = ShardEncoder(1, 3, 5, 1400)
    scheduler.update(mesh("ab", "xy"))
    frames = encoder.push(b"d" * 3000, 0.0, scheduler.effective_n)
    assert len(frames) == len(scheduler.assign()) == 6
    scheduler.update(mesh("abc", "xyz"))
    assert scheduler.effective_n == 5
    frames = encoder.push(b"d" * 3000, 0.0, scheduler.effective_n)
    assert len(frames) == len(scheduler.assign()) == 5
