"""Receiver counters: what `warp status` and the metrics endpoint report per tunnel."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RejectReason(StrEnum):
    """Why a shard frame was refused (the `reason` of a `shard.rejected` event)."""

    SHORT = "short"  # shorter than a shard header
    NOT_SHARD = "not_shard"  # first byte is not a shard frame type
    LEGACY = "legacy"  # the retired one-datagram-per-block shard (0x01): never decoded
    TUNNEL = "tunnel"  # another tunnel's id: routed to the wrong decoder
    GEOMETRY = "geometry"  # parity header: no data shards, or k' + parity > 255
    INDEX = "index"  # parity index >= parity shards, or a position >= 255
    FRAGMENT = "fragment"  # fragment index >= fragment count
    LENGTH = "length"  # length 0, truncated, larger than allowed, or records not fitting
    INCONSISTENT = "inconsistent"  # disagrees with earlier shards of its block or datagram
    STALE = "stale"  # sequence number too far behind to be told apart from one had
    STALE_EPOCH = "stale_epoch"  # from a sender instance that has since been replaced


@dataclass(slots=True)
class DecoderStats:
    # A data shard had already (or rebuilt), parity of a block whose data is all here:
    # what the link did not need.
    surplus_shards: int = 0
    late_shards: int = 0  # data shards already given up (unseen too long)
    duplicates: int = 0  # a parity index repeated within an incomplete block
    blocks_decoded: int = 0  # blocks whose parity came and whose data is all had or rebuilt
    # Blocks that needed parity: a data shard missing at decode time that had not turned
    # up block_timeout later (counted then; data shards often arrive just after parity).
    blocks_rebuilt: int = 0
    decode_calls: int = 0  # zfec decodes (a data shard missing when the block was decoded)
    blocks_expired: int = 0  # parity held block_timeout without enough shards to rebuild
    blocks_evicted: int = 0  # such a block pushed out by max_blocks_in_flight or the budget
    datagrams_delivered: int = 0
    datagrams_lost: int = 0  # datagrams the application did not get, each once
    datagrams_incomplete: int = 0  # fragmented datagrams given up with some fragments here
    blocks_skipped: int = 0  # ordered mode: datagram numbers given up after reorder_timeout
    datagrams_late: int = 0  # ordered mode: rebuilt after their place was skipped; dropped
    epoch_changes: int = 0  # the sender restarted (a new epoch appeared)
    resyncs: int = 0  # the sender restarted with an epoch already seen (far-behind sequence)
    rejected: dict[RejectReason, int] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())
