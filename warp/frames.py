"""Inner frames: what the plaintext of a WireGuard transport message carries.

A plaintext is an IP packet (first nibble 4 or 6, exactly as WireGuard), empty (keepalive),
or a warp frame whose first byte is a `FrameType`. No frame type has a high nibble of 4 or 6,
so a receiver can tell the three apart from the first byte alone.

Frames must be self-delimiting: WireGuard zero-pads plaintexts to a multiple of 16 bytes, so a
frame parser must ignore trailing zero bytes beyond the length its own header states.
"""

from __future__ import annotations

from enum import IntEnum


class FrameType(IntEnum):
    # Retired: one datagram per FEC block. Receivers count it and drop it (never decode it).
    SHARD = 0x01
    PROBE = 0x02
    PROBE_REPLY = 0x03
    # FEC blocks of several datagrams (warp/redundancy/shard.py, docs/protocol.md).
    DATA_SHARD = 0x04
    PARITY_SHARD = 0x05
    #: each uplink's reflexive address and NAT mapping (warp/paths/punch.py)
    NAT_INFO = 0x06
    # Map (rendezvous) control messages; bodies are msgpack (see warp/map_client).
    MAP_REGISTER = 0x10
    MAP_REGISTERED = 0x11
    MAP_LOOKUP = 0x12
    MAP_PEER_ENDPOINTS = 0x13
    MAP_PUSH = 0x14
    MAP_DEREGISTER = 0x15
    MAP_RELAY = 0x16
    MAP_RELAYED = 0x17
    MAP_ERROR = 0x18


class PlaintextKind(IntEnum):
    KEEPALIVE = 0
    IP = 1
    WARP = 2
    UNKNOWN = 3


_WARP_TYPES = frozenset(int(t) for t in FrameType)


def classify(plaintext: bytes) -> PlaintextKind:
    """Tell keepalives, IP packets and warp frames apart by their first byte."""
    if not plaintext:
        return PlaintextKind.KEEPALIVE
    first = plaintext[0]
    if first >> 4 in (4, 6):
        return PlaintextKind.IP
    if first in _WARP_TYPES:
        return PlaintextKind.WARP
    return PlaintextKind.UNKNOWN
