"""SimNet: whole hosts (gateway cores, the map) on an in-memory internet, in virtual time.

A host is any sans-I/O object with the shape of a gateway core (:class:`Host`): datagrams in
(``uplink``, ``source``, ``data``, ``now``), datagrams out (``uplink``, ``remote``, ``data``), one
timer (``next_deadline`` / ``handle_timer``). SimNet owns the clock: it calls each host exactly
at its deadline and delivers each datagram at its arrival time, in time order, and after every
input drains what the host has to send.

The network a datagram crosses, from one host's uplink to another's::

    host --egress link--> [NAT] --internet--> [NAT] --ingress link--> host

* each uplink has its own egress and ingress :class:`~tests.sim.network.Link` (delay, jitter,
  seeded iid or bursty loss, blackouts), so each direction of each uplink fails on its own;
  ``black_holed`` drops everything both ways (an uplink that dies without its interface going);
* a :class:`Nat` (endpoint-independent or address-and-port-dependent mapping, with or without
  filtering, random public ports, a conntrack idle timeout, ``rebind()``) sits between an
  uplink and the internet, or the uplink has a public address of its own (the map);
* the internet routes by destination IP to a NAT or a public uplink; anything else is dropped
  and counted (``stats["unroutable"]``);
* a host may also send datagrams with a TTL (``low_ttl_datagrams_to_send``, optional): one
  with a TTL below :data:`HOPS_TO_FAR_NAT` crosses its own NAT (which maps it) and dies in
  the internet (``stats["ttl_expired"]``).

Everything random comes from seeded generators: a run is a function of its seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tests.sim.network import Link, LossModel

Address = tuple[str, int]
Mapping = Literal["endpoint-independent", "address-and-port-dependent"]
Filtering = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]
NatKind = Literal["full-cone", "restricted-cone", "port-restricted-cone", "symmetric"]

NEVER = math.inf
#: a datagram needs at least this TTL to reach the far side's NAT (its own NAT is one hop away)
HOPS_TO_FAR_NAT = 3
#: timer calls at one instant after which a host is taken to spin (a deadline never moving on)
MAX_TIMER_CALLS_AT_ONCE = 10_000


class Host(Protocol):
    """What SimNet drives: the shape of a gateway core (and of the map's, through a wrapper)."""

    def datagram_received(self, uplink: str, source: Address, data: bytes, now: float) -> None:
        """A datagram from ``source`` arrived on ``uplink``."""

    def handle_timer(self, now: float) -> None:
        """Called at (never before) ``next_deadline()``."""

    def next_deadline(self) -> float | None: ...

    def datagrams_to_send(self) -> list[tuple[str, Address, bytes]]:
        """``(uplink, remote, data)``: what to send, drained."""
        ...


# ------------------------------------------------------------------------------------ NAT


@dataclass(slots=True)
class NatBinding:
    key: tuple[Address, Address | None]
    private: Address
    public_port: int
    last_used: float
    #: remotes the inside host sent to through this binding (what filtering lets back in)
    remotes: set[Address] = field(default_factory=set)


class Nat:
    """A NAT in front of one or more uplinks (RFC 4787 terms).

    ``mapping``: ``endpoint-independent`` (one public port per inside address, whatever the
    remote: a "cone") or ``address-and-port-dependent`` (one public port per inside address
    *and* remote: "symmetric"). Public ports are random.
    ``filtering``: what comes back in through a binding: anything (``endpoint-independent``,
    a full cone), only from IPs the inside sent to (``address-dependent``), only from exact
    addresses it sent to (``address-and-port-dependent``).
    ``timeout``: a binding unused (either way) this long is gone (conntrack's UDP timeout);
    the next datagram out gets a new random port. :meth:`rebind` drops every binding at once
    (a conntrack flush, a NAT reboot, a CGNAT moving us).
    """

    def __init__(
        self,
        public_ip: str,
        rng: random.Random,
        *,
        mapping: Mapping = "endpoint-independent",
        filtering: Filtering = "address-and-port-dependent",
        timeout: float = 30.0,
    ) -> None:
        self.public_ip = public_ip
        self.mapping: Mapping = mapping
        self.filtering: Filtering = filtering
        self.timeout = timeout
        self._rng = rng
        self._bindings: dict[tuple[Address, Address | None], NatBinding] = {}
        self._by_port: dict[int, NatBinding] = {}
        self.stats: Counter[str] = Counter()

    @classmethod
    def of_kind(cls, kind: NatKind, public_ip: str, rng: random.Random, timeout: float) -> Nat:
        """A NAT of a common kind: ``full-cone`` (no filtering), ``restricted-cone`` (by
        address), ``port-restricted-cone`` (by address and port): all endpoint-independent
        mapping; ``symmetric``: a port per remote, filtered by address and port."""
        if kind == "symmetric":
            return cls(
                public_ip,
                rng,
                mapping="address-and-port-dependent",
                filtering="address-and-port-dependent",
                timeout=timeout,
            )
        filtering: Filtering = {
            "full-cone": "endpoint-independent",
            "restricted-cone": "address-dependent",
            "port-restricted-cone": "address-and-port-dependent",
        }[kind]  # type: ignore[assignment]
        return cls(public_ip, rng, filtering=filtering, timeout=timeout)

    def outbound(self, private: Address, remote: Address, now: float) -> Address:
        """The public source address of a datagram from ``private`` to ``remote``."""
        key = (private, remote if self.mapping == "address-and-port-dependent" else None)
        binding = self._bindings.get(key)
        if binding is not None and now - binding.last_used >= self.timeout:
            self._expire(binding)
            binding = None
        if binding is None:
            binding = NatBinding(key, private, self._free_port(), now)
            self._bindings[key] = binding
            self._by_port[binding.public_port] = binding
            self.stats["bindings"] += 1
        binding.last_used = now
        binding.remotes.add(remote)
        return self.public_ip, binding.public_port

    def inbound(self, public_port: int, source: Address, now: float) -> Address | None:
        """Where a datagram from ``source`` to our ``public_port`` goes inside; None: dropped."""
        binding = self._by_port.get(public_port)
        if binding is None:
            self.stats["no_binding"] += 1
            return None
        if now - binding.last_used >= self.timeout:
            self._expire(binding)
            self.stats["no_binding"] += 1
            return None
        if not self._admits(binding, source):
            self.stats["filtered"] += 1
            return None
        binding.last_used = now
        return binding.private

    def public_address(self, private: Address, remote: Address | None = None) -> Address | None:
        """The current binding of ``private`` (towards ``remote`` when mapping depends on it)."""
        key = (private, remote if self.mapping == "address-and-port-dependent" else None)
        binding = self._bindings.get(key)
        return None if binding is None else (self.public_ip, binding.public_port)

    def rebind(self) -> None:
        """Forget every binding: the next datagram out of each inside address gets a new port."""
        self.stats["rebinds"] += 1
        self._bindings.clear()
        self._by_port.clear()

    def _admits(self, binding: NatBinding, source: Address) -> bool:
        if self.filtering == "endpoint-independent":
            return True
        if self.filtering == "address-and-port-dependent":
            return source in binding.remotes
        return any(remote[0] == source[0] for remote in binding.remotes)

    def _expire(self, binding: NatBinding) -> None:
        self.stats["expired"] += 1
        if self._bindings.get(binding.key) is binding:
            del self._bindings[binding.key]
        if self._by_port.get(binding.public_port) is binding:
            del self._by_port[binding.public_port]

    def _free_port(self) -> int:
        while True:
            port = self._rng.randrange(1024, 65536)
            if port not in self._by_port:
                return port


# ------------------------------------------------------------------------------------ SimNet


@dataclass(eq=False)
class Uplink:
    """One uplink of a host: its inside address, its NAT (None: the address is public) and
    its access links."""

    host: HostSlot
    name: str
    address: Address
    nat: Nat | None
    egress: Link
    ingress: Link
    #: everything sent or received here vanishes (the uplink died, its interface stayed)
    black_holed: bool = False

    def public(self, remote: Address | None = None) -> Address | None:
        """The address the internet sees for this uplink (towards ``remote``, for a NAT whose
        mapping depends on it); None while the NAT holds no binding."""
        if self.nat is None:
            return self.address
        return self.nat.public_address(self.address, remote)


@dataclass(eq=False)
class HostSlot:
    """A host in the network, with its uplinks and its armed deadline."""

    name: str
    host: Host
    uplinks: dict[str, Uplink] = field(default_factory=dict)
    deadline: float = NEVER
    #: called after every input, once the host's datagrams are out (events, deliveries)
    observe: Callable[[float], None] | None = None
    removed: bool = False


class SimNet:
    """The clock, the event queue, the hosts, their uplinks and NATs (see the module
    docstring). ``internet_delay`` is added to every datagram between the two NATs."""

    def __init__(self, seed: int = 0, *, internet_delay: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.internet_delay = internet_delay
        self.now = 0.0
        self.hosts: dict[str, HostSlot] = {}
        self.stats: Counter[str] = Counter()
        self._queue: list[tuple[float, int, Callable[..., None], tuple[object, ...]]] = []
        self._seq = itertools.count()
        self._nats: dict[str, Nat] = {}
        self._public: dict[Address, Uplink] = {}
        self._inside: dict[tuple[str, Address], Uplink] = {}
        self._timer_calls = 0
        self._timer_instant = -NEVER

    # ------------------------------------------------------------------------ building

    def child_rng(self) -> random.Random:
        """A generator of its own, seeded from the network's (one per link, NAT, host)."""
        return random.Random(self.rng.getrandbits(64))

    def rng_bytes(self) -> Callable[[int], bytes]:
        """Seeded random bytes for a core's ``rng``."""
        return self.child_rng().randbytes

    def nat(self, public_ip: str, kind: NatKind, *, timeout: float = 30.0) -> Nat:
        """A NAT of ``kind`` (see :meth:`Nat.of_kind`) on ``public_ip``."""
        if public_ip in self._nats or any(a[0] == public_ip for a in self._public):
            raise ValueError(f"{public_ip} is taken")
        nat = Nat.of_kind(kind, public_ip, self.child_rng(), timeout)
        self._nats[public_ip] = nat
        return nat

    def add_host(
        self, name: str, host: Host, *, observe: Callable[[float], None] | None = None
    ) -> HostSlot:
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        slot = HostSlot(name, host, observe=observe)
        self.hosts[name] = slot
        # serviced at the current instant, once its uplinks (added next) exist
        self._push(self.now, self._serviced, (slot,))
        return slot

    def add_uplink(
        self,
        host: str,
        name: str,
        address: Address,
        *,
        nat: Nat | None = None,
        delay: float = 0.010,
        jitter: float = 0.0,
        egress_losses: Sequence[LossModel] = (),
        ingress_losses: Sequence[LossModel] = (),
        egress_rate: float | None = None,
        egress_queue: int = 0,
    ) -> Uplink:
        """An uplink ``name`` of ``host`` at ``address`` (behind ``nat``, else public); each
        direction's access link has ``delay`` (+ uniform ``jitter``) and its own losses.
        ``egress_rate`` (bytes/s): the uplink's upload is a bottleneck with a queue of
        ``egress_queue`` bytes (a shaped modem, as ``tc tbf``)."""
        slot = self.hosts[host]
        if name in slot.uplinks:
            raise ValueError(f"uplink {name!r} of {host!r} exists")
        uplink = Uplink(
            slot,
            name,
            address,
            nat,
            Link(
                self.child_rng(),
                delay=delay,
                jitter=jitter,
                losses=tuple(egress_losses),
                rate=egress_rate,
                queue_bytes=egress_queue,
            ),
            Link(self.child_rng(), delay=delay, jitter=jitter, losses=tuple(ingress_losses)),
        )
        self._attach(uplink)
        return uplink

    def remove_uplink(self, uplink: Uplink) -> None:
        """The uplink is gone (its datagrams in flight are lost); tell the host yourself."""
        uplink.host.uplinks.pop(uplink.name, None)
        if uplink.nat is None:
            self._public.pop(uplink.address, None)
        else:
            self._inside.pop((uplink.nat.public_ip, uplink.address), None)

    def move_uplink(self, uplink: Uplink, address: Address, *, nat: Nat | None) -> None:
        """The uplink moves to another network (``address`` behind ``nat``, else public): what
        has not passed its old NAT yet is lost; tell the host yourself (``uplink_changed``)."""
        self.remove_uplink(uplink)
        uplink.address, uplink.nat = address, nat
        self._attach(uplink)

    def remove_host(self, name: str) -> None:
        """The host is killed: nothing more in or out of it."""
        slot = self.hosts.pop(name)
        slot.removed = True
        for uplink in list(slot.uplinks.values()):
            self.remove_uplink(uplink)

    # ------------------------------------------------------------------------ running

    def at(
        self, when: float, action: Callable[[float], object], *, touches: str | None = None
    ) -> None:
        """Run ``action(now)`` at ``when`` (e.g. feed a gate, cut an uplink); then every host
        is serviced (the action may have given any of them something to do), or only host
        ``touches`` when the action says it touches that one alone."""
        self._push(max(when, self.now), self._action, (action, touches))

    def every(
        self,
        interval: float,
        action: Callable[[float], object],
        *,
        start: float,
        stop: float,
        touches: str | None = None,
    ) -> None:
        """``action(now)`` at ``start``, ``start + interval`` ... before ``stop``."""
        count = math.ceil((stop - start) / interval)
        for i in range(count):
            self.at(start + i * interval, action, touches=touches)

    def run_until(self, until: float) -> None:
        """Process everything due up to ``until`` (inclusive); the clock ends at ``until``."""
        queue = self._queue
        pop = heapq.heappop
        while queue and queue[0][0] <= until:
            when, _, handler, args = pop(queue)
            self.now = when
            handler(when, *args)
        self.now = max(self.now, until)

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def run_while(self, condition: Callable[[], bool], *, limit: float) -> float:
        """Run until ``condition()`` is false (checked after every step) or ``limit``; the
        time it turned false (NEVER if it did not)."""
        queue = self._queue
        pop = heapq.heappop
        while condition():
            if not queue or queue[0][0] > limit:
                self.now = max(self.now, limit)
                return NEVER
            when, _, handler, args = pop(queue)
            self.now = when
            handler(when, *args)
        return self.now

    # ------------------------------------------------------------------------ internals

    def _attach(self, uplink: Uplink) -> None:
        address, nat = uplink.address, uplink.nat
        if nat is None:
            if address[0] in self._nats or address in self._public:
                raise ValueError(f"{address} is taken")
            self._public[address] = uplink
        else:
            if (nat.public_ip, address) in self._inside:
                raise ValueError(f"{address} behind {nat.public_ip} is taken")
            self._inside[(nat.public_ip, address)] = uplink
        uplink.host.uplinks[uplink.name] = uplink

    def _push(self, when: float, handler: Callable[..., None], args: tuple[object, ...]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), handler, args))

    def _action(self, now: float, action: Callable[[float], object], touches: str | None) -> None:
        action(now)
        if touches is not None:
            slot = self.hosts.get(touches)
            if slot is not None:
                self._service(slot)
            return
        for slot in list(self.hosts.values()):
            self._service(slot)

    def _serviced(self, now: float, slot: HostSlot) -> None:
        self._service(slot)

    def _timer(self, now: float, slot: HostSlot) -> None:
        if slot.removed or slot.deadline != now:
            return  # re-armed (or gone) since
        if now == self._timer_instant:
            self._timer_calls += 1
            if self._timer_calls > MAX_TIMER_CALLS_AT_ONCE:
                raise RuntimeError(
                    f"{slot.name}: next_deadline() stays at {now} after handle_timer"
                )
        else:
            self._timer_instant, self._timer_calls = now, 0
        slot.deadline = NEVER
        slot.host.handle_timer(now)
        self._service(slot)

    def _service(self, slot: HostSlot) -> None:
        """Send what ``slot``'s host has to send, let it be observed, re-arm its timer."""
        if slot.removed:
            return
        now = self.now
        host = slot.host
        for uplink_name, remote, data in host.datagrams_to_send():
            self._send(slot, uplink_name, remote, data, now)
        low_ttl = getattr(host, "low_ttl_datagrams_to_send", None)
        if low_ttl is not None:
            for uplink_name, remote, data, ttl in low_ttl():
                self._send(slot, uplink_name, remote, data, now, ttl=ttl)
        if slot.observe is not None:
            slot.observe(now)
        deadline = host.next_deadline()
        deadline = NEVER if deadline is None else max(deadline, now)
        if deadline != slot.deadline:
            slot.deadline = deadline
            if deadline != NEVER:
                self._push(deadline, self._timer, (slot,))

    def _send(
        self,
        slot: HostSlot,
        uplink_name: str,
        remote: Address,
        data: bytes,
        now: float,
        *,
        ttl: int | None = None,
    ) -> None:
        uplink = slot.uplinks.get(uplink_name)
        if uplink is None:
            self.stats["no_uplink"] += 1
            return
        if uplink.black_holed:
            self.stats["black_holed"] += 1
            return
        arrivals = uplink.egress.transmit(now, len(data))
        if not arrivals:
            return
        source = (
            uplink.address
            if uplink.nat is None
            else uplink.nat.outbound(uplink.address, remote, now)
        )
        if ttl is not None and ttl < HOPS_TO_FAR_NAT:
            self.stats["ttl_expired"] += len(arrivals)
            return
        for arrival in arrivals:
            self._push(arrival + self.internet_delay, self._arrive, (source, remote, data))

    def _arrive(self, now: float, source: Address, destination: Address, data: bytes) -> None:
        nat = self._nats.get(destination[0])
        if nat is not None:
            inside = nat.inbound(destination[1], source, now)
            uplink = None if inside is None else self._inside.get((nat.public_ip, inside))
            if uplink is None:
                return  # the NAT counted it
        else:
            found = self._public.get(destination)
            if found is None:
                self.stats["unroutable"] += 1
                return
            uplink = found
        if uplink.black_holed:
            self.stats["black_holed"] += 1
            return
        for arrival in uplink.ingress.transmit(now, len(data)):
            self._push(arrival, self._deliver, (uplink, source, data))

    def _deliver(self, now: float, uplink: Uplink, source: Address, data: bytes) -> None:
        slot = uplink.host
        if slot.removed or slot.uplinks.get(uplink.name) is not uplink:
            self.stats["gone"] += 1
            return
        self.stats["delivered"] += 1
        slot.host.datagram_received(uplink.name, source, data, now)
        self._service(slot)
