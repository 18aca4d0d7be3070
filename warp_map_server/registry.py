"""The map's state and rules, sans-I/O: registrations, lookup policy, expiry, pushes, relay.

:class:`Registry` sees only what arrived inside authenticated WireGuard sessions: a client's
public key, the plaintext of its transport message, the source address that message came from
(the client's reflexive address for that uplink) and the current time. It answers with
:class:`Deliver` items (seal this plaintext for that client and send it to that address) that
the server's I/O loop carries out, and with a timer deadline (the next registration expiry).

Rules:

* A registration is (client, uplink tag) -> endpoint, valid for ``registration_ttl`` after its
  latest Register: it is expired at exactly ``registered_at + ttl``.
* A client's endpoint set is its unexpired registrations' endpoints, freshest first. Every change
  of the set takes a new version (one counter for the whole map, so versions only grow).
* A client names one far gate or several (a gateway with a fleet of far gates: Register's
  ``also``); each is its far gate in every rule below.
* On a change of client X's set: every client W whose far gate is X, and who may see X, gets a
  Push of X's set at each of its endpoints; and when the set grew, X gets a Push of each of its
  far gates' sets (those it may see), so both sides start punching at once.
* ``mutual`` policy: W may see X only if X registered W as (one of) its far gate(s). ``any``:
  always. A client may always see itself. The same rule gates relaying.
* Relay: forward the payload to the target's endpoint the sender names (one it has registered:
  a gateway relays over each uplink pair, so that a cut uplink at either end costs only its
  share), else to its freshest, within a per-sender token bucket of ``relay_rate`` bits per
  second. The Relayed says which endpoint of the sender the Relay came from.
* Requests (register, lookup, deregister, invalid frames) pass a per-source-IP token bucket of
  ``requests_per_second``; over it they are dropped and counted.
* With an :class:`~warp_map_server.validation.AddressValidator`: a Registered for an address not
  validated for the client carries a challenge, and a Register echoing it validates the address.
  Which :class:`Deliver` may go out is the validator's decision: to an unvalidated address only
  the one carrying its challenge.

Cluster (``clustered=True``, several map instances on one Valkey): every change of a local
client's endpoint set (and, at most every quarter TTL, its refresh) becomes an :class:`Announce`
of its :class:`ClientRecord`, which the cluster shell stores in Valkey and publishes to the other
instances. What they announce comes back through :meth:`Registry.remote_update` into a mirror of
remote clients, used for lookups, policy and pushes to local watchers exactly as local clients
are. Relaying to a client held by another instance becomes a :class:`Forward` to that instance,
which checks policy and its own per-sender rate limit again (:meth:`Registry.relay_from_cluster`).
Versions are a Lamport clock over the cluster (never below any version seen), so a gateway's
view never goes backwards when its far gate moves between instances. ``max_clients`` counts
local and mirrored clients: it caps the whole cluster's state.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from warp.keys import encode_key
from warp.map_client.messages import (
    MAX_ENDPOINTS,
    MAX_FAR_GATES,
    MAX_RELAY_PAYLOAD,
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
)
from warp_map_server.ratelimit import TokenBucketTable
from warp_map_server.validation import AddressValidator

LookupPolicy = Literal["mutual", "any"]

logger = logging.getLogger("warp_map_server")

RATE_TABLE_SIZE = 32_768
RELAY_BURST_SECONDS = 0.25
LOG_SUPPRESS_SECONDS = 10.0


def log_event(log: logging.Logger, event: str, level: int = logging.INFO, **fields: object) -> None:
    """Log ``event key=value ...``; the event name and fields also go in ``extra`` for JSON."""
    if not log.isEnabledFor(level):
        return
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


def short(key: bytes) -> str:
    """A key as operators see it in logs: the first 12 characters of its Crockford form."""
    return encode_key(key)[:12] if len(key) == 32 else key.hex()[:12]


def normalize(endpoint: tuple[object, ...]) -> Endpoint:
    """(host, port) from a socket address of any family; IPv4-mapped IPv6 becomes IPv4."""
    host, port = str(endpoint[0]), int(str(endpoint[1]))
    host = host.split("%", 1)[0]
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), port


@dataclass(frozen=True, slots=True)
class Deliver:
    """Seal ``plaintext`` for client ``peer`` and send it to ``destination``."""

    peer: bytes
    plaintext: bytes
    destination: Endpoint
    #: carries a challenge for ``destination`` (the only frame an unvalidated address gets)
    challenge: bool = False


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """What the cluster knows of one client: held (registered) at instance ``owner``.

    ``endpoints`` empty: the client is gone. ``ttl``: seconds until the record lapses unless
    announced again (relative, so instances need no common clock)."""

    key: bytes
    far_gate: bytes
    endpoints: tuple[Endpoint, ...]
    version: int
    owner: int
    ttl: float
    #: further far gates (a gateway with several)
    also: tuple[bytes, ...] = ()

    @property
    def far_gates(self) -> tuple[bytes, ...]:
        return (self.far_gate, *self.also)


@dataclass(frozen=True, slots=True)
class Announce:
    """Store ``record`` in the cluster (delete it when it has no endpoints) and tell the others."""

    record: ClientRecord


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay ``payload`` from ``sender`` to ``target``, held by instance ``owner``."""

    owner: int
    sender: bytes
    target: bytes
    payload: bytes
    #: where the sender's Relay came from, and the target endpoint it named (if any)
    source: Endpoint | None = None
    endpoint: Endpoint | None = None


ClusterOutput = Announce | Forward


@dataclass(slots=True)
class RemoteClient:
    """A client held by another instance, as last announced."""

    key: bytes
    far_gate: bytes
    endpoints: tuple[Endpoint, ...]
    version: int
    owner: int
    expires_at: float
    also: tuple[bytes, ...] = ()

    @property
    def far_gates(self) -> tuple[bytes, ...]:
        return (self.far_gate, *self.also)

    def freshest(self, now: float) -> Endpoint | None:
        return self.endpoints[0] if self.endpoints and self.expires_at > now else None

    def destination(self, endpoint: Endpoint | None, now: float) -> Endpoint | None:
        """Where to deliver a relayed payload: ``endpoint`` if it is one of ours, else None;
        the freshest when none is named."""
        if endpoint is None:
            return self.freshest(now)
        return endpoint if self.expires_at > now and endpoint in self.endpoints else None


@dataclass(slots=True)
class Registration:
    uplink: int
    endpoint: Endpoint
    registered_at: float
    expires_at: float
    last_heard: float


@dataclass(slots=True)
class Client:
    key: bytes
    far_gate: bytes
    instance: int
    registrations: dict[int, Registration] = field(default_factory=dict)
    version: int = 0
    #: when the cluster's copy of this client lapses (last announce + TTL)
    announced_until: float = 0.0
    #: further far gates (a gateway with several): each is a far gate as ``far_gate`` is
    also: tuple[bytes, ...] = ()

    @property
    def far_gates(self) -> tuple[bytes, ...]:
        return (self.far_gate, *self.also)

    def endpoints(self, now: float) -> tuple[Endpoint, ...]:
        live = [r for r in self.registrations.values() if r.expires_at > now]
        live.sort(key=lambda r: r.last_heard, reverse=True)
        seen: dict[Endpoint, None] = {}
        for r in live:
            seen.setdefault(r.endpoint, None)
        return tuple(seen)[:MAX_ENDPOINTS]

    def freshest(self, now: float) -> Endpoint | None:
        best: Registration | None = None
        for r in self.registrations.values():
            if r.expires_at > now and (best is None or r.last_heard > best.last_heard):
                best = r
        return None if best is None else best.endpoint

    def destination(self, endpoint: Endpoint | None, now: float) -> Endpoint | None:
        """Where to deliver a relayed payload: ``endpoint`` if a live registration has it,
        else None; the freshest when none is named."""
        if endpoint is None:
            return self.freshest(now)
        live = any(
            r.endpoint == endpoint and r.expires_at > now for r in self.registrations.values()
        )
        return endpoint if live else None


class Registry:
    def __init__(
        self,
        *,
        registration_ttl: float = 60.0,
        lookup_policy: LookupPolicy = "mutual",
        relay_enabled: bool = True,
        relay_rate: float | None = 10_000_000,
        max_clients: int = 10_000,
        max_registrations: int = 16,
        requests_per_second: float = 20,
        boot_id: int = 0,
        validator: AddressValidator | None = None,
        clustered: bool = False,
        log: logging.Logger = logger,
    ) -> None:
        if registration_ttl <= 0:
            raise ValueError("registration_ttl must be positive")
        self.ttl = registration_ttl
        self.policy: LookupPolicy = lookup_policy
        self.relay_enabled = relay_enabled
        self.max_clients = max_clients
        self.max_registrations = max_registrations
        self.boot_id = boot_id
        self.validator = validator
        self.log = log
        self.counters: Counter[str] = Counter()
        self.clients: dict[bytes, Client] = {}
        # far gate key -> clients that registered it as their far gate
        self._watchers: dict[bytes, set[bytes]] = {}
        self._expiry: list[tuple[float, bytes, int]] = []
        self._expiry_live = 0
        self._version = 0
        self._outbox: list[Deliver] = []
        self._requests = TokenBucketTable[str](
            requests_per_second, max(float(requests_per_second), 5.0), RATE_TABLE_SIZE
        )
        self.relay_rate = relay_rate
        relay_burst = max((relay_rate or 1.0) * RELAY_BURST_SECONDS, 2.0 * MAX_RELAY_PAYLOAD * 8)
        self._relay = TokenBucketTable[bytes](
            relay_rate or 1.0, relay_burst, max(max_clients, 1) * 2
        )
        self._last_log: dict[str, float] = {}
        self.clustered = clustered
        #: clients held by other instances of the cluster (key -> last announce)
        self.remote: dict[bytes, RemoteClient] = {}
        self._remote_expiry: list[tuple[float, bytes]] = []
        self._cluster_outbox: list[ClusterOutput] = []
        #: the cluster store is unreachable: mirrored clients are kept, not expired (their
        #: instances cannot refresh them meanwhile)
        self.cluster_down = False

    # ---------------------------------------------------------------------------- outputs

    def drain(self) -> list[Deliver]:
        out, self._outbox = self._outbox, []
        return out

    def drain_cluster(self) -> list[ClusterOutput]:
        """What to store in / publish to the cluster (empty unless ``clustered``)."""
        out, self._cluster_outbox = self._cluster_outbox, []
        return out

    def next_deadline(self) -> float | None:
        candidates = [self._expiry[0][0]] if self._expiry else []
        if self._remote_expiry:
            candidates.append(self._remote_expiry[0][0])
        return min(candidates) if candidates else None

    @property
    def registration_count(self) -> int:
        return sum(len(c.registrations) for c in self.clients.values())

    def has_registrations(self, key: bytes) -> bool:
        client = self.clients.get(key)
        return client is not None and bool(client.registrations)

    def endpoints_of(self, key: bytes, now: float) -> tuple[Endpoint, ...]:
        client = self.clients.get(key)
        if client is not None:
            return client.endpoints(now)
        remote = self.remote.get(key)
        return remote.endpoints if remote is not None and remote.expires_at > now else ()

    def _far_gates_of(self, key: bytes) -> tuple[bytes, ...]:
        client = self.clients.get(key)
        if client is not None:
            return client.far_gates
        remote = self.remote.get(key)
        return () if remote is None else remote.far_gates

    def _view_of(self, key: bytes, now: float) -> tuple[tuple[Endpoint, ...], int]:
        """(endpoints, version) of a local or mirrored client; ((), 0) if unknown."""
        client = self.clients.get(key)
        if client is not None:
            return client.endpoints(now), client.version
        remote = self.remote.get(key)
        if remote is not None and remote.expires_at > now:
            return remote.endpoints, remote.version
        return (), 0

    # ---------------------------------------------------------------------------- inputs

    def heard(self, key: bytes, source: Endpoint, now: float) -> None:
        """An authenticated datagram from ``key`` came from ``source``: that endpoint is fresh."""
        client = self.clients.get(key)
        if client is None:
            return
        for r in client.registrations.values():
            if r.endpoint == source and r.expires_at > now:
                r.last_heard = now

    def handle(self, key: bytes, plaintext: bytes, source: Endpoint, now: float) -> None:
        """A map frame from authenticated client ``key``, received from ``source``."""
        self.heard(key, source, now)
        try:
            message = decode(plaintext)
        except MessageError as exc:
            self.counters["requests.invalid"] += 1
            if self._request_allowed(source, now):
                self._reply(key, source, Error(None, ErrorCode.BAD_REQUEST, str(exc)))
            return
        if isinstance(message, Relay):
            self._relay_payload(key, message, source, now)
            return
        if not self._request_allowed(source, now):
            return
        match message:
            case Register():
                self._register(key, message, source, now)
            case Lookup():
                self._lookup(key, message, source, now)
            case Deregister():
                self._deregister(key, message, source, now)
            case _:
                self.counters["requests.invalid"] += 1
                self._reply(
                    key, source, Error(None, ErrorCode.BAD_REQUEST, "not a request to the map")
                )

    def tick(self, now: float) -> None:
        """Expire registrations whose time has come (at exactly registered_at + ttl)."""
        changed: dict[bytes, Client] = {}
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, key, uplink = heapq.heappop(self._expiry)
            client = self.clients.get(key)
            if client is None:
                continue
            registration = client.registrations.get(uplink)
            if registration is None or registration.expires_at != expires_at:
                continue  # refreshed or removed since: a stale heap entry
            del client.registrations[uplink]
            self.counters["registrations.expired"] += 1
            log_event(
                self.log,
                "map.expired",
                client=short(key),
                uplink=uplink,
                endpoint=_fmt(registration.endpoint),
            )
            changed[key] = client
        for key, client in changed.items():
            self._changed(client, now, grew=False)
            if not client.registrations:
                self._remove_client(key)
        while self._remote_expiry and self._remote_expiry[0][0] <= now and not self.cluster_down:
            expires_at, key = heapq.heappop(self._remote_expiry)
            remote = self.remote.get(key)
            if remote is None or remote.expires_at != expires_at:
                continue
            # Its instance stopped announcing it (that instance died, or Valkey is down and
            # the client re-registers elsewhere): as a local expiry, watchers hear it is gone.
            self.counters["cluster.remote_expired"] += 1
            self._version += 1
            self._push_to_watchers(key, (), self._version, now)  # (policy still knows it)
            del self.remote[key]

    def forget(self, key: bytes, now: float) -> None:
        """Drop everything about ``key`` (its session is gone for good)."""
        client = self.clients.get(key)
        if client is None:
            return
        had = bool(client.registrations)
        client.registrations.clear()
        if had:
            self._changed(client, now, grew=False)
        self._remove_client(key)

    # ---------------------------------------------------------------------------- policy

    def may_see(self, asker: bytes, target: bytes) -> bool:
        if asker == target or self.policy == "any":
            return True
        return asker in self._far_gates_of(target)

    # ---------------------------------------------------------------------------- requests

    def _register(self, key: bytes, message: Register, source: Endpoint, now: float) -> None:
        self.counters["requests.register"] += 1
        if self.validator is not None and message.challenge is not None:
            self.validator.confirm(key, source, message.challenge, now)
        client = self.clients.get(key)
        if client is None:
            # Mirrored clients count too: max_clients caps what the whole cluster holds (a
            # client moving over from another instance is already counted).
            if key not in self.remote and len(self.clients) + len(self.remote) >= self.max_clients:
                self.counters["clients.refused"] += 1
                self._log_suppressed(
                    "map.clients_full", now, clients=len(self.clients), remote=len(self.remote)
                )
                self._reply(
                    key,
                    source,
                    Error(message.request_id, ErrorCode.LIMIT_REACHED, "map is full"),
                )
                return
            client = Client(key, message.far_gate, message.instance, also=message.also)
            self.clients[key] = client
            for far_key in client.far_gates:
                self._watchers.setdefault(far_key, set()).add(key)
            moved = self.remote.pop(key, None)
            if moved is not None:
                # The client came over from another instance: our versions must follow its.
                client.version = moved.version
                self.counters["cluster.moved_here"] += 1
        grew = False
        set_before = frozenset(client.endpoints(now))
        if message.instance != client.instance:
            # The client restarted: its old registrations describe sockets that are gone.
            if client.registrations:
                log_event(
                    self.log,
                    "map.instance_replaced",
                    client=short(key),
                    dropped=len(client.registrations),
                )
            client.registrations.clear()
            client.instance = message.instance
        if message.far_gates != client.far_gates:
            old_fars = set(client.far_gates)
            client.far_gate, client.also = message.far_gate, message.also
            for old_far in old_fars - set(client.far_gates):
                self._unwatch(key, old_far)
                self._revoke(client, old_far, now)
            for far_key in client.far_gates:
                self._watchers.setdefault(far_key, set()).add(key)
            grew = True  # whoever may now see us must hear of it, and we of them
        registration = client.registrations.get(message.uplink)
        if registration is None:
            # Another tag on the very same endpoint is the same socket: replace it.
            for uplink, other in list(client.registrations.items()):
                if other.endpoint == source:
                    del client.registrations[uplink]
            if len(client.registrations) >= self.max_registrations:
                self.counters["registrations.refused"] += 1
                self._reply(
                    key,
                    source,
                    Error(
                        message.request_id,
                        ErrorCode.LIMIT_REACHED,
                        f"at most {self.max_registrations} registrations per client",
                    ),
                )
                if set_before != frozenset(client.endpoints(now)):
                    self._changed(client, now, grew=grew)
                return
            registration = Registration(message.uplink, source, now, now + self.ttl, now)
            client.registrations[message.uplink] = registration
            log_event(
                self.log,
                "map.registered",
                client=short(key),
                uplink=message.uplink,
                endpoint=_fmt(source),
                far_gate=short(message.far_gate),
                far_gates=len(message.far_gates),
            )
        else:
            if registration.endpoint != source:
                log_event(
                    self.log,
                    "map.endpoint_moved",
                    client=short(key),
                    uplink=message.uplink,
                    old=_fmt(registration.endpoint),
                    new=_fmt(source),
                )
            registration.endpoint = source
            registration.registered_at = now
            registration.expires_at = now + self.ttl
            registration.last_heard = now
            self.counters["registrations.refreshed"] += 1
        heapq.heappush(self._expiry, (now + self.ttl, key, message.uplink))
        self._compact_expiry()
        challenge = None if self.validator is None else self.validator.challenge(key, source, now)
        registered = Registered(
            message.request_id, message.uplink, source, self.ttl, self.boot_id, challenge
        )
        self._outbox.append(
            Deliver(key, encode(registered), source, challenge=challenge is not None)
        )
        set_after = frozenset(client.endpoints(now))
        if set_after != set_before or grew:
            self._changed(client, now, grew=grew or not set_after <= set_before)
        elif self.clustered and now + self.ttl - client.announced_until >= self.ttl / 4:
            self._announce(client, now)  # keep the cluster's copy from lapsing

    def _lookup(self, key: bytes, message: Lookup, source: Endpoint, now: float) -> None:
        self.counters["requests.lookup"] += 1
        if not self.may_see(key, message.key):
            self.counters["lookup.refused"] += 1
            log_event(
                self.log,
                "map.lookup_refused",
                logging.DEBUG,
                client=short(key),
                target=short(message.key),
            )
            self._reply(
                key,
                source,
                Error(message.request_id, ErrorCode.NOT_PERMITTED, "lookup not permitted"),
            )
            return
        endpoints, version = self._view_of(message.key, now)
        self._reply(
            key,
            source,
            PeerEndpoints(message.request_id, message.key, endpoints, version, self.boot_id),
        )

    def _deregister(self, key: bytes, message: Deregister, source: Endpoint, now: float) -> None:
        self.counters["requests.deregister"] += 1
        client = self.clients.get(key)
        if client is None:
            self._reply(key, source, PeerEndpoints(message.request_id, key, (), 0, self.boot_id))
            return
        before = frozenset(client.endpoints(now))
        if message.uplink is None:
            removed = list(client.registrations.values())
            client.registrations.clear()
        else:
            one = client.registrations.pop(message.uplink, None)
            removed = [] if one is None else [one]
        for r in removed:
            log_event(
                self.log,
                "map.deregistered",
                client=short(key),
                uplink=r.uplink,
                endpoint=_fmt(r.endpoint),
            )
        if before != frozenset(client.endpoints(now)):
            self._changed(client, now, grew=False)
        self._reply(
            key,
            source,
            PeerEndpoints(
                message.request_id, key, client.endpoints(now), client.version, self.boot_id
            ),
        )
        if not client.registrations:
            self._remove_client(key)

    def _relay_payload(self, key: bytes, message: Relay, source: Endpoint, now: float) -> None:
        if not self.relay_enabled:
            self.counters["relay.disabled"] += 1
            return
        if not self.may_see(key, message.key):
            self.counters["relay.refused"] += 1
            self._log_suppressed(
                "map.relay.refused", now, client=short(key), target=short(message.key)
            )
            return
        target = self.clients.get(message.key)
        if target is None:
            remote = self.remote.get(message.key)
            if remote is None or remote.destination(message.endpoint, now) is None:
                self.counters["relay.no_target"] += 1
                return
            if not self._relay_allowed(key, len(message.payload), now):
                return
            self.counters["relay.forwarded_cluster"] += 1
            self.counters["relay.bytes"] += len(message.payload)
            self._cluster_outbox.append(
                Forward(remote.owner, key, message.key, message.payload, source, message.endpoint)
            )
            return
        destination = target.destination(message.endpoint, now)
        if destination is None:
            self.counters["relay.no_target"] += 1
            return
        if not self._relay_allowed(key, len(message.payload), now):
            return
        self.counters["relay.forwarded"] += 1
        self.counters["relay.bytes"] += len(message.payload)
        self._outbox.append(
            Deliver(message.key, encode(Relayed(key, message.payload, source)), destination)
        )

    def _relay_allowed(self, sender: bytes, size: int, now: float) -> bool:
        """``sender``'s token bucket (relay_rate bits/s) holds ``size`` bytes more."""
        if self.relay_rate is None or self._relay.allow(sender, now, size * 8):
            return True
        self.counters["relay.dropped"] += 1
        self.counters["relay.dropped_bytes"] += size
        self._log_suppressed(
            "map.relay.dropped",
            now,
            client=short(sender),
            reason="rate_limit",
            total=self.counters["relay.dropped"],
        )
        return False

    # ---------------------------------------------------------------------------- cluster

    def relay_from_cluster(
        self,
        sender: bytes,
        target: bytes,
        payload: bytes,
        now: float,
        source: Endpoint | None = None,
        endpoint: Endpoint | None = None,
    ) -> None:
        """Another instance relays ``payload`` from its client ``sender`` (its Relay came from
        ``source``) to our ``target`` (at ``endpoint`` if named).

        Checked again here, against what this instance holds: the target must be ours, the
        policy must let the sender reach it, and the sender's rate limit holds per instance."""
        client = self.clients.get(target)
        destination = None if client is None else client.destination(endpoint, now)
        if destination is None:
            self.counters["cluster.relay_no_target"] += 1
            return
        if not self.may_see(sender, target):
            self.counters["cluster.relay_refused"] += 1
            return
        if len(payload) > MAX_RELAY_PAYLOAD or not self._relay_allowed(sender, len(payload), now):
            return
        self.counters["cluster.relay_delivered"] += 1
        self._outbox.append(Deliver(target, encode(Relayed(sender, payload, source)), destination))

    def remote_update(self, record: ClientRecord, now: float) -> None:
        """Another instance announced ``record``: mirror it, push it to local watchers."""
        if record.owner == self.boot_id:
            return  # our own announce, back from the channel
        self._version = max(self._version, record.version)  # Lamport: ours stay newer
        local = self.clients.get(record.key)
        if local is not None:
            if record.version <= local.version:
                return  # older than what we hold
            # The client now registers with another instance: what we hold is stale.
            self.counters["cluster.moved_away"] += 1
            local.registrations.clear()
            self._remove_client(record.key)
        previous = self.remote.get(record.key)
        if previous is not None and record.version < previous.version:
            return
        endpoints = record.endpoints[:MAX_ENDPOINTS]
        if not endpoints:
            if previous is not None:
                self._push_to_watchers(record.key, (), record.version, now)
                del self.remote[record.key]
            return
        if previous is None and len(self.clients) + len(self.remote) >= self.max_clients:
            self.counters["cluster.remote_refused"] += 1  # a cluster over its cap
            return
        expires_at = now + min(max(record.ttl, 0.0), self.ttl)
        self.remote[record.key] = RemoteClient(
            record.key,
            record.far_gate,
            endpoints,
            record.version,
            record.owner,
            expires_at,
            record.also[: MAX_FAR_GATES - 1],
        )
        heapq.heappush(self._remote_expiry, (expires_at, record.key))
        self._compact_remote_expiry()
        far_gates_changed = previous is not None and previous.far_gates != record.far_gates
        if previous is not None and far_gates_changed:
            # Under mutual, an old far gate may not see the client any more: tell it so.
            for old_far in set(previous.far_gates) - set(record.far_gates):
                old_watcher = self.clients.get(old_far)
                if (
                    self.policy == "mutual"
                    and old_watcher is not None
                    and record.key in old_watcher.far_gates
                ):
                    frame = encode(Push(record.key, (), record.version, self.boot_id))
                    self._push(old_watcher, frame, now, about=record.key)
        if previous is None or previous.endpoints != endpoints or far_gates_changed:
            self._push_to_watchers(record.key, endpoints, record.version, now)

    def cluster_lost(self) -> None:
        """The cluster store is unreachable: serve what we hold, mirrored clients included."""
        self.cluster_down = True

    def cluster_back(self, now: float) -> None:
        """The cluster store is back (maybe empty, after its restart): announce every local
        client again, and give every mirrored one a full TTL to be announced by its instance
        (one that died meanwhile is forgotten then)."""
        self.cluster_down = False
        for remote in self.remote.values():
            remote.expires_at = max(remote.expires_at, now + self.ttl)
        self._remote_expiry = [(r.expires_at, r.key) for r in self.remote.values()]
        heapq.heapify(self._remote_expiry)
        for client in self.clients.values():
            if client.registrations:
                self._announce(client, now)

    def _announce(self, client: Client, now: float) -> None:
        if not self.clustered:
            return
        endpoints = client.endpoints(now)
        until = max((r.expires_at for r in client.registrations.values()), default=now)
        client.announced_until = until
        record = ClientRecord(
            client.key,
            client.far_gate,
            endpoints,
            client.version,
            self.boot_id,
            until - now,
            client.also,
        )
        self._cluster_outbox.append(Announce(record))

    def _push_to_watchers(
        self, key: bytes, endpoints: tuple[Endpoint, ...], version: int, now: float
    ) -> None:
        """Push ``key``'s endpoint set to each local client watching it that may see it."""
        frame = encode(Push(key, endpoints, version, self.boot_id))
        for watcher_key in sorted(self._watchers.get(key, ())):
            if watcher_key == key or not self.may_see(watcher_key, key):
                continue
            watcher = self.clients.get(watcher_key)
            if watcher is not None:
                self._push(watcher, frame, now, about=key)

    def _compact_remote_expiry(self) -> None:
        if len(self._remote_expiry) <= max(1024, 4 * len(self.remote)):
            return
        self._remote_expiry = [(r.expires_at, r.key) for r in self.remote.values()]
        heapq.heapify(self._remote_expiry)

    # ---------------------------------------------------------------------------- helpers

    def _request_allowed(self, source: Endpoint, now: float) -> bool:
        if self._requests.allow(source[0], now):
            return True
        self.counters["requests.rate_limited"] += 1
        self._log_suppressed("map.rate_limited", now, source=source[0])
        return False

    def _reply(self, key: bytes, destination: Endpoint, message: MapMessage) -> None:
        self._outbox.append(Deliver(key, encode(message), destination))

    def _changed(self, client: Client, now: float, *, grew: bool) -> None:
        """``client``'s endpoint set changed: new version, push it to whoever watches it."""
        self._version += 1
        client.version = self._version
        endpoints = client.endpoints(now)
        self._push_to_watchers(client.key, endpoints, client.version, now)
        self._announce(client, now)
        if not grew or not endpoints:
            return
        for far_key in client.far_gates:
            if far_key != client.key and self.may_see(client.key, far_key):
                far_endpoints, far_version = self._view_of(far_key, now)
                if far_endpoints:
                    reverse = encode(Push(far_key, far_endpoints, far_version, self.boot_id))
                    self._push(client, reverse, now, about=far_key)

    def _revoke(self, client: Client, old_far: bytes, now: float) -> None:
        """``client`` no longer names ``old_far`` as its far gate: under ``mutual``, the old far
        gate may not see it any more, so it is told the list is empty."""
        watcher = self.clients.get(old_far)
        if self.policy != "mutual" or watcher is None or client.key not in watcher.far_gates:
            return
        self._version += 1
        client.version = self._version
        frame = encode(Push(client.key, (), client.version, self.boot_id))
        self._push(watcher, frame, now, about=client.key)

    def _push(self, to: Client, frame: bytes, now: float, *, about: bytes) -> None:
        destinations = to.endpoints(now)
        for destination in destinations:
            self._outbox.append(Deliver(to.key, frame, destination))
        if destinations:
            self.counters["push.sent"] += len(destinations)
            log_event(
                self.log,
                "map.push",
                to=short(to.key),
                about=short(about),
                endpoints=len(destinations),
            )

    def _remove_client(self, key: bytes) -> None:
        client = self.clients.pop(key, None)
        if client is None:
            return
        for far_key in client.far_gates:
            self._unwatch(key, far_key)
        self._relay.forget(key)

    def _unwatch(self, key: bytes, far_key: bytes) -> None:
        watchers = self._watchers.get(far_key)
        if watchers is not None:
            watchers.discard(key)
            if not watchers:
                del self._watchers[far_key]

    def _compact_expiry(self) -> None:
        # Refreshes leave stale entries behind; rebuild when the heap outgrows its last live size
        # eightfold (amortised O(1) per push, memory bounded by the live registrations).
        if len(self._expiry) <= max(1024, 8 * self._expiry_live):
            return
        self._expiry = [
            (r.expires_at, c.key, r.uplink)
            for c in self.clients.values()
            for r in c.registrations.values()
        ]
        heapq.heapify(self._expiry)
        self._expiry_live = len(self._expiry)

    def _log_suppressed(self, event: str, now: float, **fields: object) -> None:
        """Log ``event`` at most once per LOG_SUPPRESS_SECONDS (floods must not flood logs)."""
        last = self._last_log.get(event)
        if last is not None and now - last < LOG_SUPPRESS_SECONDS:
            return
        self._last_log[event] = now
        log_event(self.log, event, logging.WARNING, **fields)

    def gc(self, now: float) -> None:
        """Drop rate-limiter buckets that hold no information any more."""
        self._requests.gc(now)
        self._relay.gc(now)

    def summary(self, now: float) -> dict[str, int]:
        out = dict(self.counters)
        out["clients"] = len(self.clients)
        out["registrations"] = self.registration_count
        if self.clustered:
            out["remote_clients"] = len(self.remote)
        out["rate_table"] = len(self._requests)
        return out


def _fmt(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
