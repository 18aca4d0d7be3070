"""Wire layouts of the four WireGuard messages (little-endian; whitepaper §5.4).

The first four bytes are read as one little-endian u32: it equals the message type only when the
three reserved bytes are zero, so a single comparison checks both.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from .constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)

#: type+reserved, sender, ephemeral, encrypted static, encrypted timestamp, mac1, mac2
INITIATION: Final = struct.Struct("<II32s48s28s16s16s")
#: type+reserved, sender, receiver, ephemeral, encrypted nothing, mac1, mac2
RESPONSE: Final = struct.Struct("<III32s16s16s16s")
#: type+reserved, receiver, nonce, encrypted cookie
COOKIE_REPLY: Final = struct.Struct("<II24s32s")
#: type+reserved, receiver, counter; followed by the ciphertext and its tag
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")
#: the first four bytes
MESSAGE_TYPE: Final = struct.Struct("<I")

#: The bytes covered by mac1 (everything before it) and by mac2.
INITIATION_MAC1_OFFSET: Final = INITIATION_SIZE - 32  # 116
INITIATION_MAC2_OFFSET: Final = INITIATION_SIZE - 16  # 132
RESPONSE_MAC1_OFFSET: Final = RESPONSE_SIZE - 32  # 60
RESPONSE_MAC2_OFFSET: Final = RESPONSE_SIZE - 16  # 76

_INIT_PREFIX: Final = struct.Struct("<II32s48s28s")
_RESP_PREFIX: Final = struct.Struct("<III32s16s")

assert INITIATION.size == INITIATION_SIZE
assert RESPONSE.size == RESPONSE_SIZE
assert COOKIE_REPLY.size == COOKIE_REPLY_SIZE
assert TRANSPORT_HEADER.size + 16 == TRANSPORT_MIN_SIZE


class Initiation(NamedTuple):
    sender: int
    ephemeral: bytes
    static: bytes
    timestamp: bytes
    mac1: bytes
    mac2: bytes


class Response(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    empty: bytes
    mac1: bytes
    mac2: bytes


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    cookie: bytes


class TransportHeader(NamedTuple):
    receiver: int
    counter: int


def message_type(data: bytes) -> int | None:
    """The message type (1..4) when the header is well formed and the size fits, else None."""
    n = len(data)
    if n < 4:
        return None
    (typ,) = MESSAGE_TYPE.unpack_from(data)
    if typ == MESSAGE_TRANSPORT:
        return typ if n >= TRANSPORT_MIN_SIZE else None
    if typ == MESSAGE_INITIATION:
        return typ if n == INITIATION_SIZE else None
    if typ == MESSAGE_RESPONSE:
        return typ if n == RESPONSE_SIZE else None
    if typ == MESSAGE_COOKIE_REPLY:
        return typ if n == COOKIE_REPLY_SIZE else None
    return None


def parse_initiation(data: bytes) -> Initiation | None:
    if len(data) != INITIATION_SIZE:
        return None
    typ, *fields = INITIATION.unpack(data)
    if typ != MESSAGE_INITIATION:
        return None
    return Initiation(*fields)


def parse_response(data: bytes) -> Response | None:
    if len(data) != RESPONSE_SIZE:
        return None
    typ, *fields = RESPONSE.unpack(data)
    if typ != MESSAGE_RESPONSE:
        return None
    return Response(*fields)


def parse_cookie_reply(data: bytes) -> CookieReply | None:
    if len(data) != COOKIE_REPLY_SIZE:
        return None
    typ, *fields = COOKIE_REPLY.unpack(data)
    if typ != MESSAGE_COOKIE_REPLY:
        return None
    return CookieReply(*fields)


def parse_transport_header(data: bytes) -> TransportHeader | None:
    if len(data) < TRANSPORT_MIN_SIZE:
        return None
    typ, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
    if typ != MESSAGE_TRANSPORT:
        return None
    return TransportHeader(receiver, counter)


def build_initiation_prefix(
    sender: int, ephemeral: bytes, static: bytes, timestamp: bytes
) -> bytes:
    """The first 116 bytes of an initiation (everything mac1 covers)."""
    return _INIT_PREFIX.pack(MESSAGE_INITIATION, sender, ephemeral, static, timestamp)


def build_response_prefix(sender: int, receiver: int, ephemeral: bytes, empty: bytes) -> bytes:
    """The first 60 bytes of a response (everything mac1 covers)."""
    return _RESP_PREFIX.pack(MESSAGE_RESPONSE, sender, receiver, ephemeral, empty)


def build_cookie_reply(receiver: int, nonce: bytes, encrypted_cookie: bytes) -> bytes:
    return COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, receiver, nonce, encrypted_cookie)


def build_transport_header(receiver: int, counter: int) -> bytes:
    return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver, counter)
