"""Shard frame layout: the fixed header every shard carries, and its parser.

Layout (network byte order, 16 bytes, then the payload)::

    0  B  frame type (FrameType.SHARD = 0x01)
    1  H  tunnel id
    3  H  stream epoch (random per sender instance: a restarted sender is recognised)
    5  B  k (required shards)
    6  B  n (total shards)
    7  B  shard index (0 .. n-1; 0 .. k-1 are the data shards)
    8  I  block sequence number (per tunnel, wraps modulo 2**32)
   12  B  fragment index (block's position within its datagram)
   13  B  fragment count (blocks in the datagram, 1 .. 255)
   14  H  block length (datagram bytes carried by this block, 1 .. 65535)
   16  ..  payload: exactly ceil(block length / k) bytes

Bytes 0-6 are the same for every shard of a stream, so the receiver checks them with one
integer compare (see the decoder's grouped view of the header).

The payload length is derived from the header, never from the datagram length: WireGuard
zero-pads plaintexts to a multiple of 16, so bytes after the payload are ignored.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from warp.frames import FrameType

SHARD_HEADER = struct.Struct("!BHHBBBIBBH")
SHARD_HEADER_SIZE = SHARD_HEADER.size  # 16
WIREGUARD_OVERHEAD = 32  # transport message: 16 B header + 16 B Poly1305 tag
WIREGUARD_PADDING_MULTIPLE = 16
MAX_DATAGRAM_SIZE = 65535
MAX_FRAGMENTS = 255
MAX_SHARDS = 255
SEQUENCE_MODULUS = 1 << 32
# Largest payload a shard can describe: a 65535-byte block with k = 1.
MAX_SHARD_PAYLOAD = MAX_DATAGRAM_SIZE

SHARD_FRAME_TYPE = int(FrameType.SHARD)

assert SHARD_HEADER_SIZE == 16


class ShardHeader(NamedTuple):
    """A parsed shard header (the decoder unpacks inline; this is for routing and tests)."""

    tunnel_id: int
    epoch: int
    block_seq: int
    shard_index: int
    k: int
    n: int
    fragment_index: int
    fragment_count: int
    block_length: int

    @property
    def payload_size(self) -> int:
        return shard_payload_size(self.block_length, self.k)


def shard_payload_size(block_length: int, k: int) -> int:
    """Every shard of a block carries ceil(block_length / k) bytes (the last data shard
    is zero-padded); both ends derive it the same way, so it is not on the wire."""
    return -(-block_length // k)


def max_frame_size(mtu: int) -> int:
    """Largest shard frame (header + payload) for a tunnel whose UDP payloads must fit `mtu`.

    Rounded down to a multiple of 16 so that WireGuard's padding of the plaintext to a
    multiple of 16 can never push a full-size shard past the MTU.
    """
    plaintext = mtu - WIREGUARD_OVERHEAD
    return plaintext - plaintext % WIREGUARD_PADDING_MULTIPLE


def max_shard_payload(mtu: int) -> int:
    """Largest shard payload for `mtu` (see `max_frame_size`)."""
    return max_frame_size(mtu) - SHARD_HEADER_SIZE


def shard_tunnel_id(frame: bytes | bytearray | memoryview) -> int | None:
    """Tunnel id of a shard frame, for routing it to that tunnel's decoder.

    None when the frame is not a shard or is too short to hold a shard header.
    """
    if len(frame) < SHARD_HEADER_SIZE or frame[0] != SHARD_FRAME_TYPE:
        return None
    return (frame[1] << 8) | frame[2]


def parse_shard_header(frame: bytes | bytearray | memoryview) -> ShardHeader | None:
    """Parse and structurally validate a shard header; None if it is not a valid shard.

    Checks only what a header alone can tell (type, geometry 1 <= k <= n, indexes, fragment
    numbering, that the payload is present). Any such (k, n) is valid: the decoder follows
    each block's own geometry, and checks that a block's shards agree.
    """
    if len(frame) < SHARD_HEADER_SIZE:
        return None
    (frame_type, tunnel_id, epoch, k, n, index, seq, frag_index, frag_count, block_length) = (
        SHARD_HEADER.unpack_from(frame)
    )
    if (
        frame_type != SHARD_FRAME_TYPE
        or not 1 <= k <= n
        or index >= n
        or frag_index >= frag_count
        or block_length == 0
        or len(frame) < SHARD_HEADER_SIZE + shard_payload_size(block_length, k)
    ):
        return None
    return ShardHeader(tunnel_id, epoch, seq, index, k, n, frag_index, frag_count, block_length)
