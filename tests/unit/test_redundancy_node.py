"""The gateway's receive side as the node builds it: the decoder's memory bound from the
tunnel's mtu, the tunnel counters in `Gateway.snapshot()`, the `shard.rejected` log line."""

from __future__ import annotations

import logging
import random

import pytest

from warp.config import parse_gateway_config
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.node import Gateway
from warp.redundancy import ShardEncoder, max_shard_payload

TUNNEL_ID = 1


def gateway(k: int = 3, n: int = 5, mtu: int | None = None) -> Gateway:
    mtu_line = f"mtu = {mtu}" if mtu is not None else ""
    text = f"""
private_key = "{encode_key(generate_private_key())}"
[far_gate]
public_key = "{encode_key(public_key_of(generate_private_key()))}"
endpoints = ["192.0.2.1:51820"]
[tunnels.t]
tunnel_id = {TUNNEL_ID}
[tunnels.t.gate]
path = "/tmp/warp-test-redund.gate"
application_path = "/tmp/warp-test-redund.app"
[tunnels.t.transport]
{mtu_line}
[tunnels.t.transport.redundancy]
num_shards = {n}
required_shards = {k}
"""
    return Gateway(parse_gateway_config(text), static_uplinks=[("up1", "127.0.0.1")])


def documented_bound(k: int, mtu: int) -> int:
    """docs/operations.md, Counters: 3 x 4096 x min(k x max_shard_payload(mtu), 65535)
    + 65535 bytes per tunnel."""
    return 3 * 4096 * min(k * max_shard_payload(mtu), 65_535) + 65_535


def send(encoder: ShardEncoder, datagram: bytes, now: float = 0.0) -> list[bytes]:
    """One datagram sent alone, its block closed at once (as its window would)."""
    return [f for _, f in encoder.push(datagram, now) + encoder.flush(now) + encoder.close()]


def test_decoder_memory_stays_under_the_documented_bound_against_a_peer_with_mtu_65535() -> None:
    node = gateway()  # the default mtu, 1400
    decoder = node.session.tunnels["t"].decoder
    assert decoder.memory_bound == documented_bound(3, 1400) < 48 * 2**20
    # A peer whose mtu is 65 535: first fragments of 4 096 datagrams whose others never
    # come, with one parity shard of 64 kB each (refused: larger than our mtu allows).
    big = ShardEncoder(TUNNEL_ID, 3, 5, 65_535, epoch=9)
    for _ in range(4096):
        frames = big.push(random.randbytes(65_535), 0.0)
        for frame in (frames[0][1], frames[-1][1]):
            node.session.on_shard(frame, 0.0)
    assert decoder.buffered_bytes() <= decoder.memory_bound
    # And a code that makes a block hold 60 data shards, each missing one.
    wide = ShardEncoder(TUNNEL_ID, 60, 61, 1420, epoch=9, initial_seq=big.next_seq)
    for _ in range(1000):
        frames = send(wide, random.randbytes(65_535))
        for _, frame in enumerate(frames[1:]):
            node.session.on_shard(frame, 0.0)
    assert 0 < decoder.buffered_bytes() <= decoder.memory_bound


def test_snapshot_of_a_clean_stream_shows_no_repair_no_drop_and_the_surplus() -> None:
    node = gateway(2, 4)
    sender = ShardEncoder(TUNNEL_ID, 2, 4, 1400, epoch=3)
    rng = random.Random(4)
    parity = 0
    for i in range(500):
        frames = send(sender, random.randbytes(rng.randrange(1, 2000)))
        parity += sum(1 for f in frames if f[0] == 0x05)
        rng.shuffle(frames)  # parity first, often: decoded with parity, no repair
        for frame in frames:
            node.session.on_shard(frame, i * 0.002)
    node.session.tunnels["t"].decoder.tick(10.0)
    [tunnel] = node.snapshot()["tunnels"]
    assert tunnel["blocks_rebuilt"] == 0
    assert tunnel["surplus_shards"] == parity
    assert tunnel["datagrams_lost"] == 0
    assert tunnel["drops"] == {}


def test_snapshot_counts_repairs_and_lost_datagrams() -> None:
    node = gateway(2, 4)
    sender = ShardEncoder(TUNNEL_ID, 2, 4, 1400, epoch=3)
    blocks = [send(sender, bytes([i]) * 300) for i in range(6)]  # 1 data + 2 parity each
    for i, block in enumerate(blocks):
        kept = {1: block[1:3], 3: [], 4: []}.get(i, block)
        for frame in kept:
            node.session.on_shard(frame, i * 0.01)
    node.session.tunnels["t"].decoder.tick(10.0)
    [tunnel] = node.snapshot()["tunnels"]
    assert tunnel["blocks_rebuilt"] == 1  # block 1: its data shard never came
    assert tunnel["datagrams_lost"] == 2  # blocks 3 and 4: nothing came
    assert tunnel["drops"] == {}


def test_rejected_shards_are_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    node = gateway()
    data = send(ShardEncoder(TUNNEL_ID, 3, 5, 1400, epoch=3), b"x" * 900)[0]
    old = bytes([0x01]) + data[1:]  # the retired shard type
    with caplog.at_level(logging.WARNING, logger="warp"):
        for _ in range(50):
            node.session.on_shard(old, 0.0)
    lines = [r.getMessage() for r in caplog.records if "shard.rejected" in r.getMessage()]
    assert lines == ["shard.rejected tunnel=t reason=legacy count=1"]
    [tunnel] = node.snapshot()["tunnels"]
    assert tunnel["drops"]["rejected_legacy"] == 50
