"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (whitepaper §5.4.2–5.4.3).

Pure functions over a per-peer :class:`Handshake`; the device owns index allocation, peer lookup,
replay/flood checks and timers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .constants import INITIAL_CHAIN_KEY, INITIAL_HASH, ZERO_KEY
from .crypto import (
    CryptoFailure,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf1,
    kdf2,
    kdf3,
    public_key,
)
from .messages import Initiation, Response, build_initiation_prefix, build_response_prefix


class HandshakeState(IntEnum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Handshake:
    """The handshake state of one peer."""

    __slots__ = (
        "chaining_key",
        "hash",
        "last_initiation_consumed",
        "last_sent_timestamp",
        "last_timestamp",
        "local_ephemeral",
        "local_index",
        "precomputed_static_static",
        "preshared_key",
        "remote_ephemeral",
        "remote_index",
        "remote_static",
        "state",
    )

    def __init__(
        self, remote_static: bytes, precomputed_static_static: bytes, preshared_key: bytes
    ) -> None:
        self.state = HandshakeState.ZEROED
        self.hash = b""
        self.chaining_key = b""
        self.local_ephemeral: X25519PrivateKey | None = None
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0
        self.remote_static = remote_static
        self.precomputed_static_static = precomputed_static_static
        self.preshared_key = preshared_key
        #: the newest TAI64N timestamp accepted from this peer (replay protection)
        self.last_timestamp = bytes(12)
        #: `now` of the last initiation accepted from this peer (flood protection)
        self.last_initiation_consumed: float | None = None
        #: the newest TAI64N timestamp we sent to this peer (kept strictly increasing)
        self.last_sent_timestamp: bytes | None = None

    def clear(self) -> None:
        """Forget the ephemeral state (not the replay/flood memory)."""
        self.state = HandshakeState.ZEROED
        self.hash = b""
        self.chaining_key = b""
        self.local_ephemeral = None
        self.remote_ephemeral = b""
        self.local_index = 0
        self.remote_index = 0


def create_initiation(
    hs: Handshake,
    static_private: X25519PrivateKey,
    static_public: bytes,
    ephemeral: X25519PrivateKey,
    sender_index: int,
    timestamp: bytes,
) -> bytes:
    """Message 1 without its MACs (116 bytes). Raises CryptoFailure on a bad remote key."""
    h = hash_(INITIAL_HASH, hs.remote_static)
    e_pub = public_key(ephemeral)
    ck = kdf1(INITIAL_CHAIN_KEY, e_pub)
    h = hash_(h, e_pub)
    ck, k = kdf2(ck, dh(ephemeral, hs.remote_static))
    static = aead_encrypt(k, 0, static_public, h)
    h = hash_(h, static)
    ck, k = kdf2(ck, hs.precomputed_static_static)
    stamp = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h, stamp)
    hs.hash = h
    hs.chaining_key = ck
    hs.local_ephemeral = ephemeral
    hs.local_index = sender_index
    hs.remote_index = 0
    hs.remote_ephemeral = b""
    hs.state = HandshakeState.INITIATION_CREATED
    return build_initiation_prefix(sender_index, e_pub, static, stamp)


@dataclass(slots=True)
class PartialInitiation:
    """What a responder learns from message 1 before it knows which peer sent it."""

    static: bytes
    hash: bytes
    chaining_key: bytes


def consume_initiation_static(
    static_private: X25519PrivateKey, static_public: bytes, msg: Initiation
) -> PartialInitiation:
    """Decrypt the initiator's static key. Raises CryptoFailure."""
    h = hash_(INITIAL_HASH, static_public)
    h = hash_(h, msg.ephemeral)
    ck = kdf1(INITIAL_CHAIN_KEY, msg.ephemeral)
    ck, k = kdf2(ck, dh(static_private, msg.ephemeral))
    static = aead_decrypt(k, 0, msg.static, h)
    h = hash_(h, msg.static)
    return PartialInitiation(static, h, ck)


def consume_initiation_timestamp(
    partial: PartialInitiation, precomputed_static_static: bytes, msg: Initiation
) -> tuple[bytes, bytes, bytes]:
    """Decrypt the timestamp with the static-static secret: (timestamp, hash, chaining key).
    Raises CryptoFailure."""
    if precomputed_static_static == ZERO_KEY:
        raise CryptoFailure("static")
    ck, k = kdf2(partial.chaining_key, precomputed_static_static)
    stamp = aead_decrypt(k, 0, msg.timestamp, partial.hash)
    h = hash_(partial.hash, msg.timestamp)
    return stamp, h, ck


def accept_initiation(
    hs: Handshake, msg: Initiation, h: bytes, ck: bytes, timestamp: bytes, now: float
) -> None:
    hs.hash = h
    hs.chaining_key = ck
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    hs.local_ephemeral = None
    if timestamp > hs.last_timestamp:
        hs.last_timestamp = timestamp
    hs.last_initiation_consumed = now
    hs.state = HandshakeState.INITIATION_CONSUMED


def create_response(hs: Handshake, ephemeral: X25519PrivateKey, sender_index: int) -> bytes:
    """Message 2 without its MACs (60 bytes). Requires INITIATION_CONSUMED.
    Raises CryptoFailure on a low-order ephemeral."""
    e_pub = public_key(ephemeral)
    h = hash_(hs.hash, e_pub)
    ck = kdf1(hs.chaining_key, e_pub)
    ck = kdf1(ck, dh(ephemeral, hs.remote_ephemeral))
    ck = kdf1(ck, dh(ephemeral, hs.remote_static))
    ck, tau, k = kdf3(ck, hs.preshared_key)
    h = hash_(h, tau)
    empty = aead_encrypt(k, 0, b"", h)
    h = hash_(h, empty)
    hs.hash = h
    hs.chaining_key = ck
    hs.local_ephemeral = ephemeral
    hs.local_index = sender_index
    hs.state = HandshakeState.RESPONSE_CREATED
    return build_response_prefix(sender_index, hs.remote_index, e_pub, empty)


def consume_response(
    hs: Handshake, static_private: X25519PrivateKey, msg: Response
) -> tuple[bytes, bytes]:
    """Check message 2 against our INITIATION_CREATED state: (hash, chaining key).
    Raises CryptoFailure."""
    eph = hs.local_ephemeral
    if eph is None:
        raise CryptoFailure("state")
    h = hash_(hs.hash, msg.ephemeral)
    ck = kdf1(hs.chaining_key, msg.ephemeral)
    ck = kdf1(ck, dh(eph, msg.ephemeral))
    ck = kdf1(ck, dh(static_private, msg.ephemeral))
    ck, tau, k = kdf3(ck, hs.preshared_key)
    h = hash_(h, tau)
    aead_decrypt(k, 0, msg.empty, h)
    h = hash_(h, msg.empty)
    return h, ck


def accept_response(hs: Handshake, msg: Response, h: bytes, ck: bytes) -> None:
    hs.hash = h
    hs.chaining_key = ck
    hs.remote_index = msg.sender
    hs.state = HandshakeState.RESPONSE_CONSUMED


def derive_transport_keys(chaining_key: bytes, initiator: bool) -> tuple[bytes, bytes]:
    """(send key, receive key) from the final chaining key."""
    t1, t2 = kdf2(chaining_key, b"")
    return (t1, t2) if initiator else (t2, t1)
