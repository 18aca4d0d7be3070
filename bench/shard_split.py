"""How each block's shards split over our uplinks and over the peer's addresses, and how many
blocks one lost uplink costs.

    .venv/bin/python bench/shard_split.py [--blocks 240]

Drives the assignment `warp run` uses, without sockets: `warp.core.session.path_qualities` of a
full mesh of `Path` records (every local uplink to every peer address, equal quality) into
the tunnel's `ShardScheduler` (with added parity, as the node builds it), one `assign()` per
block. For each setup it prints the shards per peer address and per local uplink over the
run, how often each per-block split occurred, and the blocks that losing one uplink would
lose (a block is lost when more than n' - k of its shards rode that uplink; n' is the
block's shard count, n or more while parity is added).

`measure` takes the blocks as (k, [[(uplink, peer address) per shard] per block]), so the
same report can be printed for another assignment (e.g. an older commit's) by a driver.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

Block = Sequence[tuple[str, str]]  # (local uplink, peer address) of each shard

SETUPS = ((3, 5, 3, 3), (3, 6, 2, 2), (3, 5, 2, 2), (2, 4, 2, 2))


def split(counts: Counter[str], names: Sequence[str]) -> str:
    return "/".join(str(c) for c in sorted((counts[name] for name in names), reverse=True))


def measure(title: str, k: int, blocks: Sequence[Block]) -> None:
    """Print the split of `blocks` over peer addresses and local uplinks, and the blocks
    lost with each one uplink gone."""
    uplinks = sorted({u for block in blocks for u, _ in block})
    remotes = sorted({r for block in blocks for _, r in block})
    sizes = Counter(len(block) for block in blocks)
    print(f"{title}, {len(blocks)} blocks: shards per block {dict(sorted(sizes.items()))}")
    for end, names, pick in (("peer address", remotes, 1), ("local uplink", uplinks, 0)):
        totals: Counter[str] = Counter()
        patterns: Counter[str] = Counter()
        lost: Counter[str] = Counter()
        for block in blocks:
            counts = Counter(shard[pick] for shard in block)
            totals.update(counts)
            patterns[split(counts, names)] += 1
            for name in names:
                if counts[name] > len(block) - k:
                    lost[name] += 1
        shares = " ".join(f"{name}={totals[name]}" for name in names)
        per_block = ", ".join(f"{p} x{c}" for p, c in patterns.most_common())
        dead = " ".join(f"{name}:{lost[name]}" for name in names)
        print(f"  per {end}: {shares}; per block {per_block}")
        print(f"    blocks lost if one dies: {dead} (worst {max(lost.values(), default=0)})")


def current_blocks(k: int, n: int, uplinks: int, peers: int, count: int) -> list[Block]:
    """The assignment of this tree's gateway (node.py) for a full mesh."""
    from warp.core.session import path_qualities
    from warp.paths.path import Path, PathState
    from warp.paths.scheduler import ShardScheduler

    paths = [
        Path(f"up{u + 1}", (f"203.0.113.{r + 1}", 4000 + r), "map", 0.0, PathState.ACTIVE)
        for u in range(uplinks)
        for r in range(peers)
    ]
    scheduler: ShardScheduler[Path] = ShardScheduler(k, n, add_parity=True)
    scheduler.update(path_qualities(paths))
    peer_name = {path.remote: f"peer{path.remote[1] - 3999}" for path in paths}
    return [[(p.uplink, peer_name[p.remote]) for p in scheduler.assign()] for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=240)
    args = parser.parse_args()
    for k, n, uplinks, peers in SETUPS:
        blocks = current_blocks(k, n, uplinks, peers, args.blocks)
        measure(f"({k}, {n}), {uplinks} uplinks x {peers} peer uplinks", k, blocks)


if __name__ == "__main__":
    main()
