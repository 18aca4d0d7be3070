"""Return routability, sans-I/O: which addresses warp-map may send to for a client, and how much.

A WireGuard session proves who a client is, not where it is: a client holds its session keys
and can seal a request and send it with a forged source address. Answering that address, or
registering it and pushing to it, would make the map a reflector against a bystander. So, as
WireGuard's cookie and QUIC's address validation do, an address must prove it receives what the
map sends before the map sends it more than it got from it.

Rules (per client key, that is per session; forgotten with the session):

* An address is *validated* when the map's handshake response went there and the session was
  then confirmed (only whoever received the response can derive the keys), or when a Register
  from it echoes the challenge the map sent there. A challenge is a keyed hash of the client
  key, the address and the time epoch: stateless, valid for the current and the last epoch.
* To an address not validated for the client, the map sends only the Registered carrying the
  challenge (and the device's own keepalives), and only while the total stays within what it
  received from it for that client (its *credit*). Lookup answers, errors, pushes and relayed
  payloads are never sent there. Both refusals are counted.
* Memory is bounded: per client at most ``MAX_VALIDATED`` validated and ``MAX_CREDITED``
  credited addresses, the least recently used dropped first.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import Counter, OrderedDict

from warp.map_client.messages import CHALLENGE_LENGTH, Endpoint

EPOCH_SECONDS = 30.0
MAX_VALIDATED = 32
MAX_CREDITED = 16


class AddressValidator:
    def __init__(self, secret: bytes, *, epoch_seconds: float = EPOCH_SECONDS) -> None:
        if len(secret) < 16:
            raise ValueError("the challenge secret must be at least 16 bytes")
        self._secret = secret[:32]
        self.epoch_seconds = epoch_seconds
        self.counters: Counter[str] = Counter()
        self._validated: dict[bytes, OrderedDict[Endpoint, None]] = {}
        #: client -> address -> bytes the map may still send there (received minus sent)
        self._credit: dict[bytes, OrderedDict[Endpoint, int]] = {}
        #: client -> where the latest handshake response for it went
        self._responded: dict[bytes, Endpoint] = {}

    # ------------------------------------------------------------------------------ queries

    def is_validated(self, key: bytes, address: Endpoint) -> bool:
        validated = self._validated.get(key)
        return validated is not None and address in validated

    def credit(self, key: bytes, address: Endpoint) -> int:
        credits = self._credit.get(key)
        return 0 if credits is None else credits.get(address, 0)

    def __len__(self) -> int:
        return sum(len(v) for v in self._validated.values()) + sum(
            len(c) for c in self._credit.values()
        )

    # ------------------------------------------------------------------------------ inputs

    def received(self, key: bytes, address: Endpoint, size: int) -> None:
        """An authenticated datagram of ``size`` bytes from ``key`` came from ``address``."""
        validated = self._validated.get(key)
        if validated is not None and address in validated:
            validated.move_to_end(address)
            return
        credits = self._credit.setdefault(key, OrderedDict())
        credits[address] = credits.get(address, 0) + size
        credits.move_to_end(address)
        if len(credits) > MAX_CREDITED:
            credits.popitem(last=False)

    def responded(self, key: bytes, address: Endpoint) -> None:
        """The device sent a handshake response for ``key`` to ``address``."""
        self._responded[key] = address

    def handshake_confirmed(self, key: bytes) -> None:
        """The responder's session for ``key`` was confirmed: the latest response arrived."""
        address = self._responded.pop(key, None)
        if address is not None:
            self._validate(key, address)

    def challenge(self, key: bytes, address: Endpoint, now: float) -> bytes | None:
        """The challenge to send ``address`` for ``key``; None when it is already validated."""
        if self.is_validated(key, address):
            return None
        self.counters["validation.challenged"] += 1
        return self._token(key, address, self._epoch(now))

    def confirm(self, key: bytes, address: Endpoint, echoed: bytes, now: float) -> bool:
        """A Register from ``address`` echoed ``echoed``: validate the address if it is right."""
        epoch = self._epoch(now)
        for candidate in (epoch, epoch - 1):
            if hmac.compare_digest(echoed, self._token(key, address, candidate)):
                self._validate(key, address)
                return True
        self.counters["validation.challenge_failed"] += 1
        return False

    def may_send(self, key: bytes, address: Endpoint, size: int, *, challenge: bool) -> bool:
        """Whether the map may send ``size`` bytes for ``key`` to ``address`` (and debit it).
        ``challenge``: the datagram carries the address's challenge or is a keepalive, which
        may use the address's credit; nothing else goes to an unvalidated address."""
        validated = self._validated.get(key)
        if validated is not None and address in validated:
            return True
        if not challenge:
            self.counters["validation.unvalidated_dropped"] += 1
            return False
        credits = self._credit.get(key)
        available = 0 if credits is None else credits.get(address, 0)
        if size > available:
            self.counters["validation.over_credit"] += 1
            return False
        assert credits is not None
        credits[address] = available - size
        return True

    def forget(self, key: bytes) -> None:
        """The session of ``key`` is gone: so is everything it proved."""
        self._validated.pop(key, None)
        self._credit.pop(key, None)
        self._responded.pop(key, None)

    # ------------------------------------------------------------------------------ helpers

    def _validate(self, key: bytes, address: Endpoint) -> None:
        validated = self._validated.setdefault(key, OrderedDict())
        if address not in validated:
            self.counters["validation.validated"] += 1
        validated[address] = None
        validated.move_to_end(address)
        if len(validated) > MAX_VALIDATED:
            validated.popitem(last=False)
        credits = self._credit.get(key)
        if credits is not None:
            credits.pop(address, None)

    def _epoch(self, now: float) -> int:
        return int(now // self.epoch_seconds)

    def _token(self, key: bytes, address: Endpoint, epoch: int) -> bytes:
        host, port = address
        message = (
            key
            + ipaddress.ip_address(host).packed
            + port.to_bytes(2, "big")
            + epoch.to_bytes(8, "big", signed=True)
        )
        return hashlib.blake2s(message, key=self._secret, digest_size=CHALLENGE_LENGTH).digest()
