"""CPU cost of ordered delivery under heavy block loss: `ShardDecoder(ordered=True)` fed one
second of virtual traffic at `--rate` blocks/s (1-block datagrams, (k, n) = (1, 1) so the
FEC costs nothing and the reorder buffer's gap skipping dominates), with `--loss` of the
blocks lost whole, `tick` run at every deadline as the node's timer does.

Run: ``python bench/reorder_skip.py [--rate 20000] [--loss 0.3] [--rounds 5]``. Prints the
median CPU seconds per second of traffic, and the most datagrams held at once.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warp.redundancy.decoder import ShardDecoder
from warp.redundancy.encoder import ShardEncoder


def frames(rate: int, loss: float, seed: int) -> list[bytes]:
    encoder = ShardEncoder(1, 1, 1, mtu=1420, epoch=1)
    rng = random.Random(seed)
    out = []
    for _ in range(rate):
        [(_, frame)] = encoder.push(b"x" * 200, 0.0) + encoder.flush(0.0)
        if rng.random() >= loss:
            out.append(frame)
    return out


def run_once(rate: int, loss: float, seed: int) -> tuple[float, int, int]:
    stream = frames(rate, loss, seed)
    decoder = ShardDecoder(1, 1, 1, ordered=True, reorder_timeout=0.05)
    step = 1.0 / (rate * (1 - loss))
    now = 0.0
    delivered = 0
    most_held = 0
    start = time.process_time()
    for frame in stream:
        now += step
        deadline = decoder.next_deadline()
        if deadline is not None and deadline <= now:
            delivered += len(decoder.tick(now))
        delivered += len(decoder.receive(frame, now))
        reorder = decoder._reorder
        if reorder is not None and len(reorder) > most_held:
            most_held = len(reorder)
    delivered += len(decoder.tick(now + 10))
    elapsed = time.process_time() - start
    assert delivered == len(stream), (delivered, len(stream))
    return elapsed, most_held, delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=20000, help="blocks per second")
    parser.add_argument("--loss", type=float, default=0.3, help="share of blocks lost whole")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = [run_once(args.rate, args.loss, seed) for seed in range(args.rounds)]
    cpu = statistics.median(r[0] for r in results)
    held = max(r[1] for r in results)
    print(
        f"ordered delivery, {args.rate} blocks/s, {args.loss:.0%} of blocks lost: "
        f"{cpu:.3f} s CPU per second of traffic (median of {args.rounds}), "
        f"up to {held} datagrams held"
    )


if __name__ == "__main__":
    main()
