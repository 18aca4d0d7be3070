"""Receiver counters: what `warp status` and the metrics endpoint report per tunnel."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RejectReason(StrEnum):
    """Why a shard frame was refused (the `reason` of a `shard.rejected` event)."""

    SHORT = "short"  # shorter than a shard header
    NOT_SHARD = "not_shard"  # first byte is not FrameType.SHARD
    TUNNEL = "tunnel"  # another tunnel's id: routed to the wrong decoder
    GEOMETRY = "geometry"  # not 1 <= k <= n
    INDEX = "index"  # shard index >= n
    FRAGMENT = "fragment"  # fragment index >= fragment count
    LENGTH = "length"  # block length 0, payload truncated or larger than allowed
    INCONSISTENT = "inconsistent"  # disagrees with earlier shards of its block or datagram
    STALE = "stale"  # sequence number too far behind to be told apart from a finished one
    STALE_EPOCH = "stale_epoch"  # from a sender instance that has since been replaced


@dataclass(slots=True)
class DecoderStats:
    surplus_shards: int = 0  # shards of an already rebuilt block: parity the link did not need
    late_shards: int = 0  # shards of a block already given up (expired, evicted, unseen)
    duplicates: int = 0  # a shard index repeated within an incomplete block
    blocks_decoded: int = 0  # every block rebuilt, from data shards or with parity
    # Blocks that needed parity: a data shard missing at decode time that had not turned
    # up block_timeout later (counted then; data shards often arrive just after parity).
    blocks_rebuilt: int = 0
    decode_calls: int = 0  # zfec decodes (a data shard missing when the block was decoded)
    blocks_expired: int = 0  # incomplete after block_timeout
    blocks_evicted: int = 0  # incomplete, pushed out by max_blocks_in_flight or the budget
    datagrams_delivered: int = 0
    datagrams_lost: int = 0  # datagrams the application did not get, each once
    datagrams_incomplete: int = 0  # multi-block datagrams abandoned with some blocks rebuilt
    blocks_skipped: int = 0  # ordered mode: sequence numbers given up after reorder_timeout
    datagrams_late: int = 0  # ordered mode: rebuilt after their place was skipped; dropped
    epoch_changes: int = 0  # the sender restarted (a new epoch appeared)
    resyncs: int = 0  # the sender restarted with an epoch already seen (far-behind sequence)
    rejected: dict[RejectReason, int] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())
