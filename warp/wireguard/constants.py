"""WireGuard protocol constants (whitepaper §5–6, wireguard-go ``device/constants.go``)."""

from __future__ import annotations

import hashlib
from typing import Final

# --- strings and initial values -------------------------------------------------------------
CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

#: Ci = HASH(Construction)
INITIAL_CHAIN_KEY: Final = hashlib.blake2s(CONSTRUCTION).digest()
#: Hi = HASH(Ci || Identifier)
INITIAL_HASH: Final = hashlib.blake2s(INITIAL_CHAIN_KEY + IDENTIFIER).digest()

KEY_SIZE: Final = 32
ZERO_KEY: Final = bytes(32)

# --- message types and sizes -----------------------------------------------------------------
MESSAGE_INITIATION: Final = 1
MESSAGE_RESPONSE: Final = 2
MESSAGE_COOKIE_REPLY: Final = 3
MESSAGE_TRANSPORT: Final = 4

INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64
TRANSPORT_HEADER_SIZE: Final = 16
TAG_SIZE: Final = 16
TRANSPORT_MIN_SIZE: Final = TRANSPORT_HEADER_SIZE + TAG_SIZE  # 32: a keepalive
#: WireGuard's own overhead per transport message.
TRANSPORT_OVERHEAD: Final = TRANSPORT_MIN_SIZE

PADDING_MULTIPLE: Final = 16

# --- counters ---------------------------------------------------------------------------------
REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1

# --- timers (seconds) -------------------------------------------------------------------------
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
KEEPALIVE_TIMEOUT: Final = 10.0
#: Jitter added to REKEY_TIMEOUT based timers: uniform in [0, 334) ms.
REKEY_TIMEOUT_JITTER_MAX: Final = 0.334
#: Retransmissions of an initiation before giving up (REKEY_ATTEMPT_TIME / REKEY_TIMEOUT).
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
#: A responder refuses initiations from the same peer closer together than this.
HANDSHAKE_INITIATION_RATE: Final = 0.020
#: The "last-minute" rekey on receive: REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT.
LAST_MINUTE_REKEY_TIME: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165
#: Dead-peer detection: after sending data without hearing back.
NEW_HANDSHAKE_TIME: Final = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # 15
#: Erase all key material when no new session has been derived for this long.
ZERO_KEYS_AFTER: Final = 3 * REJECT_AFTER_TIME  # 540

# --- cookies and load -------------------------------------------------------------------------
COOKIE_REFRESH_TIME: Final = 120.0
UNDER_LOAD_AFTER_TIME: Final = 1.0
#: Per-source-IP token bucket applied to handshakes with a valid mac2 while under load.
RATELIMIT_PACKETS_PER_SECOND: Final = 20.0
RATELIMIT_BURST: Final = 5.0
RATELIMIT_MAX_SOURCES: Final = 65536
RATELIMIT_GC_INTERVAL: Final = 1.0

# --- replay window ----------------------------------------------------------------------------
#: Bytes of bitmap in the replay ring; the usable window is (RING - 1) * 8 counters.
REPLAY_RING_BYTES: Final = 1040
REPLAY_WINDOW: Final = (REPLAY_RING_BYTES - 1) * 8  # 8312 >= 8192

# --- bounds -----------------------------------------------------------------------------------
MAX_STAGED_PACKETS: Final = 1024
MAX_EVENTS: Final = 4096
MAX_OUTGOING: Final = 65536
