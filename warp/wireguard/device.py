"""The sans-I/O WireGuard device: many peers, one static key.

Bytes, their source and the current time go in (:meth:`Device.receive`, :meth:`Device.seal`,
:meth:`Device.tick`); decrypted plaintexts, datagrams to send (:meth:`Device.drain_outgoing`),
events (:meth:`Device.drain_events`) and the next timer deadline (:meth:`Device.next_deadline`)
come out. Nothing here touches a socket, sleeps or reads a clock, except the injectable wall clock
used for TAI64N timestamps.

The behaviour follows the whitepaper §5–6 and wireguard-go's ``send.go``, ``receive.go`` and
``timers.go``; deviations are documented in ``docs/protocol.md`` ("WireGuard layer").
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

from .allowed_ips import AllowedIPs
from .constants import (
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    LAST_MINUTE_REKEY_TIME,
    MAX_EVENTS,
    MAX_OUTGOING,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    NEW_HANDSHAKE_TIME,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    REPLAY_RING_BYTES,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
    UNDER_LOAD_AFTER_TIME,
    ZERO_KEY,
    ZERO_KEYS_AFTER,
)
from .cookie import CookieChecker, RateLimiter
from .crypto import (
    NONCE,
    CryptoFailure,
    InvalidTag,
    dh,
    generate_private_key,
    private_key_from_bytes,
    public_key,
)
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
from .keypair import Keypair
from .messages import (
    COOKIE_REPLY,
    INITIATION,
    MESSAGE_TYPE,
    RESPONSE,
    TRANSPORT_HEADER,
    CookieReply,
    Initiation,
    Response,
)
from .noise import (
    HandshakeState,
    accept_initiation,
    accept_response,
    consume_initiation_static,
    consume_initiation_timestamp,
    consume_response,
    create_initiation,
    create_response,
    derive_transport_keys,
)
from .peer import Peer
from .tai64n import next_timestamp

__all__ = ["Device"]

log = logging.getLogger("warp.wireguard")

_DEBUG = logging.DEBUG
_KIND_INITIATION = MessageKind.INITIATION
_KIND_RESPONSE = MessageKind.RESPONSE
_KIND_COOKIE = MessageKind.COOKIE_REPLY
_KIND_TRANSPORT = MessageKind.TRANSPORT
_KIND_KEEPALIVE = MessageKind.KEEPALIVE
_PAD = tuple(bytes(i) for i in range(16))
_nonce = NONCE.pack
_header_pack = TRANSPORT_HEADER.pack
_header_unpack = TRANSPORT_HEADER.unpack_from
_REPLAY_LIMIT = REJECT_AFTER_MESSAGES
_REPLAY_RING = REPLAY_RING_BYTES


def _normalise(source: object) -> Address:
    """``(host, port, flowinfo, scope_id)`` → ``(host, port)``."""
    if isinstance(source, tuple) and len(source) >= 2:
        return (str(source[0]), int(source[1]))
    raise TypeError("source must be a (host, port) tuple")


class Device:
    """A WireGuard interface without I/O: one static key pair, many peers.

    ``now`` values passed to the methods are seconds on a monotonic clock chosen by the caller;
    they must not go backwards. ``wallclock`` is only used for TAI64N handshake timestamps.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        rng: Callable[[int], bytes] = os.urandom,
        wallclock: Callable[[], float] = time.time,
        mtu: int | None = None,
        accept_unknown_peer: Callable[[bytes], bool] | None = None,
        max_peers: int = 1024,
        handshake_load_threshold: float = 50.0,
        roaming_events: bool = True,
    ) -> None:
        if mtu is not None and mtu <= 0:
            raise ValueError("mtu must be positive")
        self._private = private_key_from_bytes(bytes(private_key))
        self.public_key: bytes = public_key(self._private)
        self._rng = rng
        self._wallclock = wallclock
        self.mtu = mtu
        self.accept_unknown_peer = accept_unknown_peer
        self.max_peers = max_peers
        self.handshake_load_threshold = handshake_load_threshold
        self.roaming_events = roaming_events
        self._peers: dict[bytes, Peer] = {}
        #: local index → keypair (types 3 and 4 name it)
        self._keypairs: dict[int, Keypair] = {}
        #: local index → peer whose handshake uses it (types 2 and 3 name it)
        self._handshakes: dict[int, Peer] = {}
        self.allowed_ips = AllowedIPs()
        self._checker = CookieChecker(self.public_key, rng)
        self._ratelimiter = RateLimiter()
        self._outbox: list[Outgoing] = []
        self._events: deque[Event] = deque()
        #: statistics of things that happened
        self.counters: Counter[str] = Counter()
        #: input dropped, by reason (``bad_mac1``, ``replay``, ``bad_size``, ``unknown_index``…)
        self.rejected: Counter[str] = Counter()
        self._forced_load: bool | None = None
        self._under_load_until = float("-inf")
        self._load_window_start = float("-inf")
        self._load_count = 0
        #: timer heap of (time, seq, peer); an entry is live when time == peer.scheduled, and
        #: peer.scheduled is never later than the peer's earliest deadline
        self._timers: list[tuple[float, int, Peer]] = []
        self._timer_seq = itertools.count()
        self._jitter_pool = b""
        self._jitter_pos = 0

    # ------------------------------------------------------------------ peers

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Address | None = None,
        allowed_ips: Sequence[str] = (),
        persistent_keepalive: float | None = None,
    ) -> Peer:
        """Add (or reconfigure the endpoint, allowed IPs and keepalive of) a peer."""
        public_key = bytes(public_key)
        if len(public_key) != 32:
            raise ValueError("a peer public key is 32 bytes")
        if preshared_key is not None and len(preshared_key) != 32:
            raise ValueError("a preshared key is 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a peer cannot have the device's own public key")
        peer = self._peers.get(public_key)
        if peer is None:
            try:
                ss = dh(self._private, public_key)
            except CryptoFailure:
                raise ValueError("invalid peer public key (low-order point)") from None
            peer = self._new_peer(public_key, ss, preshared_key)
        elif preshared_key is not None:
            peer.preshared_key = peer.handshake.preshared_key = bytes(preshared_key)
        if endpoint is not None:
            peer.endpoint = _normalise(endpoint)
        if persistent_keepalive is not None:
            self.set_persistent_keepalive(public_key, persistent_keepalive)
        for network in allowed_ips:
            self.add_allowed_ip(public_key, network)
        return peer

    def _new_peer(self, public_key: bytes, ss: bytes, preshared_key: bytes | None) -> Peer:
        peer = Peer(
            public_key,
            preshared_key=bytes(preshared_key) if preshared_key is not None else ZERO_KEY,
            precomputed_static_static=ss,
            endpoint=None,
            persistent_keepalive=None,
        )
        self._peers[public_key] = peer
        return peer

    def add_allowed_ip(self, peer_key: bytes, network: str) -> None:
        peer = self._peers[peer_key]
        net = self.allowed_ips.insert(network, peer_key)
        for other in self._peers.values():
            if other is not peer and net in other._allowed_ips:
                other._allowed_ips.remove(net)
        if net not in peer._allowed_ips:
            peer._allowed_ips.append(net)

    def set_persistent_keepalive(self, peer_key: bytes, interval: float | None) -> None:
        """Set or clear (None / 0) a peer's persistent keepalive interval. A newly enabled
        keepalive fires at the next tick, as wireguard-go sends one when it is configured."""
        peer = self._peers[peer_key]
        interval = interval or None
        if interval is not None and interval < 0:
            raise ValueError("persistent_keepalive must be >= 0")
        was = peer.persistent_keepalive
        peer.persistent_keepalive = interval
        if interval is None:
            peer.persistent_at = None
        elif was is None:
            peer.persistent_at = float("-inf")  # due at once, as wireguard-go sends one
            self._arm(peer, float("-inf"))

    def remove_peer(self, public_key: bytes) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        for kp in (peer.previous, peer.current, peer.next):
            if kp is not None:
                self._delete_keypair(kp)
        peer.previous = peer.current = peer.next = None
        self._forget_handshake(peer)
        peer.handshake.clear()
        peer.staged.clear()
        self.allowed_ips.remove_peer(public_key)

    def peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(public_key)

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def route(self, destination: bytes) -> bytes | None:
        """The peer key whose allowed IPs hold ``destination`` (4 or 16 raw address bytes)."""
        return self.allowed_ips.lookup(destination)

    # ------------------------------------------------------------------ load

    def set_under_load(self, value: bool | None) -> None:
        """Force the "under load" state (cookies required) on or off; None = automatic, when
        more than ``handshake_load_threshold`` handshake messages arrive within a second."""
        self._forced_load = value

    def under_load(self, now: float) -> bool:
        if self._forced_load is not None:
            return self._forced_load
        return now < self._under_load_until

    def _note_handshake_arrival(self, now: float) -> None:
        if now - self._load_window_start >= 1.0 or now < self._load_window_start:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > self.handshake_load_threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    # ------------------------------------------------------------------ outputs

    @property
    def has_outgoing(self) -> bool:
        """True when :meth:`drain_outgoing` would return something (cheap to ask)."""
        return bool(self._outbox)

    @property
    def has_events(self) -> bool:
        """True when :meth:`drain_events` would return something (cheap to ask)."""
        return bool(self._events)

    def drain_outgoing(self) -> list[Outgoing]:
        out = self._outbox
        self._outbox = []
        return out

    def drain_events(self) -> list[Event]:
        events = list(self._events)
        self._events.clear()
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` should run next (possibly a little early, never late).
        ``-inf`` means "now"."""
        timers = self._timers
        return timers[0][0] if timers else None

    def _out(
        self, data: bytes, dest: Address | None, peer: bytes | None, kind: MessageKind
    ) -> None:
        if len(self._outbox) >= MAX_OUTGOING:
            self.counters["outgoing_dropped"] += 1
            return
        self._outbox.append(Outgoing(data, dest, peer, kind))

    def _event(self, event: Event) -> None:
        if len(self._events) >= MAX_EVENTS:
            self._events.popleft()
            self.counters["events_dropped"] += 1
        self._events.append(event)

    def _arm(self, peer: Peer, t: float) -> None:
        """Make sure ``peer`` is ticked at ``t`` (a deadline moving later needs no call)."""
        s = peer.scheduled
        if s is None or t < s:
            peer.scheduled = t
            heapq.heappush(self._timers, (t, next(self._timer_seq), peer))

    def _jitter(self) -> float:
        """Uniform in [0, REKEY_TIMEOUT_JITTER_MAX) from the injected RNG."""
        pos = self._jitter_pos
        pool = self._jitter_pool
        if pos + 2 > len(pool):
            pool = self._jitter_pool = self._rng(64)
            pos = 0
        self._jitter_pos = pos + 2
        return int.from_bytes(pool[pos : pos + 2], "little") * (REKEY_TIMEOUT_JITTER_MAX / 65536)

    def _new_index(self) -> int:
        keypairs, handshakes = self._keypairs, self._handshakes
        for _ in range(64):
            index = int.from_bytes(self._rng(4), "little")
            if index not in keypairs and index not in handshakes:
                return index
        index = 1  # a broken RNG: fall back to the first free index
        while index in keypairs or index in handshakes:
            index += 1
        return index

    def _reject(self, reason: str, source: Address | None = None) -> None:
        self.rejected[reason] += 1
        if log.isEnabledFor(_DEBUG):
            log.debug(
                "wireguard.rejected reason=%s source=%s",
                reason,
                source,
                extra={"event": "wireguard.rejected", "reason": reason, "source": source},
            )

    def _log(self, event: str, peer: Peer | None = None, **fields: object) -> None:
        if log.isEnabledFor(_DEBUG):
            key = peer.public_key.hex()[:16] if peer is not None else None
            log.debug(
                "%s peer=%s %s",
                event,
                key,
                " ".join(f"{k}={v}" for k, v in fields.items()),
                extra={"event": event, "peer": key},
            )

    # ------------------------------------------------------------------ sending

    def seal(self, peer_key: bytes, plaintext: bytes, now: float) -> bytes | None:
        """Encrypt ``plaintext`` for ``peer_key`` with the current session.

        Returns the type-4 message, or None when there is no usable session: the plaintext is
        then staged (sent when a handshake completes) and a handshake is started. Unknown peer
        keys return None and count ``counters["seal_unknown_peer"]``.
        """
        peer = self._peers.get(peer_key)
        if peer is None:
            self.counters["seal_unknown_peer"] += 1
            return None
        kp = peer.current
        if (
            kp is None
            or kp.send is None
            or kp.send_counter >= REJECT_AFTER_MESSAGES
            or now - kp.created >= REJECT_AFTER_TIME
        ):
            self._stage(peer, plaintext)
            self._send_initiation(peer, now, retry=False)
            return None
        if peer.staged:
            self._flush_staged(peer, kp, now)
        return self._encrypt(peer, kp, plaintext, now)

    def seal_many(
        self, peer_key: bytes, plaintexts: Sequence[bytes], now: float
    ) -> list[bytes | None]:
        """:meth:`seal` each of ``plaintexts`` (e.g. the shards of one block) for one peer.

        Same result as ``[seal(peer_key, p, now) for p in plaintexts]``, but the peer lookup,
        session checks and timer bookkeeping run once per call instead of once per packet."""
        peer = self._peers.get(peer_key)
        kp = peer.current if peer is not None else None
        count = len(plaintexts)
        if (
            peer is None
            or kp is None
            or peer.staged
            or kp.send_counter + count >= REKEY_AFTER_MESSAGES
            or now - kp.created >= REKEY_AFTER_TIME
        ):
            # Anything unusual (no session, staged packets, a rekey or expiry near): one by one.
            seal = self.seal
            return [seal(peer_key, p, now) for p in plaintexts]
        send = kp.send
        if send is None or count == 0:
            seal = self.seal
            return [seal(peer_key, p, now) for p in plaintexts]
        encrypt = send.encrypt
        mtu = self.mtu
        remote_index = kp.remote_index
        counter = kp.send_counter
        out: list[bytes | None] = []
        append = out.append
        tx_bytes = 0
        data = False
        for plaintext in plaintexts:
            n = len(plaintext)
            if n:
                data = True
            pad = -n & 15
            if pad:
                if mtu:
                    last = n % mtu if n > mtu else n
                    padded = (last + 15) & -16
                    pad = (mtu if padded > mtu else padded) - last
                if pad:
                    plaintext = plaintext + _PAD[pad]
            msg = _header_pack(MESSAGE_TRANSPORT, remote_index, counter) + encrypt(
                _nonce(counter), plaintext, None
            )
            counter += 1
            tx_bytes += len(msg)
            append(msg)
        kp.send_counter = counter
        peer.tx_bytes += tx_bytes
        peer.tx_packets += count
        self._note_sent(peer, now, data)  # as _encrypt once per packet, all at the same `now`
        return out

    def _note_sent(self, peer: Peer, now: float, data: bool) -> None:
        """Timers after an authenticated send: persistent keepalive re-armed, passive keepalive
        cancelled, and (for data, not keepalives) the dead-peer timer started."""
        self._authenticated_sent(peer, now)
        if data and peer.new_handshake_at is None:
            t = now + NEW_HANDSHAKE_TIME + self._jitter()
            peer.new_handshake_at = t
            self._arm(peer, t)

    def _encrypt(self, peer: Peer, kp: Keypair, plaintext: bytes, now: float) -> bytes:
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(plaintext)
        pad = -n & 15
        if pad:
            mtu = self.mtu
            if mtu:
                last = n % mtu if n > mtu else n
                padded = (last + 15) & -16
                pad = (mtu if padded > mtu else padded) - last
            if pad:
                plaintext = plaintext + _PAD[pad]
        send = kp.send
        assert send is not None
        msg = _header_pack(MESSAGE_TRANSPORT, kp.remote_index, counter) + send.encrypt(
            _nonce(counter), plaintext, None
        )
        peer.tx_bytes += len(msg)
        peer.tx_packets += 1
        self._note_sent(peer, now, n > 0)
        # keep the key fresh (sending side)
        if counter >= REKEY_AFTER_MESSAGES or (
            kp.is_initiator and now - kp.created >= REKEY_AFTER_TIME
        ):
            self._send_initiation(peer, now, retry=False)
        return msg

    def _stage(self, peer: Peer, plaintext: bytes) -> None:
        staged = peer.staged
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            peer.staged_dropped += 1
            self.counters["staged_dropped"] += 1
        staged.append(plaintext)

    def _flush_staged(self, peer: Peer, kp: Keypair, now: float) -> None:
        staged = peer.staged
        while staged:
            if kp.send_counter >= REJECT_AFTER_MESSAGES:
                self._send_initiation(peer, now, retry=False)
                return
            plaintext = staged.popleft()
            msg = self._encrypt(peer, kp, plaintext, now)
            kind = _KIND_TRANSPORT if plaintext else _KIND_KEEPALIVE
            if not plaintext:
                self.counters["keepalives_sent"] += 1
            self._out(msg, peer.endpoint, peer.public_key, kind)

    def _send_staged(self, peer: Peer, now: float) -> None:
        """Send what is staged, or start a handshake when there is no usable session."""
        if not peer.staged:
            return
        kp = peer.current
        if (
            kp is None
            or kp.send is None
            or kp.send_counter >= REJECT_AFTER_MESSAGES
            or now - kp.created >= REJECT_AFTER_TIME
        ):
            self._send_initiation(peer, now, retry=False)
            return
        self._flush_staged(peer, kp, now)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def initiate_handshake(self, peer_key: bytes, now: float, *, force: bool = False) -> None:
        """Start a handshake now (rate-limited to one initiation per REKEY_TIMEOUT unless
        ``force``). The initiation goes to the outbox."""
        peer = self._peers.get(peer_key)
        if peer is None:
            self.counters["initiate_unknown_peer"] += 1
            return
        if force:
            peer.last_sent_handshake = None
        self._send_initiation(peer, now, retry=False)

    def _send_initiation(self, peer: Peer, now: float, *, retry: bool) -> None:
        if not retry:
            peer.handshake_attempts = 0
        last = peer.last_sent_handshake
        if last is not None and now - last < REKEY_TIMEOUT:
            if retry:
                t = last + REKEY_TIMEOUT + self._jitter()
                peer.retransmit_at = t
                self._arm(peer, t)
            return
        peer.last_sent_handshake = now
        hs = peer.handshake
        self._forget_handshake(peer)
        index = self._new_index()
        ephemeral = generate_private_key(self._rng(32))
        stamp = next_timestamp(self._wallclock(), hs.last_sent_timestamp)
        hs.last_sent_timestamp = stamp
        try:
            prefix = create_initiation(hs, self._private, self.public_key, ephemeral, index, stamp)
        except CryptoFailure:  # pragma: no cover - keys are validated in add_peer
            hs.clear()
            self.counters["initiation_failed"] += 1
            return
        self._handshakes[index] = peer
        msg = peer.cookies.add_macs(prefix, now)
        self.counters["initiations_sent"] += 1
        self._log("handshake.initiated", peer, retry=retry, attempts=peer.handshake_attempts)
        self._authenticated_sent(peer, now)
        self._out(msg, peer.endpoint, peer.public_key, _KIND_INITIATION)
        t = now + REKEY_TIMEOUT + self._jitter()
        peer.retransmit_at = t
        self._arm(peer, t)

    def _rearm_persistent_keepalive(self, peer: Peer, now: float) -> None:
        """Any authenticated packet, sent or received, pushes the persistent keepalive back."""
        pk = peer.persistent_keepalive
        if pk is not None:
            if peer.persistent_at is None:
                self._arm(peer, now + pk)
            peer.persistent_at = now + pk

    def _authenticated_sent(self, peer: Peer, now: float) -> None:
        self._rearm_persistent_keepalive(peer, now)
        peer.keepalive_at = None

    def _authenticated_received(self, peer: Peer, now: float) -> None:
        self._rearm_persistent_keepalive(peer, now)
        peer.new_handshake_at = None

    def _forget_handshake(self, peer: Peer) -> None:
        index = peer.handshake.local_index
        if index and self._handshakes.get(index) is peer:
            del self._handshakes[index]

    def _delete_keypair(self, kp: Keypair | None) -> None:
        if kp is None:
            return
        if self._keypairs.get(kp.local_index) is kp:
            del self._keypairs[kp.local_index]
        kp.zero()

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes, source: Address, now: float) -> Received | None:
        """Process one datagram from ``source``. Never raises.

        Returns a :class:`Received` for every authenticated transport message (keepalives
        included, with ``plaintext == b""``); handshake and cookie messages return None and put
        their replies in the outbox. Dropped input is counted in :attr:`rejected`.
        """
        try:
            if len(source) != 2:
                source = _normalise(source)
            n = len(data)
            if n >= TRANSPORT_MIN_SIZE and data[0] == MESSAGE_TRANSPORT:
                typ, index, counter = _header_unpack(data)
                if typ != MESSAGE_TRANSPORT:
                    self._reject("bad_reserved", source)
                    return None
                kp = self._keypairs.get(index)
                if kp is None:
                    self._reject("unknown_index", source)
                    return None
                cipher = kp.receive
                if cipher is None:
                    self._reject("unknown_index", source)
                    return None
                if now - kp.created >= REJECT_AFTER_TIME:
                    self._reject("expired_keypair", source)
                    return None
                replay = kp.replay
                last = replay.last
                # In order (the common case) needs no window lookup; else the full check.
                in_order = last < counter < _REPLAY_LIMIT
                if not in_order and not replay.check(counter):
                    self._reject("replay", source)
                    return None
                try:
                    plaintext = cipher.decrypt(_nonce(counter), data[16:], None)
                except InvalidTag:
                    self._reject("decrypt_failed", source)
                    return None
                if in_order and counter >> 3 == last >> 3:
                    # ReplayWindow.mark inlined for a counter in the same ring byte as the
                    # last one (7 in 8 in-order packets): no blocks to clear.
                    replay._bits[(counter >> 3) % _REPLAY_RING] |= 1 << (counter & 7)
                    replay.last = counter
                else:
                    replay.mark(counter)
                peer = kp.peer
                if source != peer.endpoint:
                    # Multi-path: the source alternates between paths on nearly every packet,
                    # so without roaming events this is one store, no call, no allocation.
                    if self.roaming_events:
                        self._set_endpoint(peer, source)
                    else:
                        peer.endpoint = source
                if kp is peer.next:
                    self._confirm_session(peer, kp, source, now)
                # keep the key fresh (receiving side): one "last-minute" handshake at 165 s
                if not peer.sent_last_minute_handshake:
                    cur = peer.current
                    if (
                        cur is not None
                        and cur.is_initiator
                        and now - cur.created >= LAST_MINUTE_REKEY_TIME
                    ):
                        peer.sent_last_minute_handshake = True
                        self._send_initiation(peer, now, retry=False)
                # _authenticated_received, inlined: this runs for every shard received.
                pk = peer.persistent_keepalive
                if pk is not None:
                    if peer.persistent_at is None:
                        self._arm(peer, now + pk)
                    peer.persistent_at = now + pk
                peer.new_handshake_at = None
                peer.rx_bytes += n
                peer.rx_packets += 1
                if not plaintext:
                    return Received(peer.public_key, b"", source)
                # data received: passive keepalive
                if peer.keepalive_at is None:
                    t = now + KEEPALIVE_TIMEOUT
                    peer.keepalive_at = t
                    self._arm(peer, t)
                else:
                    peer.need_another_keepalive = True
                version = plaintext[0] >> 4
                if version == 4 or version == 6:
                    checked = self._check_ip(peer, plaintext, source)
                    if checked is None:
                        return None
                    plaintext = checked
                return Received(peer.public_key, plaintext, source)
            self._receive_other(data, source, now)
            return None
        except Exception:  # a bug, never the peer's fault: count it, never raise
            self.rejected["internal_error"] += 1
            log.exception("wireguard.internal_error", extra={"event": "wireguard.internal_error"})
            return None

    def _check_ip(self, peer: Peer, plaintext: bytes, source: Address) -> bytes | None:
        """Trim an IP packet to its IP length and check its source against the peer's
        allowed IPs."""
        n = len(plaintext)
        if plaintext[0] >> 4 == 4:
            if n < 20:
                self._reject("bad_ip_packet", source)
                return None
            length = (plaintext[2] << 8) | plaintext[3]
            if length < 20 or length > n:
                self._reject("bad_ip_packet", source)
                return None
            src = plaintext[12:16]
        else:
            if n < 40:
                self._reject("bad_ip_packet", source)
                return None
            length = 40 + ((plaintext[4] << 8) | plaintext[5])
            if length > n:
                self._reject("bad_ip_packet", source)
                return None
            src = plaintext[8:24]
        if self.allowed_ips.lookup(src) != peer.public_key:
            self._reject("not_allowed_ip", source)
            return None
        return plaintext if length == n else plaintext[:length]

    def _set_endpoint(self, peer: Peer, source: Address) -> None:
        old = peer.endpoint
        peer.endpoint = source
        if self.roaming_events:
            self._event(PeerRoamed(peer.public_key, old, source))

    def _confirm_session(self, peer: Peer, kp: Keypair, source: Address, now: float) -> None:
        """Key confirmation on the responder: the first packet under `next` promotes it."""
        self._delete_keypair(peer.previous)
        peer.previous = peer.current
        peer.current = kp
        peer.next = None
        peer.current_expired = False
        self._arm(peer, kp.created + REJECT_AFTER_TIME)
        self._handshake_complete(peer, now)
        self.counters["handshakes_completed"] += 1
        self._log("handshake.complete", peer, initiator=False, source=source)
        self._event(HandshakeComplete(peer.public_key, False, source))
        self._send_staged(peer, now)

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.retransmit_at = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake_time = now

    def _receive_other(self, data: bytes, source: Address, now: float) -> None:
        n = len(data)
        if n < 4:
            self._reject("bad_size", source)
            return
        (typ,) = MESSAGE_TYPE.unpack_from(data)
        if typ == MESSAGE_INITIATION:
            if n != INITIATION_SIZE:
                self._reject("bad_size", source)
                return
            if self._check_handshake_macs(data, source, now):
                self._consume_initiation(data, source, now)
        elif typ == MESSAGE_RESPONSE:
            if n != RESPONSE_SIZE:
                self._reject("bad_size", source)
                return
            if self._check_handshake_macs(data, source, now):
                self._consume_response(data, source, now)
        elif typ == MESSAGE_COOKIE_REPLY:
            if n != COOKIE_REPLY.size:
                self._reject("bad_size", source)
                return
            self._consume_cookie_reply(data, source, now)
        elif typ == MESSAGE_TRANSPORT:
            self._reject("bad_size", source)  # shorter than a keepalive
        elif 1 <= data[0] <= 4:
            self._reject("bad_reserved", source)
        else:
            self._reject("bad_type", source)

    def _check_handshake_macs(self, data: bytes, source: Address, now: float) -> bool:
        self._note_handshake_arrival(now)
        if not self._checker.check_mac1(data):
            self._reject("bad_mac1", source)
            return False
        if self.under_load(now):
            if not self._checker.check_mac2(data, source, now):
                reply = self._checker.create_reply(data, source, now)
                self.counters["cookie_replies_sent"] += 1
                self._log("cookie.sent", None, source=source)
                self._out(reply, source, None, _KIND_COOKIE)
                return False
            if not self._ratelimiter.allow(source[0], now):
                self._reject("rate_limited", source)
                return False
        return True

    def _consume_initiation(self, data: bytes, source: Address, now: float) -> None:
        _, *fields = INITIATION.unpack(data)
        msg = Initiation(*fields)
        try:
            partial = consume_initiation_static(self._private, self.public_key, msg)
        except CryptoFailure:
            self._reject("decrypt_failed", source)
            return
        peer = self._peers.get(partial.static)
        accepted = False
        if peer is None:
            policy = self.accept_unknown_peer
            if policy is None:
                self._reject("unknown_peer", source)
                return
            try:
                ss = dh(self._private, partial.static)
                stamp, h, ck = consume_initiation_timestamp(partial, ss, msg)
            except CryptoFailure:
                self._reject("decrypt_failed", source)
                return
            if len(self._peers) >= self.max_peers:
                self._reject("too_many_peers", source)
                return
            try:
                allowed = bool(policy(partial.static))
            except Exception:
                log.exception("wireguard.policy_error", extra={"event": "wireguard.policy_error"})
                allowed = False
            if not allowed:
                self._reject("peer_refused", source)
                return
            peer = self._new_peer(partial.static, ss, None)
            accepted = True
        else:
            try:
                stamp, h, ck = consume_initiation_timestamp(
                    partial, peer.handshake.precomputed_static_static, msg
                )
            except CryptoFailure:
                self._reject("decrypt_failed", source)
                return
        hs = peer.handshake
        if not stamp > hs.last_timestamp:
            self._reject("stale_timestamp", source)
            return
        last = hs.last_initiation_consumed
        if last is not None and now - last <= HANDSHAKE_INITIATION_RATE:
            self._reject("handshake_flood", source)
            return
        self._forget_handshake(peer)
        accept_initiation(hs, msg, h, ck, stamp, now)
        self.counters["initiations_received"] += 1
        if accepted:
            self.counters["peers_accepted"] += 1
            self._log("peer.accepted", peer, source=source)
            self._event(UnknownPeerAccepted(peer.public_key, source))
        self._authenticated_received(peer, now)
        if source != peer.endpoint:
            self._set_endpoint(peer, source)
        self._send_response(peer, now)

    def _send_response(self, peer: Peer, now: float) -> None:
        peer.last_sent_handshake = now
        hs = peer.handshake
        index = self._new_index()
        try:
            prefix = create_response(hs, generate_private_key(self._rng(32)), index)
        except CryptoFailure:  # the initiator sent a low-order ephemeral key
            hs.clear()
            self._reject("bad_key", peer.endpoint)
            return
        msg = peer.cookies.add_macs(prefix, now)
        self._begin_session(peer, now, initiator=False)
        self.counters["responses_sent"] += 1
        self._log("handshake.responded", peer)
        self._authenticated_sent(peer, now)
        self._out(msg, peer.endpoint, peer.public_key, _KIND_RESPONSE)

    def _begin_session(self, peer: Peer, now: float, *, initiator: bool) -> None:
        hs = peer.handshake
        send, recv = derive_transport_keys(hs.chaining_key, initiator)
        kp = Keypair(
            peer,
            send,
            recv,
            is_initiator=initiator,
            local_index=hs.local_index,
            remote_index=hs.remote_index,
            created=now,
        )
        self._forget_handshake(peer)
        self._keypairs[kp.local_index] = kp
        hs.clear()
        if initiator:
            if peer.next is not None:
                self._delete_keypair(peer.previous)
                self._delete_keypair(peer.current)
                peer.previous = peer.next
                peer.next = None
            else:
                self._delete_keypair(peer.previous)
                peer.previous = peer.current
            peer.current = kp
            peer.current_expired = False
            self._arm(peer, now + REJECT_AFTER_TIME)
        else:
            self._delete_keypair(peer.next)
            peer.next = kp
            self._delete_keypair(peer.previous)
            peer.previous = None
        # session derived: arm the zero-keys timer
        t = now + ZERO_KEYS_AFTER
        peer.zero_at = t
        self._arm(peer, t)

    def _consume_response(self, data: bytes, source: Address, now: float) -> None:
        _, *fields = RESPONSE.unpack(data)
        msg = Response(*fields)
        peer = self._handshakes.get(msg.receiver)
        if peer is None:
            self._reject("unknown_index", source)
            return
        hs = peer.handshake
        if hs.state != HandshakeState.INITIATION_CREATED or hs.local_index != msg.receiver:
            self._reject("unexpected_response", source)
            return
        try:
            h, ck = consume_response(hs, self._private, msg)
        except CryptoFailure:
            self._reject("decrypt_failed", source)
            return
        accept_response(hs, msg, h, ck)
        self.counters["responses_received"] += 1
        if source != peer.endpoint:
            self._set_endpoint(peer, source)
        self._authenticated_received(peer, now)
        self._begin_session(peer, now, initiator=True)
        self._handshake_complete(peer, now)
        self.counters["handshakes_completed"] += 1
        self._log("handshake.complete", peer, initiator=True, source=source)
        self._event(HandshakeComplete(peer.public_key, True, source))
        self._send_keepalive(peer, now)

    def _consume_cookie_reply(self, data: bytes, source: Address, now: float) -> None:
        _, *fields = COOKIE_REPLY.unpack(data)
        reply = CookieReply(*fields)
        peer = self._handshakes.get(reply.receiver)
        if peer is None:
            kp = self._keypairs.get(reply.receiver)
            if kp is not None:
                peer = kp.peer
        if peer is None:
            self._reject("unknown_index", source)
            return
        if not peer.cookies.consume_reply(reply, now):
            self._reject("bad_cookie", source)
            return
        self.counters["cookie_replies_received"] += 1
        self._log("cookie.received", peer, source=source)

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        timers = self._timers
        peers = self._peers
        due: list[Peer] = []
        while timers and timers[0][0] <= now:
            t, _, peer = heapq.heappop(timers)
            if peer.scheduled == t:
                peer.scheduled = None
                if peers.get(peer.public_key) is peer:
                    due.append(peer)
        for peer in due:
            try:
                self._tick_peer(peer, now)
            except Exception:  # pragma: no cover - defensive
                self.rejected["internal_error"] += 1
                log.exception(
                    "wireguard.internal_error", extra={"event": "wireguard.internal_error"}
                )
            if peers.get(peer.public_key) is peer:
                d = peer.deadline()
                if d is not None:
                    self._arm(peer, d)

    def _tick_peer(self, peer: Peer, now: float) -> None:
        if peer.zero_at is not None and now >= peer.zero_at:
            peer.zero_at = None
            self._zero_keys(peer)
        kp = peer.current
        if (
            kp is not None
            and kp.send is not None
            and not peer.current_expired
            and now >= kp.created + REJECT_AFTER_TIME
        ):
            peer.current_expired = True
            self.counters["sessions_expired"] += 1
            self._log("session.expired", peer)
            self._event(SessionExpired(peer.public_key))
        if peer.retransmit_at is not None and now >= peer.retransmit_at:
            peer.retransmit_at = None
            self._retransmit_handshake(peer, now)
        if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
            peer.new_handshake_at = None
            self._log("handshake.dead_peer", peer)
            self._send_initiation(peer, now, retry=False)
        if peer.keepalive_at is not None and now >= peer.keepalive_at:
            peer.keepalive_at = None
            self._send_keepalive(peer, now)
            if peer.need_another_keepalive:
                peer.need_another_keepalive = False
                peer.keepalive_at = now + KEEPALIVE_TIMEOUT  # armed by tick()
        if peer.persistent_at is not None and now >= peer.persistent_at:
            peer.persistent_at = None  # re-armed by the next authenticated packet
            if peer.persistent_keepalive:
                self._send_keepalive(peer, now)

    def _retransmit_handshake(self, peer: Peer, now: float) -> None:
        if peer.handshake_attempts > MAX_TIMER_HANDSHAKES:
            dropped = len(peer.staged)
            peer.staged.clear()
            peer.staged_dropped += dropped
            self.counters["staged_dropped"] += dropped
            self.counters["handshakes_failed"] += 1
            peer.keepalive_at = None
            self._log("handshake.failed", peer, attempts=peer.handshake_attempts)
            self._event(HandshakeFailed(peer.public_key, dropped))
            if peer.zero_at is None:
                peer.zero_at = now + ZERO_KEYS_AFTER  # armed by tick()
            return
        peer.handshake_attempts += 1
        self._send_initiation(peer, now, retry=True)

    def _zero_keys(self, peer: Peer) -> None:
        for kp in (peer.previous, peer.current, peer.next):
            self._delete_keypair(kp)
        peer.previous = peer.current = peer.next = None
        peer.current_expired = False
        self._forget_handshake(peer)
        peer.handshake.clear()
        dropped = len(peer.staged)
        peer.staged.clear()
        peer.staged_dropped += dropped
        self.counters["staged_dropped"] += dropped
        self.counters["keys_zeroed"] += 1
        self._log("keys.zeroed", peer)
        self._event(KeysZeroed(peer.public_key))
