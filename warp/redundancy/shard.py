"""Block frame layouts: the data and parity shards of FEC blocks, and their parsers.

A FEC block is up to k data shards, sent the moment they are packed, then n - k parity
shards over them (see `warp.redundancy.encoder`). Both frames carry a 9-byte stream
prefix: frame type, tunnel id, stream epoch (random per sender instance), sequence.

Data shard (FrameType.DATA_SHARD = 0x04), 18 bytes, then the payload::

    0  B  frame type 0x04
    1  H  tunnel id
    3  H  stream epoch
    5  I  data sequence number (per tunnel, one per data shard, wraps modulo 2**32)
    9  B  position in its block (0 .. k-1): the block began at sequence - position
   10  I  datagram number of the first datagram with bytes in this shard (wraps)
   14  B  fragment index
   15  B  fragment count: 1 = the payload is whole datagrams, each as a record
          (H length 1 .. 65535, then its bytes); 2 .. 255 = the payload is fragment
          `fragment index` of one datagram, whose fragments are consecutive shards
   16  H  payload length
   18  ..  payload

Parity shard (FrameType.PARITY_SHARD = 0x05), 14 bytes, then the coded bytes::

    0  B  frame type 0x05
    1  H  tunnel id
    3  H  stream epoch
    5  I  data sequence number of the block's first data shard
    9  B  k': data shards in the block (1 .. 255; fewer than k when the window closed it)
   10  B  parity shards in the block (1 .. 255 - k')
   11  B  parity index (0 .. parity shards - 1)
   12  H  coded size: 9 + the longest payload of the block's data shards
   14  ..  zfec parity (share k' + parity index) of the block's data shards, each taken
           from byte 9 of its frame (position .. payload) and zero-padded to the coded size

So a rebuilt data shard is its frame again: stream prefix + the rebuilt bytes.

Lengths come from headers, never from the datagram length: WireGuard zero-pads plaintexts
to a multiple of 16, so bytes after them are ignored. The first shard type (0x01, one
datagram per block) is retired: a receiver counts it (`legacy`) and drops it.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from warp.frames import FrameType

DATA_HEADER = struct.Struct("!BHHIBIBBH")
DATA_HEADER_SIZE = DATA_HEADER.size  # 18
PARITY_HEADER = struct.Struct("!BHHIBBBH")
PARITY_HEADER_SIZE = PARITY_HEADER.size  # 14
STREAM_PREFIX_SIZE = 9  # type, tunnel, epoch, sequence: not covered by parity
CODED_HEADER_SIZE = DATA_HEADER_SIZE - STREAM_PREFIX_SIZE  # 9
SHARD_HEADER_SIZE = DATA_HEADER_SIZE
WIREGUARD_OVERHEAD = 32  # transport message: 16 B header + 16 B Poly1305 tag
WIREGUARD_PADDING_MULTIPLE = 16
RECORD_HEADER_SIZE = 2
MAX_DATAGRAM_SIZE = 65535
MAX_FRAGMENTS = 255
MAX_SHARDS = 255
SEQUENCE_MODULUS = 1 << 32
# Largest payload a data shard can describe.
MAX_SHARD_PAYLOAD = 65535 - CODED_HEADER_SIZE

DATA_FRAME_TYPE = int(FrameType.DATA_SHARD)
PARITY_FRAME_TYPE = int(FrameType.PARITY_SHARD)
LEGACY_FRAME_TYPE = int(FrameType.SHARD)

assert DATA_HEADER_SIZE == 18 and PARITY_HEADER_SIZE == 14


class DataHeader(NamedTuple):
    """A parsed data shard header (the decoder unpacks inline; this is for tests)."""

    tunnel_id: int
    epoch: int
    seq: int
    position: int
    datagram: int
    fragment_index: int
    fragment_count: int
    length: int


class ParityHeader(NamedTuple):
    tunnel_id: int
    epoch: int
    first_seq: int
    data_shards: int
    parity_shards: int
    parity_index: int
    coded_size: int


def max_frame_size(mtu: int) -> int:
    """Largest shard frame (header + payload) for a tunnel whose UDP payloads must fit `mtu`.

    Rounded down to a multiple of 16 so that WireGuard's padding of the plaintext to a
    multiple of 16 can never push a full-size shard past the MTU.
    """
    plaintext = mtu - WIREGUARD_OVERHEAD
    return plaintext - plaintext % WIREGUARD_PADDING_MULTIPLE


def max_shard_payload(mtu: int) -> int:
    """Largest data shard payload for `mtu`: both its data frame and the parity frames
    over it (14-byte header + 9 coded header bytes + payload) fit `max_frame_size`."""
    return max_frame_size(mtu) - max(DATA_HEADER_SIZE, PARITY_HEADER_SIZE + CODED_HEADER_SIZE)


def shard_tunnel_id(frame: bytes | bytearray | memoryview) -> int | None:
    """Tunnel id of a data, parity or retired shard frame, for routing it to that tunnel's
    decoder (which counts a retired one). None when it is none of those or too short."""
    if len(frame) < PARITY_HEADER_SIZE or frame[0] not in _SHARD_TYPES:
        return None
    return (frame[1] << 8) | frame[2]


_SHARD_TYPES = frozenset((DATA_FRAME_TYPE, PARITY_FRAME_TYPE, LEGACY_FRAME_TYPE))


def parse_data_header(frame: bytes | bytearray | memoryview) -> DataHeader | None:
    """Parse and structurally validate a data shard header; None if it is not one."""
    if len(frame) < DATA_HEADER_SIZE:
        return None
    (kind, tunnel_id, epoch, seq, position, datagram, frag_index, frag_count, length) = (
        DATA_HEADER.unpack_from(frame)
    )
    if (
        kind != DATA_FRAME_TYPE
        or frag_index >= frag_count
        or length == 0
        or len(frame) < DATA_HEADER_SIZE + length
    ):
        return None
    return DataHeader(tunnel_id, epoch, seq, position, datagram, frag_index, frag_count, length)


def parse_parity_header(frame: bytes | bytearray | memoryview) -> ParityHeader | None:
    """Parse and structurally validate a parity shard header; None if it is not one."""
    if len(frame) < PARITY_HEADER_SIZE:
        return None
    (kind, tunnel_id, epoch, first, data_shards, parity_shards, index, size) = (
        PARITY_HEADER.unpack_from(frame)
    )
    if (
        kind != PARITY_FRAME_TYPE
        or data_shards == 0
        or not index < parity_shards <= MAX_SHARDS - data_shards
        or size <= CODED_HEADER_SIZE
        or len(frame) < PARITY_HEADER_SIZE + size
    ):
        return None
    return ParityHeader(tunnel_id, epoch, first, data_shards, parity_shards, index, size)
