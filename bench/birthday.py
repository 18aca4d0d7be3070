"""Birthday probing, port-restricted cone × symmetric NAT with random ports, in the simulator
(tests/sim/birthday.py: the sans-I/O `warp.paths.punch.BirthdayProbe` on both sides, NATs as
RFC 4787 describes them, 10 ms access links each way and 20 ms between the NATs).

Prints the share of ``--runs`` attempts that reached a direct path within 10 s, the probes each
side spent, and how many of the easy side's probes it took for half the attempts to get
through (Tailscale's figure: 50 % after 174 probes with 256 ports).

Run: ``python bench/birthday.py [--runs 20] [--ports 256] [--rate 200] [--curve-runs 1000]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.sim.birthday import birthday_run
from warp.paths.punch import BirthdaySettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--curve-runs", type=int, default=1000)
    parser.add_argument("--ports", type=int, default=256)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    settings = BirthdaySettings(ports=args.ports, rate=args.rate)

    runs = [birthday_run(s, "port-restricted-cone", "symmetric", settings=settings)
            for s in range(args.runs)]  # fmt: skip
    direct = [r for r in runs if r.direct_at <= 10.0]
    print(f"port-restricted cone x symmetric, {args.ports} ports, {args.rate:g} probes/s")
    print(f"direct within 10 s: {len(direct)}/{len(runs)} ({100 * len(direct) / len(runs):.0f} %)")
    if direct:
        print(f"time to direct: median {statistics.median(r.direct_at for r in direct):.2f} s, "
              f"max {max(r.direct_at for r in direct):.2f} s")  # fmt: skip
        easy = sorted(r.probes_a for r in direct)
        print(f"probes, easy side: median {statistics.median(easy):.0f}, max {easy[-1]}; "
              f"hard side: median {statistics.median(r.probes_b for r in direct):.0f} "
              f"(at most {args.ports}); total per run: median "
              f"{statistics.median(r.probes_a + r.probes_b for r in direct):.0f}")  # fmt: skip

    # Easy-side probes to success over many attempts: the birthday curve.
    curve = []
    for seed in range(10_000, 10_000 + args.curve_runs):
        run = birthday_run(seed, "port-restricted-cone", "symmetric", settings=settings)
        curve.append(run.probes_a if math.isfinite(run.direct_at) else math.inf)
    curve.sort()
    half = curve[len(curve) // 2]
    # With every hard-side port open, a probe lands with p = ports / 64512.
    ideal = math.log(0.5) / math.log(1 - args.ports / 64512)
    print(f"over {args.curve_runs} attempts: 50 % direct after {half} easy-side probes "
          f"(ideal, every hard-side port already open: {ideal:.0f}; the hard side opens "
          f"its ports at {args.rate:g}/s while the easy side starts "
          f"{settings.easy_delay:g} s in)")  # fmt: skip


if __name__ == "__main__":
    main()
