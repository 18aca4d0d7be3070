"""Sans-I/O WireGuard core (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, cookies, timers, replay
window). See :class:`Device` and ``docs/protocol.md`` ("WireGuard layer")."""

from __future__ import annotations

from .allowed_ips import AllowedIPs
from .constants import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    TRANSPORT_OVERHEAD,
)
from .device import Device
from .events import (
    Address,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    KeysZeroed,
    MessageKind,
    Outgoing,
    PeerRoamed,
    Received,
    SessionExpired,
    UnknownPeerAccepted,
)
from .keys import generate_private_key, public_key_of
from .peer import Peer

__all__ = [
    "KEEPALIVE_TIMEOUT",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "REKEY_AFTER_MESSAGES",
    "REKEY_AFTER_TIME",
    "REKEY_ATTEMPT_TIME",
    "REKEY_TIMEOUT",
    "TRANSPORT_OVERHEAD",
    "Address",
    "AllowedIPs",
    "Device",
    "Event",
    "HandshakeComplete",
    "HandshakeFailed",
    "KeysZeroed",
    "MessageKind",
    "Outgoing",
    "Peer",
    "PeerRoamed",
    "Received",
    "SessionExpired",
    "UnknownPeerAccepted",
    "generate_private_key",
    "public_key_of",
]
