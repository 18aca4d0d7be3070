"""Receiver side: shards in, datagrams out, exactly once, in bounded memory and time.

Everything a peer controls (k, n, indexes, lengths, fragment numbering, sequence numbers)
is checked before it is used; a bad shard becomes a `RejectReason` count, never an
exception and never an allocation sized by the peer.

Memory: at most `max_blocks_in_flight` incomplete blocks (each holding fewer than k
payloads), at most `max_blocks_in_flight` rebuilt blocks waiting for the other blocks of
their datagram, and (ordered mode) at most `max_blocks_in_flight` blocks' worth of
datagrams waiting for a gap; plus a fixed ring of `window` sequence numbers. When a bound
is reached the oldest entry goes, and is counted.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections import OrderedDict
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
_NO_SEQUENCE = -1  # ring slot never written: no 32-bit sequence number equals it
_RETIRED_EPOCHS_KEPT = 8

# The shard header read with its fields grouped for the per-shard fast path, as three
# integers: stream (frame type, tunnel id, epoch, k, n; then the shard index in the low
# byte), block sequence, shape (fragment index, fragment count, block length). Same 16
# bytes as `SHARD_HEADER`: one compare checks the whole stream identity.
_GROUPED_HEADER = struct.Struct("!QII")
assert _GROUPED_HEADER.size == SHARD_HEADER_SIZE
_unpack_grouped = _GROUPED_HEADER.unpack_from


def _shape_fields(shape: int) -> tuple[int, int, int]:
    """(fragment index, fragment count, block length) from the grouped header field."""
    return shape >> 24, (shape >> 16) & 0xFF, shape & 0xFFFF


# An incomplete block is a plain list, the cheapest record CPython builds and extends:
#   [shape, end, extended sequence, time created, received-index bits,
#    index, payload, index, payload, ...]  (the first fewer-than-k distinct shards)
# shape: fragment index, fragment count and block length, as the grouped header has them;
# end: header + payload size, where this block's payloads end in a frame.
_Block = list[Any]
_SHAPE, _END, _EXTENDED, _CREATED, _RECEIVED = range(5)
_FIRST_SHARD = 5


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

    - A block is rebuilt from the first k distinct shards (joined as they are when they
      are the k data shards, zfec-decoded otherwise); later shards of a rebuilt or
      abandoned block cost a header unpack and a ring lookup (`duplicates`).
    - Incomplete blocks are abandoned after `block_timeout`, or when more than
      `max_blocks_in_flight` are open (oldest first).
    - Sequence numbers more than `window` blocks behind the highest seen are refused
      (`stale`): within the window, the ring tells a finished block from a new one.
    - `max_shard_size` (payload bytes) caps what one shard may make us hold: give it
      `max_shard_payload(mtu)` of the largest MTU the peer may use.
    - `ordered`: deliver in sequence, holding a datagram behind a gap for at most
      `reorder_timeout`, then skipping the gap (see `ReorderBuffer`).
    - A shard with a new epoch means the sender restarted: the stream state is reset and
      the new stream followed. Shards of an epoch left behind are refused while the
      current stream is alive (started a block within 2 `block_timeout`s); after that,
      the old one is followed again (a fail-back), but never below the sequence number
      it had reached. A shard a full `window` behind, once the stream is silent, is a
      restarted sender that drew a known epoch: followed (`resyncs`).

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
        self.tunnel_id = tunnel_id
        self.k = k
        self.n = n
        self.max_blocks_in_flight = max_blocks_in_flight
        self.block_timeout = block_timeout
        self.ordered = ordered
        self.reorder_timeout = reorder_timeout
        self.max_shard_size = max_shard_size
        self.window = window
        self.stats = DecoderStats()
        self._zfec: Any = zfec_decoder(k, n) if n > k else None
        self._data_mask = (1 << k) - 1
        self._in_order_indexes = list(range(k))
        self._complete_length = _FIRST_SHARD + 2 * k
        self._k_minus_1 = k - 1
        self._ring_mask = window - 1
        self._epoch: int | None = None
        # Header bytes 0-7 (type, tunnel, epoch, k, n, shard index) of every valid shard of
        # the current stream, as the grouped header reads them -> (index, 1 << index).
        # One lookup checks all those fields; empty until the first shard tells the epoch.
        self._valid_heads: dict[int, tuple[int, int]] = {}
        # Epochs we followed before, with the highest sequence number seen in each.
        self._retired_epochs: OrderedDict[int, int] = OrderedDict()
        self._last_block_opened = -math.inf
        self._reset_streams()

    def _reset_streams(self) -> None:
        # Incomplete blocks by raw sequence number, oldest first.
        self._pending: OrderedDict[int, _Block] = OrderedDict()
        # Ring of decided (rebuilt or abandoned) sequence numbers: a shard of a decided
        # block costs one header unpack, one dict miss and one array read.
        self._decided = array("q", [_NO_SEQUENCE]) * self.window
        # Sequence numbers are extended to unbounded integers against the highest seen,
        # so ordering and windows never deal with wrap-around.
        self._highest_raw = 0
        self._highest_extended: int | None = None
        # Sequence numbers at or below this were seen before (fail-back to an epoch).
        self._floor: float = -math.inf
        self._partials: OrderedDict[int, _PartialDatagram] = OrderedDict()
        self._partial_blocks = 0
        # Ordered mode: datagrams keyed by the extended sequence of their first block.
        self._reorder: ReorderBuffer | None = (
            ReorderBuffer(self.reorder_timeout, self.max_blocks_in_flight, self.stats)
            if self.ordered
            else None
        )

    def reset(self) -> list[bytes]:
        """Forget all stream state (not the counters); returns what ordered mode held."""
        flushed = self._reorder.flush() if self._reorder is not None else []
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
        index, bit = head
        block = self._pending.get(seq)
        if block is None:
            if self._decided[seq & self._ring_mask] == seq:
                self.stats.duplicates += 1
                return []
            return self._open_block(frame, seq, index, bit, shape, now)
        if shape != block[_SHAPE]:
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
        if len(block) < self._complete_length:
            return []
        return self._rebuild(seq, block, now)

    def _receive_unexpected(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """A header whose type, tunnel, epoch, k or n differ from what this decoder expects.

        A well-formed shard that differs only in epoch comes from a restarted sender: the
        stream state is reset and the shard is taken as the first of the new stream.
        """
        (frame_type, tunnel_id, epoch, k, n, index, _, frag_index, frag_count, length) = (
            SHARD_HEADER.unpack_from(frame)
        )
        if frame_type != _SHARD:
            return self._reject(RejectReason.NOT_SHARD)
        if tunnel_id != self.tunnel_id:
            return self._reject(RejectReason.TUNNEL)
        if k != self.k or n != self.n:
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
        if epoch in self._retired_epochs and not self._stream_silent(now):
            # A straggler from before a restart, or a second sender instance fighting the
            # current one: the stream we follow is alive, keep it.
            return self._reject(RejectReason.STALE_EPOCH)
        flushed: list[bytes] = []
        if self._epoch is not None:
            self.stats.epoch_changes += 1
            # Remember how far the retired stream got: should it come back (the current
            # one fell silent: a fail-back), nothing at or below that is taken again.
            if self._highest_extended is not None:
                self._retired_epochs[self._epoch] = self._highest_raw
            while len(self._retired_epochs) > _RETIRED_EPOCHS_KEPT:
                self._retired_epochs.popitem(last=False)
            flushed = self.reset()
        floor = self._retired_epochs.pop(epoch, None)
        if floor is not None:
            self._highest_raw = self._highest_extended = self._floor = floor
        self._epoch = epoch
        prefix = int.from_bytes(frame[:7]) << 8
        self._valid_heads = {prefix | i: (i, 1 << i) for i in range(self.n)}
        return flushed + self.receive(frame, now)

    def _stream_silent(self, now: float) -> bool:
        """Whether the stream we follow has started no block for 2 block timeouts."""
        return now - self._last_block_opened >= 2 * self.block_timeout

    def _reject(self, reason: RejectReason) -> list[bytes]:
        rejected = self.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1
        return []

    def _open_block(
        self,
        frame: bytes | bytearray | memoryview,
        seq: int,
        index: int,
        bit: int,
        shape: int,
        now: float,
    ) -> list[bytes]:
        """Validate the first shard of a block and start tracking the block with it."""
        length = shape & 0xFFFF
        shard_size = -(-length // self.k)
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
        elif 0 < delta < _HALF_SEQUENCE:
            extended = self._highest_extended = highest + delta
            self._highest_raw = seq
        else:  # behind the highest (or equal to it: only possible at a fail-back floor)
            extended = highest + delta - SEQUENCE_MODULUS if delta else highest
            if highest - extended >= self.window or extended <= self._floor:
                # A full window behind is no straggler of this stream (WireGuard's replay
                # window drops anything that late): a restarted sender drew an epoch we
                # know. Follow it once the old stream is silent.
                far_behind = max(highest, self._floor) - extended >= self.window
                if far_behind and self._stream_silent(now):
                    self.stats.resyncs += 1
                    return self.reset() + self.receive(frame, now)
                return self._reject(RejectReason.STALE)
        pending = self._pending
        if len(pending) >= self.max_blocks_in_flight:
            old_seq, old_block = pending.popitem(last=False)
            self._mark_decided(old_seq, old_block[_EXTENDED])
            self.stats.blocks_evicted += 1
        payload = frame[SHARD_HEADER_SIZE:end]
        if type(payload) is not bytes:
            payload = bytes(payload)
        block = pending[seq] = [shape, end, extended, now, bit, index, payload]
        self._last_block_opened = now
        if self.k == 1:
            return self._rebuild(seq, block, now)
        return []

    def _mark_decided(self, seq: int, extended: int) -> None:
        # A block that fell out of the window must not overwrite the slot of a newer one
        # (that would let the newer block be rebuilt twice); its own late shards are
        # rejected as stale anyway.
        highest = self._highest_extended
        if highest is not None and highest - extended < self.window:
            self._decided[seq & self._ring_mask] = seq

    def _rebuild(self, seq: int, block: _Block, now: float) -> list[bytes]:
        del self._pending[seq]
        extended = block[_EXTENDED]
        # As _mark_decided; a block exists, so _highest_extended is set.
        if self._highest_extended - extended < self.window:
            self._decided[seq & self._ring_mask] = seq
        stats = self.stats
        stats.blocks_rebuilt += 1
        parts: list[Any] = block[_FIRST_SHARD + 1 :: 2]
        if block[_RECEIVED] == self._data_mask:
            # All k data shards: no decoding, just put them in order.
            indexes = block[_FIRST_SHARD::2]
            if indexes != self._in_order_indexes:
                parts = [parts[indexes.index(i)] for i in self._in_order_indexes]
        else:
            parts = self._zfec.decode(parts, block[_FIRST_SHARD::2])
            stats.decode_calls += 1
        shape = block[_SHAPE]
        length = shape & 0xFFFF
        shard_size = block[_END] - SHARD_HEADER_SIZE
        last = length - self._k_minus_1 * shard_size  # bytes of data in the last data shard
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
        frag_index, count, _ = _shape_fields(block[_SHAPE])
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
        if partial.size > MAX_DATAGRAM_SIZE:
            del partials[start]
            self._partial_blocks -= count - partial.missing
            self.stats.datagrams_incomplete += 1
            return self._reject(RejectReason.LENGTH)
        if partial.missing:
            return []
        del partials[start]
        self._partial_blocks -= count
        datagram = b"".join(partial.parts)  # type: ignore[arg-type]  # all parts are set
        if self._reorder is not None:
            return self._reorder.offer(start, count, datagram, now)
        self.stats.datagrams_delivered += 1
        return [datagram]

    def _drop_oldest_partial(self) -> None:
        _, partial = self._partials.popitem(last=False)
        self._partial_blocks -= len(partial.parts) - partial.missing
        self.stats.datagrams_incomplete += 1

    # ---- time --------------------------------------------------------------------------

    def tick(self, now: float) -> list[bytes]:
        """Abandon blocks and datagrams past their timeouts; in ordered mode, skip gaps
        that have been waited on for `reorder_timeout` and return what that releases."""
        pending = self._pending
        timeout = self.block_timeout
        while pending:
            seq, block = next(iter(pending.items()))
            # Same expression as next_deadline(): ticking at the deadline must expire.
            if block[_CREATED] + timeout > now:
                break
            del pending[seq]
            self._mark_decided(seq, block[_EXTENDED])
            self.stats.blocks_expired += 1
        partials = self._partials
        while partials and next(iter(partials.values())).created + timeout <= now:
            self._drop_oldest_partial()
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
        reorder = self._reorder
        if reorder is not None:
            t2 = reorder.deadline()
            if t2 is not None and (deadline is None or t2 < deadline):
                deadline = t2
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
        """Most payload bytes this decoder can hold, whatever the peer sends."""
        block_bytes = min(self.k * self.max_shard_size, MAX_DATAGRAM_SIZE)
        pending = (self.k - 1) * self.max_shard_size
        # Partial datagrams and the reorder buffer each hold up to max_blocks_in_flight
        # rebuilt blocks, and may exceed it by one datagram before the oldest goes.
        held = block_bytes * (2 * self.max_blocks_in_flight) + 2 * MAX_DATAGRAM_SIZE
        return self.max_blocks_in_flight * pending + held
