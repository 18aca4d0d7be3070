"""The rendezvous client, sans-I/O: what a gateway tells warp-map and what it learns from it.

:class:`MapClient` owns no socket and no WireGuard device. The gateway (or
:mod:`warp.map_client.driver`) feeds it map plaintexts with the uplink they arrived on and the
current time, and carries out its :class:`MapSend` actions: *seal this frame for the map peer
and send it to the map from this uplink's socket*. Each uplink registers with its own packet,
so the map sees, and tells back, each uplink's own reflexive address.

Behaviour:

* every uplink registers at once when added or changed, then every ``refresh_interval`` (or
  half the map's TTL if that is shorter); the far gate is looked up at the same rhythm, and
  every push from the map about the far gate is applied at once;
* unanswered requests are retried after ``response_timeout``, doubling up to
  ``max_retry_interval``; after two unanswered requests in a row (nothing at all heard from the
  map meanwhile) the client asks for a fresh WireGuard handshake with the map
  (:class:`RehandshakeNeeded`, at most once per ``rehandshake_interval``, by default a
  quarter of the refresh interval) and re-registers every
  uplink at once: this is how it recovers from a map restart, which loses all sessions;
* a map whose boot id changed (it restarted) gets every uplink re-registered at once;
* a Registered carrying a challenge (the map has not validated that uplink's address yet) gets
  the uplink registered again at once with the challenge echoed (once per challenge);
* with several map instances (``map_count`` > 1, a map cluster), the far gate is looked up
  every ``liveness_interval`` at least, so that a dead instance is noticed within about a
  second; after ``FAILOVER_AFTER`` unanswered requests in a row the client moves to the next
  instance (:class:`MapSwitched`: the driver points the map session there and starts a fresh
  handshake) and registers every uplink there at once. Paths to the far gate are not touched;
* ``stop`` deregisters everything and reports :class:`Stopped` when the map confirmed or the
  attempts ran out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeAlias, TypeVar

from warp.map_client.messages import (
    MAX_FAR_GATES,
    U32,
    Deregister,
    Endpoint,
    Error,
    ErrorCode,
    Lookup,
    MapMessage,
    MessageError,
    PeerEndpoints,
    Push,
    Register,
    Registered,
    Relay,
    Relayed,
    decode,
    encode,
    is_map_frame,
)

U = TypeVar("U", bound=Hashable)

STOP_ATTEMPTS = 3
#: unanswered requests in a row after which the client moves to the next map instance
FAILOVER_AFTER = 2


# ------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True, slots=True)
class MapSend(Generic[U]):
    """Seal ``frame`` for the map's public key and send it from ``uplink``'s socket."""

    uplink: U
    frame: bytes


@dataclass(frozen=True, slots=True)
class UplinkRegistered(Generic[U]):
    """The map confirmed ``uplink``'s registration; ``reflexive`` is the address it saw."""

    uplink: U
    reflexive: Endpoint
    ttl: float
    changed: bool  # first registration, or the reflexive address moved


@dataclass(frozen=True, slots=True)
class UplinkExpired(Generic[U]):
    """``uplink``'s registration ran past its TTL without a confirmed refresh."""

    uplink: U


@dataclass(frozen=True, slots=True)
class PeerEndpointsChanged:
    """The far gate's endpoints as the map knows them (freshest first); may be empty."""

    key: bytes
    endpoints: tuple[Endpoint, ...]
    pushed: bool  # True: from a push, False: from a lookup answer


@dataclass(frozen=True, slots=True)
class LookupRefused:
    """The map would not say where the far gate is (``mutual`` policy: it has not registered
    us as its far gate, or is not registered at all)."""

    key: bytes
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class RelayReceived(Generic[U]):
    """A relayed payload (a sealed WireGuard message) from ``sender``; feed it to the device.
    It arrived on ``uplink``; ``source``: the sender's endpoint it was relayed from (None if
    the map did not say)."""

    sender: bytes
    payload: bytes
    uplink: U
    source: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class MapErrorReceived:
    request_id: int | None
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class RehandshakeNeeded:
    """Requests to the map go unanswered: start a fresh WireGuard handshake with the map (its
    session may be gone, e.g. after a restart). Frames already handed out may be re-sent."""

    unanswered: int


@dataclass(frozen=True, slots=True)
class MapSwitched:
    """The map instance in use stopped answering: use instance ``index`` (of ``map_count``)
    from now on, with a fresh WireGuard handshake. Frames already handed out may be re-sent."""

    index: int
    previous: int
    unanswered: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """``stop`` finished: ``acknowledged`` says whether the map confirmed the deregistration."""

    acknowledged: bool


MapEvent: TypeAlias = (
    UplinkRegistered[U]
    | UplinkExpired[U]
    | PeerEndpointsChanged
    | LookupRefused
    | RelayReceived[U]
    | MapErrorReceived
    | RehandshakeNeeded
    | MapSwitched
    | Stopped
)


# ------------------------------------------------------------------------------------ state


RequestKind = Literal["register", "lookup", "deregister", "stop"]


@dataclass(slots=True)
class _Pending(Generic[U]):
    kind: RequestKind
    request_id: int
    frame: bytes
    uplink: U | None  # None: from any uplink (the best one at the time of sending)
    deadline: float
    attempt: int = 0


@dataclass(slots=True)
class _Uplink(Generic[U]):
    id: U
    tag: int
    reflexive: Endpoint | None = None
    registered_until: float | None = None
    next_register: float = 0.0
    register_request: int | None = None
    last_reply: float | None = None
    echoed_challenge: bytes | None = None


@dataclass(slots=True)
class _Lookup:
    """What the map said about one far gate, and when to ask again."""

    next_lookup: float | None = 0.0
    request: int | None = None
    endpoints: tuple[Endpoint, ...] | None = None
    version: tuple[int, int] | None = None  # (boot, version)
    refused: bool = False


@dataclass(slots=True)
class MapClientStats:
    requests_sent: int = 0
    retries: int = 0
    replies: int = 0
    pushes: int = 0
    relayed_in: int = 0
    relayed_out: int = 0
    invalid: int = 0
    rehandshakes: int = 0
    failovers: int = 0
    errors: dict[int, int] = field(default_factory=dict)


class MapClient(Generic[U]):
    """Rendezvous client state machine; see the module docstring.

    ``far_gate``: the public key of the peer this gateway wants to reach, or several (a
    fleet): each is looked up and its pushes applied, and registrations name them all (the
    first MAX_FAR_GATES), so that under the map's ``mutual`` policy each may see this one.
    ``refresh_interval``: ``interfaces.interface_scan_interval``.
    ``rng``: source of random bytes (instance id, uplink tags, request ids).
    """

    def __init__(
        self,
        far_gate: bytes | Sequence[bytes],
        *,
        refresh_interval: float = 10.0,
        response_timeout: float = 1.0,
        max_retry_interval: float | None = None,
        rehandshake_interval: float | None = None,
        map_count: int = 1,
        liveness_interval: float = 0.5,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        far_gates = (far_gate,) if isinstance(far_gate, bytes) else tuple(far_gate)
        if not far_gates or any(len(key) != 32 for key in far_gates):
            raise ValueError("far_gate must be a 32-byte public key")
        if refresh_interval <= 0 or response_timeout <= 0:
            raise ValueError("refresh_interval and response_timeout must be positive")
        self.far_gate = far_gates[0]
        self.far_gates = far_gates
        self.refresh_interval = refresh_interval
        self.response_timeout = response_timeout
        self.max_retry_interval = (
            max_retry_interval
            if max_retry_interval is not None
            else max(response_timeout, min(refresh_interval / 2, 8.0))
        )
        # A forced handshake bypasses WireGuard's REKEY_TIMEOUT (5 s): do it at most this often.
        self.rehandshake_interval = (
            rehandshake_interval
            if rehandshake_interval is not None
            else min(5.0, max(response_timeout, refresh_interval / 4))
        )
        if liveness_interval <= 0:
            raise ValueError("liveness_interval must be positive")
        #: map instances to fail over between (``warp_map.address`` list); settable once the
        #: addresses are resolved
        self.map_count = map_count
        self.map_index = 0
        self.liveness_interval = liveness_interval
        self._rng = rng
        self.instance = int.from_bytes(rng(8), "big")
        self._next_request = int.from_bytes(rng(4), "big")
        self._uplinks: dict[U, _Uplink[U]] = {}
        self._pending: dict[int, _Pending[U]] = {}
        self._outbox: list[MapSend[U]] = []
        self._events: list[MapEvent[U]] = []
        self._lookups: dict[bytes, _Lookup] = {key: _Lookup() for key in far_gates}
        self._lookup_of: dict[int, bytes] = {}  # lookup request id -> far gate
        self._map_boot: int | None = None
        self._ttl: float | None = None
        self._unanswered = 0
        self._last_rehandshake: float | None = None
        self._stopping = False
        self._stopped = False
        self.stats = MapClientStats()

    # ------------------------------------------------------------------------ observation

    @property
    def uplinks(self) -> list[U]:
        return list(self._uplinks)

    @property
    def peer_endpoints(self) -> tuple[Endpoint, ...]:
        """The (first) far gate's endpoints as last heard from the map (freshest first)."""
        return self.endpoints_of(self.far_gate)

    def endpoints_of(self, far_gate: bytes) -> tuple[Endpoint, ...]:
        """A far gate's endpoints as last heard from the map (freshest first)."""
        state = self._lookups.get(far_gate)
        return (state.endpoints or ()) if state is not None else ()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def reflexive_addresses(self, now: float) -> dict[U, Endpoint]:
        """Each registered uplink's public address as the map saw it."""
        return {
            u.id: u.reflexive
            for u in self._uplinks.values()
            if u.reflexive is not None and self._is_registered(u, now)
        }

    def registered(self, uplink: U, now: float) -> bool:
        state = self._uplinks.get(uplink)
        return state is not None and self._is_registered(state, now)

    def all_registered(self, now: float) -> bool:
        return bool(self._uplinks) and all(
            self._is_registered(u, now) for u in self._uplinks.values()
        )

    @staticmethod
    def _is_registered(uplink: _Uplink[U], now: float) -> bool:
        return uplink.registered_until is not None and uplink.registered_until > now

    def drain_outgoing(self) -> list[MapSend[U]]:
        out, self._outbox = self._outbox, []
        return out

    def drain_events(self) -> list[MapEvent[U]]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        candidates = [p.deadline for p in self._pending.values()]
        if not self._stopping:
            candidates.extend(
                u.next_register for u in self._uplinks.values() if u.register_request is None
            )
            candidates.extend(
                u.registered_until for u in self._uplinks.values() if u.registered_until is not None
            )
            if self._uplinks:
                candidates.extend(
                    state.next_lookup
                    for state in self._lookups.values()
                    if state.next_lookup is not None and state.request is None
                )
        return min(candidates) if candidates else None

    # ------------------------------------------------------------------------ commands

    def add_uplink(self, uplink: U, now: float) -> None:
        """A new uplink socket exists: register it at once."""
        if uplink in self._uplinks or self._stopping:
            return
        self._uplinks[uplink] = _Uplink(uplink, self._new_tag(), next_register=now)
        self.tick(now)

    def uplink_changed(self, uplink: U, now: float) -> None:
        """The uplink's address or route changed: re-register it at once."""
        state = self._uplinks.get(uplink)
        if state is None or self._stopping:
            return
        self._cancel(state.register_request)
        state.register_request = None
        state.next_register = now
        self.tick(now)

    def remove_uplink(self, uplink: U, now: float) -> None:
        """The uplink is gone: forget it and deregister it (through another uplink)."""
        state = self._uplinks.pop(uplink, None)
        if state is None:
            return
        self._cancel(state.register_request)
        for pending in self._pending.values():
            if pending.uplink == uplink:
                pending.uplink = None
        if self._uplinks and not self._stopping and state.registered_until is not None:
            request_id = self._new_request_id()
            self._request("deregister", request_id, Deregister(request_id, state.tag), None, now)

    def set_far_gates(self, far_gates: Sequence[bytes], now: float) -> None:
        """A reload changed the far gates: look up the new ones now, forget the removed ones
        (their pending lookups cancelled) and re-register every uplink so that the map has
        the new list (its ``mutual`` policy). Known far gates keep what the map said."""
        keys = tuple(far_gates)
        if not keys or any(len(key) != 32 for key in keys):
            raise ValueError("far_gates must be 32-byte public keys")
        if keys == self.far_gates:
            return
        for key in [k for k in self._lookups if k not in keys]:
            self._cancel(self._lookups[key].request)
            del self._lookups[key]
        for key in keys:
            self._lookups.setdefault(key, _Lookup(next_lookup=now))
        self.far_gate = keys[0]
        self.far_gates = keys
        if self._stopping:
            return
        for state in self._uplinks.values():
            self._cancel(state.register_request)
            state.register_request = None
            state.next_register = now
        self.tick(now)

    def refresh(self, now: float) -> None:
        """Re-register every uplink and look the far gate up now (e.g. after a rescan)."""
        if self._stopping:
            return
        for state in self._uplinks.values():
            if state.register_request is None:
                state.next_register = now
        for lookup in self._lookups.values():
            if lookup.request is None:
                lookup.next_lookup = now
        self.tick(now)

    def relay(
        self,
        payload: bytes,
        now: float,
        uplink: U | None = None,
        *,
        to: bytes | None = None,
        endpoint: Endpoint | None = None,
    ) -> bool:
        """Ask the map to forward ``payload`` (a sealed WireGuard message) to the far gate
        (``to``: which one; the first by default), sent from ``uplink`` (else the best one),
        delivered to the far gate's ``endpoint`` (else its freshest)."""
        via = uplink if uplink in self._uplinks else self._best_uplink()
        target = self.far_gate if to is None else to
        if via is None or self._stopped or target not in self._lookups:
            return False
        self._outbox.append(MapSend(via, encode(Relay(target, payload, endpoint))))
        self.stats.relayed_out += 1
        return True

    def stop(self, now: float) -> None:
        """Deregister every uplink (sent from each of them) and stop refreshing."""
        if self._stopping:
            return
        self._stopping = True
        for pending in list(self._pending.values()):
            self._cancel(pending.request_id)
        for state in self._uplinks.values():
            state.register_request = None
        if not self._uplinks:
            self._finish_stop(acknowledged=False)
            return
        request_id = self._new_request_id()
        frame = encode(Deregister(request_id, None))
        for state in self._uplinks.values():
            self._outbox.append(MapSend(state.id, frame))
        self.stats.requests_sent += 1
        self._pending[request_id] = _Pending(
            "stop", request_id, frame, None, now + self.response_timeout
        )

    # ------------------------------------------------------------------------ inputs

    def receive(self, plaintext: bytes, uplink: U, now: float) -> bool:
        """Handle a plaintext from the map session; False if it is not a map frame."""
        if not is_map_frame(plaintext):
            return False
        try:
            message = decode(plaintext)
        except MessageError:
            self.stats.invalid += 1
            return True
        self._unanswered = 0
        self._handle(message, uplink, now)
        return True

    def tick(self, now: float) -> None:
        """Run timers: retries, refreshes, lookups, expiry of our own registrations."""
        for pending in sorted(self._pending.values(), key=lambda p: p.deadline):
            if pending.deadline <= now and pending.request_id in self._pending:
                self._timed_out(pending, now)
        if self._stopping:
            return
        for state in self._uplinks.values():
            if state.registered_until is not None and state.registered_until <= now:
                state.registered_until = None
                self._events.append(UplinkExpired(state.id))
            if state.register_request is None and state.next_register <= now:
                self._register(state, now)
        if not self._uplinks:
            return
        for key, lookup in self._lookups.items():
            if (
                lookup.request is None
                and lookup.next_lookup is not None
                and lookup.next_lookup <= now
            ):
                request_id = self._new_request_id()
                lookup.request = request_id
                lookup.next_lookup = None
                self._lookup_of[request_id] = key
                self._request("lookup", request_id, Lookup(request_id, key), None, now)

    # ------------------------------------------------------------------------ internals

    def _handle(self, message: MapMessage, uplink: U, now: float) -> None:
        match message:
            case Registered():
                self._on_registered(message, now)
            case PeerEndpoints():
                self._on_peer_endpoints(message, now)
            case Push():
                self.stats.pushes += 1
                self._note_boot(message.boot, now)
                if message.key in self._lookups:
                    self._apply_peer(
                        message.key, message.endpoints, message.boot, message.version, pushed=True
                    )
            case Relayed():
                self.stats.relayed_in += 1
                self._events.append(
                    RelayReceived(message.key, message.payload, uplink, message.endpoint)
                )
            case Error():
                self._on_error(message, now)
            case _:
                self.stats.invalid += 1  # a request type sent to a client

    def _on_registered(self, message: Registered, now: float) -> None:
        pending = self._pending.get(message.request_id)
        if pending is None or pending.kind != "register":
            return  # late answer to a request we gave up or replaced
        state = self._uplinks.get(pending.uplink) if pending.uplink is not None else None
        del self._pending[message.request_id]
        self.stats.replies += 1
        if state is None:
            return
        state.register_request = None
        if state.tag != message.uplink:  # a confused map: try again soon
            self.stats.invalid += 1
            state.next_register = now + self.response_timeout
            return
        self._ttl = message.ttl
        changed = state.reflexive != message.reflexive or state.registered_until is None
        state.reflexive = message.reflexive
        state.registered_until = now + message.ttl
        state.last_reply = now
        state.next_register = now + self._refresh_period()
        self._events.append(UplinkRegistered(state.id, message.reflexive, message.ttl, changed))
        self._note_boot(message.boot, now)
        if message.challenge is None:
            state.echoed_challenge = None  # validated
        elif message.challenge != state.echoed_challenge and state.register_request is None:
            # Prove to the map that this uplink receives at its address (return routability):
            # until then the map sends it no pushes and no relayed payloads. A challenge that
            # comes back after being echoed is not echoed again (no loop with a confused map).
            state.echoed_challenge = message.challenge
            self._register(state, now, challenge=message.challenge)

    def _on_peer_endpoints(self, message: PeerEndpoints, now: float) -> None:
        pending = self._pending.get(message.request_id)
        if pending is None or pending.kind == "register":
            return  # not an answer to anything we asked (a register is answered by Registered)
        del self._pending[message.request_id]
        self.stats.replies += 1
        self._note_boot(message.boot, now)
        if pending.kind == "lookup":
            key = self._end_lookup(message.request_id, now)
            if key is not None and message.key == key:
                self._lookups[key].refused = False
                self._apply_peer(
                    key, message.endpoints, message.boot, message.version, pushed=False
                )
        elif pending.kind == "stop":
            self._finish_stop(acknowledged=True)

    def _on_error(self, message: Error, now: float) -> None:
        self.stats.errors[int(message.code)] = self.stats.errors.get(int(message.code), 0) + 1
        pending = (
            self._pending.pop(message.request_id, None) if message.request_id is not None else None
        )
        if pending is not None and pending.kind == "lookup":
            key = self._end_lookup(pending.request_id, now)
            if key is not None and not self._lookups[key].refused:
                self._lookups[key].refused = True
                self._events.append(LookupRefused(key, message.code, message.message))
            return
        if pending is not None and pending.kind == "register" and pending.uplink is not None:
            state = self._uplinks.get(pending.uplink)
            if state is not None:
                state.register_request = None
                state.next_register = now + self.refresh_interval
        if pending is not None and pending.kind == "stop":
            self._finish_stop(acknowledged=False)
        self._events.append(MapErrorReceived(message.request_id, message.code, message.message))

    def _end_lookup(self, request_id: int, now: float) -> bytes | None:
        """A lookup was answered (or refused): the next one after the lookup period."""
        key = self._lookup_of.pop(request_id, None)
        if key is not None:
            lookup = self._lookups[key]
            lookup.request = None
            lookup.next_lookup = now + self._lookup_period()
        return key

    def _apply_peer(
        self, key: bytes, endpoints: tuple[Endpoint, ...], boot: int, version: int, *, pushed: bool
    ) -> None:
        state = self._lookups[key]
        if state.version is not None:
            last_boot, last_version = state.version
            if boot == last_boot and version < last_version:
                return  # an older view overtaken by a newer one
        state.version = (boot, version)
        if endpoints != state.endpoints:
            state.endpoints = endpoints
            self._events.append(PeerEndpointsChanged(key, endpoints, pushed))

    def _note_boot(self, boot: int, now: float) -> None:
        if self._map_boot is not None and boot != self._map_boot:
            # The map restarted and forgot us: register every uplink again right away (except
            # those whose registration the new map has just confirmed).
            self._map_boot = boot
            for state in self._uplinks.values():
                if state.register_request is None and state.last_reply != now:
                    state.next_register = now
            for lookup in self._lookups.values():
                if lookup.request is None:
                    lookup.next_lookup = now
            self.tick(now)
            return
        self._map_boot = boot

    def _lookup_period(self) -> float:
        """Lookups double as the liveness check of the map instance when there are others to
        fail over to."""
        if self.map_count > 1:
            return min(self.refresh_interval, self.liveness_interval)
        return self.refresh_interval

    def _refresh_period(self) -> float:
        if self._ttl is None:
            return self.refresh_interval
        return min(self.refresh_interval, self._ttl / 2)

    def _register(self, state: _Uplink[U], now: float, challenge: bytes | None = None) -> None:
        request_id = self._new_request_id()
        state.register_request = request_id
        message = Register(
            request_id,
            state.tag,
            self.far_gate,
            self.instance,
            challenge,
            self.far_gates[1:MAX_FAR_GATES],
        )
        self._request("register", request_id, message, state.id, now)

    def _request(
        self,
        kind: RequestKind,
        request_id: int,
        message: MapMessage,
        uplink: U | None,
        now: float,
    ) -> None:
        frame = encode(message)
        pending = _Pending(kind, request_id, frame, uplink, now + self.response_timeout)
        self._pending[request_id] = pending
        self.stats.requests_sent += 1
        self._send(pending)

    def _send(self, pending: _Pending[U]) -> None:
        via = pending.uplink if pending.uplink is not None else self._best_uplink()
        if via is not None:
            self._outbox.append(MapSend(via, pending.frame))

    def _timed_out(self, pending: _Pending[U], now: float) -> None:
        self._unanswered += 1
        if pending.kind in ("stop", "deregister") and pending.attempt + 1 >= STOP_ATTEMPTS:
            del self._pending[pending.request_id]
            if pending.kind == "stop":
                self._finish_stop(acknowledged=False)
            return
        if self.map_count > 1 and self._unanswered >= FAILOVER_AFTER and not self._stopping:
            self._fail_over(pending, now)
        elif self._unanswered >= 2 and (
            self._last_rehandshake is None
            or now - self._last_rehandshake >= self.rehandshake_interval
        ):
            # Reported before the retry is handed out, so that a driver handling events before
            # sends seals the retry under the new session.
            self._last_rehandshake = now
            self.stats.rehandshakes += 1
            self._events.append(RehandshakeNeeded(self._unanswered))
            if not self._stopping:
                # Whatever the map knew about us may be gone: register everything again.
                for state in self._uplinks.values():
                    if state.register_request is None:
                        state.next_register = now
        if pending.kind == "stop":
            for state in self._uplinks.values():
                self._outbox.append(MapSend(state.id, pending.frame))
        else:
            self._send(pending)
        pending.attempt += 1
        self.stats.retries += 1
        backoff = self.response_timeout * (2**pending.attempt)
        pending.deadline = now + min(backoff, self.max_retry_interval)

    def _fail_over(self, timed_out: _Pending[U], now: float) -> None:
        """Move to the next map instance; reported before the retries are handed out (as
        RehandshakeNeeded), so they go to the new instance under its new session."""
        previous = self.map_index
        self.map_index = (self.map_index + 1) % self.map_count
        self._events.append(MapSwitched(self.map_index, previous, self._unanswered))
        self._unanswered = 0
        self._map_boot = None  # the next instance has its own boot id
        self.stats.failovers += 1
        self._last_rehandshake = now
        for state in self._uplinks.values():
            if state.register_request is None:
                state.next_register = now
        # Everything else still waiting goes to the new instance at once, without counting as
        # unanswered there (``timed_out`` is re-sent by the caller).
        for pending in self._pending.values():
            if pending is not timed_out and pending.kind != "stop":
                self._send(pending)
                pending.deadline = now + self.response_timeout

    def _cancel(self, request_id: int | None) -> None:
        if request_id is None:
            return
        pending = self._pending.pop(request_id, None)
        if pending is not None and pending.kind == "lookup":
            key = self._lookup_of.pop(request_id, None)
            if key is not None:
                self._lookups[key].request = None
                self._lookups[key].next_lookup = 0.0

    def _finish_stop(self, *, acknowledged: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._events.append(Stopped(acknowledged))

    def _best_uplink(self) -> U | None:
        best: _Uplink[U] | None = None
        for state in self._uplinks.values():
            if best is None or (state.last_reply or -1.0) > (best.last_reply or -1.0):
                best = state
        return None if best is None else best.id

    def _new_tag(self) -> int:
        used = {u.tag for u in self._uplinks.values()}
        while True:
            tag = int.from_bytes(self._rng(4), "big")
            if tag not in used:
                return tag

    def _new_request_id(self) -> int:
        self._next_request = (self._next_request + 1) & U32
        while self._next_request in self._pending:
            self._next_request = (self._next_request + 1) & U32
        return self._next_request
