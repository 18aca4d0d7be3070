"""The `Path` record: one (local uplink, remote address) pair and its measured health.

Pure data plus small bookkeeping methods; no sockets, no clocks (`now` is passed in).
`PathProber` (warp/paths/prober.py) owns a table of these and drives their state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from warp.paths.capacity import PathRateMeter

Address = tuple[str, int]
"""A UDP endpoint as (host, port); IPv6 scope/flow info is dropped at the socket boundary."""

PathKey = tuple[str, Address]
"""(uplink name, remote address): what identifies a path."""

PathSource = Literal["map", "static", "learned", "relay"]
PATH_SOURCES: frozenset[str] = frozenset({"map", "static", "learned", "relay"})

LOSS_WINDOW = 32
"""How many recent settled (answered or timed-out) probes the loss figure covers."""

RTT_ALPHA = 1 / 8
RTT_BETA = 1 / 4


class PathState(StrEnum):
    PROBING = "probing"
    ACTIVE = "active"
    DEAD = "dead"


@dataclass(slots=True)
class ProbeRecord:
    """One probe sent on a path, kept until it falls out of the loss window."""

    probe_id: int
    sent_at: float
    counted: bool
    """False for the initial burst: probes sent before the NATs could open are not loss."""
    answered: bool = False
    expired: bool = False
    sent_bytes: int = 0
    """The path's `tx_bytes` when this probe left (what the far side's receive report in
    the reply is compared with)."""


@dataclass(slots=True, eq=False)
class Path:
    """One path: a local uplink and a remote address, and what we know about it."""

    uplink: str
    remote: Address
    source: PathSource
    created_at: float
    state: PathState = PathState.PROBING
    state_since: float = 0.0
    last_authenticated: float | None = None
    """Time of the last authenticated packet received on this path."""
    rtt: float | None = None
    """Smoothed RTT (EWMA, RFC 6298 gains), seconds."""
    rtt_var: float | None = None
    rtt_last: float | None = None
    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    probes_sent: int = 0
    probe_replies: int = 0
    # Scheduling (owned by PathProber).
    next_probe_at: float = 0.0
    burst_anchor: float = 0.0
    burst_index: int = 0
    early_probe_at: float = float("-inf")
    low_ttl_until: float = float("-inf")
    """Until then, and while nothing was ever heard on this path, packets on it are first
    punches: they leave with a low TTL (`PathProber.low_ttl_window`)."""
    """Last probe sent ahead of schedule to check a suspect path (`drop_superseded`)."""
    probes: deque[ProbeRecord] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    rates: PathRateMeter = field(default_factory=PathRateMeter)
    """Delivered and offered rates from the far side's receive reports (`warp.paths.capacity`)."""

    @property
    def key(self) -> PathKey:
        return (self.uplink, self.remote)

    @property
    def loss(self) -> float | None:
        """Fraction of recent probes that went unanswered (None until one has settled)."""
        answered = lost = 0
        for record in self.probes:
            if not record.counted:
                continue
            if record.answered:
                answered += 1
            elif record.expired:
                lost += 1
        settled = answered + lost
        return lost / settled if settled else None

    def low_ttl(self, now: float) -> bool:
        """Whether a packet sent now is a first punch: it should cross our own NAT and die
        before the peer's, so that a router without a firewall there does not pin its port."""
        return now < self.low_ttl_until and self.last_authenticated is None

    def restart_measurements(self) -> None:
        """A dead path came back (or is tried again): its loss window and RTT restart.

        The probes that went unanswered while it was dead describe the outage, not the path
        now (they made a path that just came back show 87.5 % loss). Probes still in flight
        stay, uncounted (they were sent while it was dead), so the reply that revived it still
        gives an RTT sample."""
        in_flight = [r for r in self.probes if not r.answered and not r.expired]
        self.probes.clear()
        for record in in_flight:
            record.counted = False
            self.probes.append(record)
        self.rtt = self.rtt_var = self.rtt_last = None
        self.rates.reset()

    def record_tx(self, nbytes: int) -> None:
        self.tx_packets += 1
        self.tx_bytes += nbytes

    def record_rx(self, nbytes: int) -> None:
        self.rx_packets += 1
        self.rx_bytes += nbytes

    def add_rtt_sample(self, sample: float) -> None:
        self.rtt_last = sample
        if self.rtt is None or self.rtt_var is None:
            self.rtt = sample
            self.rtt_var = sample / 2
        else:
            self.rtt_var = (1 - RTT_BETA) * self.rtt_var + RTT_BETA * abs(self.rtt - sample)
            self.rtt = (1 - RTT_ALPHA) * self.rtt + RTT_ALPHA * sample

    def snapshot(self) -> dict[str, object]:
        """Plain values for `warp status` / metrics (a dead path: no loss or RTT figure)."""
        dead = self.state is PathState.DEAD
        loss = None if dead else self.loss
        return {
            "uplink": self.uplink,
            "remote": f"{self.remote[0]}:{self.remote[1]}",
            "source": self.source,
            "state": str(self.state),
            "rtt_ms": None if self.rtt is None or dead else round(self.rtt * 1000, 3),
            "rtt_last_ms": None
            if self.rtt_last is None or dead
            else round(self.rtt_last * 1000, 3),
            "loss": loss,
            "tx_bytes": self.tx_bytes,
            "tx_packets": self.tx_packets,
            "rx_bytes": self.rx_bytes,
            "rx_packets": self.rx_packets,
            "last_authenticated": self.last_authenticated,
        }
