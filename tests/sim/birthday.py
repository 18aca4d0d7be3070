"""Birthday probing between two hosts on :mod:`tests.sim.simnet`, each behind its own NAT:
the sans-I/O :class:`~warp.paths.punch.BirthdayProbe` driven as a gateway's shell drives it
(the hard side's sockets are uplinks of the host behind the same NAT, one private port each).

:func:`birthday_run` is one attempt (a function of its seed): when a direct exchange first
worked, and how many probes each side spent.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tests.sim.simnet import Address, NatKind, SimNet
from warp.paths.natcheck import NatMapping
from warp.paths.punch import BirthdayPlan, BirthdayProbe, BirthdaySettings, plan_birthday

PROBE = b"\xf1BDAY"
ANSWER = b"\xf1BACK"
MAIN = "wan0"


def socket_name(index: int | None) -> str:
    return MAIN if index is None else f"{MAIN}~{index}"


def socket_index(uplink: str) -> int | None:
    return None if uplink == MAIN else int(uplink.rsplit("~", 1)[1])


MAPPING: dict[NatKind, NatMapping] = {
    "full-cone": "endpoint-independent",
    "restricted-cone": "endpoint-independent",
    "port-restricted-cone": "endpoint-independent",
    "symmetric": "address-dependent",
}


class BirthdayHost:
    """One side: its uplink's own socket, and (hard side) the birthday sockets."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempt: BirthdayProbe | None = None
        self.direct_at = math.inf
        self._outbox: list[tuple[str, Address, bytes]] = []

    def start(self, attempt: BirthdayProbe) -> None:
        self.attempt = attempt

    # Host
    def datagram_received(self, uplink: str, source: Address, data: bytes, now: float) -> None:
        attempt = self.attempt
        if attempt is None:
            return
        if data.startswith(PROBE):
            self._outbox.append((uplink, source, ANSWER))  # from the socket it came to
        if data.startswith((PROBE, ANSWER)):
            attempt.answered(socket_index(uplink), source, now)
            if data.startswith(ANSWER):
                self.direct_at = min(self.direct_at, now)

    def handle_timer(self, now: float) -> None:
        if self.attempt is not None:
            for probe in self.attempt.tick(now):
                self._outbox.append((socket_name(probe.socket), probe.remote, PROBE))

    def next_deadline(self) -> float | None:
        return None if self.attempt is None else self.attempt.next_deadline()

    def datagrams_to_send(self) -> list[tuple[str, Address, bytes]]:
        out, self._outbox = self._outbox, []
        return out


@dataclass(frozen=True)
class BirthdayRun:
    plan_a: BirthdayPlan
    plan_b: BirthdayPlan
    #: when a probe's answer first came back to either side (inf: never)
    direct_at: float
    probes_a: int
    probes_b: int
    #: probes sent after the first success (should be none beyond those in flight)
    probes_after: int


def birthday_run(
    seed: int,
    kind_a: NatKind,
    kind_b: NatKind,
    *,
    settings: BirthdaySettings | None = None,
    enabled: bool = True,
    limit: float = 12.0,
) -> BirthdayRun:
    """a behind ``kind_a``, b behind ``kind_b``, 10 ms access links each way: each learned its
    own mapping and the other's (from the map, here given) and each starts its role at 0."""
    settings = settings or BirthdaySettings()
    net = SimNet(seed, internet_delay=0.020)
    hosts = {"a": BirthdayHost("a"), "b": BirthdayHost("b")}
    publics = {"a": "100.64.1.1", "b": "100.64.2.1"}
    kinds = {"a": kind_a, "b": kind_b}
    nats = {side: net.nat(publics[side], kinds[side]) for side in hosts}
    plans = {
        "a": plan_birthday(MAPPING[kind_a], MAPPING[kind_b], enabled=enabled),
        "b": plan_birthday(MAPPING[kind_b], MAPPING[kind_a], enabled=enabled),
    }
    for side, host in hosts.items():
        net.add_host(side, host)
        net.add_uplink(side, MAIN, ("192.168.0.2", 51820), nat=nats[side])
        if plans[side].role == "hard":
            for i in range(settings.ports):
                net.add_uplink(side, socket_name(i), ("192.168.0.2", 40000 + i), nat=nats[side])
    # What the map saw of each main socket: its reflexive address (towards the map).
    map_address = ("198.51.100.1", 13116)
    for side in hosts:
        nats[side].outbound(("192.168.0.2", 51820), map_address, 0.0)
    rng = random.Random(seed)
    for side, other in (("a", "b"), ("b", "a")):
        role = plans[side].role
        if role is not None:
            reflexive = nats[other].public_address(("192.168.0.2", 51820), map_address)
            assert reflexive is not None
            hosts[side].start(BirthdayProbe(role, reflexive, 0.0, rng, settings))
    net.at(0.0, lambda now: None)
    direct = net.run_while(
        lambda: not any(h.direct_at < math.inf for h in hosts.values()), limit=limit
    )
    sent = {side: 0 if h.attempt is None else h.attempt.sent for side, h in hosts.items()}
    net.run_for(0.2)  # what is still in flight or due
    after = sum((0 if h.attempt is None else h.attempt.sent) - sent[s] for s, h in hosts.items())
    return BirthdayRun(plans["a"], plans["b"], direct, sent["a"], sent["b"], after)
