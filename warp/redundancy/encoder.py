"""Sender side: datagrams become data shards at once; parity follows per block."""

from __future__ import annotations

import secrets
from typing import Any

from warp.redundancy.codec import zfec_encoder
from warp.redundancy.shard import (
    DATA_FRAME_TYPE,
    DATA_HEADER,
    MAX_DATAGRAM_SIZE,
    MAX_FRAGMENTS,
    MAX_SHARDS,
    PARITY_FRAME_TYPE,
    PARITY_HEADER,
    RECORD_HEADER_SIZE,
    SEQUENCE_MODULUS,
    STREAM_PREFIX_SIZE,
    max_shard_payload,
)

# A frame to send and its slot in its block's n-shard layout: data position 0 .. k-1,
# parity k .. n-1 (also for a block closed early with fewer data shards, so that each
# slot goes where the scheduler placed it and no path carries more than n - k of a block).
Emission = tuple[int, bytes]

_SEQUENCE_MASK = SEQUENCE_MODULUS - 1
DEFAULT_WINDOW = 0.001


def validate_geometry(k: int, n: int) -> None:
    if not 1 <= k <= n <= MAX_SHARDS:
        raise ValueError(f"need 1 <= k <= n <= {MAX_SHARDS}, got k={k} n={n}")


class ShardEncoder:
    """Turns one tunnel's datagrams into data shards, and each block of them into parity.

    Systematic and immediate: `push` packs datagrams into the open data shard (a record
    each: 2-byte length, bytes) and returns every data shard that filled; a datagram
    larger than one shard goes out as near-equal fragments over consecutive data shards.
    `flush` ends a send batch: the partly packed shard goes out too, so packing never
    delays a datagram. A block is the next k data shards; its n - k parity shards go out
    as soon as it has k, or when `close_due` finds it open for `window` seconds (then
    with k' < k data shards and the same n - k parity: protection never drops).

    Every frame is at most `max_frame_size(mtu)` <= mtu - 32 bytes. Sans-I/O: the caller
    passes the time and calls `close_due` at `next_deadline`.
    """

    __slots__ = (
        "_block",
        "_block_first",
        "_block_opened",
        "_block_parity",
        "_datagram",
        "_epoch",
        "_n_next",
        "_next_seq",
        "_packed",
        "_packed_count",
        "_packed_first",
        "_packed_size",
        "_prefix",
        "blocks_encoded",
        "capacity",
        "k",
        "n",
        "tunnel_id",
        "window",
    )

    def __init__(
        self,
        tunnel_id: int,
        k: int,
        n: int,
        mtu: int,
        *,
        window: float = DEFAULT_WINDOW,
        epoch: int | None = None,
        initial_seq: int = 0,
        initial_datagram: int = 0,
    ) -> None:
        validate_geometry(k, n)
        if not 0 <= tunnel_id <= 0xFFFF:
            raise ValueError(f"tunnel_id must fit 16 bits, got {tunnel_id}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.tunnel_id = tunnel_id
        self.k = k
        self.n = n
        self.window = window
        self.capacity = max_shard_payload(mtu)
        # Header fields are 8-bit: a 65535-byte datagram must fit in 255 fragments.
        if self.capacity <= RECORD_HEADER_SIZE or (
            -(-MAX_DATAGRAM_SIZE // self.capacity) > MAX_FRAGMENTS
        ):
            raise ValueError(f"mtu {mtu} is too small")
        self._epoch = secrets.randbits(16) if epoch is None else epoch & 0xFFFF
        self._prefix = bytes([DATA_FRAME_TYPE]) + tunnel_id.to_bytes(2) + self._epoch.to_bytes(2)
        self._next_seq = initial_seq % SEQUENCE_MODULUS
        self._datagram = initial_datagram % SEQUENCE_MODULUS
        self._n_next = n
        # Datagram records waiting in the open data shard (sent by `flush` at the latest).
        self._packed: list[bytes | bytearray | memoryview] = []
        self._packed_count = 0
        self._packed_size = 0
        self._packed_first = 0
        # The open block: its data shards' bytes from offset 9 (what parity covers).
        self._block: list[bytes] = []
        self._block_first = 0
        self._block_parity = n - k
        self._block_opened = 0.0
        self.blocks_encoded = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def next_datagram(self) -> int:
        return self._datagram

    def push(
        self, datagram: bytes | bytearray | memoryview, now: float, n: int | None = None
    ) -> list[Emission]:
        """Take a datagram (1 .. 65535 bytes); return the frames ready to go.

        `n` (k <= n <= 255) is the shard count of blocks opened from now on: the sender
        adds parity while its uplinks are too few for the configured code, or adapts it
        to the loss. Call `flush` once the batch of datagrams to send now is pushed."""
        length = len(datagram)
        if not 0 < length <= MAX_DATAGRAM_SIZE:
            raise ValueError(f"datagram length must be 1..{MAX_DATAGRAM_SIZE}, got {length}")
        if n is not None:
            validate_geometry(self.k, n)
            self._n_next = n
        out: list[Emission] = []
        capacity = self.capacity
        record = RECORD_HEADER_SIZE + length
        if record <= capacity:
            if self._packed_count and self._packed_size + record > capacity:
                self._emit_packed(now, out)
            if not self._packed_count:
                self._packed_first = self._datagram
            self._packed.append(length.to_bytes(2))
            self._packed.append(datagram)
            self._packed_count += 1
            self._packed_size += record
            self._datagram = (self._datagram + 1) & _SEQUENCE_MASK
            return out
        if self._packed_count:
            self._emit_packed(now, out)
        # (At least two: a fragment count of 1 means records. Only a datagram one or two
        # bytes short of a shard is split although its bytes would fit.)
        count = max(2, -(-length // capacity))
        # Near-equal fragments rather than full ones plus a runt.
        base, extra = divmod(length, count)
        view = memoryview(datagram)
        offset = 0
        number = self._datagram
        self._datagram = (number + 1) & _SEQUENCE_MASK
        for index in range(count):
            size = base + 1 if index < extra else base
            self._emit_data(view[offset : offset + size], number, index, count, now, out)
            offset += size
        return out

    def flush(self, now: float) -> list[Emission]:
        """End of a send batch: the partly packed data shard goes out now."""
        out: list[Emission] = []
        if self._packed_count:
            self._emit_packed(now, out)
        return out

    @property
    def block_open(self) -> bool:
        """A block has data shards out and its parity still to come (a sender pacing its
        datagrams should let the block fill before it waits: a block the window closes
        early costs n - k parity for fewer than k data shards)."""
        return bool(self._block)

    def next_deadline(self) -> float | None:
        """When the open block's window expires (`close_due` must run), or None."""
        if not self._block or not self._block_parity:
            return None
        return self._block_opened + self.window

    def close_due(self, now: float) -> list[Emission]:
        """The open block's parity, if its window has expired (else nothing)."""
        deadline = self.next_deadline()
        if deadline is None or deadline > now:
            return []
        out: list[Emission] = []
        self._close_block(out)
        return out

    def close(self) -> list[Emission]:
        """Whatever is open goes out now: the packed shard, the open block's parity (as
        its window would send it later)."""
        out: list[Emission] = []
        if self._packed_count:
            self._emit_packed(0.0, out)
        if self._block:
            self._close_block(out)
        return out

    def _emit_packed(self, now: float, out: list[Emission]) -> None:
        payload = b"".join(self._packed)
        self._packed.clear()
        self._packed_count = 0
        self._packed_size = 0
        self._emit_data(payload, self._packed_first, 0, 1, now, out)

    def _emit_data(
        self,
        payload: bytes | bytearray | memoryview,
        datagram: int,
        fragment_index: int,
        fragment_count: int,
        now: float,
        out: list[Emission],
    ) -> None:
        block = self._block
        if not block:
            self._block_first = self._next_seq
            self._block_opened = now
            self._block_parity = self._n_next - self.k
        seq = self._next_seq
        self._next_seq = (seq + 1) & _SEQUENCE_MASK
        position = len(block)
        frame = b"".join(
            (
                DATA_HEADER.pack(
                    DATA_FRAME_TYPE,
                    self.tunnel_id,
                    self._epoch,
                    seq,
                    position,
                    datagram,
                    fragment_index,
                    fragment_count,
                    len(payload),
                ),
                payload,
            )
        )
        out.append((position, frame))
        # What parity covers (nothing to keep without parity: only the count matters).
        block.append(frame[STREAM_PREFIX_SIZE:] if self._block_parity else b"")
        if len(block) == self.k:
            self._close_block(out)

    def _close_block(self, out: list[Emission]) -> None:
        block = self._block
        data_shards = len(block)
        parity = self._block_parity
        self._block = []
        self.blocks_encoded += 1
        if not parity:
            return
        size = max(len(piece) for piece in block)
        pieces = [piece if len(piece) == size else piece.ljust(size, b"\0") for piece in block]
        code: Any = zfec_encoder(data_shards, data_shards + parity)
        coded = code.encode(pieces, list(range(data_shards, data_shards + parity)))
        k = self.k
        for index, piece in enumerate(coded):
            head = PARITY_HEADER.pack(
                PARITY_FRAME_TYPE,
                self.tunnel_id,
                self._epoch,
                self._block_first,
                data_shards,
                parity,
                index,
                size,
            )
            out.append((k + index, head + piece))
