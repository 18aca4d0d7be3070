"""Cryptographic primitives of WireGuard (whitepaper §5.4).

BLAKE2s and HMAC come from :mod:`hashlib`/:mod:`hmac`, X25519 and ChaCha20-Poly1305 from
``cryptography``, XChaCha20-Poly1305 (cookie replies only) from PyNaCl.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

__all__ = [
    "NONCE",
    "ChaCha20Poly1305",
    "CryptoFailure",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "generate_private_key",
    "hash_",
    "hmac_",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "private_key_from_bytes",
    "public_key",
    "xaead_decrypt",
    "xaead_encrypt",
]

#: The 96-bit ChaCha20-Poly1305 nonce: 4 zero bytes then the little-endian 64-bit counter.
NONCE: Final = struct.Struct("<4xQ")
_ZERO_NONCE: Final = bytes(12)

_blake2s = hashlib.blake2s
_hmac_digest = hmac.digest


class CryptoFailure(Exception):
    """An authentication or key-agreement failure (a bad tag, a low-order point)."""


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 of the concatenation of ``parts``."""
    h = _blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte output."""
    return _blake2s(data, key=key, digest_size=16).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s (block size 64)."""
    return _hmac_digest(key, data, "blake2s")


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = _hmac_digest(key, data, "blake2s")
    return _hmac_digest(t0, b"\x01", "blake2s")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = _hmac_digest(key, data, "blake2s")
    t1 = _hmac_digest(t0, b"\x01", "blake2s")
    t2 = _hmac_digest(t0, t1 + b"\x02", "blake2s")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = _hmac_digest(key, data, "blake2s")
    t1 = _hmac_digest(t0, b"\x01", "blake2s")
    t2 = _hmac_digest(t0, t1 + b"\x02", "blake2s")
    t3 = _hmac_digest(t0, t2 + b"\x03", "blake2s")
    return t1, t2, t3


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(NONCE.pack(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Open ``ciphertext``; raises :class:`CryptoFailure` when authentication fails."""
    try:
        return ChaCha20Poly1305(key).decrypt(NONCE.pack(counter), ciphertext, aad)
    except InvalidTag:
        raise CryptoFailure("aead") from None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return bytes(crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key))


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return bytes(crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key))
    except CryptoError:
        raise CryptoFailure("xaead") from None


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != 32:
        raise ValueError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(raw)


def generate_private_key(random32: bytes) -> X25519PrivateKey:
    """An X25519 key from 32 random bytes (the caller's injected RNG)."""
    return private_key_from_bytes(random32)


def public_key(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519; raises :class:`CryptoFailure` on a malformed key or an all-zero shared secret."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise CryptoFailure("dh") from None
