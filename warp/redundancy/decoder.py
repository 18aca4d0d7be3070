"""Receiver side: shards in, datagrams out, exactly once, in bounded memory and time.

Everything a peer controls (k, n, indexes, lengths, fragment numbering, sequence numbers)
is checked before it is used; a bad shard becomes a `RejectReason` count, never an
exception and never an allocation sized by the peer.

Each block is decoded with the geometry (k, n) its own shard headers carry: the two ends
of a tunnel may be configured differently, and a sender may add parity for a while.

Memory: three stores, each bounded in bytes by `max_blocks_in_flight` blocks of the
configured geometry at the largest shard size (see `memory_bound`) and in entries by
`max_blocks_in_flight`: incomplete blocks (reserving k - 1 shards each), rebuilt blocks
waiting for the other blocks of their datagram, and (ordered mode) datagrams waiting for
a gap; plus fixed rings of `window` sequence numbers. When a bound is reached the oldest
entry goes, and is counted.

Counting: `blocks_rebuilt` counts blocks that needed parity (a data shard never came: a
block decoded with parity is checked again `block_timeout` later, so that data shards that
merely arrived after the parity do not count); shards of a block already rebuilt are
`surplus_shards`. `datagrams_lost` counts each datagram the application did not get, once:
see `ShardDecoder`.
"""

from __future__ import annotations

import struct
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from warp.redundancy.codec import zfec_decoder
from warp.redundancy.encoder import validate_geometry
from warp.redundancy.ordering import ReorderBuffer
from warp.redundancy.shard import (
    MAX_DATAGRAM_SIZE,
    MAX_SHARD_PAYLOAD,
    SEQUENCE_MODULUS,
    SHARD_FRAME_TYPE,
    SHARD_HEADER,
    SHARD_HEADER_SIZE,
)
from warp.redundancy.stats import DecoderStats, RejectReason

_SHARD = SHARD_FRAME_TYPE
_HALF_SEQUENCE = SEQUENCE_MODULUS >> 1
_SEQUENCE_MASK = SEQUENCE_MODULUS - 1
_NO_SEQUENCE = -1  # ring slot never written: no sequence number equals it
# Ring value of a block given up (expired, evicted, or never begun in time): its sequence
# number with this bit; a rebuilt block's slot holds the bare sequence number.
_ABANDONED = SEQUENCE_MODULUS
_RETIRED_EPOCHS_KEPT = 8
# Distinct (k, n) followed at once; more (a hostile peer) starts the set over.
_MAX_GEOMETRIES = 16
# The first blocks of a stream keep a fingerprint of each shard they got, so that a
# restarted sender that drew the same epoch (and numbers its blocks from 0 again) is told
# from stragglers: it sends other bytes under a sequence number and index already seen.
_FINGERPRINTED_BLOCKS = 64

# The shard header read with its fields grouped for the per-shard fast path, as three
# integers: stream (frame type, tunnel id, epoch, k, n; then the shard index in the low
# byte), block sequence, shape (fragment index, fragment count, block length). Same 16
# bytes as `SHARD_HEADER`: one dict lookup checks the whole stream identity.
_GROUPED_HEADER = struct.Struct("!QII")
assert _GROUPED_HEADER.size == SHARD_HEADER_SIZE
_unpack_grouped = _GROUPED_HEADER.unpack_from


class _Geometry:
    """What decoding a (k, n) block needs, computed once per geometry."""

    __slots__ = ("complete_length", "data_mask", "in_order", "k", "k_minus_1", "n", "zfec")

    def __init__(self, k: int, n: int) -> None:
        self.k = k
        self.n = n
        self.k_minus_1 = k - 1
        self.data_mask = (1 << k) - 1
        self.in_order = list(range(k))
        self.complete_length = _FIRST_SHARD + 2 * k
        self.zfec: Any = zfec_decoder(k, n) if n > k else None


# An incomplete block is a plain list, the cheapest record CPython builds and extends:
#   [shape, end, extended sequence, time created, received-index bits, geometry,
#    index, payload, index, payload, ...]  (the first fewer-than-k distinct shards)
# shape: fragment index, fragment count and block length, as the grouped header has them;
# end: header + payload size, where this block's payloads end in a frame.
_Block = list[Any]
_SHAPE, _END, _EXTENDED, _CREATED, _RECEIVED, _GEOMETRY = range(6)
_FIRST_SHARD = 6

# An unseen run of sequence numbers (`_gaps`): (settle time, first, last, end of the
# datagram before the run, start of that datagram, start of the datagram after the run).
_Gap = tuple[float, int, int, int, int, int]


def _datagram_start(extended: int, shape: int) -> int:
    """Sequence number of the first block of the datagram this block belongs to."""
    return extended - (shape >> 24)


class _PartialDatagram:
    """Rebuilt blocks of a multi-block datagram, waiting for the others."""

    __slots__ = ("created", "missing", "parts", "size")

    def __init__(self, fragment_count: int, created: float) -> None:
        self.parts: list[bytes | None] = [None] * fragment_count
        self.missing = fragment_count
        self.size = 0
        self.created = created


class ShardDecoder:
    """Rebuilds one tunnel's datagrams from its shard frames.

    Sans-I/O: `receive` and `tick` take the current time and return the datagrams ready
    for the application; `next_deadline` says when `tick` must next be called.

    - `k`, `n` are this tunnel's configured geometry: they size the memory budgets. Each
      block is decoded with the (k, n) of its own shard headers (any 1 <= k <= n <= 255);
      a shard disagreeing with earlier shards of its block (k, n, length, fragment) is
      rejected (`inconsistent`).
    - A block is rebuilt from the first k distinct shards (joined as they are when they
      are the k data shards, zfec-decoded otherwise); later shards of a rebuilt block are
      `surplus_shards`, of an abandoned block `late_shards`.
    - Incomplete blocks are abandoned after `block_timeout`, or when the budgets are full
      (oldest first). A sequence number never seen while later ones were, is given up
      `block_timeout` after the first later one arrived (its shards are refused from then).
    - Sequence numbers more than `window` blocks behind the highest seen are refused
      (`stale`): within the window, the ring tells a finished block from a new one.
    - `max_shard_size` (payload bytes) caps what one shard may make us hold: give it
      `max_shard_payload(mtu)` of the tunnel's MTU.
    - `ordered`: deliver in sequence, holding a datagram behind a gap for at most
      `reorder_timeout`, then skipping the gap (see `ReorderBuffer`).
    - Restarts. The stream is *silent* once it has begun no block for `block_timeout`. A
      shard with a new epoch means the sender restarted: the stream state is reset and
      the new stream followed. Shards of an epoch left behind are refused while the
      current stream is not silent; after that, the old one is followed again (a
      fail-back), but never below the sequence number it had reached. A restarted sender
      that drew the same epoch is recognised while the stream is silent: by a shard a
      full `window` behind, or by a shard of one of the first blocks seen whose bytes
      differ from those received under that index (a straggler brings an index not
      received yet): the stream is reset and followed (`resyncs`).

    `datagrams_lost` counts each datagram the application did not get, once, in both
    modes: a block abandoned, a multi-block datagram given up (however many of its blocks
    are missing), a datagram that completed after ordered mode skipped its place, and
    blocks of which no shard arrived (a run of those inside one known datagram counts as
    that datagram; one outside any known datagram counts one per block, which is exact
    for datagrams that fit in one block). Counting starts at the first block seen of a
    stream; what was in flight when the stream is reset (restart) is counted too.

    Exactly-once delivery assumes no shard arrives a full `window` of blocks late, which
    WireGuard's replay window (8312 messages) guarantees for the default window.
    """

    def __init__(
        self,
        tunnel_id: int,
        k: int,
        n: int,
        *,
        max_blocks_in_flight: int = 4096,
        block_timeout: float = 1.0,
        ordered: bool = False,
        reorder_timeout: float = 0.05,
        max_shard_size: int = MAX_SHARD_PAYLOAD,
        window: int = 1 << 16,
    ) -> None:
        validate_geometry(k, n)
        if max_blocks_in_flight < 1:
            raise ValueError("max_blocks_in_flight must be at least 1")
        if window & (window - 1) or window < 2 * max_blocks_in_flight or window > _HALF_SEQUENCE:
            raise ValueError("window must be a power of two >= 2 * max_blocks_in_flight")
        if block_timeout <= 0 or reorder_timeout < 0:
            raise ValueError("timeouts must be positive")
        if max_shard_size < 1:
            raise ValueError("max_shard_size must be at least 1")
        self.tunnel_id = tunnel_id
        self.k = k
        self.n = n
        self.max_blocks_in_flight = max_blocks_in_flight
        self.block_timeout = block_timeout
        self.ordered = ordered
        self.reorder_timeout = reorder_timeout
        self.max_shard_size = max_shard_size
        self.window = window
        # Bytes each store may hold: max_blocks_in_flight of the largest configured block.
        self.store_budget = max_blocks_in_flight * min(k * max_shard_size, MAX_DATAGRAM_SIZE)
        self.stats = DecoderStats()
        # Called with the reason of every rejected shard (the node logs them, rate-limited).
        self.on_reject: Callable[[RejectReason], None] | None = None
        self._ring_mask = window - 1
        self._geometries: dict[int, _Geometry] = {}
        self._epoch: int | None = None
        # Header bytes 0-7 (type, tunnel, epoch, k, n, shard index) of every valid shard of
        # the current stream, as the grouped header reads them -> (index, 1 << index,
        # geometry, list length of a complete block). One lookup checks all those fields.
        self._valid_heads: dict[int, tuple[int, int, _Geometry, int]] = {}
        # Epochs we followed before, with the highest sequence number seen in each.
        self._retired_epochs: OrderedDict[int, int] = OrderedDict()
        # The stream is silent from this time on: block_timeout after it last began a block.
        self._silent_from = -float("inf")
        self._reset_streams()

    def _reset_streams(self) -> None:
        # Incomplete blocks by raw sequence number, oldest first, and the bytes reserved.
        self._pending: OrderedDict[int, _Block] = OrderedDict()
        self._pending_bytes = 0
        # Ring of decided (rebuilt, or abandoned: | _ABANDONED) sequence numbers: a shard of
        # a decided block costs one header unpack, one dict miss and one array read.
        self._decided = array("q", [_NO_SEQUENCE]) * self.window
        # Ring of datagrams counted lost, by the sequence number of their first block.
        self._lost = array("q", [_NO_SEQUENCE]) * self.window
        # Sequence numbers are extended to unbounded integers against the highest seen,
        # so ordering and windows never deal with wrap-around.
        self._highest_raw = 0
        self._highest_extended: int | None = None
        self._highest_shape = 0
        # Sequence numbers at or below this were seen before (fail-back to an epoch).
        self._floor: float = -float("inf")
        self._partials: OrderedDict[int, _PartialDatagram] = OrderedDict()
        self._partial_blocks = 0
        self._partial_bytes = 0
        # Blocks decoded with parity -> data shards still missing; checked at the time
        # queued in `_repair_checks` (data shards often just arrive after the parity).
        self._unconfirmed: dict[int, int] = {}
        self._repair_checks: deque[tuple[float, int]] = deque()
        self._gaps: deque[_Gap] = deque()
        # The first _FINGERPRINTED_BLOCKS blocks from the first one opened:
        # sequence number -> shard index -> fingerprint of its bytes.
        self._first_extended: int | None = None
        self._fingerprint_until = -1
        self._early: dict[int, dict[int, int]] = {}
        # Ordered mode: datagrams keyed by the extended sequence of their first block.
        self._reorder: ReorderBuffer | None = (
            ReorderBuffer(
                self.reorder_timeout,
                self.max_blocks_in_flight,
                self.stats,
                max_bytes=self.store_budget,
                on_drop=self._count_lost,
            )
            if self.ordered
            else None
        )

    def reset(self) -> list[bytes]:
        """Forget all stream state (not the counters); returns what ordered mode held.

        What is still incomplete is counted lost, and pending repair checks are settled."""
        flushed = self._reorder.flush() if self._reorder is not None else []
        for seq, block in self._pending.items():
            self._count_lost(_datagram_start(block[_EXTENDED], block[_SHAPE]))
            self._mark_decided(seq, block[_EXTENDED], _ABANDONED)
        for start in self._partials:
            self._count_lost(start)
        while self._gaps:
            self._settle_gap(self._gaps.popleft())
        self._settle_repairs(float("inf"))
        self._reset_streams()
        return flushed

    # ---- receiving -------------------------------------------------------------------

    def receive(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Take one shard frame; return the datagrams it completes (usually none or one)."""
        # This runs for every shard that arrives: it is written for speed (see bench/fec.py).
        try:
            stream, seq, shape = _unpack_grouped(frame)
        except struct.error:
            return self._reject(RejectReason.SHORT)
        head = self._valid_heads.get(stream)
        if head is None:
            return self._receive_unexpected(frame, now)
        index, bit, geometry, complete_length = head
        block = self._pending.get(seq)
        if block is None:
            decided = self._decided[seq & self._ring_mask]
            if decided == seq:
                if now >= self._silent_from and self._restarted(frame, seq, index):
                    return self._restart(frame, now)
                self.stats.surplus_shards += 1
                unconfirmed = self._unconfirmed
                if unconfirmed:
                    missing = unconfirmed.get(seq)
                    if missing is not None and missing & bit:
                        if missing == bit:
                            del unconfirmed[seq]
                        else:
                            unconfirmed[seq] = missing ^ bit
                return []
            if decided == seq | _ABANDONED:
                if now >= self._silent_from and self._restarted(frame, seq, index):
                    return self._restart(frame, now)
                self.stats.late_shards += 1
                return []
            return self._open_block(frame, seq, index, bit, geometry, shape, now)
        if shape != block[_SHAPE] or geometry is not block[_GEOMETRY]:
            return self._reject(RejectReason.INCONSISTENT)
        if block[_RECEIVED] & bit:
            self.stats.duplicates += 1
            return []
        end = block[_END]
        if len(frame) < end:
            return self._reject(RejectReason.LENGTH)
        payload = frame[SHARD_HEADER_SIZE:end]
        if type(payload) is not bytes:
            # Never keep a view into the caller's (maybe reused, maybe huge) buffer.
            payload = bytes(payload)
        block[_RECEIVED] |= bit
        block.append(index)
        block.append(payload)
        if len(block) < complete_length:
            return []
        return self._rebuild(seq, block, now)

    def _receive_unexpected(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """A header whose type, tunnel, epoch or geometry this decoder has not seen yet.

        A well-formed shard with a new epoch comes from a restarted sender: the stream
        state is reset and the shard is taken as the first of the new stream. A new
        geometry of the current epoch is learnt and followed.
        """
        (frame_type, tunnel_id, epoch, k, n, index, _, frag_index, frag_count, length) = (
            SHARD_HEADER.unpack_from(frame)
        )
        if frame_type != _SHARD:
            return self._reject(RejectReason.NOT_SHARD)
        if tunnel_id != self.tunnel_id:
            return self._reject(RejectReason.TUNNEL)
        if not 1 <= k <= n:
            return self._reject(RejectReason.GEOMETRY)
        if index >= n:
            return self._reject(RejectReason.INDEX)
        if frag_index >= frag_count:
            return self._reject(RejectReason.FRAGMENT)
        shard_size = -(-length // k)
        if length == 0 or shard_size > self.max_shard_size:
            return self._reject(RejectReason.LENGTH)
        if len(frame) < SHARD_HEADER_SIZE + shard_size:
            return self._reject(RejectReason.LENGTH)
        flushed: list[bytes] = []
        if epoch != self._epoch:
            if epoch in self._retired_epochs and not self._stream_silent(now):
                # A straggler from before a restart, or a second sender instance fighting
                # the current one: the stream we follow is alive, keep it.
                return self._reject(RejectReason.STALE_EPOCH)
            if self._epoch is not None:
                self.stats.epoch_changes += 1
                # Remember how far the retired stream got: should it come back (the
                # current one fell silent: a fail-back), nothing at or below that is
                # taken again.
                if self._highest_extended is not None:
                    self._retired_epochs[self._epoch] = self._highest_raw
                while len(self._retired_epochs) > _RETIRED_EPOCHS_KEPT:
                    self._retired_epochs.popitem(last=False)
                flushed = self.reset()
            floor = self._retired_epochs.pop(epoch, None)
            if floor is not None:
                self._highest_raw = self._highest_extended = self._floor = floor
                # Just switched: the floor holds, this is no restart of the fail-back stream.
                self._silent_from = now + self.block_timeout
            self._epoch = epoch
            self._valid_heads = {}
        self._learn_geometry(frame, k, n)
        return flushed + self.receive(frame, now)

    def _learn_geometry(self, frame: bytes | bytearray | memoryview, k: int, n: int) -> None:
        """Accept the shards of this frame's epoch and (k, n) on the fast path."""
        key = k << 8 | n
        geometry = self._geometries.get(key)
        if geometry is None:
            if len(self._geometries) >= _MAX_GEOMETRIES:
                # Blocks in flight keep their geometry object; their next shards come back
                # with a new one and are refused as inconsistent: only a peer cycling
                # through geometries pays for this.
                self._geometries.clear()
                self._valid_heads = {}
            geometry = self._geometries[key] = _Geometry(k, n)
        prefix = int.from_bytes(frame[:7]) << 8
        complete_length = geometry.complete_length
        heads = self._valid_heads
        for i in range(n):
            heads[prefix | i] = (i, 1 << i, geometry, complete_length)

    def _stream_silent(self, now: float) -> bool:
        """Whether the stream we follow has begun no block for `block_timeout`."""
        return now >= self._silent_from

    def _restarted(self, frame: bytes | bytearray | memoryview, seq: int, index: int) -> bool:
        """Whether a shard of a decided block, arriving while the stream is silent, comes
        from a restarted sender that drew the same epoch: other bytes than the shard of
        that index we got (a straggler is an index not received yet; a copy, the same
        bytes). Known only for the first blocks of the stream: the restarted sender goes
        through them again, numbering from 0."""
        seen = self._early.get(seq)
        if seen is None:
            return False
        length = int.from_bytes(frame[14:16])
        geometry = self._valid_heads[int.from_bytes(frame[:8])][2]
        payload_end = SHARD_HEADER_SIZE - (-length // geometry.k)
        fingerprint = hash(bytes(frame[SHARD_HEADER_SIZE:payload_end]))
        known = seen.get(index)
        if known is None:
            seen[index] = fingerprint
            return False
        return known != fingerprint

    def _remember_early(self, seq: int, block: _Block) -> None:
        """Fingerprints of the shards an early block got (see `_restarted`)."""
        first = self._first_extended
        if first is None or not 0 <= block[_EXTENDED] - first < _FINGERPRINTED_BLOCKS:
            return
        self._early[seq] = {
            index: hash(payload)
            for index, payload in zip(
                block[_FIRST_SHARD::2], block[_FIRST_SHARD + 1 :: 2], strict=True
            )
        }

    def _restart(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """The sender restarted with the epoch we follow: start over with this shard."""
        self.stats.resyncs += 1
        return self.reset() + self.receive(frame, now)

    def _reject(self, reason: RejectReason) -> list[bytes]:
        rejected = self.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1
        if self.on_reject is not None:
            self.on_reject(reason)
        return []

    def _open_block(
        self,
        frame: bytes | bytearray | memoryview,
        seq: int,
        index: int,
        bit: int,
        geometry: _Geometry,
        shape: int,
        now: float,
    ) -> list[bytes]:
        """Validate the first shard of a block and start tracking the block with it."""
        length = shape & 0xFFFF
        shard_size = -(-length // geometry.k)
        end = SHARD_HEADER_SIZE + shard_size
        if shape >> 24 >= (shape >> 16) & 0xFF:
            return self._reject(RejectReason.FRAGMENT)
        if length == 0 or shard_size > self.max_shard_size or len(frame) < end:
            return self._reject(RejectReason.LENGTH)
        # Extend the 32-bit sequence number against the highest seen, so that windows and
        # ordering never deal with wrap-around.
        highest = self._highest_extended
        delta = (seq - self._highest_raw) & _SEQUENCE_MASK
        if highest is None:
            extended = self._highest_extended = seq
            self._highest_raw = seq
            self._highest_shape = shape
        elif 0 < delta < _HALF_SEQUENCE:
            extended = self._highest_extended = highest + delta
            self._highest_raw = seq
            if delta > 1:
                self._note_gap(highest, extended, shape, now)
            self._highest_shape = shape
        else:  # behind the highest (or equal to it: only possible at a fail-back floor)
            extended = highest + delta - SEQUENCE_MODULUS if delta else highest
            if highest - extended >= self.window or extended <= self._floor:
                # A full window behind is no straggler of this stream (WireGuard's replay
                # window drops anything that late): a restarted sender drew an epoch we
                # know. Follow it once the old stream is silent.
                far_behind = max(highest, self._floor) - extended >= self.window
                if far_behind and self._stream_silent(now):
                    return self._restart(frame, now)
                return self._reject(RejectReason.STALE)
        # Reserve what the block may hold before it is rebuilt: k - 1 shards.
        pending = self._pending
        reserved = self._pending_bytes + geometry.k_minus_1 * shard_size
        if reserved > self.store_budget or len(pending) >= self.max_blocks_in_flight:
            reserved = self._evict_for(reserved)
        self._pending_bytes = reserved
        payload = frame[SHARD_HEADER_SIZE:end]
        if type(payload) is not bytes:
            payload = bytes(payload)
        block = pending[seq] = [shape, end, extended, now, bit, geometry, index, payload]
        self._silent_from = now + self.block_timeout
        if self._first_extended is None:
            self._first_extended = extended
            self._fingerprint_until = extended + _FINGERPRINTED_BLOCKS
        if geometry.k_minus_1 == 0:
            return self._rebuild(seq, block, now)
        return []

    def _evict_for(self, reserved: int) -> int:
        """Abandon the oldest incomplete blocks until one more fits; returns the bytes
        reserved with it. A single block larger than the whole budget still gets in."""
        pending = self._pending
        while pending and (
            reserved > self.store_budget or len(pending) >= self.max_blocks_in_flight
        ):
            seq, block = pending.popitem(last=False)
            reserved -= block[_GEOMETRY].k_minus_1 * (block[_END] - SHARD_HEADER_SIZE)
            self._abandon(seq, block)
            self.stats.blocks_evicted += 1
        return reserved

    def _mark_decided(self, seq: int, extended: int, flag: int = 0) -> None:
        # A block that fell out of the window must not overwrite the slot of a newer one
        # (that would let the newer block be rebuilt twice); its own late shards are
        # rejected as stale anyway.
        highest = self._highest_extended
        if highest is not None and highest - extended < self.window:
            self._decided[seq & self._ring_mask] = seq | flag

    def _abandon(self, seq: int, block: _Block) -> None:
        """An incomplete block is given up: its datagram is lost."""
        self._mark_decided(seq, block[_EXTENDED], _ABANDONED)
        self._remember_early(seq, block)
        self._count_lost(_datagram_start(block[_EXTENDED], block[_SHAPE]))

    def _count_lost(self, start: int) -> None:
        """The datagram whose first block is `start` will not be delivered: count it once."""
        slot = start & self._ring_mask
        if self._lost[slot] != start:
            self._lost[slot] = start
            self.stats.datagrams_lost += 1

    def _rebuild(self, seq: int, block: _Block, now: float) -> list[bytes]:
        del self._pending[seq]
        geometry: _Geometry = block[_GEOMETRY]
        shard_size = block[_END] - SHARD_HEADER_SIZE
        self._pending_bytes -= geometry.k_minus_1 * shard_size
        extended = block[_EXTENDED]
        # As _mark_decided; a block exists, so _highest_extended is set.
        if self._highest_extended - extended < self.window:
            self._decided[seq & self._ring_mask] = seq
        if extended < self._fingerprint_until:
            self._remember_early(seq, block)
        stats = self.stats
        stats.blocks_decoded += 1
        parts: list[Any] = block[_FIRST_SHARD + 1 :: 2]
        received = block[_RECEIVED]
        if received == geometry.data_mask:
            # All k data shards: no decoding, just put them in order.
            indexes = block[_FIRST_SHARD::2]
            if indexes != geometry.in_order:
                parts = [parts[indexes.index(i)] for i in geometry.in_order]
        else:
            parts = geometry.zfec.decode(parts, block[_FIRST_SHARD::2])
            stats.decode_calls += 1
            # A repair only if the missing data shards do not turn up after all.
            self._unconfirmed[seq] = geometry.data_mask & ~received
            checks = self._repair_checks
            checks.append((now + self.block_timeout, seq))
            if len(checks) > self.window:
                self._settle_repairs(checks[0][0])
        shape = block[_SHAPE]
        length = shape & 0xFFFF
        last = length - geometry.k_minus_1 * shard_size  # data bytes in the last data shard
        if last != shard_size:
            # Drop the zero padding: usually the end of the last data shard, but it spans
            # more than one shard when length < k.
            if last > 0:
                parts[-1] = parts[-1][:last]
            else:
                whole, tail = divmod(length, shard_size)
                parts = [*parts[:whole], parts[whole][:tail]] if tail else parts[:whole]
        data = b"".join(parts)
        if shape >> 16 != 1:  # not fragment 0 of 1: part of a larger datagram
            return self._assemble(block, data, now)
        if self._reorder is not None:
            return self._reorder.offer(extended, 1, data, now)
        stats.datagrams_delivered += 1
        return [data]

    # ---- multi-block datagrams -------------------------------------------------------

    def _assemble(self, block: _Block, data: bytes, now: float) -> list[bytes]:
        shape = block[_SHAPE]
        frag_index, count = shape >> 24, (shape >> 16) & 0xFF
        start = block[_EXTENDED] - frag_index
        partials = self._partials
        partial = partials.get(start)
        if partial is None:
            while partials and self._partial_blocks >= self.max_blocks_in_flight:
                self._drop_oldest_partial()
            partial = _PartialDatagram(count, now)
            partials[start] = partial
        elif len(partial.parts) != count or partial.parts[frag_index] is not None:
            return self._reject(RejectReason.INCONSISTENT)
        partial.parts[frag_index] = data
        partial.missing -= 1
        partial.size += len(data)
        self._partial_blocks += 1
        self._partial_bytes += len(data)
        if partial.size > MAX_DATAGRAM_SIZE:
            self._drop_partial(start)
            return self._reject(RejectReason.LENGTH)
        if partial.missing:
            while self._partial_bytes > self.store_budget:
                oldest = next(iter(partials))
                self._drop_partial(oldest)
                if oldest == start:
                    break
            return []
        del partials[start]
        self._partial_blocks -= count
        self._partial_bytes -= partial.size
        datagram = b"".join(partial.parts)  # type: ignore[arg-type]  # all parts are set
        if self._reorder is not None:
            return self._reorder.offer(start, count, datagram, now)
        self.stats.datagrams_delivered += 1
        return [datagram]

    def _drop_partial(self, start: int) -> None:
        partial = self._partials.pop(start)
        self._partial_blocks -= len(partial.parts) - partial.missing
        self._partial_bytes -= partial.size
        self.stats.datagrams_incomplete += 1
        self._count_lost(start)

    def _drop_oldest_partial(self) -> None:
        self._drop_partial(next(iter(self._partials)))

    # ---- unseen blocks ---------------------------------------------------------------

    def _note_gap(self, highest: int, extended: int, shape: int, now: float) -> None:
        """Blocks highest+1 .. extended-1 are not seen (yet): settle them later."""
        first, last = highest + 1, extended - 1
        if last - first >= self.window:
            # A jump beyond the ring: what it cannot track is lost, one per block.
            self.stats.datagrams_lost += last - first + 1 - self.window
            first = last - self.window + 1
        before = self._highest_shape
        before_start = _datagram_start(highest, before)
        before_end = before_start + ((before >> 16) & 0xFF)
        gaps = self._gaps
        gaps.append(
            (
                now + self.block_timeout,
                first,
                last,
                before_end,
                before_start,
                _datagram_start(extended, shape),
            )
        )
        if len(gaps) > self.max_blocks_in_flight:
            self._settle_gap(gaps.popleft())

    def _settle_gap(self, gap: _Gap) -> None:
        """Give up the blocks of a gap that are still unseen; count their datagrams."""
        _, first, last, before_end, before_start, after_start = gap
        pending = self._pending
        decided = self._decided
        mask = self._ring_mask
        for extended in range(first, last + 1):
            seq = extended & _SEQUENCE_MASK
            outcome = decided[extended & mask]
            if seq in pending or outcome == seq or outcome == seq | _ABANDONED:
                continue  # it came after all: its own fate counts
            self._mark_decided(seq, extended, _ABANDONED)
            if extended < before_end:
                self._count_lost(before_start)
            elif extended >= after_start:
                self._count_lost(after_start)
            else:
                self._count_lost(extended)

    def _settle_repairs(self, now: float) -> None:
        checks = self._repair_checks
        unconfirmed = self._unconfirmed
        while checks and checks[0][0] <= now:
            _, seq = checks.popleft()
            if unconfirmed.pop(seq, 0):
                self.stats.blocks_rebuilt += 1

    # ---- time --------------------------------------------------------------------------

    def tick(self, now: float) -> list[bytes]:
        """Abandon blocks and datagrams past their timeouts, settle repair checks and unseen
        blocks; in ordered mode, skip gaps that have been waited on for `reorder_timeout`
        and return what that releases."""
        pending = self._pending
        timeout = self.block_timeout
        while pending:
            seq, block = next(iter(pending.items()))
            # Same expression as next_deadline(): ticking at the deadline must expire.
            if block[_CREATED] + timeout > now:
                break
            del pending[seq]
            self._pending_bytes -= block[_GEOMETRY].k_minus_1 * (block[_END] - SHARD_HEADER_SIZE)
            self._abandon(seq, block)
            self.stats.blocks_expired += 1
        partials = self._partials
        while partials and next(iter(partials.values())).created + timeout <= now:
            self._drop_oldest_partial()
        gaps = self._gaps
        while gaps and gaps[0][0] <= now:
            self._settle_gap(gaps.popleft())
        self._settle_repairs(now)
        return self._reorder.tick(now) if self._reorder is not None else []

    def next_deadline(self) -> float | None:
        """When `tick` must next run, or None if nothing is waiting."""
        # Asked after every shard: no list, no iterator object, no min() call.
        deadline: float | None = None
        for block in self._pending.values():
            deadline = block[_CREATED] + self.block_timeout
            break
        for partial in self._partials.values():
            t = partial.created + self.block_timeout
            if deadline is None or t < deadline:
                deadline = t
            break
        if self._gaps:
            t = self._gaps[0][0]
            if deadline is None or t < deadline:
                deadline = t
        if self._repair_checks:
            # Checks may wait one more block_timeout: ticking for each one would wake the
            # timer once per block; this way one tick settles a second's worth.
            t = self._repair_checks[0][0] + self.block_timeout
            if deadline is None or t < deadline:
                deadline = t
        reorder = self._reorder
        if reorder is not None:
            held_until = reorder.deadline()
            if held_until is not None and (deadline is None or held_until < deadline):
                deadline = held_until
        return deadline

    # ---- introspection -----------------------------------------------------------------

    @property
    def blocks_in_flight(self) -> int:
        return len(self._pending)

    def buffered_bytes(self) -> int:
        """Payload bytes currently held (walks the buffers: for tests and status)."""
        total = sum(
            len(p) for block in self._pending.values() for p in block[_FIRST_SHARD + 1 :: 2]
        )
        total += sum(len(p) for d in self._partials.values() for p in d.parts if p is not None)
        if self._reorder is not None:
            total += self._reorder.held_bytes()
        return total

    @property
    def memory_bound(self) -> int:
        """Most payload bytes this decoder can hold, whatever the peer sends: three stores
        of `store_budget` bytes (= max_blocks_in_flight x the largest block of the
        configured geometry, k x max_shard_size capped at 65 535), plus one block in the
        incomplete store when a single peer block is larger than the whole budget."""
        return 3 * self.store_budget + MAX_DATAGRAM_SIZE
