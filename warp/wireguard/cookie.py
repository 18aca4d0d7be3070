"""MAC1, MAC2 and cookie replies (whitepaper §5.4.4, §5.4.7; wireguard-go ``cookie.go``)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable

from .constants import (
    COOKIE_REFRESH_TIME,
    LABEL_COOKIE,
    LABEL_MAC1,
    RATELIMIT_BURST,
    RATELIMIT_GC_INTERVAL,
    RATELIMIT_MAX_SOURCES,
    RATELIMIT_PACKETS_PER_SECOND,
)
from .crypto import CryptoFailure, hash_, mac, xaead_decrypt, xaead_encrypt
from .messages import CookieReply, build_cookie_reply

Address = tuple[str, int]

_compare = hmac.compare_digest


def mac1_key(public_key: bytes) -> bytes:
    """HASH("mac1----" || public key of the message's recipient)."""
    return hash_(LABEL_MAC1, public_key)


def cookie_key(public_key: bytes) -> bytes:
    """HASH("cookie--" || public key of the cookie's issuer)."""
    return hash_(LABEL_COOKIE, public_key)


def source_bytes(source: Address) -> bytes:
    """The bytes a cookie is bound to: the IP address bytes then the port, little-endian
    (as wireguard-go)."""
    host, port = source[0], source[1]
    try:
        ip = ipaddress.ip_address(host).packed
    except ValueError:
        ip = str(host).encode("utf-8", "replace")
    return ip + (int(port) & 0xFFFF).to_bytes(2, "little")


def _split(message: bytes) -> tuple[int, int]:
    """Offsets of mac1 and mac2 in an initiation or response."""
    n = len(message)
    return n - 32, n - 16


class CookieChecker:
    """Our side as the recipient of handshake messages: checks mac1/mac2, issues cookies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_rng", "_secret", "_secret_time")

    def __init__(self, own_public_key: bytes, rng: Callable[[int], bytes]) -> None:
        self._mac1_key = mac1_key(own_public_key)
        self._cookie_key = cookie_key(own_public_key)
        self._rng = rng
        self._secret = b""
        self._secret_time: float | None = None

    def check_mac1(self, message: bytes) -> bool:
        m1, m2 = _split(message)
        return _compare(mac(self._mac1_key, message[:m1]), message[m1:m2])

    def _cookie(self, source: Address) -> bytes:
        return mac(self._secret, source_bytes(source))

    def check_mac2(self, message: bytes, source: Address, now: float) -> bool:
        if self._secret_time is None or now - self._secret_time > COOKIE_REFRESH_TIME:
            return False
        _, m2 = _split(message)
        cookie = self._cookie(source)
        return _compare(mac(cookie, message[:m2]), message[m2:])

    def create_reply(self, message: bytes, source: Address, now: float) -> bytes:
        """A cookie reply (type 3) to ``message`` (an initiation or a response) from ``source``."""
        if self._secret_time is None or now - self._secret_time > COOKIE_REFRESH_TIME:
            self._secret = self._rng(32)
            self._secret_time = now
        m1, m2 = _split(message)
        receiver = int.from_bytes(message[4:8], "little")
        nonce = self._rng(24)
        encrypted = xaead_encrypt(self._cookie_key, nonce, self._cookie(source), message[m1:m2])
        return build_cookie_reply(receiver, nonce, encrypted)


class CookieGenerator:
    """Our side as the sender of handshake messages to one peer: adds mac1/mac2, stores the
    cookies that peer sends us."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_time", "_last_mac1", "_mac1_key")

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key = mac1_key(peer_public_key)
        self._cookie_key = cookie_key(peer_public_key)
        self._cookie = b""
        self._cookie_time: float | None = None
        self._last_mac1: bytes | None = None

    def add_macs(self, prefix: bytes, now: float) -> bytes:
        """``prefix`` (all bytes before mac1) followed by mac1 and mac2."""
        mac1 = mac(self._mac1_key, prefix)
        self._last_mac1 = mac1
        body = prefix + mac1
        if self._cookie_time is None or now - self._cookie_time > COOKIE_REFRESH_TIME:
            return body + bytes(16)
        return body + mac(self._cookie, body)

    @property
    def has_cookie(self) -> bool:
        return self._cookie_time is not None

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Decrypt and store the cookie; False when it does not authenticate."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = xaead_decrypt(self._cookie_key, reply.nonce, reply.cookie, self._last_mac1)
        except CryptoFailure:
            return False
        self._cookie = cookie
        self._cookie_time = now
        return True

    def clear(self) -> None:
        self._cookie = b""
        self._cookie_time = None
        self._last_mac1 = None


class RateLimiter:
    """Per-source-IP token bucket for handshakes under load (wireguard-go ``ratelimiter``):
    RATELIMIT_PACKETS_PER_SECOND with a burst of RATELIMIT_BURST, bounded in memory."""

    __slots__ = ("_buckets", "_last_gc")

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_gc = float("-inf")

    def allow(self, host: str, now: float) -> bool:
        buckets = self._buckets
        if now - self._last_gc >= RATELIMIT_GC_INTERVAL:
            self._last_gc = now
            stale = [k for k, (_, t) in buckets.items() if now - t >= RATELIMIT_GC_INTERVAL]
            for k in stale:
                del buckets[k]
        entry = buckets.get(host)
        if entry is None:
            if len(buckets) >= RATELIMIT_MAX_SOURCES:
                return False
            buckets[host] = (RATELIMIT_BURST - 1.0, now)
            return True
        tokens, last = entry
        tokens = min(RATELIMIT_BURST, tokens + max(0.0, now - last) * RATELIMIT_PACKETS_PER_SECOND)
        if tokens >= 1.0:
            buckets[host] = (tokens - 1.0, now)
            return True
        buckets[host] = (tokens, now)
        return False


__all__ = [
    "CookieChecker",
    "CookieGenerator",
    "RateLimiter",
    "cookie_key",
    "mac1_key",
    "source_bytes",
]
