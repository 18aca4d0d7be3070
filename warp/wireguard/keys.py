"""Raw X25519 key helpers (32-byte strings; text forms live in ``warp.keys``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from .crypto import private_key_from_bytes, public_key


def generate_private_key(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """32 random bytes, clamped as Curve25519 private keys are."""
    key = bytearray(rng(32))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key_of(private_key: bytes) -> bytes:
    return public_key(private_key_from_bytes(private_key))
