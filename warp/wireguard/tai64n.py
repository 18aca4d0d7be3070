"""TAI64N timestamps (12 bytes, big-endian seconds then nanoseconds)."""

from __future__ import annotations

import struct
from typing import Final

TAI64N: Final = struct.Struct(">QI")
#: 2^62 + 10, as the kernel and wireguard-go write it.
TAI64_BASE: Final = 0x400000000000000A
#: Nanoseconds are rounded down to a multiple of 2^24 ns (~16.8 ms) so as not to leak timing.
_WHITENER: Final = 1 << 24


def timestamp(wall: float) -> bytes:
    """The TAI64N label of Unix time ``wall``."""
    secs = int(wall // 1)
    nanos = int((wall - secs) * 1e9)
    nanos = min(max(nanos, 0), 999_999_999)
    nanos -= nanos % _WHITENER
    return TAI64N.pack((TAI64_BASE + secs) & 0xFFFF_FFFF_FFFF_FFFF, nanos)


def increment(stamp: bytes) -> bytes:
    """The 12-byte big-endian integer one above ``stamp``."""
    return ((int.from_bytes(stamp, "big") + 1) % (1 << 96)).to_bytes(12, "big")


def next_timestamp(wall: float, last: bytes | None) -> bytes:
    """A timestamp strictly greater than ``last``: the wall clock's, or ``last + 1`` when the clock
    has not advanced (or stepped back) since."""
    stamp = timestamp(wall)
    if last is not None and stamp <= last:
        return increment(last)
    return stamp
