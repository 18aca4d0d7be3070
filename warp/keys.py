"""X25519 keys and their text forms.

The canonical text form is Crockford base32 of the 32 raw bytes (52 characters, upper case on
output). Input is case-insensitive, reads O as 0 and I/L as 1, and WireGuard's base64 form
(44 characters) is accepted too, so `wg genkey` keys work.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_LENGTH = 32
CROCKFORD_LENGTH = 52  # ceil(256 / 5)
WIREGUARD_BASE64_LENGTH = 44
SECP256K1_TEXT_LENGTH = 53  # keys of the earlier Rust prototype

CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE_MAP: dict[str, int] = {ch: i for i, ch in enumerate(CROCKFORD_ALPHABET)}
_DECODE_MAP.update({"O": 0, "I": 1, "L": 1})


class KeyFormatError(ValueError):
    """A key's text could not be read; the message is meant for the user."""


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, encryption_algorithm=NoEncryption()
    )


def public_key_of(private_key: bytes) -> bytes:
    if len(private_key) != KEY_LENGTH:
        raise KeyFormatError(f"a private key is {KEY_LENGTH} bytes, got {len(private_key)}")
    return (
        X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def encode_key(raw: bytes) -> str:
    """Crockford base32 (upper case, no padding) of a 32-byte key."""
    if len(raw) != KEY_LENGTH:
        raise KeyFormatError(f"a key is {KEY_LENGTH} bytes, got {len(raw)}")
    number = int.from_bytes(raw, "big") << (CROCKFORD_LENGTH * 5 - KEY_LENGTH * 8)
    chars = []
    for _ in range(CROCKFORD_LENGTH):
        chars.append(CROCKFORD_ALPHABET[number & 31])
        number >>= 5
    return "".join(reversed(chars))


def to_wireguard_base64(raw: bytes) -> str:
    if len(raw) != KEY_LENGTH:
        raise KeyFormatError(f"a key is {KEY_LENGTH} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    """Read a key in Crockford base32 or WireGuard base64; raise KeyFormatError otherwise."""
    stripped = text.strip()
    length = len(stripped)
    if length == CROCKFORD_LENGTH:
        return _decode_crockford(stripped)
    if length == WIREGUARD_BASE64_LENGTH:
        return _decode_wireguard_base64(stripped)
    if length == SECP256K1_TEXT_LENGTH:
        raise KeyFormatError(
            "this 53-character key looks like a secp256k1 key from the Rust prototype; "
            "WARP uses X25519 keys: run `warp-keygen` to make a new key pair"
        )
    if stripped.startswith("<") and stripped.endswith(">"):
        raise KeyFormatError(f"placeholder {stripped!r}: run `warp-keygen` to make a key pair")
    raise KeyFormatError(
        f"a key is {CROCKFORD_LENGTH} characters of Crockford base32 "
        f"or {WIREGUARD_BASE64_LENGTH} of WireGuard base64, got {length} characters"
    )


def _decode_crockford(text: str) -> bytes:
    number = 0
    for position, ch in enumerate(text.upper()):
        value = _DECODE_MAP.get(ch)
        if value is None:
            raise KeyFormatError(
                f"invalid character {ch!r} at position {position + 1} of the key "
                f"(Crockford base32 uses 0-9 and A-Z without I, L, O, U)"
            )
        number = (number << 5) | value
    spare_bits = CROCKFORD_LENGTH * 5 - KEY_LENGTH * 8
    if number & ((1 << spare_bits) - 1):
        raise KeyFormatError("the key's last character has bits set beyond the 32 key bytes")
    return (number >> spare_bits).to_bytes(KEY_LENGTH, "big")


def _decode_wireguard_base64(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"not valid WireGuard base64: {exc}") from None
    if len(raw) != KEY_LENGTH:
        raise KeyFormatError(f"base64 key decodes to {len(raw)} bytes, expected {KEY_LENGTH}")
    return raw
