"""Sliding-window replay filter (RFC 6479 style, as the kernel and wireguard-go).

The bitmap is a ring of ``REPLAY_RING_BYTES`` bytes; one byte covers eight consecutive counters.
The window is ``(ring - 1) * 8`` = 8312 counters, so heavy multi-path reordering is not mistaken for
replay. :meth:`check` is read-only and :meth:`mark` records a counter: call ``mark`` only after
the AEAD has authenticated the packet.
"""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_RING_BYTES, REPLAY_WINDOW

_RING = REPLAY_RING_BYTES
_WINDOW = REPLAY_WINDOW
_LIMIT = REJECT_AFTER_MESSAGES


class ReplayWindow:
    __slots__ = ("_bits", "last")

    def __init__(self) -> None:
        self._bits = bytearray(_RING)
        #: the highest counter accepted so far (-1: none yet)
        self.last = -1

    @property
    def window(self) -> int:
        return _WINDOW

    def check(self, counter: int) -> bool:
        """True when ``counter`` has not been seen and is not too old (read-only)."""
        if counter >= _LIMIT or counter < 0:
            return False
        last = self.last
        if counter > last:
            return True
        if last - counter >= _WINDOW:
            return False
        return not (self._bits[(counter >> 3) % _RING] >> (counter & 7)) & 1

    def mark(self, counter: int) -> None:
        """Record ``counter`` (which :meth:`check` accepted) as seen."""
        bits = self._bits
        last = self.last
        if counter > last:
            index = counter >> 3
            last_index = last >> 3
            gap = index - last_index
            if gap == 1:
                bits[index % _RING] = 0
            elif gap > 0:
                # Clear the blocks the window slides over.
                if gap >= _RING:
                    bits[:] = bytes(_RING)
                else:
                    start = (last_index + 1) % _RING
                    end = start + gap
                    if end <= _RING:
                        bits[start:end] = bytes(gap)
                    else:
                        bits[start:] = bytes(_RING - start)
                        bits[: end - _RING] = bytes(end - _RING)
            self.last = counter
        bits[(counter >> 3) % _RING] |= 1 << (counter & 7)

    def check_and_mark(self, counter: int) -> bool:
        if not self.check(counter):
            return False
        self.mark(counter)
        return True

    def reset(self) -> None:
        self._bits = bytearray(_RING)
        self.last = -1
