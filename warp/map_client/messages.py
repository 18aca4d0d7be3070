"""Map (rendezvous) messages: the codec shared by warp-map and its clients.

A map message travels as the plaintext of a WireGuard transport message between a warp instance
and warp-map. Layout (every integer big-endian)::

    0      1        3                 3 + length
    +------+--------+-----------------+----------------------------+
    | type | length | msgpack body    | WireGuard zero padding ... |
    +------+--------+-----------------+----------------------------+

``type`` is a :class:`~warp.frames.FrameType` between ``MAP_REGISTER`` (0x10) and ``MAP_ERROR``
(0x18); ``length`` (u16) is the length of the body, which is one msgpack map with short string
keys. Bytes after ``3 + length`` are WireGuard's padding and are ignored. Unknown body keys are
ignored (forward compatibility); missing or mistyped known keys make the message invalid.

An endpoint is a msgpack array ``[ip, port]`` where ``ip`` is the packed address (bin, 4 or 16
bytes) and ``port`` an integer 1..65535. Keys are 32-byte bin. ``q`` is a request id (u32) chosen
by the client and echoed in the answer.

=========================  =====  ==============================================================
message                    type   body
=========================  =====  ==============================================================
Register                   0x10   q, u (uplink tag u32), f (far-gate key), i (instance id u64),
                                  c (optional: the challenge of a Registered, echoed),
                                  g (optional: further far-gate keys, a fleet's; at most
                                  MAX_FAR_GATES in all),
                                  x (optional: zero padding to REGISTER_MIN_FRAME bytes)
Registered                 0x11   q, u, a (reflexive endpoint), t (TTL, milliseconds), b,
                                  c (optional: 8-byte challenge, see below)
Lookup                     0x12   q, k (key looked up)
PeerEndpoints              0x13   q, k, e (array of endpoints), v (version u64), b (map boot id)
Push                       0x14   k, e, v, b (unsolicited PeerEndpoints)
Deregister                 0x15   q, u (optional: absent = every uplink). Answered with
                                  PeerEndpoints for the asker's own key (what is left).
Relay                      0x16   k (target key), p (payload bin: a sealed WireGuard message),
                                  a (optional: the target's endpoint to deliver to, one the
                                  map lists for it; absent = its freshest)
Relayed                    0x17   k (sender key), p, a (optional: the endpoint the Relay came
                                  from, as the map saw it: the sender's uplink)
Error                      0x18   q (optional), c (:class:`ErrorCode`), m (text, ≤ 200 chars)
=========================  =====  ==============================================================

``v`` is the version of a client's endpoint set at the map: it grows by one at every change.
``b`` is a random id the map draws at start; versions compare only under the same ``b``.

``c`` is the map's return-routability check: a Registered answering a Register from an address
the map has not validated for that client carries a challenge; the client proves it receives at
that address by registering that uplink again at once with ``c`` echoed. Until then the map sends
that address nothing but answers no larger than what it received from it (no pushes, no relayed
payloads), so a client cannot point the map at a bystander by spoofing its source address.
A Register is padded (``x``) to ``REGISTER_MIN_FRAME`` bytes so that the answer carrying the
challenge always fits in it (as QUIC pads its Initial), whatever the field values and address.

:func:`decode` is the one parsing boundary: whatever the bytes, it returns a message or raises
:class:`MessageError`, never anything else.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

import msgpack

from warp.frames import FrameType

Endpoint: TypeAlias = tuple[str, int]

KEY_LENGTH = 32
HEADER = struct.Struct("!BH")
HEADER_SIZE = HEADER.size
MAX_BODY = 0xFFFF
MAX_ENDPOINTS = 64
#: far gates one Register names at most (``f`` and ``g``)
MAX_FAR_GATES = 64
MAX_RELAY_PAYLOAD = 9216
MAX_ERROR_TEXT = 200
CHALLENGE_LENGTH = 8
#: the largest Registered with a challenge (IPv6, every integer at its widest) is 72 bytes
REGISTER_MIN_FRAME = 80
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

MAP_TYPES = frozenset(
    int(t)
    for t in (
        FrameType.MAP_REGISTER,
        FrameType.MAP_REGISTERED,
        FrameType.MAP_LOOKUP,
        FrameType.MAP_PEER_ENDPOINTS,
        FrameType.MAP_PUSH,
        FrameType.MAP_DEREGISTER,
        FrameType.MAP_RELAY,
        FrameType.MAP_RELAYED,
        FrameType.MAP_ERROR,
    )
)


class MessageError(ValueError):
    """The bytes are not a valid map message; the text says why (for counters and logs)."""


class ErrorCode(IntEnum):
    BAD_REQUEST = 1
    NOT_PERMITTED = 2
    LIMIT_REACHED = 3
    RATE_LIMITED = 4
    RELAY_DISABLED = 5


@dataclass(frozen=True, slots=True)
class Register:
    request_id: int
    uplink: int
    far_gate: bytes
    instance: int
    challenge: bytes | None = None  # echoed from a Registered
    #: further far gates (a gateway with several): the map treats each as ``far_gate``
    also: tuple[bytes, ...] = ()

    @property
    def far_gates(self) -> tuple[bytes, ...]:
        return (self.far_gate, *self.also)


@dataclass(frozen=True, slots=True)
class Registered:
    request_id: int
    uplink: int
    reflexive: Endpoint
    ttl: float  # seconds (milliseconds on the wire)
    boot: int
    challenge: bytes | None = None  # the address is not validated yet: echo this


@dataclass(frozen=True, slots=True)
class Lookup:
    request_id: int
    key: bytes


@dataclass(frozen=True, slots=True)
class PeerEndpoints:
    request_id: int
    key: bytes
    endpoints: tuple[Endpoint, ...]
    version: int
    boot: int


@dataclass(frozen=True, slots=True)
class Push:
    key: bytes
    endpoints: tuple[Endpoint, ...]
    version: int
    boot: int


@dataclass(frozen=True, slots=True)
class Deregister:
    request_id: int
    uplink: int | None  # None: every uplink of this client


@dataclass(frozen=True, slots=True)
class Relay:
    key: bytes  # the target
    payload: bytes
    #: the target's endpoint to deliver to (one of its uplinks); None: its freshest
    endpoint: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class Relayed:
    key: bytes  # the sender
    payload: bytes
    #: where the sender's Relay came from (its uplink's reflexive address); None: not said
    endpoint: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class Error:
    request_id: int | None
    code: ErrorCode
    message: str


MapMessage: TypeAlias = (
    Register | Registered | Lookup | PeerEndpoints | Push | Deregister | Relay | Relayed | Error
)

# Requests a client sends (the map answers these); the rest flow map -> client.
Request: TypeAlias = Register | Lookup | Deregister | Relay


def is_map_frame(plaintext: bytes) -> bool:
    return bool(plaintext) and plaintext[0] in MAP_TYPES


# ------------------------------------------------------------------------------------- encode


def _endpoint_out(endpoint: Endpoint) -> list[Any]:
    host, port = endpoint
    return [ipaddress.ip_address(host).packed, port]


def _endpoints_out(endpoints: tuple[Endpoint, ...]) -> list[Any]:
    if len(endpoints) > MAX_ENDPOINTS:
        raise MessageError(f"at most {MAX_ENDPOINTS} endpoints")
    return [_endpoint_out(e) for e in endpoints]


def _body(message: MapMessage) -> tuple[FrameType, dict[str, Any]]:
    body: dict[str, Any]
    match message:
        case Register(request_id, uplink, far_gate, instance, challenge, also):
            body = {"q": request_id, "u": uplink, "f": far_gate, "i": instance}
            if challenge is not None:
                body["c"] = challenge
            if also:
                body["g"] = list(also)
            return FrameType.MAP_REGISTER, body
        case Registered(request_id, uplink, reflexive, ttl, boot, challenge):
            body = {
                "q": request_id,
                "u": uplink,
                "a": _endpoint_out(reflexive),
                "t": round(ttl * 1000),
                "b": boot,
            }
            if challenge is not None:
                body["c"] = challenge
            return FrameType.MAP_REGISTERED, body
        case Lookup(request_id, key):
            return FrameType.MAP_LOOKUP, {"q": request_id, "k": key}
        case PeerEndpoints(request_id, key, endpoints, version, boot):
            return FrameType.MAP_PEER_ENDPOINTS, {
                "q": request_id,
                "k": key,
                "e": _endpoints_out(endpoints),
                "v": version,
                "b": boot,
            }
        case Push(key, endpoints, version, boot):
            return FrameType.MAP_PUSH, {
                "k": key,
                "e": _endpoints_out(endpoints),
                "v": version,
                "b": boot,
            }
        case Deregister(request_id, uplink):
            body = {"q": request_id}
            if uplink is not None:
                body["u"] = uplink
            return FrameType.MAP_DEREGISTER, body
        case Relay(key, payload, endpoint) | Relayed(key, payload, endpoint):
            frame_type = (
                FrameType.MAP_RELAY if isinstance(message, Relay) else FrameType.MAP_RELAYED
            )
            relay_body: dict[str, Any] = {"k": key, "p": payload}
            if endpoint is not None:
                relay_body["a"] = _endpoint_out(endpoint)
            return frame_type, relay_body
        case Error(request_id, code, text):
            body = {"c": int(code), "m": text[:MAX_ERROR_TEXT]}
            if request_id is not None:
                body["q"] = request_id
            return FrameType.MAP_ERROR, body
    raise MessageError(f"not a map message: {message!r}")  # pragma: no cover


def encode(message: MapMessage) -> bytes:
    """The frame (type, length, msgpack body) for ``message``; validates what it writes."""
    frame_type, body = _body(message)
    packed = msgpack.packb(body, use_bin_type=True)
    if frame_type == FrameType.MAP_REGISTER and HEADER_SIZE + len(packed) < REGISTER_MIN_FRAME:
        # "x" and a bin8 header add 4 bytes to the body
        body["x"] = bytes(max(0, REGISTER_MIN_FRAME - HEADER_SIZE - len(packed) - 4))
        packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_BODY:
        raise MessageError(f"body of {len(packed)} bytes is over {MAX_BODY}")
    frame = HEADER.pack(int(frame_type), len(packed)) + packed
    # Every frame we write must be one we accept: catches out-of-range fields at the source.
    decode(frame)
    return frame


# ------------------------------------------------------------------------------------- decode


def _int(body: Mapping[str, Any], name: str, maximum: int, *, minimum: int = 0) -> int:
    value = body.get(name)
    if type(value) is not int or not minimum <= value <= maximum:
        raise MessageError(f"field {name!r} must be an integer in [{minimum}, {maximum}]")
    return value


def _key(body: Mapping[str, Any], name: str) -> bytes:
    value = body.get(name)
    if type(value) is not bytes or len(value) != KEY_LENGTH:
        raise MessageError(f"field {name!r} must be a {KEY_LENGTH}-byte key")
    return value


def _further_far_gates(body: Mapping[str, Any]) -> tuple[bytes, ...]:
    value = body.get("g", [])
    if type(value) is not list or len(value) >= MAX_FAR_GATES:
        raise MessageError(f"field 'g' must be a list of at most {MAX_FAR_GATES - 1} keys")
    for key in value:
        if type(key) is not bytes or len(key) != KEY_LENGTH:
            raise MessageError(f"field 'g' must hold {KEY_LENGTH}-byte keys")
    return tuple(value)


def _challenge(body: Mapping[str, Any]) -> bytes | None:
    if "c" not in body:
        return None
    value = body["c"]
    if type(value) is not bytes or len(value) != CHALLENGE_LENGTH:
        raise MessageError(f"field 'c' must be {CHALLENGE_LENGTH} bytes")
    return value


def _endpoint_in(value: object) -> Endpoint:
    if type(value) is not list or len(value) != 2:
        raise MessageError("an endpoint is [ip, port]")
    packed, port = value
    if type(packed) is not bytes or len(packed) not in (4, 16):
        raise MessageError("an endpoint ip is 4 or 16 bytes")
    if type(port) is not int or not 1 <= port <= 0xFFFF:
        raise MessageError("an endpoint port is 1..65535")
    return str(ipaddress.ip_address(packed)), port


def _optional_endpoint(body: Mapping[str, Any]) -> Endpoint | None:
    return _endpoint_in(body["a"]) if "a" in body else None


def _endpoints_in(body: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    value = body.get("e")
    if type(value) is not list or len(value) > MAX_ENDPOINTS:
        raise MessageError(f"field 'e' must be a list of at most {MAX_ENDPOINTS} endpoints")
    return tuple(_endpoint_in(e) for e in value)


def _payload(body: Mapping[str, Any]) -> bytes:
    value = body.get("p")
    if type(value) is not bytes or not 0 < len(value) <= MAX_RELAY_PAYLOAD:
        raise MessageError(f"field 'p' must be 1..{MAX_RELAY_PAYLOAD} bytes")
    return value


def _unpack(frame: bytes) -> tuple[int, Mapping[str, Any]]:
    if len(frame) < HEADER_SIZE:
        raise MessageError("shorter than a map frame header")
    frame_type, length = HEADER.unpack_from(frame)
    if frame_type not in MAP_TYPES:
        raise MessageError(f"frame type 0x{frame_type:02x} is not a map message")
    end = HEADER_SIZE + length
    if len(frame) < end:
        raise MessageError(f"body length {length} runs past the {len(frame)}-byte frame")
    try:
        body = msgpack.unpackb(
            frame[HEADER_SIZE:end],
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=1024,
            max_bin_len=MAX_RELAY_PAYLOAD,
            max_array_len=MAX_ENDPOINTS * 2,
            max_map_len=32,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise MessageError(f"body is not msgpack: {type(exc).__name__}") from None
    if type(body) is not dict:
        raise MessageError("body must be a msgpack map")
    return frame_type, body


def decode(frame: bytes) -> MapMessage:
    """Parse one map frame (trailing padding ignored); raise :class:`MessageError` if invalid."""
    frame_type, body = _unpack(frame)
    if frame_type == FrameType.MAP_REGISTER:
        return Register(
            _int(body, "q", U32),
            _int(body, "u", U32),
            _key(body, "f"),
            _int(body, "i", U64),
            _challenge(body),
            _further_far_gates(body),
        )
    if frame_type == FrameType.MAP_REGISTERED:
        return Registered(
            _int(body, "q", U32),
            _int(body, "u", U32),
            _endpoint_in(body.get("a")),
            _int(body, "t", U32) / 1000,
            _int(body, "b", U64),
            _challenge(body),
        )
    if frame_type == FrameType.MAP_LOOKUP:
        return Lookup(_int(body, "q", U32), _key(body, "k"))
    if frame_type == FrameType.MAP_PEER_ENDPOINTS:
        return PeerEndpoints(
            _int(body, "q", U32),
            _key(body, "k"),
            _endpoints_in(body),
            _int(body, "v", U64),
            _int(body, "b", U64),
        )
    if frame_type == FrameType.MAP_PUSH:
        return Push(
            _key(body, "k"), _endpoints_in(body), _int(body, "v", U64), _int(body, "b", U64)
        )
    if frame_type == FrameType.MAP_DEREGISTER:
        uplink = _int(body, "u", U32) if "u" in body else None
        return Deregister(_int(body, "q", U32), uplink)
    if frame_type == FrameType.MAP_RELAY:
        return Relay(_key(body, "k"), _payload(body), _optional_endpoint(body))
    if frame_type == FrameType.MAP_RELAYED:
        return Relayed(_key(body, "k"), _payload(body), _optional_endpoint(body))
    # MAP_ERROR
    code = _int(body, "c", 0xFF)
    text = body.get("m", "")
    if type(text) is not str:
        raise MessageError("field 'm' must be text")
    request_id = _int(body, "q", U32) if "q" in body else None
    try:
        error_code = ErrorCode(code)
    except ValueError:
        raise MessageError(f"unknown error code {code}") from None
    return Error(request_id, error_code, text[:MAX_ERROR_TEXT])
