"""What the device hands back: received plaintexts, datagrams to send, and events."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

Address = tuple[str, int]


class MessageKind(Enum):
    INITIATION = "initiation"
    RESPONSE = "response"
    COOKIE_REPLY = "cookie_reply"
    TRANSPORT = "transport"
    KEEPALIVE = "keepalive"


class Received(NamedTuple):
    """An authenticated transport message: ``plaintext`` is ``b""`` for a keepalive, an IP packet
    trimmed to its IP length, or any other plaintext untouched (a warp frame, possibly with
    WireGuard's trailing zero padding).

    A NamedTuple, not a frozen dataclass: one is built per received packet, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs ~2x as much."""

    peer: bytes
    plaintext: bytes
    source: Address


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A datagram to send. ``destination`` is the peer's current endpoint (None when unknown) or,
    for replies to handshake messages, the source of the message being answered."""

    data: bytes
    destination: Address | None
    peer: bytes | None
    kind: MessageKind


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """A new session is usable for sending. For the initiator: the response was accepted. For the
    responder: the first transport message under the new keys arrived (key confirmation)."""

    peer: bytes
    initiator: bool
    source: Address


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """No handshake completed within REKEY_ATTEMPT_TIME of retries; staged packets dropped."""

    peer: bytes
    dropped_packets: int = 0


@dataclass(frozen=True, slots=True)
class SessionExpired:
    """The current session passed REJECT_AFTER_TIME without being replaced."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """No new session for 3 x REJECT_AFTER_TIME: all keypairs and handshake state erased."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class PeerRoamed:
    """The peer's endpoint moved to the source of its latest authenticated packet."""

    peer: bytes
    old: Address | None
    new: Address


@dataclass(frozen=True, slots=True)
class UnknownPeerAccepted:
    """An initiator we did not know was accepted by the ``accept_unknown_peer`` policy."""

    peer: bytes
    source: Address


Event = (
    HandshakeComplete
    | HandshakeFailed
    | SessionExpired
    | KeysZeroed
    | PeerRoamed
    | UnknownPeerAccepted
)
