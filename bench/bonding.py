"""Bonding uneven uplinks (issue 18): the issue's table for any shaping, in virtual time.

Gateway a's uplinks are shaped (a rate limit with a `--queue-ms` queue in front, as tc tbf
or a modem) to the rates given; gateway b has as many public, unshaped uplinks. a sends
`--size`-byte datagrams to b at rates stepped up as a fraction of the capacity; each step
runs `--seconds` of virtual time and is measured after `--settle` seconds.

For each (k, n) and spread it prints: the capacity (what the uplinks carry in application
bytes: their rates times the application bytes per wire byte measured), the highest rate
with < 1 % loss and its share of the capacity, the loss one step above, and each uplink's
share of the wire bytes at the best rate.

    .venv/bin/python bench/bonding.py --rates 30 10 --scale 0.1
    .venv/bin/python bench/bonding.py --rates 30 10 --codes 1/1 3/5 --spreads aggregate

`--scale 0.1` runs 30 + 10 Mbit/s as 3 + 1 (the ratio is what matters; the CPU cost grows
with the rate), with time ten times slower: the FEC block window (`--window-ms`, 1 ms by
default) runs as 10 ms, so that a block gathers as many datagrams as at the given rates.
Figures are printed at the given rates (scaled back).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.sim.gateways import Fleet, Peer
from tests.sim.simnet import NatKind

MBIT = 1e6 / 8
CONE: NatKind = "port-restricted-cone"


@dataclass
class Step:
    fraction: float
    capacity: float  # application bytes/s
    delivered: float  # application bytes/s
    loss: float
    sender_drops: float
    shares: list[float]


def run_step(args: argparse.Namespace, spread: str, k: int, n: int, fraction: float) -> Step:
    rates = [r * MBIT * args.scale for r in args.rates]
    fleet = Fleet(args.seed)
    transport = [f'spread = "{spread}"']
    redundancy = [f'window = "{args.window_ms / args.scale:g}ms"']
    config_a = fleet.config(
        "a", [Peer("b", "t")], k=k, n=n, transport=transport, redundancy=redundancy
    )
    config_b = fleet.config(
        "b", [Peer("a", "t")], k=k, n=n, transport=transport, redundancy=redundancy
    )
    a = fleet.gateway(
        "a", config_a, [CONE] * len(rates), egress_rates=rates, queue_time=args.queue_ms / 1000
    )
    fleet.gateway("b", config_b, [None] * len(rates))
    session = a.core.sessions["b"]
    guess = sum(rates) * k / n * args.size / (args.size + 64)
    stop = args.seconds
    stream = fleet.stream(
        "a", "t", "b", rate=fraction * guess / args.size, start=1.0, stop=stop, size=args.size
    )
    marks: dict[str, tuple[int, int, list[int]]] = {}

    def mark(name: str) -> None:
        stats = session.send_queue.stats
        marks[name] = (
            stats.sent,
            stats.dropped_stale + stats.dropped_overflow,
            [fleet.uplink("a", i).egress.stats.sent_bytes for i in range(len(rates))],
        )

    fleet.net.at(args.settle, lambda now: mark("start"))
    fleet.net.at(stop, lambda now: mark("stop"))
    fleet.net.run_until(stop + 0.5)
    (sent_a, drops_a, bytes_a), (sent_b, drops_b, bytes_b) = marks["start"], marks["stop"]
    wire = [b - a for a, b in zip(bytes_a, bytes_b, strict=True)]
    capacity = sum(rates) * (sent_b - sent_a) * args.size / max(sum(wire), 1)
    offered = sum(1 for at in stream.sent_at if args.settle <= at < stop)
    lost = len(stream.lost_between(args.settle, stop))
    window = stop - args.settle
    return Step(
        fraction=fraction,
        capacity=capacity / args.scale,
        delivered=(offered - lost) * args.size / window / args.scale,
        loss=lost / max(offered, 1),
        sender_drops=(drops_b - drops_a) / max(offered, 1),
        shares=[w / max(sum(wire), 1) for w in wire],
    )


def mbit(value: float) -> str:
    return f"{value / MBIT:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[30.0, 10.0],
                        help="uplink upload rates, Mbit/s")  # fmt: skip
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--codes", nargs="+", default=["1/1", "3/5"], help="k/n")
    parser.add_argument("--spreads", nargs="+", default=["aggregate", "survive_uplink_loss"])
    fractions = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.2]
    parser.add_argument("--fractions", type=float, nargs="+", default=fractions,
                        help="offered rates, fractions of the capacity")  # fmt: skip
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--queue-ms", type=float, default=30.0)
    parser.add_argument("--window-ms", type=float, default=1.0,
                        help="FEC block window at the given rates (run at it / scale)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=16.0)
    parser.add_argument("--settle", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"uplinks {' + '.join(f'{r:g}' for r in args.rates)} Mbit/s (simulated at x"
          f"{args.scale:g}), queue {args.queue_ms:g} ms, FEC window {args.window_ms:g} ms,"
          f" {args.size} B datagrams")  # fmt: skip
    print("| spread | (k, n) | capacity (app Mbit/s) | best rate < 1 % loss | above that |"
          " uplink shares at best |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for spread in args.spreads:
        for code in args.codes:
            k, n = (int(x) for x in code.split("/"))
            best: Step | None = None
            above: Step | None = None
            for fraction in args.fractions:
                step = run_step(args, spread, k, n, fraction)
                if step.loss < 0.01:
                    best = step
                else:
                    above = step
                    break
            if best is None:
                print(f"| {spread} | ({k}, {n}) | - | none below 1 % | - | - |")
                continue
            tail = "-"
            if above is not None:
                tail = (f"{above.loss * 100:.1f} % lost at {above.fraction * 100:.0f} % offered"
                        f" ({above.sender_drops * 100:.1f} % by the sender)")  # fmt: skip
            shares = " / ".join(f"{s * 100:.0f} %" for s in best.shares)
            share = best.delivered / best.capacity * 100
            print(f"| {spread} | ({k}, {n}) | {mbit(best.capacity)} | {mbit(best.delivered)} "
                  f"({share:.0f} %) | {tail} | {shares} |")  # fmt: skip


if __name__ == "__main__":
    main()
