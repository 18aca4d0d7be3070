"""Per-peer state: keys, sessions, handshake, timers, staged packets, endpoint, statistics."""

from __future__ import annotations

from collections import deque

from .allowed_ips import Network
from .constants import PADDING_MULTIPLE, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from .cookie import CookieGenerator
from .events import Address
from .keypair import Keypair
from .noise import Handshake

__all__ = ["Peer"]

assert PADDING_MULTIPLE == 16


class Peer:
    """One remote WireGuard peer of a :class:`~warp.wireguard.device.Device`.

    Read the public attributes; change them only through the device. Times are in the device's
    ``now`` units (a monotonic clock), not wall-clock time.
    """

    __slots__ = (
        "_allowed_ips",
        "cookies",
        "current",
        "current_expired",
        "endpoint",
        "handshake",
        "handshake_attempts",
        "keepalive_at",
        "last_handshake_time",
        "last_sent_handshake",
        "need_another_keepalive",
        "new_handshake_at",
        "next",
        "persistent_at",
        "persistent_keepalive",
        "preshared_key",
        "previous",
        "public_key",
        "retransmit_at",
        "rx_bytes",
        "rx_packets",
        "scheduled",
        "sent_last_minute_handshake",
        "staged",
        "staged_dropped",
        "tx_bytes",
        "tx_packets",
        "zero_at",
    )

    def __init__(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes,
        precomputed_static_static: bytes,
        endpoint: Address | None,
        persistent_keepalive: float | None,
    ) -> None:
        self.public_key = public_key
        self.preshared_key = preshared_key
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive or None
        self._allowed_ips: list[Network] = []
        self.handshake = Handshake(public_key, precomputed_static_static, preshared_key)
        self.cookies = CookieGenerator(public_key)
        # sessions (key confirmation: the responder's new keypair waits in `next`)
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.current_expired = False
        self.staged: deque[bytes] = deque()
        self.staged_dropped = 0
        # statistics
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.last_handshake_time: float | None = None
        # timers (absolute deadlines in `now` units; None = not armed)
        self.last_sent_handshake: float | None = None
        self.handshake_attempts = 0
        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.need_another_keepalive = False
        self.new_handshake_at: float | None = None
        self.zero_at: float | None = None
        self.persistent_at: float | None = None
        self.sent_last_minute_handshake = False
        #: the time of this peer's live entry in the device's timer heap
        self.scheduled: float | None = None

    @property
    def allowed_ips(self) -> tuple[Network, ...]:
        return tuple(self._allowed_ips)

    @property
    def has_session(self) -> bool:
        """True when the current keypair can still send (it may still expire before ``now``:
        :meth:`session_usable` checks against a time)."""
        kp = self.current
        return (
            kp is not None
            and kp.send is not None
            and not self.current_expired
            and kp.send_counter < REJECT_AFTER_MESSAGES
        )

    def session_usable(self, now: float) -> bool:
        kp = self.current
        return (
            kp is not None
            and kp.send is not None
            and kp.send_counter < REJECT_AFTER_MESSAGES
            and now - kp.created < REJECT_AFTER_TIME
        )

    @property
    def handshake_in_progress(self) -> bool:
        return self.retransmit_at is not None

    def deadline(self) -> float | None:
        """The earliest armed timer of this peer."""
        best: float | None = None
        kp = self.current
        candidates = (
            self.retransmit_at,
            self.keepalive_at,
            self.new_handshake_at,
            self.zero_at,
            self.persistent_at,
            kp.created + REJECT_AFTER_TIME
            if kp is not None and not self.current_expired and kp.send is not None
            else None,
        )
        for t in candidates:
            if t is not None and (best is None or t < best):
                best = t
        return best

    def __repr__(self) -> str:
        return (
            f"Peer({self.public_key.hex()[:16]}…, endpoint={self.endpoint}, "
            f"session={self.has_session})"
        )
