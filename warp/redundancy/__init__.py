"""Sans-I/O forward error correction: datagrams to zfec-coded shards and back.

Sender: `ShardEncoder.encode(datagram)` gives, per block, the n shard frames to spread
over paths (see `warp.paths.scheduler`). `SendQueue` holds datagrams until an uplink can
take them, by priority and deadline. Receiver: `shard_tunnel_id(frame)` routes a shard to
its tunnel's `ShardDecoder`, whose `receive`/`tick` return the rebuilt datagrams.
"""

from warp.redundancy.decoder import ShardDecoder
from warp.redundancy.encoder import BlockFrames, ShardEncoder
from warp.redundancy.ordering import ReorderBuffer
from warp.redundancy.sendqueue import QueuedDatagram, SendQueue, SendQueueStats
from warp.redundancy.shard import (
    MAX_DATAGRAM_SIZE,
    SHARD_HEADER_SIZE,
    WIREGUARD_OVERHEAD,
    ShardHeader,
    max_frame_size,
    max_shard_payload,
    parse_shard_header,
    shard_payload_size,
    shard_tunnel_id,
)
from warp.redundancy.stats import DecoderStats, RejectReason

__all__ = [
    "MAX_DATAGRAM_SIZE",
    "SHARD_HEADER_SIZE",
    "WIREGUARD_OVERHEAD",
    "BlockFrames",
    "DecoderStats",
    "QueuedDatagram",
    "RejectReason",
    "ReorderBuffer",
    "SendQueue",
    "SendQueueStats",
    "ShardDecoder",
    "ShardEncoder",
    "ShardHeader",
    "max_frame_size",
    "max_shard_payload",
    "parse_shard_header",
    "shard_payload_size",
    "shard_tunnel_id",
]
