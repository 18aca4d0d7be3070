"""Birthday probing through a symmetric NAT (port-restricted cone × symmetric), sans-I/O.

A symmetric NAT (address-dependent mapping) gives each destination its own random public port,
so the port the map reports for the hard side is of no use to its peer, and the easy side's
(endpoint-independent, port-restricted) NAT drops whatever the hard side sends until the easy
side has sent to that exact public address. Tailscale's answer, done here:

* the **hard** side opens :attr:`BirthdaySettings.ports` local sockets and sends one probe from
  each to the easy side's reflexive address: its NAT now holds that many bindings towards the
  easy side, each on a random public port (and each admits the easy side's address);
* the **easy** side sends probes to random ports of the hard side's public IP. Each probe
  opens the easy side's filter for that port and lands in one of the hard side's bindings
  with probability ``ports / 64512``; the first that lands is answered from the hard side's
  socket, and that answer passes the easy side's filter: a direct path.

With 256 ports, half the attempts succeed after about 174 probes of the easy side (the birthday
bound). Both sides are rate-limited (:attr:`BirthdaySettings.rate`), bounded
(:attr:`BirthdaySettings.budget` probes, :attr:`BirthdaySettings.duration` seconds per attempt)
and stop at the first success. :func:`plan_birthday` says which role an uplink takes, or why it
takes none (two symmetric NATs: the hard side's ports are random at both ends, the search space
is 64512² and the pair stays relayed).

Nothing here touches a socket or a clock: ``now`` and the random generator are passed in; the
caller sends each :class:`Probe` (from hard-side socket ``socket``, or the uplink's own socket)
and reports the first authenticated packet that came back on one (:meth:`BirthdayProbe.answered`).
"""

from __future__ import annotations

import ipaddress
import math
import random
from dataclasses import dataclass
from typing import Literal

from warp.frames import FrameType
from warp.paths.natcheck import NatMapping

Address = tuple[str, int]
Role = Literal["hard", "easy"]
#: why an uplink pair runs no birthday probing (logged as ``punch.birthday_skipped reason=``)
SkipReason = Literal["disabled", "not_needed", "both_symmetric", "mapping_unknown"]

#: the ports a NAT hands out (below 1024 is rare for UDP mappings)
FIRST_PORT = 1024
PORT_SPACE = 65536 - FIRST_PORT


@dataclass(frozen=True, slots=True)
class BirthdaySettings:
    #: hard side: local sockets opened, one probe each (Tailscale: 256)
    ports: int = 256
    #: probes per second at most, either side
    rate: float = 200.0
    #: easy side: probes at most per attempt
    budget: int = 2000
    #: seconds an attempt lasts at most
    duration: float = 10.0
    #: easy side: seconds to wait before the first probe (the hard side's bindings must exist)
    easy_delay: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.ports <= 1024:
            raise ValueError("ports must be in [1, 1024]")
        if self.rate <= 0 or self.duration <= 0 or self.easy_delay < 0:
            raise ValueError("rate and duration must be positive, easy_delay not negative")
        if not 1 <= self.budget <= PORT_SPACE:
            raise ValueError(f"budget must be in [1, {PORT_SPACE}]")


@dataclass(frozen=True, slots=True)
class BirthdayPlan:
    role: Role | None
    reason: SkipReason | None = None


def plan_birthday(local: NatMapping, peer: NatMapping, *, enabled: bool) -> BirthdayPlan:
    """The role of an uplink whose NAT maps as ``local`` towards a peer uplink mapping as
    ``peer`` (each learned from the map's secondary port), or why there is none."""
    if not enabled:
        return BirthdayPlan(None, "disabled")
    if local == "unknown" or peer == "unknown":
        return BirthdayPlan(None, "mapping_unknown")
    if local == "address-dependent" and peer == "address-dependent":
        return BirthdayPlan(None, "both_symmetric")
    if local == "address-dependent":
        return BirthdayPlan("hard")
    if peer == "address-dependent":
        return BirthdayPlan("easy")
    return BirthdayPlan(None, "not_needed")  # two cones: ordinary punching works


@dataclass(frozen=True, slots=True)
class Probe:
    """Send a probe to ``remote``: from hard-side socket ``socket`` (0 .. ports − 1), or from
    the uplink's own socket (``socket`` None, the easy side)."""

    socket: int | None
    remote: Address


class BirthdayProbe:
    """One attempt between one of our uplinks and one peer uplink.

    ``peer``: the hard side probes the easy side's reflexive address; the easy side probes
    random ports of ``peer``'s IP (its port, the one the map saw, is skipped: ordinary
    punching tried it)."""

    def __init__(
        self,
        role: Role,
        peer: Address,
        now: float,
        rng: random.Random,
        settings: BirthdaySettings | None = None,
    ) -> None:
        self.role: Role = role
        self.peer = peer
        self.settings = settings or BirthdaySettings()
        self.started = now
        self.sent = 0
        #: "running", then "succeeded" (``answered``) or "exhausted" (budget or time spent)
        self.state: Literal["running", "succeeded", "exhausted"] = "running"
        #: the probe that got through: (hard-side socket or None, remote)
        self.winner: Probe | None = None
        self._first = now + (self.settings.easy_delay if role == "easy" else 0.0)
        limit = self.settings.ports if role == "hard" else self.settings.budget
        self._limit = min(limit, math.floor(self.settings.duration * self.settings.rate) + 1)
        self._ports: list[int] = []
        if role == "easy":
            # Without repeats: each probe tests a port not tried yet.
            candidates = range(FIRST_PORT, 65536)
            count = min(self.settings.budget + 1, PORT_SPACE)
            self._ports = [p for p in rng.sample(candidates, count) if p != peer[1]]

    @property
    def running(self) -> bool:
        return self.state == "running"

    def next_deadline(self) -> float | None:
        """The next probe's time; once all are out, the attempt's end (answers to the last
        probes may still come)."""
        if not self.running:
            return None
        if self.sent >= self._limit:
            return self.started + self.settings.duration
        return self._first + self.sent / self.settings.rate

    def tick(self, now: float) -> list[Probe]:
        """The probes due by ``now`` (at most ``rate`` per second since the first)."""
        if not self.running:
            return []
        if now - self.started >= self.settings.duration:
            self.state = "exhausted"
            return []
        if now < self._first:
            return []
        # (the epsilon: at exactly `next_deadline()` float rounding must not leave it unsent)
        due = min(math.floor((now - self._first) * self.settings.rate + 1e-6) + 1, self._limit)
        out: list[Probe] = []
        while self.sent < due:
            if self.role == "hard":
                out.append(Probe(self.sent, self.peer))
            else:
                out.append(Probe(None, (self.peer[0], self._ports[self.sent])))
            self.sent += 1
        return out

    def answered(self, socket: int | None, remote: Address, now: float) -> bool:
        """An authenticated packet from ``remote`` arrived on hard-side socket ``socket`` (or
        the uplink's socket): the attempt succeeded if it is the peer's (its IP). True: this
        is the first success; every probe stops."""
        if self.state == "succeeded" or remote[0] != self.peer[0]:
            return False
        if self.role == "hard" and (socket is None or not 0 <= socket < self.sent):
            return False
        self.state = "succeeded"
        self.winner = Probe(socket, remote)
        return True


# ------------------------------------------------------------------------ NAT info frame
#
# What each side tells the other over their session (relayed or not), so that both know
# every pair's plan: ``u8 FrameType.NAT_INFO, u8 count (≤ MAX_NAT_INFO)``, then per uplink
# ``u8 mapping (0 unknown, 1 endpoint-independent, 2 address-dependent), u8 address length
# (4 or 16), the address, u16 port`` (big endian). Trailing bytes (WireGuard's zero padding)
# are ignored.

MAX_NAT_INFO = 16
_MAPPING_CODES: dict[NatMapping, int] = {
    "unknown": 0,
    "endpoint-independent": 1,
    "address-dependent": 2,
}
_CODE_MAPPINGS: dict[int, NatMapping] = {v: k for k, v in _MAPPING_CODES.items()}
_NAT_INFO = int(FrameType.NAT_INFO)


def encode_nat_info(entries: list[tuple[Address, NatMapping]]) -> bytes:
    """The NAT_INFO frame for (reflexive address, mapping) entries (the first MAX_NAT_INFO)."""
    entries = entries[:MAX_NAT_INFO]
    out = bytearray((_NAT_INFO, len(entries)))
    for (host, port), mapping in entries:
        packed = ipaddress.ip_address(host).packed
        out += bytes((_MAPPING_CODES[mapping], len(packed))) + packed + port.to_bytes(2, "big")
    return bytes(out)


def parse_nat_info(frame: bytes) -> dict[Address, NatMapping] | None:
    """The entries of a NAT_INFO frame, or None if it is malformed (hostile or corrupt)."""
    if len(frame) < 2 or frame[0] != _NAT_INFO or frame[1] > MAX_NAT_INFO:
        return None
    out: dict[Address, NatMapping] = {}
    offset = 2
    for _ in range(frame[1]):
        if offset + 2 > len(frame):
            return None
        mapping = _CODE_MAPPINGS.get(frame[offset])
        length = frame[offset + 1]
        end = offset + 2 + length + 2
        if mapping is None or length not in (4, 16) or end > len(frame):
            return None
        host = str(ipaddress.ip_address(frame[offset + 2 : offset + 2 + length]))
        port = int.from_bytes(frame[end - 2 : end], "big")
        if port == 0:
            return None
        out[(host, port)] = mapping
        offset = end
    return out


#: why a far gate is relayed (`warp status --json` ``far_gates.<name>.relay_reason``)
RelayReason = Literal["both_symmetric", "birthday_needed", "mapping_unknown", "filtered"]


def relay_reason(local: list[NatMapping], peer: list[NatMapping]) -> RelayReason:
    """Why no direct path came up, from our uplinks' and the far gate's uplinks' mappings:
    ``both_symmetric`` (every pair: two symmetric NATs, nothing to try), ``birthday_needed``
    (some pair is a cone and a symmetric NAT: only birthday probing gets through),
    ``mapping_unknown`` (some mapping not learned: the map has no secondary port), else
    ``filtered`` (cones on both sides, yet nothing came through: a firewall)."""
    plans = [plan_birthday(a, b, enabled=True) for a in local for b in peer]
    if not plans or any(p.reason == "mapping_unknown" for p in plans):
        return "mapping_unknown"
    if all(p.reason == "both_symmetric" for p in plans):
        return "both_symmetric"
    if any(p.role is not None for p in plans):
        return "birthday_needed"
    return "filtered"
