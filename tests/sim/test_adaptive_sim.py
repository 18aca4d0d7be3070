"""Adaptive parity on SimNet: loss on both of a gateway's uplinks steps 0 % → 10 % → 1 %;
the sender's code follows the loss its probes measure (more parity at 10 %, less after),
keeping residual loss within the 0.1 % target from 2 s after each step, and costs fewer
wire bytes over the run than the fixed (3, 5) tunnel (which the default spread sends as
(3, 6) on two uplinks a side, and which misses the target at 10 %).

Probes every 100 ms (``holepunch_keep_alive_interval``), lost ones counted after 500 ms
(``path_timeout``): the loss figure a 2 s reaction needs; at the default 1 s the figure
takes tens of seconds to settle.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.sim.gateways import Fleet, LossFactory, Peer, Stream
from tests.sim.network import LossModel
from tests.sim.simnet import NatKind
from warp.core.snapshot import snapshot

CONE: NatKind = "port-restricted-cone"
#: (start, loss) of each phase on a's two uplinks (egress), and when the stream stops
STEPS = ((0.0, 0.0), (12.0, 0.10), (27.0, 0.01))
STOP = 42.0
#: the stream: 1 000 datagrams/s of 200 bytes, a to b
RATE = 1000.0
SETTLE = 2.0  # after each step: the code has followed the loss
TARGET = 0.001
FAST_PROBES = ('holepunch_keep_alive_interval = "100ms"', 'path_timeout = "500ms"')


class SteppedLoss:
    """Independent loss at the rate of the phase the packet is sent in (`STEPS`)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def lost(self, now: float) -> bool:
        rate = next(r for start, r in reversed(STEPS) if now >= start)
        return self.rng.random() < rate


def stepped(rng: random.Random) -> list[LossModel]:
    return [SteppedLoss(rng)]


@dataclass
class Run:
    stream: Stream
    wire_bytes: int
    shards: list[tuple[float, int]] = field(default_factory=list)  # (time, effective n)
    status: dict[str, Any] = field(default_factory=dict)  # the tunnel's redundancy at the end

    def code_at(self, time: float) -> int:
        return next(n for t, n in reversed(self.shards) if t <= time)

    def residual(self, start: float, stop: float) -> tuple[int, int]:
        """(lost, sent) datagrams sent in [start, stop)."""
        sent = sum(1 for t in self.stream.sent_at if start <= t < stop)
        return len(self.stream.lost_between(start, stop)), sent


def run(k: int, n: int, redundancy: tuple[str, ...] = ()) -> Run:
    fleet = Fleet(7)
    losses: list[LossFactory | None] = [stepped, stepped]
    for name, other in (("a", "b"), ("b", "a")):
        config = fleet.config(
            name, [Peer(other, "t")], k=k, n=n, interfaces=FAST_PROBES, redundancy=redundancy
        )
        fleet.gateway(name, config, [CONE, CONE], egress=losses if name == "a" else ())
    stream = fleet.stream("a", "t", "b", rate=RATE, start=0.0, stop=STOP)
    session = fleet.gateways["a"].core.sessions["b"]
    result = Run(stream, 0)
    scheduler = session.tunnels["t"].scheduler
    fleet.net.every(
        0.25, lambda now: result.shards.append((now, scheduler.effective_n)), start=0.0, stop=STOP
    )
    fleet.net.run_until(STOP + 0.5)
    result.wire_bytes = sum(path.tx_bytes for path in session.prober.paths)
    status = snapshot(fleet.gateways["a"].core, fleet.net.now, uptime=0.0, uplink_rows=[], gates={})
    result.status = status["tunnels"][0]["redundancy"]
    return result


def phases() -> list[tuple[float, float, float]]:
    """(start, stop, loss) of each phase."""
    bounds = [start for start, _ in STEPS] + [STOP]
    return [(bounds[i], bounds[i + 1], STEPS[i][1]) for i in range(len(STEPS))]


def report(name: str, result: Run) -> None:
    print(f"{name}: wire bytes {result.wire_bytes}")
    for start, stop, loss in phases():
        lost, sent = result.residual(start + SETTLE, stop)
        codes = sorted({n for t, n in result.shards if start + SETTLE <= t < stop})
        print(
            f"  {loss:.0%} loss, {start + SETTLE:g}-{stop:g} s: {lost} of {sent} lost "
            f"({lost / sent:.3%}), n in {codes}"
        )


def test_adaptive_parity_follows_stepped_loss_within_target_and_costs_less_than_fixed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="warp")
    adaptive = run(2, 4, ("adaptive = true", "max_parity = 6"))
    adapted = [r.getMessage() for r in caplog.records if "tunnel.parity_adapted" in r.getMessage()]
    assert any("tunnel=t from=4 to=5 loss=0.0" in line for line in adapted), adapted
    assert adaptive.status["adaptive"] is True and adaptive.status["target_loss"] == TARGET
    fixed = run(3, 5)
    report("adaptive (k = 2)", adaptive)
    report("fixed (3, 5)", fixed)
    for start, stop, _ in phases():
        lost, sent = adaptive.residual(start + SETTLE, stop)
        assert lost <= TARGET * sent, (start, lost, sent)
    # The code each phase ends with: more parity at 10 % than at 0 %, and back down at 1 %.
    settled = [adaptive.code_at(stop - 0.5) for _, stop, _ in phases()]
    print(f"adaptive n at the end of each phase: {settled}")
    assert settled[0] < settled[1] and settled[2] < settled[1]
    assert adaptive.wire_bytes < fixed.wire_bytes
