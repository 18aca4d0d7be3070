"""Shard scheduling policy: which path carries which shard of a block, and how many shards.

Pure policy, no I/O. Give it the paths with their measured loss and RTT (`update`), then
ask it for one assignment per block (`assign`): a tuple whose i-th entry is the path for
shard i. A path is a (local uplink, remote address) pair; a remote address is one uplink
of the peer (its reflexive address: two ports behind one public IP are two peer uplinks).

Rules, in order of precedence:

1. Dead paths carry nothing.
2. Both ends are balanced: no local uplink and no remote address carries more than
   `n - k` shards of a block whenever the alive paths allow it, so losing any one whole
   uplink, ours or the peer's, loses no block. Whether they allow it is a small max-flow
   question (partial meshes included: not every uplink need reach every remote). When
   they do not, each end is spread as evenly as the paths allow (the smallest per-uplink
   and per-address caps that still place all n shards).
3. Within those caps, paths get shares in proportion to a quality weight that falls with
   loss and RTT (`path_weight`), so shards move away from lossy or slow paths without
   ever breaking rule 2.
4. Shares are fractional (5 shards over 9 equal paths is 5/9 each); each block places
   its shards one by one on the path owed the most (share plus carried rounding credit)
   whose uplink and remote still have room, so over a few blocks every path gets its
   share and which path gets the extra shard rotates.

Added parity (`add_parity`, the `survive_uplink_loss` spread): when the configured (k, n)
cannot keep rule 2 on the alive paths (3 of 5 over two uplinks puts 3 shards on one),
the block code grows to the smallest n' (at most 2k and 255) that can, for as long as
the paths stay that few; `effective_n` goes back to n when they return. With two uplinks
on each side that is n' = 2k; generally n' >= ceil(k * m / (m - 1)) for a full mesh with
m = min(local uplinks, remote addresses). Relayed paths (through the map, one per uplink
pair) are spread the same way. One uplink at either end cannot be protected: the code stays
at n and `protection` says why.

Adaptive parity (`AdaptiveParity`, `transport.redundancy.adaptive`): the code's n is chosen
from the measured path losses instead of configured. For each candidate n (from the floor
upwards: k + min_parity, and never below what the spread above needs to survive an uplink
loss) the block is spread as the rules place it, and the chance that more than n - k of its
shards are lost is computed shard by shard over that spread (a sum of per-path binomials,
`block_loss`, each path's loss taken as at least the mean over the paths: one path's probe
window is too few probes to tell 0 % from 3 %). The smallest n whose predicted residual loss is
within half the target (`GROW_MARGIN`: the measured loss lags a step and is a few dozen
probes, so it reads low about as often as high) is taken, at most k + max_parity.
Hysteresis: n grows as soon as the current code's prediction is above that, but shrinks
only to a code predicted within an eighth of the target (`SHRINK_MARGIN`), so loss
figures wavering around a boundary do not flap the code.

Capacity (`PathQuality.rate`, bytes/s a path may carry, from `warp.paths.capacity`): once
every alive path has one, a path's weight is its rate (the loss is already in what it
delivered), so each uplink gets shards in proportion to what it carries and the sum of the
uplinks is used; a path without a figure yet weighs the mean rate times its quality weight.
Two spreads (`transport.spread`): `survive_uplink_loss` keeps rule 2 (and adds parity) and
the proportions act within its caps; the rate the tunnel can then promise is what the
uplinks left after losing the one that matters most still carry (`protected_rate`).
`aggregate` drops rule 2 (no caps, no added parity): shards go by capacity alone and FEC
covers random loss only.

The per-block work is precomputed: `update` lays out a cycle of assignments and `assign`
steps through it, so scheduling costs one list index per block.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
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
# Partial meshes: capacities remembered per `Mesh` (one per `update`), at most this many.
KNOWN_CAPACITIES = 4096
# Largest code the sender adds parity up to: n' <= 2k (two uplinks a side need exactly
# that) and the header's 8-bit shard count.
MAX_SHARDS = 255

PROTECTED = "protected against one uplink loss"
SPREADS = ("survive_uplink_loss", "aggregate")
# Adaptive parity aims at this fraction of the target: room for a loss figure that reads low.
GROW_MARGIN = 0.5
# ... and shrinks only to a code predicted within this fraction of it: a band wide enough that
# loss measured in ~3 % steps (a path's probe window) does not move the code back and forth.
SHRINK_MARGIN = 0.125


@dataclass(frozen=True, slots=True)
class AdaptiveParity:
    """Bounds and target of adaptive parity: n - k within [min_parity, max_parity] (the
    survive-an-uplink-loss floor aside), residual block loss at most `target_loss`."""

    min_parity: int
    max_parity: int
    target_loss: float

    def __post_init__(self) -> None:
        if not 0 <= self.min_parity <= self.max_parity:
            raise ValueError(f"need 0 <= min_parity <= max_parity, got {self}")
        if not 0.0 < self.target_loss < 1.0:
            raise ValueError(f"need 0 < target_loss < 1, got {self.target_loss}")


@dataclass(frozen=True, slots=True)
class PathQuality(Generic[PathId]):
    """What the scheduler knows of a path: measured by probes, owned by the path layer.

    `local` is the uplink the path leaves from and `remote` the peer address it goes to;
    left unset, each is the path itself (a path per uplink, one peer address each)."""

    path_id: PathId
    alive: bool = True
    loss: float = 0.0  # fraction of probes lost, 0..1
    rtt: float | None = None  # seconds; None while not yet measured
    local: Hashable | None = None
    remote: Hashable | None = None
    rate: float | None = None  # bytes/s the path's shards are weighted by; None: not known
    known_rate: float | None = None  # bytes/s it can be counted on for (default: `rate`)


@dataclass(frozen=True, slots=True)
class ParityChange:
    """`effective_n` moved: parity added (uplinks too few for n) or back to the configured n."""

    added: bool
    k: int
    n: int
    effective_n: int
    uplinks: int
    peer_addresses: int
    previous_n: int = field(default=0, compare=False)
    """The shard count before this change."""
    loss: float | None = field(default=None, compare=False)
    """Adaptive parity: the shard loss (mean over the spread) that moved the code; None for
    a change made by the uplinks alone."""


def block_loss(counts: Sequence[int], losses: Sequence[float], k: int) -> float:
    """Probability that fewer than k of a block's shards arrive when path i carries
    counts[i] shards and loses each independently with losses[i]."""
    received = [1.0]  # distribution of shards received so far, path by path
    for shards, loss in zip(counts, losses, strict=True):
        if shards <= 0:
            continue
        loss = min(max(loss, 0.0), 1.0)
        path = [math.comb(shards, r) * (1 - loss) ** r * loss ** (shards - r)
                for r in range(shards + 1)]  # fmt: skip
        combined = [0.0] * (len(received) + shards)
        for a, pa in enumerate(received):
            for b, pb in enumerate(path):
                combined[a + b] += pa * pb
        received = combined
    return min(sum(received[:k]), 1.0)


def whole_shards(shares: Sequence[float], n: int) -> list[int]:
    """Fractional shares as whole shard counts summing to n (largest remainders)."""
    counts = [math.floor(share + 1e-9) for share in shares]
    order = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in order[: max(n - sum(counts), 0)]:
        counts[i] += 1
    return counts


def path_weight(path: PathQuality[PathId], best_rtt: float) -> float:
    """Relative preference for a path (1.0 for a clean path with the best RTT)."""
    delivery = 1.0 - min(max(path.loss, 0.0), 1.0)
    weight = delivery**LOSS_EXPONENT
    if path.rtt is not None and path.rtt > best_rtt:
        weight *= (best_rtt + RTT_SLACK) / (path.rtt + RTT_SLACK)
    return weight


class Mesh:
    """Alive paths as a bipartite graph: local uplinks (0..locals-1) and remote addresses
    (0..remotes-1), one edge per path. Answers how many shards of a block fit under
    per-uplink and per-address caps (`capacity`, a max-flow)."""

    __slots__ = ("_known", "edges", "full", "local_count", "neighbours", "pairs", "remote_count")

    def __init__(
        self, edges: Sequence[tuple[int, int]], local_count: int, remote_count: int
    ) -> None:
        self.edges = sorted(set(edges))
        self.local_count = local_count
        self.remote_count = remote_count
        neighbours: list[set[int]] = [set() for _ in range(local_count)]
        for local, remote in self.edges:
            neighbours[local].add(remote)
        self.neighbours = [sorted(n) for n in neighbours]
        self.full = all(len(n) == remote_count for n in neighbours)
        # Disjoint pairs (each uplink reaches its own remote only): nothing to share.
        remotes_used = [remote for _, remote in self.edges]
        single = all(len(n) == 1 for n in neighbours)
        self.pairs = single and len(remotes_used) == len(set(remotes_used))
        # Capacities already computed: a block's placements revisit the same few cap states.
        self._known: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}

    def capacity(self, local_caps: Sequence[int], remote_caps: Sequence[int]) -> int:
        """Most shards placeable with these caps per local uplink and per remote address."""
        if self.full:
            # Complete bipartite graph: only the two ends' totals bind.
            return min(sum(local_caps), sum(remote_caps))
        if self.pairs:
            return sum(min(local_caps[local], remote_caps[remote]) for local, remote in self.edges)
        key = (tuple(local_caps), tuple(remote_caps))
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= KNOWN_CAPACITIES:
                self._known.clear()
            known = self._known[key] = self._max_flow(local_caps, remote_caps)
        return known

    def _max_flow(self, local_caps: Sequence[int], remote_caps: Sequence[int]) -> int:
        # Augmenting paths (Ford-Fulkerson) on a graph of a few nodes; edges are uncapped.
        flow: dict[tuple[int, int], int] = {}
        local_left = list(local_caps)
        remote_left = list(remote_caps)
        total = 0
        while True:
            path = self._augmenting_path(local_left, remote_left, flow)
            if path is None:
                return total
            # One unit at a time: caps are small (at most n per node).
            first_local, last_remote = path[0][0], path[-1][1]
            local_left[first_local] -= 1
            remote_left[last_remote] -= 1
            for index, (local, remote) in enumerate(path):
                flow[(local, remote)] = flow.get((local, remote), 0) + 1
                if index + 1 < len(path):
                    # Rerouted: the next hop pushes back along (next_local, remote).
                    back = (path[index + 1][0], remote)
                    flow[back] -= 1
            total += 1

    def _augmenting_path(
        self,
        local_left: list[int],
        remote_left: list[int],
        flow: dict[tuple[int, int], int],
    ) -> list[tuple[int, int]] | None:
        """A path from a local with room to a remote with room, alternating forward edges
        and edges carrying flow backwards; as the (local, remote) forward hops."""
        parent: dict[int, tuple[int, int | None]] = {}  # remote -> (local, previous remote)
        frontier: list[tuple[int, int | None]] = [
            (local, None) for local in range(self.local_count) if local_left[local] > 0
        ]
        seen_locals = {local for local, _ in frontier}
        while frontier:
            next_frontier: list[tuple[int, int | None]] = []
            for local, came_from in frontier:
                for remote in self.neighbours[local]:
                    if remote in parent:
                        continue
                    parent[remote] = (local, came_from)
                    if remote_left[remote] > 0:
                        hops: list[tuple[int, int]] = []
                        step: int | None = remote
                        while step is not None:
                            hop_local, previous = parent[step]
                            hops.append((hop_local, step))
                            step = previous
                        hops.reverse()
                        return hops
                    # Full remote: push back a unit some other local sends there.
                    for other in range(self.local_count):
                        if other not in seen_locals and flow.get((other, remote), 0) > 0:
                            seen_locals.add(other)
                            next_frontier.append((other, remote))
            frontier = next_frontier
        return None

    def smallest_caps(self, n: int, floor_cap: int) -> tuple[int, int]:
        """The smallest (per-uplink, per-address) caps, each at least `floor_cap`, that place
        all n shards: as even as the paths allow at each end."""
        unbounded_remote = [n] * self.remote_count
        unbounded_local = [n] * self.local_count
        local_cap = max(floor_cap, 1)
        while self.capacity([local_cap] * self.local_count, unbounded_remote) < n:
            local_cap += 1
        remote_cap = max(floor_cap, 1)
        while self.capacity(unbounded_local, [remote_cap] * self.remote_count) < n:
            remote_cap += 1
        while self.capacity([local_cap] * self.local_count, [remote_cap] * self.remote_count) < n:
            # Partial meshes: each end alone fits, both together do not. Relax the end whose
            # extra unit places more; both when neither helps alone.
            more_local = self.capacity(
                [local_cap + 1] * self.local_count, [remote_cap] * self.remote_count
            )
            more_remote = self.capacity(
                [local_cap] * self.local_count, [remote_cap + 1] * self.remote_count
            )
            if more_local >= more_remote:
                local_cap += 1
            if more_remote >= more_local:
                remote_cap += 1
        return local_cap, remote_cap

    def protects(self, k: int, n: int) -> bool:
        """Whether (k, n) fits with at most n - k shards per uplink and per address."""
        tolerance = n - k
        if tolerance <= 0 or self.local_count < 2 or self.remote_count < 2:
            return False
        return self.capacity([tolerance] * self.local_count, [tolerance] * self.remote_count) >= n


def data_shard_rate_within(wire_shards: float, k: int, parity: int, window: float) -> float:
    """The most data shards/s that stay within `wire_shards` shards/s on the wire whatever
    the datagrams' timing, with FEC blocks of k data shards closed early by a `window`.

    Every block has at least one data shard and `parity` parity shards; a block closed
    early was open for `window` (one open block at a time: at most one such block per
    window), every other block is full. So d data shards/s take at most
    d + parity * min(d, 1 / window + d / k) shards/s: at low rates each datagram alone
    costs 1 + parity shards, not n / k."""
    if wire_shards <= 0:
        return 0.0
    alone = wire_shards / (1 + parity)
    if window <= 0:  # every batch may be a block of its own
        return alone
    # One early block per window, the rest full (the bound when that is below `alone`).
    mixed = (wire_shards - parity / window) / (1 + parity / k)
    return max(alone, mixed)


def plan_shares(
    paths: Sequence[PathQuality[PathId]],
    n: int,
    local_cap: float,
    remote_cap: float,
) -> dict[PathId, float]:
    """Fractional shards per block for each alive path: none of an uplink's or an address's
    totals above its cap, sums to n when the caps allow.

    Water-filling: shares proportional to weight; the uplink or address most over its cap
    is held at the cap (its paths scaled down and fixed) and the excess goes to the other
    paths in proportion to their weights."""
    alive = [p for p in paths if p.alive]
    if not alive:
        return {}
    weights = _weights(alive)
    ends = {p.path_id: (("local", _local(p)), ("remote", _remote(p))) for p in alive}
    caps = {"local": local_cap, "remote": remote_cap}
    fixed: dict[tuple[str, Hashable], float] = {}
    shares: dict[PathId, float] = {}
    free = [p.path_id for p in alive]
    remaining = float(n)
    while free and remaining > 1e-9:
        total = sum(weights[path] for path in free)
        if total <= 0.0:
            # Every remaining path is useless (100 % loss): spread evenly regardless.
            proposed = {path: remaining / len(free) for path in free}
        else:
            proposed = {path: remaining * weights[path] / total for path in free}
        load: dict[tuple[str, Hashable], float] = {}
        for path in free:
            for end in ends[path]:
                load[end] = load.get(end, 0.0) + proposed[path]
        # The most overloaded end: its free paths share what room it has left.
        worst: tuple[str, Hashable] | None = None
        worst_ratio = 1.0
        for end, amount in load.items():
            room = caps[end[0]] - fixed.get(end, 0.0)
            ratio = room / amount if amount > 0 else 1.0
            if ratio < worst_ratio - 1e-12:
                worst, worst_ratio = end, ratio
        if worst is None:
            shares.update(proposed)
            break
        for path in [p for p in free if worst in ends[p]]:
            share = proposed[path] * max(worst_ratio, 0.0)
            shares[path] = share
            remaining -= share
            for end in ends[path]:
                fixed[end] = fixed.get(end, 0.0) + share
            free.remove(path)
    for path in free:
        shares.setdefault(path, 0.0)
    return shares


def _weights(alive: Sequence[PathQuality[PathId]]) -> dict[PathId, float]:
    """Each path's weight: its rate once known (see the module docstring), else quality."""
    rtts = [p.rtt for p in alive if p.rtt is not None]
    best_rtt = min(rtts) if rtts else 0.0
    quality = {p.path_id: path_weight(p, best_rtt) for p in alive}
    rates = [p.rate for p in alive if p.rate is not None]
    if not rates:
        return quality
    mean = sum(rates) / len(rates)
    return {p.path_id: p.rate if p.rate is not None else mean * quality[p.path_id] for p in alive}


def _local(path: PathQuality[PathId]) -> Hashable:
    return path.path_id if path.local is None else path.local


def _remote(path: PathQuality[PathId]) -> Hashable:
    return path.path_id if path.remote is None else path.remote


class ShardScheduler(Generic[PathId]):
    """Assigns each block's shards to paths (see the module docstring for the rules).

    `add_parity`: grow the code to `effective_n` > n while the alive paths cannot keep
    n - k per uplink at both ends with n (the `survive_uplink_loss` spread). `spread`:
    ``aggregate`` spreads by capacity alone (no caps, no added parity)."""

    def __init__(
        self,
        k: int,
        n: int,
        *,
        add_parity: bool = False,
        adaptive: AdaptiveParity | None = None,
        spread: str = "survive_uplink_loss",
    ) -> None:
        if not 1 <= k <= n <= MAX_SHARDS:
            raise ValueError(f"need 1 <= k <= n <= {MAX_SHARDS}, got k={k} n={n}")
        if spread not in SPREADS:
            raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
        self.k = k
        self.n = n
        self.spread = spread
        self.add_parity = add_parity and spread == "survive_uplink_loss"
        #: n is chosen from the measured loss (see the module docstring); None: n is fixed
        self.adaptive = adaptive
        self.effective_n = n
        #: predicted block loss with `effective_n` over the current spread (adaptive only)
        self.residual_loss: float | None = None
        self.protected = False
        self.protection = "not protected: no path to the far gate"
        self.uplinks = 0
        self.peer_addresses = 0
        self.shares: dict[PathId, float] = {}
        #: wire bytes/s the spread can carry (the uplink that fills first sets it), and what
        #: can be sent so that losing any one uplink loses nothing then or after (None: not
        #: protected); None while an uplink's rate is unknown
        self.usable_rate: float | None = None
        self.protected_rate: float | None = None
        self.local_cap = 0
        self.remote_cap = 0
        self._credit: dict[PathId, float] = {}
        self._order: list[PathId] = []  # paths in shard-index order: fastest first
        self._ends: dict[PathId, tuple[int, int]] = {}
        self._mesh = Mesh((), 0, 0)
        self._cycle: list[tuple[PathId, ...]] = []
        self._position = 0
        self._blocks = 0  # rotates tie-breaks across updates

    def update(self, paths: Sequence[PathQuality[PathId]]) -> ParityChange | None:
        """Take new path measurements; cheap to call when nothing changed. Returns the change
        of `effective_n`, if any (to be logged once)."""
        alive = [p for p in paths if p.alive]
        locals_index: dict[Hashable, int] = {}
        remotes_index: dict[Hashable, int] = {}
        ends: dict[PathId, tuple[int, int]] = {}
        for p in alive:
            local = locals_index.setdefault(_local(p), len(locals_index))
            remote = remotes_index.setdefault(_remote(p), len(remotes_index))
            ends[p.path_id] = (local, remote)
        mesh = Mesh(list(ends.values()), len(locals_index), len(remotes_index))
        if alive:
            change = self._choose_code(mesh, alive)
        else:
            # Nothing is sent: the code stays as it was until a path is back.
            change = None
            self.protected = False
            self.protection = "not protected: no path to the far gate"
            self.uplinks = self.peer_addresses = 0
        n = self.effective_n
        if not alive:
            local_cap = remote_cap = 0
        elif self.spread == "aggregate":
            local_cap = remote_cap = n
        else:
            local_cap, remote_cap = mesh.smallest_caps(n, n - self.k)
        shares = plan_shares(alive, n, local_cap, remote_cap)
        self._rates(alive, shares, n)
        # Lowest RTT first: data shards (the lowest indexes) then ride the fastest paths,
        # so the receiver more often has all k data shards and needs no decode.
        order = [p.path_id for p in sorted(alive, key=lambda p: p.rtt or 0.0)]
        caps = (local_cap, remote_cap)
        if (
            shares == self.shares
            and order == self._order
            and ends == self._ends
            and caps == (self.local_cap, self.remote_cap)
            and len(self._cycle[0] if self._cycle else ()) == n
        ):
            return change
        self.shares = shares
        self._order = order
        self._ends = ends
        self._mesh = mesh
        self.local_cap, self.remote_cap = caps
        self._credit = {path: self._credit.get(path, 0.0) for path in shares}
        self._cycle = [self._next_assignment() for _ in range(CYCLE_BLOCKS)] if shares else []
        self._position = 0
        return change

    def _rates(
        self, alive: Sequence[PathQuality[PathId]], shares: dict[PathId, float], n: int
    ) -> None:
        """`usable_rate` and `protected_rate` for this spread (wire bytes/s)."""
        rate: dict[Hashable, float] = {}
        share: dict[Hashable, float] = {}
        for p in alive:
            known = p.rate if p.known_rate is None else p.known_rate
            if known is None:
                self.usable_rate = self.protected_rate = None
                return
            rate[_local(p)] = rate.get(_local(p), 0.0) + known
            share[_local(p)] = share.get(_local(p), 0.0) + shares.get(p.path_id, 0.0)
        # Blocks go out as fast as the uplink that fills first allows.
        usable = min((rate[u] * n / share[u] for u in rate if share[u] > 1e-9), default=0.0)
        self.usable_rate = usable
        if not self.protected:
            self.protected_rate = None
            return
        # Losing an uplink: every block already out survives (rule 2); from then on the others
        # carry whole blocks of the configured n with what they have (in wire bytes at this
        # code: scaled by effective n / n).
        total = sum(rate.values())
        after_loss = min(total - r for r in rate.values()) * n / self.n
        self.protected_rate = min(usable, after_loss)

    def _choose_code(self, mesh: Mesh, alive: Sequence[PathQuality[PathId]]) -> ParityChange | None:
        """Set `effective_n` and the protection verdict for these paths."""
        k, n = self.k, self.n
        adaptive = self.adaptive
        self.uplinks, self.peer_addresses = mesh.local_count, mesh.remote_count
        # Adaptive: the configured n gives way to the floor k + min_parity (raised below to
        # what surviving an uplink loss needs, then to what the measured loss needs).
        base_n = n if adaptive is None else min(k + adaptive.min_parity, MAX_SHARDS)
        effective_n = base_n
        reason = ""
        if self.spread == "aggregate":
            reason = "spread = aggregate (shards by capacity; FEC against random loss only)"
        elif base_n == k and adaptive is None:
            reason = "no parity (num_shards = required_shards)"
        elif mesh.local_count < 2:
            reason = "one uplink here"
        elif mesh.remote_count < 2:
            reason = "the far gate has one address"
        elif base_n > k and mesh.protects(k, base_n):
            pass
        elif not self.add_parity:
            reason = f"({k}, {n}) puts more than {n - k} shards on an uplink here or there"
        else:
            ceiling = min(2 * k, MAX_SHARDS)
            first = max(base_n, k + 1)
            effective_n = next(
                (m for m in range(first, ceiling + 1) if mesh.protects(k, m)), base_n
            )
            if effective_n == base_n and not mesh.protects(k, base_n):
                reason = f"paths too few to spread ({k}, n <= {ceiling}) over both ends"
        loss: float | None = None
        if adaptive is not None:
            # Only ever above the floor just chosen, so the protection verdict stands.
            effective_n, loss = self._adapt(mesh, alive, adaptive, effective_n)
        self.protected = not reason
        self.protection = PROTECTED if not reason else f"not protected: {reason}"
        if effective_n == self.effective_n:
            return None
        previous_n, self.effective_n = self.effective_n, effective_n
        return ParityChange(
            added=effective_n > n,
            k=k,
            n=n,
            effective_n=effective_n,
            uplinks=mesh.local_count,
            peer_addresses=mesh.remote_count,
            previous_n=previous_n,
            loss=loss,
        )

    def _adapt(
        self,
        mesh: Mesh,
        alive: Sequence[PathQuality[PathId]],
        adaptive: AdaptiveParity,
        floor: int,
    ) -> tuple[int, float]:
        """The adaptive n (at least `floor`) and the mean shard loss over its spread."""
        k = self.k
        ceiling = max(min(k + adaptive.max_parity, MAX_SHARDS), floor)
        # One path's figure is a window of a few dozen probes (one probe moves it by ~3 %):
        # pooled over the paths it is steadier; a path worse than the pool keeps its own.
        measured = [min(max(p.loss, 0.0), 1.0) for p in alive]
        pooled = sum(measured) / len(measured)
        losses = [max(loss, pooled) for loss in measured]

        def residual(m: int) -> tuple[float, float]:
            if self.spread == "aggregate":
                local_cap = remote_cap = m  # spread as `update` will: by capacity alone
            else:
                local_cap, remote_cap = mesh.smallest_caps(m, m - k)
            shares = plan_shares(alive, m, local_cap, remote_cap)
            counts = whole_shards([shares[p.path_id] for p in alive], m)
            mean = sum(c * x for c, x in zip(counts, losses, strict=True)) / m
            return block_loss(counts, losses, k), mean

        aim = adaptive.target_loss * GROW_MARGIN
        current = min(max(self.effective_n, floor), ceiling)
        current_residual, _ = residual(current)
        chosen = current
        if current_residual > aim:
            # Grow at once to the smallest code meeting the aim.
            chosen = next((m for m in range(current + 1, ceiling + 1) if residual(m)[0] <= aim),
                          ceiling)  # fmt: skip
        else:
            # Shrink only to a code that meets the target with room to spare.
            for m in range(floor, current):
                if residual(m)[0] <= adaptive.target_loss * SHRINK_MARGIN:
                    chosen = m
                    break
        self.residual_loss, mean_loss = residual(chosen)
        return chosen, mean_loss

    def assign(self) -> tuple[PathId, ...]:
        """Path of each shard index for the next block (`effective_n` of them); empty when
        no path is alive."""
        cycle = self._cycle
        if not cycle:
            return ()
        position = self._position
        self._position = position + 1 if position + 1 < len(cycle) else 0
        return cycle[position]

    def _next_assignment(self) -> tuple[PathId, ...]:
        """One block: place the shards one by one on the path owed the most whose uplink and
        remote have room (and, in a partial mesh, that leaves the rest placeable)."""
        order = self._order
        credit = self._credit
        mesh = self._mesh
        n = self.effective_n
        # Ties go round-robin, starting one path further every block.
        start = self._blocks % len(order)
        ranked = order[start:] + order[:start]
        ends = [self._ends[path] for path in ranked]
        owed = [self.shares[path] + credit[path] for path in ranked]
        counts = [0] * len(ranked)
        local_left = [self.local_cap] * mesh.local_count
        remote_left = [self.remote_cap] * mesh.remote_count
        simple = mesh.full or mesh.pairs  # any path with room at both ends keeps n placeable
        for placed in range(n):
            refused: set[int] = set()
            while True:
                best = -1
                best_owed = 0.0
                for i, (local, remote) in enumerate(ends):
                    if local_left[local] and remote_left[remote] and i not in refused:
                        score = owed[i] - counts[i]
                        if best < 0 or score > best_owed + 1e-9:
                            best, best_owed = i, score
                if best < 0:  # pragma: no cover - the caps were chosen so that n shards fit
                    raise AssertionError("no path has room for a shard")
                local, remote = ends[best]
                local_left[local] -= 1
                remote_left[remote] -= 1
                if simple or mesh.capacity(local_left, remote_left) >= n - placed - 1:
                    counts[best] += 1
                    break
                # Partial mesh: this one would strand later shards; the next best.
                local_left[local] += 1
                remote_left[remote] += 1
                refused.add(best)
        for i, path in enumerate(ranked):
            # Clamped so a long-gone imbalance cannot starve a path for many blocks.
            credit[path] = min(max(credit[path] + self.shares[path] - counts[i], -1.0), 1.0)
        self._blocks += 1
        count_of = dict(zip(ranked, counts, strict=True))
        return tuple(path for path in order for _ in range(count_of[path]))
