"""Sans-I/O forward error correction: datagrams to zfec-coded shards and back.

Sender: `ShardEncoder.push(datagram, now)` packs datagrams into data shards, sent at once,
and adds each block's parity when it has k data shards or its window expires (`flush`,
`close_due`); each frame comes with its slot in the block, for the paths the scheduler
gave the block (see `warp.paths.scheduler`). `SendQueue` holds datagrams until an uplink
can take them, by priority and deadline. Receiver: `shard_tunnel_id(frame)` routes a shard
to its tunnel's `ShardDecoder`, whose `receive`/`tick` return the datagrams.
"""

from warp.redundancy.decoder import ShardDecoder
from warp.redundancy.encoder import Emission, ShardEncoder
from warp.redundancy.ordering import ReorderBuffer
from warp.redundancy.sendqueue import QueuedDatagram, SendQueue, SendQueueStats
from warp.redundancy.shard import (
    DATA_HEADER_SIZE,
    MAX_DATAGRAM_SIZE,
    PARITY_HEADER_SIZE,
    SHARD_HEADER_SIZE,
    WIREGUARD_OVERHEAD,
    DataHeader,
    ParityHeader,
    max_frame_size,
    max_shard_payload,
    parse_data_header,
    parse_parity_header,
    shard_tunnel_id,
)
from warp.redundancy.stats import DecoderStats, RejectReason

__all__ = [
    "DATA_HEADER_SIZE",
    "MAX_DATAGRAM_SIZE",
    "PARITY_HEADER_SIZE",
    "SHARD_HEADER_SIZE",
    "WIREGUARD_OVERHEAD",
    "DataHeader",
    "DecoderStats",
    "Emission",
    "ParityHeader",
    "QueuedDatagram",
    "RejectReason",
    "ReorderBuffer",
    "SendQueue",
    "SendQueueStats",
    "ShardDecoder",
    "ShardEncoder",
    "max_frame_size",
    "max_shard_payload",
    "parse_data_header",
    "parse_parity_header",
    "shard_tunnel_id",
]
