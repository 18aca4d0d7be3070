"""Shard scheduling policy: which path carries which shard of a block.

Pure policy, no I/O. Give it the paths with their measured loss and RTT (`update`), then
ask it for one assignment per block (`assign`): a tuple whose i-th entry is the path for
shard i.

Rules, in order of precedence:

1. Dead paths carry nothing.
2. No path carries more than `n - k` shards of a block whenever there are enough alive
   paths for that (at least ceil(n / (n - k))), so losing any one whole path loses no
   block. With fewer paths, shards are spread as evenly as possible (at most
   ceil(n / paths) each); with one path, everything goes on it.
3. Within that cap, paths get shares in proportion to a quality weight that falls with
   loss and RTT (`path_weight`), so shards move away from lossy or slow paths without
   ever breaking rule 2.
4. Shares are fractional (5 shards over 3 equal paths is 5/3 each); each block rounds
   them to whole shards, and the rounding error is carried over to the next blocks
   (largest remainder with carried credit), so over a few blocks every path gets its
   share exactly and which path gets the extra shard rotates.

The per-block work is precomputed: `update` lays out a cycle of assignments and `assign`
steps through it, so scheduling costs one list index per block.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

PathId = TypeVar("PathId", bound=Hashable)

# Weight = (1 - loss) ** LOSS_EXPONENT * (best_rtt + RTT_SLACK) / (rtt + RTT_SLACK).
# Squared delivery rate: a path losing 10 % gets 81 % of a clean path's share. RTT
# enters as a ratio, softened by RTT_SLACK so that 1 ms vs 3 ms counts for little and
# 20 ms vs 200 ms for a lot.
LOSS_EXPONENT = 2
RTT_SLACK = 0.020
# Assignments precomputed per `update`: a multiple of every path count up to 6 and of
# common n, so even shares repeat exactly.
CYCLE_BLOCKS = 240


@dataclass(frozen=True, slots=True)
class PathQuality(Generic[PathId]):
    """What the scheduler knows of a path: measured by probes, owned by the path layer."""

    path_id: PathId
    alive: bool = True
    loss: float = 0.0  # fraction of probes lost, 0..1
    rtt: float | None = None  # seconds; None while not yet measured


def path_weight(path: PathQuality[PathId], best_rtt: float) -> float:
    """Relative preference for a path (1.0 for a clean path with the best RTT)."""
    delivery = 1.0 - min(max(path.loss, 0.0), 1.0)
    weight = delivery**LOSS_EXPONENT
    if path.rtt is not None and path.rtt > best_rtt:
        weight *= (best_rtt + RTT_SLACK) / (path.rtt + RTT_SLACK)
    return weight


def shard_cap(k: int, n: int, alive_paths: int) -> int:
    """Most shards of one block a path may carry with this many alive paths."""
    tolerance = n - k
    if tolerance > 0 and alive_paths * tolerance >= n:
        return tolerance
    return -(-n // alive_paths)


def plan_shares(paths: Sequence[PathQuality[PathId]], k: int, n: int) -> dict[PathId, float]:
    """Fractional shards per block for each alive path: sums to n, none above the cap.

    Water-filling: shares proportional to weight; a path whose share exceeds the cap is
    held at the cap and the excess goes to the others in proportion to their weights.
    """
    alive = [p for p in paths if p.alive]
    if not alive:
        return {}
    cap = shard_cap(k, n, len(alive))
    rtts = [p.rtt for p in alive if p.rtt is not None]
    best_rtt = min(rtts) if rtts else 0.0
    weights = {p.path_id: path_weight(p, best_rtt) for p in alive}
    shares: dict[PathId, float] = {}
    free = list(weights)
    remaining = float(n)
    while free:
        total = sum(weights[path] for path in free)
        if total <= 0.0:
            # Every remaining path is useless (100 % loss): spread evenly regardless.
            proposed = {path: remaining / len(free) for path in free}
        else:
            proposed = {path: remaining * weights[path] / total for path in free}
        capped = [path for path in free if proposed[path] > cap]
        if not capped:
            shares.update(proposed)
            break
        for path in capped:
            shares[path] = float(cap)
            remaining -= cap
            free.remove(path)
    return shares


class ShardScheduler(Generic[PathId]):
    """Assigns each block's n shards to paths (see the module docstring for the rules)."""

    def __init__(self, k: int, n: int) -> None:
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")
        self.k = k
        self.n = n
        self.shares: dict[PathId, float] = {}
        self._credit: dict[PathId, float] = {}
        self._order: list[PathId] = []  # paths in shard-index order: fastest first
        self._cycle: list[tuple[PathId, ...]] = []
        self._position = 0
        self._blocks = 0  # rotates tie-breaks across updates

    def update(self, paths: Sequence[PathQuality[PathId]]) -> None:
        """Take new path measurements; cheap to call when nothing changed."""
        shares = plan_shares(paths, self.k, self.n)
        alive = [p for p in paths if p.alive]
        # Lowest RTT first: data shards (the lowest indexes) then ride the fastest paths,
        # so the receiver more often has all k data shards and needs no decode.
        order = [p.path_id for p in sorted(alive, key=lambda p: p.rtt or 0.0)]
        if shares == self.shares and order == self._order:
            return
        self.shares = shares
        self._order = order
        self._credit = {path: self._credit.get(path, 0.0) for path in shares}
        self._cycle = [self._next_assignment() for _ in range(CYCLE_BLOCKS)] if shares else []
        self._position = 0

    def assign(self) -> tuple[PathId, ...]:
        """Path of each shard index for the next block; empty when no path is alive."""
        cycle = self._cycle
        if not cycle:
            return ()
        position = self._position
        self._position = position + 1 if position + 1 < len(cycle) else 0
        return cycle[position]

    def _next_assignment(self) -> tuple[PathId, ...]:
        """One block: round the shares to whole shards, carrying the rounding error."""
        shares = self.shares
        credit = self._credit
        counts = {path: math.floor(share + 1e-9) for path, share in shares.items()}
        extra = self.n - sum(counts.values())
        if extra:
            paths = self._order
            rotation = self._blocks % len(paths)
            # Those owed the most (share fraction + carried credit) get the extra shards;
            # ties go round-robin, starting one path further on every block.
            candidates = sorted(
                (path for path in paths if shares[path] - counts[path] > 1e-9),
                key=lambda path: (
                    -(shares[path] - counts[path] + credit[path]),
                    (paths.index(path) - rotation) % len(paths),
                ),
            )
            for path in candidates[:extra]:
                counts[path] += 1
        for path, share in shares.items():
            # Clamped so a long-gone imbalance cannot starve a path for many blocks.
            credit[path] = min(max(credit[path] + share - counts[path], -1.0), 1.0)
        self._blocks += 1
        return tuple(path for path in self._order for _ in range(counts[path]))
