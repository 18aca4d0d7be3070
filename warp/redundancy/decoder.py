"""Receiver side: data and parity shards in, datagrams out, exactly once, bounded.

A data shard is delivered the moment it arrives: its whole datagrams at once, a fragment
as soon as its datagram's last fragment is in. Parity is used only to rebuild data shards
that are missing; a rebuilt data shard is then taken exactly as if it had arrived.

Everything a peer controls (lengths, records, fragment numbering, block geometry, sequence
and datagram numbers) is checked before it is used; a bad shard becomes a `RejectReason`
count, never an exception and never an allocation sized by the peer.

Memory: three stores, each bounded in bytes by `store_budget` (max_blocks_in_flight blocks
of the configured k at the largest shard size, at most 64 KiB a block) and in entries:
what rebuilding needs (data shards kept for their siblings, at most k x
max_blocks_in_flight and no longer than `block_timeout`, and the parity of blocks still
missing data, at most max_blocks_in_flight blocks), datagrams waiting for fragments, and
(ordered mode) datagrams waiting for a gap; plus fixed rings of `window` sequence
numbers. When a bound is reached the oldest entry goes, and is counted.

Counting: `blocks_rebuilt` counts blocks that needed parity (a data shard never came: a
block decoded with parity is checked again `block_timeout` later, so that data shards
that merely arrived after the parity do not count); shards that arrive for a data shard
already had or rebuilt, or parity of a block already whole, are `surplus_shards`.
`datagrams_lost` counts each datagram the application did not get, once: every data
shard carries the number of its first datagram, so a run of data shards that never came
(nor were rebuilt) is counted as exactly the datagrams with bytes in it.
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
    CODED_HEADER_SIZE,
    DATA_FRAME_TYPE,
    DATA_HEADER,
    DATA_HEADER_SIZE,
    LEGACY_FRAME_TYPE,
    MAX_DATAGRAM_SIZE,
    MAX_SHARD_PAYLOAD,
    MAX_SHARDS,
    PARITY_FRAME_TYPE,
    PARITY_HEADER,
    PARITY_HEADER_SIZE,
    SEQUENCE_MODULUS,
    STREAM_PREFIX_SIZE,
)
from warp.redundancy.stats import DecoderStats, RejectReason

_HALF = SEQUENCE_MODULUS >> 1
_MASK = SEQUENCE_MODULUS - 1
_NO_SEQUENCE = -1  # ring slot never written: no sequence number equals it
# Ring value of a data shard given up (never came, nor rebuilt, in time): its sequence
# number with this bit; a shard received or rebuilt has the bare sequence number.
_ABANDONED = SEQUENCE_MODULUS
_RETIRED_EPOCHS_KEPT = 8
# The first data shards of a stream keep a fingerprint of their bytes, so that a
# restarted sender that drew the same epoch (and numbers from 0 again) is told from
# stragglers: it sends other bytes under a sequence number already seen.
_FINGERPRINTED = 64
# Bytes 9 .. 17 of a data shard, what parity covers in front of the payload.
_CODED_HEADER = struct.Struct("!BIBBH")
_unpack_data = DATA_HEADER.unpack_from
_unpack_parity = PARITY_HEADER.unpack_from


class _Block:
    """A block whose parity came while some of its data shards are missing."""

    __slots__ = ("created", "data_shards", "extended", "parity", "parity_shards", "size")

    def __init__(
        self, data_shards: int, parity_shards: int, size: int, extended: int, created: float
    ) -> None:
        self.data_shards = data_shards
        self.parity_shards = parity_shards
        self.size = size
        self.extended = extended
        self.created = created
        self.parity: dict[int, bytes] = {}


class _PartialDatagram:
    """Fragments of a datagram, waiting for the others."""

    __slots__ = ("created", "missing", "parts", "size")

    def __init__(self, fragment_count: int, created: float) -> None:
        self.parts: list[bytes | None] = [None] * fragment_count
        self.missing = fragment_count
        self.size = 0
        self.created = created


class ShardDecoder:
    """Rebuilds one tunnel's datagrams from its data and parity shard frames.

    Sans-I/O: `receive` and `tick` take the current time and return the datagrams ready
    for the application; `next_deadline` says when `tick` must next be called.

    - `k`, `n` are this tunnel's configured geometry: they size the memory budgets. Each
      block is decoded with the geometry its parity headers carry (any k' + p <= 255).
    - Data shards more than `window` behind the highest seen are refused (`stale`):
      within the window, a ring tells one already had from a new one.
    - A data shard never seen while later ones were is given up `block_timeout` after the
      first later one arrived (unless rebuilt by then); its datagrams are counted lost.
    - `max_shard_size` (payload bytes) caps what one shard may make us hold: give it
      `max_shard_payload(mtu)` of the tunnel's MTU.
    - `ordered`: deliver in datagram-number order, holding a datagram behind a gap for at
      most `reorder_timeout`, then skipping the gap (see `ReorderBuffer`).
    - Restarts. The stream is *silent* once no new data shard came for `block_timeout`.
      A shard with a new epoch means the sender restarted: the stream state is reset and
      the new stream followed. Shards of an epoch left behind are refused while the
      current stream is not silent; after that, the old one is followed again (a
      fail-back), but never below the sequence number it had reached. A restarted sender
      that drew the same epoch is recognised while the stream is silent: by a shard a
      full `window` behind, or by one of the first data shards seen arriving again with
      other bytes (`resyncs`).

    Exactly-once delivery assumes no shard arrives a full `window` of data shards late,
    which WireGuard's replay window (8312 messages) guarantees for the default window.
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
        if window & (window - 1) or window < 2 * max_blocks_in_flight or window > _HALF:
            raise ValueError("window must be a power of two >= 2 * max_blocks_in_flight")
        if block_timeout <= 0 or reorder_timeout < 0:
            raise ValueError("timeouts must be positive")
        if not 1 <= max_shard_size <= MAX_SHARD_PAYLOAD:
            raise ValueError(f"max_shard_size must be 1 .. {MAX_SHARD_PAYLOAD}")
        self.tunnel_id = tunnel_id
        self.k = k
        self.n = n
        self.max_blocks_in_flight = max_blocks_in_flight
        self.block_timeout = block_timeout
        self.ordered = ordered
        self.reorder_timeout = reorder_timeout
        self.max_shard_size = max_shard_size
        self.window = window
        self.store_budget = max_blocks_in_flight * min(k * max_shard_size, MAX_DATAGRAM_SIZE)
        self._max_kept = max_blocks_in_flight * k
        self.stats = DecoderStats()
        # Called with the reason of every rejected shard (the node logs them, rate-limited).
        self.on_reject: Callable[[RejectReason], None] | None = None
        self._ring_mask = window - 1
        self._epoch: int | None = None
        # Epochs we followed before, with the highest sequence number seen in each.
        self._retired_epochs: OrderedDict[int, int] = OrderedDict()
        # The stream is silent from this time on: block_timeout after its last new shard.
        self._silent_from = -float("inf")
        self._reset_streams()

    def _reset_streams(self) -> None:
        window = self.window
        # Ring of data shards had (bare sequence number) or given up (| _ABANDONED).
        self._seen = array("q", [_NO_SEQUENCE]) * window
        # Per data shard had: the first datagram number it does not finish, and the last
        # one that began before it and is not finished before it (what a run of missing
        # shards next to it can hold: see `_settle_gap`).
        self._open_after = array("q", [0]) * window
        self._open_before = array("q", [0]) * window
        # Ring of datagrams counted lost, by datagram number.
        self._lost = array("q", [_NO_SEQUENCE]) * window
        # Sequence and datagram numbers are extended to unbounded integers against the
        # highest seen, so ordering and windows never deal with wrap-around.
        self._highest_raw = 0
        self._highest: int | None = None
        self._datagram_raw = 0
        self._datagram: int | None = None
        # Sequence numbers at or below this were seen before (fail-back to an epoch).
        self._floor: float = -float("inf")
        # Data shards had, kept to rebuild their siblings: raw seq -> (time, coded bytes).
        self._kept: OrderedDict[int, tuple[float, bytes]] = OrderedDict()
        self._kept_bytes = 0
        # Blocks with parity but missing data, by raw first sequence number.
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self._block_bytes = 0
        # Ring of blocks finished (all data had or rebuilt), by first sequence number.
        self._finished = array("q", [_NO_SEQUENCE]) * window
        self._partials: OrderedDict[int, _PartialDatagram] = OrderedDict()
        self._partial_bytes = 0
        # Blocks decoded with parity -> bits of the data positions still missing; checked
        # at the time queued in `_repair_checks` (data often just arrives after parity).
        self._unconfirmed: dict[int, int] = {}
        self._repair_checks: deque[tuple[float, int]] = deque()
        # Runs of unseen data shards: (settle time, first, last), extended.
        self._gaps: deque[tuple[float, int, int]] = deque()
        self._fingerprint_until: int | None = None
        self._early: dict[int, int] = {}
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
        for number in self._partials:
            self._count_lost(number)
        while self._gaps:
            self._settle_gap(self._gaps.popleft())
        self._settle_repairs(float("inf"))
        self._reset_streams()
        return flushed

    # ---- receiving -------------------------------------------------------------------

    def receive(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        """Take one shard frame; return the datagrams it completes (usually a few)."""
        kind = frame[0] if frame else -1
        if kind == DATA_FRAME_TYPE:
            return self._receive_data(frame, now)
        if kind == PARITY_FRAME_TYPE:
            return self._receive_parity(frame, now)
        if kind == LEGACY_FRAME_TYPE:
            return self._reject(RejectReason.LEGACY)
        return self._reject(RejectReason.SHORT if kind < 0 else RejectReason.NOT_SHARD)

    def _receive_data(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        try:
            (_, tunnel_id, epoch, seq, position, number, frag_index, frag_count, length) = (
                _unpack_data(frame)
            )
        except struct.error:
            return self._reject(RejectReason.SHORT)
        if tunnel_id != self.tunnel_id:
            return self._reject(RejectReason.TUNNEL)
        if position >= MAX_SHARDS:
            return self._reject(RejectReason.INDEX)
        if frag_index >= frag_count:
            return self._reject(RejectReason.FRAGMENT)
        end = DATA_HEADER_SIZE + length
        if length == 0 or length > self.max_shard_size or len(frame) < end:
            return self._reject(RejectReason.LENGTH)
        flushed = self._switch_epoch(epoch, now)
        if flushed is None:
            return []
        slot = seq & self._ring_mask
        state = self._seen[slot]
        if state == seq or state == seq | _ABANDONED:
            if now >= self._silent_from and self._restarted(frame, seq, end):
                return flushed + self._restart(frame, now)
            if state == seq:
                self.stats.surplus_shards += 1
                self._confirm(seq, position)
            else:
                self.stats.late_shards += 1
            return flushed
        extended = self._extend(seq)
        if extended is None:
            # A full window behind is no straggler of this stream (WireGuard's replay
            # window drops anything that late): a restarted sender drew an epoch we
            # know. Follow it once the old stream is silent.
            far_behind = max(self._highest or 0, self._floor) - self._behind(seq) >= self.window
            if far_behind and now >= self._silent_from:
                return flushed + self._restart(frame, now)
            return flushed + self._reject(RejectReason.STALE)
        coded = bytes(frame[STREAM_PREFIX_SIZE:end])
        out = self._accept(
            seq, extended, position, number, frag_index, frag_count, coded, now, True
        )
        if flushed:
            return flushed + out
        return out

    def _accept(
        self,
        seq: int,
        extended: int,
        position: int,
        number: int,
        frag_index: int,
        frag_count: int,
        coded: bytes,
        now: float,
        arrived: bool,
    ) -> list[bytes]:
        """A data shard not had before (arrived, or rebuilt), `extended` its sequence
        number within the window: deliver what it completes."""
        records: list[bytes] | None = None
        if frag_count == 1:
            records = _split_records(coded, CODED_HEADER_SIZE)
            if records is None:
                return self._reject(RejectReason.LENGTH)
        highest = self._highest
        if highest is None:
            self._highest = extended
            self._highest_raw = seq
        elif extended > highest:
            self._highest = extended
            self._highest_raw = seq
            if extended > highest + 1:
                self._note_gap(highest + 1, extended - 1, now)
        slot = seq & self._ring_mask
        self._seen[slot] = seq
        number = self._extend_datagram(number)
        if records is not None:
            self._open_before[slot] = number - 1
            self._open_after[slot] = number + len(records)
        else:
            self._open_before[slot] = number if frag_index else number - 1
            self._open_after[slot] = number + 1 if frag_index == frag_count - 1 else number
        if arrived:
            self._silent_from = now + self.block_timeout
            self._keep(seq, coded, now)
        if self._fingerprint_until is None:
            self._fingerprint_until = extended + _FINGERPRINTED
        if extended < self._fingerprint_until:
            self._early[seq] = hash(coded)
        out: list[bytes] = []
        if records is not None:
            for offset, datagram in enumerate(records):
                self._deliver(number + offset, datagram, now, out)
        else:
            self._add_fragment(number, frag_index, frag_count, coded, now, out)
        first = (seq - position) & _MASK
        block = self._blocks.get(first)
        if block is not None and arrived:
            out += self._try_rebuild(first, block, now)
        return out

    def _deliver(self, number: int, datagram: bytes, now: float, out: list[bytes]) -> None:
        if self._reorder is not None:
            out += self._reorder.offer(number, 1, datagram, now)
        else:
            self.stats.datagrams_delivered += 1
            out.append(datagram)

    def _behind(self, seq: int) -> int:
        """`seq` extended as at or behind the highest sequence number seen."""
        highest = self._highest
        if highest is None:
            return seq
        delta = (seq - self._highest_raw) & _MASK
        return highest + delta - SEQUENCE_MODULUS if delta else highest

    def _extend(self, seq: int) -> int | None:
        """A sequence number extended against the highest seen; None if it is too far
        behind to be told apart from one already had (or below a fail-back floor)."""
        highest = self._highest
        if highest is None:
            return seq
        delta = (seq - self._highest_raw) & _MASK
        if 0 < delta < _HALF:
            return highest + delta
        extended = highest + delta - SEQUENCE_MODULUS if delta else highest
        if highest - extended >= self.window or extended <= self._floor:
            return None
        return extended

    def _extend_datagram(self, raw: int) -> int:
        highest = self._datagram
        if highest is None:
            self._datagram = self._datagram_raw = raw
            return raw
        delta = (raw - self._datagram_raw) & _MASK
        if delta < _HALF:
            self._datagram = highest + delta
            self._datagram_raw = raw
            return highest + delta
        return highest + delta - SEQUENCE_MODULUS

    def _keep(self, seq: int, coded: bytes, now: float) -> None:
        """Keep a data shard to rebuild its siblings with parity; oldest out first (and
        `tick` drops those older than block_timeout)."""
        kept = self._kept
        kept[seq] = (now, coded)
        self._kept_bytes += len(coded)
        budget = self.store_budget - self._block_bytes  # one budget with the parity held
        while len(kept) > self._max_kept or self._kept_bytes > budget:
            _, (_, oldest) = kept.popitem(last=False)
            self._kept_bytes -= len(oldest)

    def _confirm(self, seq: int, position: int) -> None:
        """A data shard came after its block was rebuilt: for that one it was no repair."""
        unconfirmed = self._unconfirmed
        if not unconfirmed:
            return
        first = (seq - position) & _MASK
        missing = unconfirmed.get(first)
        bit = 1 << position
        if missing is not None and missing & bit:
            if missing == bit:
                del unconfirmed[first]
            else:
                unconfirmed[first] = missing ^ bit

    def _add_fragment(
        self,
        number: int,
        frag_index: int,
        frag_count: int,
        coded: bytes,
        now: float,
        out: list[bytes],
    ) -> None:
        partials = self._partials
        partial = partials.get(number)
        if partial is None:
            while partials and len(partials) >= self.max_blocks_in_flight:
                self._drop_partial(next(iter(partials)))
            partial = partials[number] = _PartialDatagram(frag_count, now)
        elif len(partial.parts) != frag_count or partial.parts[frag_index] is not None:
            self._reject(RejectReason.INCONSISTENT)
            return
        data = coded[CODED_HEADER_SIZE:]
        partial.parts[frag_index] = data
        partial.missing -= 1
        partial.size += len(data)
        self._partial_bytes += len(data)
        if partial.size > MAX_DATAGRAM_SIZE:
            self._drop_partial(number)
            self._reject(RejectReason.LENGTH)
            return
        if partial.missing:
            while self._partial_bytes > self.store_budget:
                oldest = next(iter(partials))
                self._drop_partial(oldest)
                if oldest == number:
                    break
            return
        del partials[number]
        self._partial_bytes -= partial.size
        self._deliver(number, b"".join(partial.parts), now, out)  # type: ignore[arg-type]

    def _drop_partial(self, number: int) -> None:
        partial = self._partials.pop(number)
        self._partial_bytes -= partial.size
        self.stats.datagrams_incomplete += 1
        self._count_lost(number)

    # ---- parity ------------------------------------------------------------------------

    def _receive_parity(self, frame: bytes | bytearray | memoryview, now: float) -> list[bytes]:
        try:
            (_, tunnel_id, epoch, first, data_shards, parity_shards, index, size) = _unpack_parity(
                frame
            )
        except struct.error:
            return self._reject(RejectReason.SHORT)
        if tunnel_id != self.tunnel_id:
            return self._reject(RejectReason.TUNNEL)
        if data_shards == 0 or not 0 < parity_shards <= MAX_SHARDS - data_shards:
            return self._reject(RejectReason.GEOMETRY)
        if index >= parity_shards:
            return self._reject(RejectReason.INDEX)
        end = PARITY_HEADER_SIZE + size
        if (
            size <= CODED_HEADER_SIZE
            or size > self.max_shard_size + CODED_HEADER_SIZE
            or len(frame) < end
        ):
            return self._reject(RejectReason.LENGTH)
        flushed = self._switch_epoch(epoch, now)
        if flushed is None:
            return []
        if self._finished[first & self._ring_mask] == first:
            self.stats.surplus_shards += 1
            return flushed
        block = self._blocks.get(first)
        if block is None:
            extended = self._extend(first)
            if extended is None:
                return flushed + self._reject(RejectReason.STALE)
            if self._all_data_had(first, data_shards):
                # The usual case on a clean link: no block to hold, the parity is surplus.
                # (_extend placed `first` within the window.)
                self._finished[first & self._ring_mask] = first
                self.stats.blocks_decoded += 1
                self.stats.surplus_shards += 1
                return flushed
            block = _Block(data_shards, parity_shards, size, extended, now)
            self._blocks[first] = block
            self._block_bytes += size  # the budget counts each block as holding one more
            self._evict_blocks(first)
        elif (block.data_shards, block.parity_shards, block.size) != (
            data_shards,
            parity_shards,
            size,
        ):
            return flushed + self._reject(RejectReason.INCONSISTENT)
        if index in block.parity:
            self.stats.duplicates += 1
            return flushed
        block.parity[index] = bytes(frame[PARITY_HEADER_SIZE:end])
        self._block_bytes += size
        self._evict_blocks(first)
        return flushed + self._try_rebuild(first, block, now)

    def _all_data_had(self, first: int, data_shards: int) -> bool:
        seen = self._seen
        ring_mask = self._ring_mask
        for position in range(data_shards):
            seq = (first + position) & _MASK
            if seen[seq & ring_mask] != seq:
                return False
        return True

    def _evict_blocks(self, keep: int) -> None:
        """Make room for parity: kept data shards go first, then the oldest blocks."""
        kept = self._kept
        while kept and self._kept_bytes + self._block_bytes > self.store_budget:
            _, (_, coded) = kept.popitem(last=False)
            self._kept_bytes -= len(coded)
        blocks = self._blocks
        while len(blocks) > self.max_blocks_in_flight or self._block_bytes > self.store_budget:
            first = next(iter(blocks))
            if first == keep:
                break
            self._drop_block(first)
            self.stats.blocks_evicted += 1

    def _drop_block(self, first: int) -> None:
        block = self._blocks.pop(first)
        self._block_bytes -= block.size * (len(block.parity) + 1)

    def _try_rebuild(self, first: int, block: _Block, now: float) -> list[bytes]:
        """Finish the block if its data is all had; rebuild the missing data shards once
        any k' of its shards are here."""
        seen = self._seen
        ring_mask = self._ring_mask
        kept = self._kept
        size = block.size
        missing: list[int] = []
        pieces: list[bytes] = []
        numbers: list[int] = []
        for position in range(block.data_shards):
            seq = (first + position) & _MASK
            if seen[seq & ring_mask] != seq:
                missing.append(position)
                continue
            entry = kept.get(seq)
            if entry is not None and len(entry[1]) <= size:
                pieces.append(entry[1].ljust(size, b"\0"))
                numbers.append(position)
        if not missing:
            self._finish(first, block)
            self.stats.surplus_shards += len(block.parity)
            self.stats.blocks_decoded += 1
            return []
        needed = block.data_shards - len(pieces)
        if len(block.parity) < needed:
            return []
        for index, piece in list(block.parity.items())[:needed]:
            pieces.append(piece)
            numbers.append(block.data_shards + index)
        code: Any = zfec_decoder(block.data_shards, block.data_shards + block.parity_shards)
        rebuilt = code.decode(pieces, numbers)
        self._finish(first, block)
        stats = self.stats
        stats.blocks_decoded += 1
        stats.decode_calls += 1
        stats.surplus_shards += len(block.parity) - needed
        self._unconfirmed[first] = sum(1 << position for position in missing)
        checks = self._repair_checks
        checks.append((now + self.block_timeout, first))
        if len(checks) > self.window:
            self._settle_repairs(checks[0][0])
        out: list[bytes] = []
        for position in missing:
            coded = bytes(rebuilt[position])
            fields = _CODED_HEADER.unpack_from(coded)
            at, number, frag_index, frag_count, length = fields
            if (
                at != position
                or frag_index >= frag_count
                or length == 0
                or length > size - CODED_HEADER_SIZE
            ):
                self._reject(RejectReason.INCONSISTENT)
                continue
            seq = (first + position) & _MASK
            extended = self._extend(seq)
            if extended is None or seen[seq & ring_mask] == seq | _ABANDONED:
                # Given up (and its datagrams counted lost) before the parity came.
                self.stats.late_shards += 1
                continue
            coded = coded[: CODED_HEADER_SIZE + length]
            out += self._accept(
                seq, extended, position, number, frag_index, frag_count, coded, now, False
            )
        return out

    def _finish(self, first: int, block: _Block) -> None:
        self._drop_block(first)
        if self._highest is None or self._highest - block.extended < self.window:
            self._finished[first & self._ring_mask] = first

    # ---- streams and restarts ------------------------------------------------------------

    def _switch_epoch(self, epoch: int, now: float) -> list[bytes] | None:
        """A shard of ``epoch``: nothing to do for the current one ([]); another one is
        followed (what the old stream held is returned) or, while the stream we follow is
        alive and it is one we left, refused (None)."""
        if epoch == self._epoch:
            return []
        if epoch in self._retired_epochs and now < self._silent_from:
            # A straggler from before a restart, or a second sender instance fighting
            # the current one: the stream we follow is alive, keep it.
            self._reject(RejectReason.STALE_EPOCH)
            return None
        flushed: list[bytes] = []
        if self._epoch is not None:
            self.stats.epoch_changes += 1
            # Remember how far the retired stream got: should it come back (a fail-back),
            # nothing at or below that is taken again.
            if self._highest is not None:
                self._retired_epochs[self._epoch] = self._highest_raw
            while len(self._retired_epochs) > _RETIRED_EPOCHS_KEPT:
                self._retired_epochs.popitem(last=False)
            flushed = self.reset()
        floor = self._retired_epochs.pop(epoch, None)
        if floor is not None:
            self._highest_raw = self._highest = floor
            self._floor = floor
            self._silent_from = now + self.block_timeout
        self._epoch = epoch
        return flushed

    def _restarted(self, frame: bytes | bytearray | memoryview, seq: int, end: int) -> bool:
        """Whether a data shard already had, arriving while the stream is silent, comes
        from a restarted sender that drew the same epoch: other bytes than we had."""
        seen = self._early.get(seq)
        return seen is not None and seen != hash(bytes(frame[STREAM_PREFIX_SIZE:end]))

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

    # ---- loss ----------------------------------------------------------------------------

    def _count_lost(self, number: int) -> None:
        """Datagram `number` will not be delivered: count it once."""
        slot = number & self._ring_mask
        if self._lost[slot] != number:
            self._lost[slot] = number
            self.stats.datagrams_lost += 1

    def _note_gap(self, first: int, last: int, now: float) -> None:
        """Data shards first .. last are not seen (yet): settle them later."""
        if last - first >= self.window:
            # A jump beyond the ring: what it cannot track is lost, one per shard.
            self.stats.datagrams_lost += last - first + 1 - self.window
            first = last - self.window + 1
        gaps = self._gaps
        gaps.append((now + self.block_timeout, first, last))
        if len(gaps) > self.max_blocks_in_flight:
            self._settle_gap(gaps.popleft())

    def _settle_gap(self, gap: tuple[float, int, int]) -> None:
        """Give up the data shards of a gap still unseen; count the datagrams they held:
        those between what the shard before a run of them finished and what the shard
        after it continues (both were had: runs are bounded by shards seen)."""
        _, first, last = gap
        seen = self._seen
        mask = self._ring_mask
        highest = self._highest
        run_start: int | None = None
        for extended in range(first, last + 2):
            seq = extended & _MASK
            state = seen[extended & mask] if extended <= last else seq
            if state == seq or state == seq | _ABANDONED:
                if run_start is not None:
                    self._count_run(run_start, extended - 1)
                    run_start = None
                continue
            if highest is not None and highest - extended < self.window:
                seen[extended & mask] = seq | _ABANDONED
            if run_start is None:
                run_start = extended
        # (the loop's last step closes any run)

    def _count_run(self, start: int, end: int) -> None:
        mask = self._ring_mask
        before, after = start - 1, end + 1
        if (
            self._seen[before & mask] == before & _MASK
            and self._seen[after & mask] == after & _MASK
        ):
            low = self._open_after[before & mask]
            high = self._open_before[after & mask]
            if low <= high:
                # Only the first and last can have bytes outside the run too (a fragmented
                # datagram across a shard had): those are counted once through the ring.
                self._count_lost(low)
                if high > low:
                    self._count_lost(high)
                    self.stats.datagrams_lost += high - low - 1
        else:  # a neighbour fell out of the ring: one per shard
            self.stats.datagrams_lost += end - start + 1

    def _settle_repairs(self, now: float) -> None:
        checks = self._repair_checks
        unconfirmed = self._unconfirmed
        while checks and checks[0][0] <= now:
            _, first = checks.popleft()
            if unconfirmed.pop(first, 0):
                self.stats.blocks_rebuilt += 1

    # ---- time --------------------------------------------------------------------------

    def tick(self, now: float) -> list[bytes]:
        """Give up blocks and datagrams past their timeouts, settle repair checks and
        unseen shards; in ordered mode, skip gaps that have been waited on for
        `reorder_timeout` and return what that releases."""
        timeout = self.block_timeout
        blocks = self._blocks
        while blocks and next(iter(blocks.values())).created + timeout <= now:
            self._drop_block(next(iter(blocks)))
            self.stats.blocks_expired += 1
        partials = self._partials
        while partials and next(iter(partials.values())).created + timeout <= now:
            self._drop_partial(next(iter(partials)))
        gaps = self._gaps
        while gaps and gaps[0][0] <= now:
            self._settle_gap(gaps.popleft())
        kept = self._kept
        while kept and next(iter(kept.values()))[0] + timeout <= now:
            _, (_, coded) = kept.popitem(last=False)
            self._kept_bytes -= len(coded)
        self._settle_repairs(now)
        return self._reorder.tick(now) if self._reorder is not None else []

    def next_deadline(self) -> float | None:
        """When `tick` must next run, or None if nothing is waiting."""
        deadline: float | None = None
        timeout = self.block_timeout
        for block in self._blocks.values():
            deadline = block.created + timeout
            break
        for partial in self._partials.values():
            t = partial.created + timeout
            if deadline is None or t < deadline:
                deadline = t
            break
        if self._gaps:
            t = self._gaps[0][0]
            if deadline is None or t < deadline:
                deadline = t
        if self._repair_checks:
            # Checks may wait one more block_timeout: one tick settles a second's worth.
            t = self._repair_checks[0][0] + timeout
            if deadline is None or t < deadline:
                deadline = t
        reorder = self._reorder
        if reorder is not None:
            held_until = reorder.deadline()
            if held_until is not None and (deadline is None or held_until < deadline):
                deadline = held_until
        # Kept data shards are bounded in number and bytes, and any tick drops the old
        # ones: they need no timer of their own.
        return deadline

    # ---- introspection -----------------------------------------------------------------

    @property
    def blocks_in_flight(self) -> int:
        """Blocks waiting for shards to rebuild their missing data."""
        return len(self._blocks)

    def buffered_bytes(self) -> int:
        """Payload bytes currently held (walks the buffers: for tests and status)."""
        total = sum(len(coded) for _, coded in self._kept.values())
        total += sum(len(p) for block in self._blocks.values() for p in block.parity.values())
        total += sum(len(p) for d in self._partials.values() for p in d.parts if p is not None)
        if self._reorder is not None:
            total += self._reorder.held_bytes()
        return total

    @property
    def memory_bound(self) -> int:
        """Most payload bytes this decoder can hold, whatever the peer sends: three stores
        of `store_budget` bytes (what rebuilding needs, fragments, ordered mode), plus one
        entry larger than a whole budget."""
        return 3 * self.store_budget + MAX_DATAGRAM_SIZE


def _split_records(coded: bytes, offset: int) -> list[bytes] | None:
    """The datagrams of a packed payload (records: 2-byte length, bytes), or None if the
    records do not fill the payload exactly or one is empty."""
    end = len(coded)
    if end - offset >= 2 and (coded[offset] << 8) | coded[offset + 1] == end - offset - 2 > 0:
        return [coded[offset + 2 :]]  # the usual case: one datagram
    records = []
    while offset < end:
        if offset + 2 > end:
            return None
        length = (coded[offset] << 8) | coded[offset + 1]
        offset += 2
        if length == 0 or offset + length > end:
            return None
        records.append(coded[offset : offset + length])
        offset += length
    return records or None
