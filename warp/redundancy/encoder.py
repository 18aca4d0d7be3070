"""Sender side: a datagram becomes blocks, each block becomes n shard frames."""

from __future__ import annotations

import secrets
import struct
from typing import Any, NamedTuple

from warp.redundancy.codec import zfec_encoder
from warp.redundancy.shard import (
    MAX_DATAGRAM_SIZE,
    MAX_FRAGMENTS,
    MAX_SHARDS,
    SEQUENCE_MODULUS,
    SHARD_FRAME_TYPE,
    SHARD_HEADER,
    max_shard_payload,
)

# One block's frames, indexed by shard index: frames[i] carries shard i (0 .. k-1 data).
BlockFrames = list[bytes]

# Header bytes 8-15: block sequence, fragment index, fragment count, block length.
_BLOCK_TAIL = struct.Struct("!IBBH")
assert SHARD_HEADER.size == 8 + _BLOCK_TAIL.size
_SEQUENCE_MASK = SEQUENCE_MODULUS - 1
_ZEROS = [bytes(size) for size in range(MAX_SHARDS)]  # padding is at most k - 1 bytes


def validate_geometry(k: int, n: int) -> None:
    if not 1 <= k <= n <= MAX_SHARDS:
        raise ValueError(f"need 1 <= k <= n <= {MAX_SHARDS}, got k={k} n={n}")


class ShardEncoder:
    """Turns one tunnel's datagrams into shard frames.

    Each block holds `k` data shards (the datagram bytes, the last one zero-padded) and
    `n - k` zfec parity shards; any `k` of the `n` rebuild it. A datagram larger than one
    block's capacity is split into up to 255 blocks of near-equal size, with consecutive
    sequence numbers. Every frame is at most `max_frame_size(mtu)` <= mtu - 32 bytes.
    """

    __slots__ = (
        "_codes",
        "_epoch",
        "_next_seq",
        "block_capacity",
        "blocks_encoded",
        "k",
        "max_payload",
        "n",
        "tunnel_id",
    )

    def __init__(
        self,
        tunnel_id: int,
        k: int,
        n: int,
        mtu: int,
        *,
        epoch: int | None = None,
        initial_seq: int = 0,
    ) -> None:
        validate_geometry(k, n)
        if not 0 <= tunnel_id <= 0xFFFF:
            raise ValueError(f"tunnel_id must fit 16 bits, got {tunnel_id}")
        self.tunnel_id = tunnel_id
        self.k = k
        self.n = n
        self.max_payload = max_shard_payload(mtu)
        self.block_capacity = k * self.max_payload
        # Header fields are 8-bit: a 65535-byte datagram must fit in 255 blocks.
        if self.max_payload <= 0 or -(-MAX_DATAGRAM_SIZE // self.block_capacity) > MAX_FRAGMENTS:
            raise ValueError(f"mtu {mtu} is too small for k={k}")
        self._epoch = secrets.randbits(16) if epoch is None else epoch & 0xFFFF
        self._next_seq = initial_seq % SEQUENCE_MODULUS
        self._codes: dict[int, _Code] = {}  # by n: at most 255 entries
        self._code(n)
        self.blocks_encoded = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def encode(
        self, datagram: bytes | bytearray | memoryview, n: int | None = None
    ) -> list[BlockFrames]:
        """Shard frames of `datagram` (1 .. 65535 bytes), one list of n frames per block.

        `n` (k <= n <= 255) overrides the configured shard count for these blocks: the
        sender adds parity while its uplinks are too few for the configured code. Each
        shard's header carries the block's (k, n)."""
        length = len(datagram)
        if not 0 < length <= MAX_DATAGRAM_SIZE:
            raise ValueError(f"datagram length must be 1..{MAX_DATAGRAM_SIZE}, got {length}")
        shards = self.n if n is None else n
        code = self._codes.get(shards) or self._code(shards)
        if length <= self.block_capacity:
            return [self._encode_block(code, datagram, length, 0, 1)]
        block_count = -(-length // self.block_capacity)
        # Near-equal blocks rather than full ones plus a runt: shards stay alike in size.
        base, extra = divmod(length, block_count)
        view = memoryview(datagram)
        blocks = []
        offset = 0
        for fragment_index in range(block_count):
            block_length = base + 1 if fragment_index < extra else base
            chunk = view[offset : offset + block_length]
            offset += block_length
            blocks.append(
                self._encode_block(code, chunk, block_length, fragment_index, block_count)
            )
        return blocks

    def _code(self, n: int) -> _Code:
        """Encoder and shard headers for blocks of n shards (built once per n)."""
        k = self.k
        validate_geometry(k, n)
        # The first 8 header bytes of shard i never change for this encoder and n.
        heads = [
            SHARD_HEADER.pack(SHARD_FRAME_TYPE, self.tunnel_id, self._epoch, k, n, i, 0, 0, 0, 0)[
                :8
            ]
            for i in range(n)
        ]
        code = _Code(zfec_encoder(k, n) if n > k else None, tuple(range(k, n)), heads)
        self._codes[n] = code
        return code

    def _encode_block(
        self,
        code: _Code,
        data: bytes | bytearray | memoryview,
        block_length: int,
        fragment_index: int,
        fragment_count: int,
    ) -> BlockFrames:
        k = self.k
        shard_size = -(-block_length // k)
        padding = shard_size * k - block_length
        if padding:
            data = b"".join((data, _ZEROS[padding]))
        seq = self._next_seq
        self._next_seq = (seq + 1) & _SEQUENCE_MASK
        self.blocks_encoded += 1
        pieces: list[bytes | bytearray | memoryview]
        if k == 1:
            pieces = [data]
        else:
            view = memoryview(data)
            pieces = [view[i : i + shard_size] for i in range(0, k * shard_size, shard_size)]
        if code.encoder is not None:
            pieces += code.encoder.encode(pieces, code.parity_numbers)
        # Header = per-index constant (type, tunnel, epoch, k, n, index) + per-block tail.
        tail = _BLOCK_TAIL.pack(seq, fragment_index, fragment_count, block_length)
        return [head + tail + piece for head, piece in zip(code.heads, pieces, strict=True)]


class _Code(NamedTuple):
    """What encoding a block of n shards needs: zfec's encoder (None without parity), the
    parity shard numbers and each shard index's constant header bytes."""

    encoder: Any
    parity_numbers: tuple[int, ...]
    heads: list[bytes]
