"""Shard scheduling policy."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp.paths.scheduler import (
    CYCLE_BLOCKS,
    PROTECTED,
    ParityChange,
    PathQuality,
    ShardScheduler,
    plan_shares,
)


def scheduler(k: int, n: int, paths: list[PathQuality[str]]) -> ShardScheduler[str]:
    s: ShardScheduler[str] = ShardScheduler(k, n)
    s.update(paths)
    return s


def totals(s: ShardScheduler[str], blocks: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(blocks):
        counts.update(s.assign())
    return counts


def test_three_equal_paths_three_of_five_spread_two_two_one_rotating() -> None:
    s = scheduler(3, 5, [PathQuality("a"), PathQuality("b"), PathQuality("c")])
    spreads = []
    for _ in range(6):
        assignment = s.assign()
        assert len(assignment) == 5
        counts = Counter(assignment)
        assert sorted(counts.values()) == [1, 2, 2]
        spreads.append(min(counts, key=lambda p: counts[p]))
    # The path carrying a single shard rotates: each one in every 3 blocks.
    assert sorted(spreads[:3]) == ["a", "b", "c"]
    assert sorted(spreads[3:]) == ["a", "b", "c"]
    assert totals(s, 300) == {"a": 500, "b": 500, "c": 500}


def test_two_paths_two_of_four_carry_two_each() -> None:
    s = scheduler(2, 4, [PathQuality("a"), PathQuality("b")])
    for _ in range(10):
        assert Counter(s.assign()) == {"a": 2, "b": 2}


def test_one_path_carries_everything_and_no_path_means_no_assignment() -> None:
    assert scheduler(3, 5, [PathQuality("only")]).assign() == ("only",) * 5
    assert scheduler(3, 5, [PathQuality("x", alive=False)]).assign() == ()
    assert scheduler(3, 5, []).assign() == ()


def test_dead_paths_are_skipped() -> None:
    paths = [PathQuality("a"), PathQuality("b", alive=False), PathQuality("c")]
    s = scheduler(2, 4, paths)
    assert set(totals(s, 50)) == {"a", "c"}
    s.update([PathQuality("a"), PathQuality("b"), PathQuality("c", alive=False)])
    assert set(totals(s, 50)) == {"a", "b"}


def test_too_few_paths_for_the_cap_spread_as_evenly_as_possible() -> None:
    # (3, 5) tolerates 2 shards per path: 2 paths cannot honour it, so 3 + 2.
    s = scheduler(3, 5, [PathQuality("a"), PathQuality("b")])
    for _ in range(10):
        assert sorted(Counter(s.assign()).values()) == [2, 3]
    assert totals(s, 240) == {"a": 600, "b": 600}
    # No parity at all: as even as possible.
    s = scheduler(4, 4, [PathQuality("a"), PathQuality("b"), PathQuality("c")])
    assert max(Counter(s.assign()).values()) == 2


def test_lossy_and_slow_paths_get_less_but_never_more_than_the_cap() -> None:
    paths = [
        PathQuality("clean", loss=0.0, rtt=0.020),
        PathQuality("lossy", loss=0.3, rtt=0.020),
        PathQuality("slow", loss=0.0, rtt=0.300),
        PathQuality("clean2", loss=0.0, rtt=0.022),
    ]
    s = scheduler(3, 5, paths)
    counts = totals(s, 2400)
    assert counts["lossy"] < counts["clean"]
    assert counts["slow"] < counts["lossy"]
    assert counts["clean"] == pytest.approx(counts["clean2"], rel=0.15)
    for _ in range(CYCLE_BLOCKS):
        assert max(Counter(s.assign()).values()) <= 2


def test_weighting_cannot_break_the_cap_even_against_a_terrible_path() -> None:
    # Three paths, (3, 5): every path must carry at least one shard (2 + 2 + 1).
    paths = [PathQuality("a"), PathQuality("b"), PathQuality("awful", loss=0.99)]
    s = scheduler(3, 5, paths)
    for _ in range(CYCLE_BLOCKS):
        counts = Counter(s.assign())
        assert counts == {"a": 2, "b": 2, "awful": 1}
    everything_lost = [PathQuality(p, loss=1.0) for p in "abc"]
    assert sorted(plan_shares(everything_lost, 5, 2, 2).values()) == pytest.approx([5 / 3] * 3)


def test_data_shards_go_to_the_fastest_path() -> None:
    paths = [PathQuality("slow", rtt=0.08), PathQuality("fast", rtt=0.01)]
    assignment = scheduler(2, 4, paths).assign()
    assert assignment[:2] == ("fast", "fast")


def test_update_with_unchanged_measurements_keeps_rotating() -> None:
    paths = [PathQuality("a"), PathQuality("b"), PathQuality("c")]
    s = scheduler(3, 5, paths)
    counts: Counter[str] = Counter()
    for _ in range(300):
        s.update(paths)  # as the gateway does after each probe round
        counts.update(s.assign())
    assert counts == {"a": 500, "b": 500, "c": 500}


def test_invalid_geometry_refused() -> None:
    with pytest.raises(ValueError):
        ShardScheduler(4, 3)


@settings(max_examples=300, deadline=None)
@given(
    geometry=st.sampled_from([(1, 1), (1, 2), (2, 3), (2, 4), (3, 5), (4, 6), (5, 8), (8, 12)]),
    paths=st.lists(
        st.tuples(
            st.booleans(),
            st.floats(0.0, 1.0),
            st.one_of(st.none(), st.floats(0.0005, 2.0)),
        ),
        max_size=9,
    ),
    blocks=st.integers(1, 40),
)
def test_invariant_no_path_above_n_minus_k_whenever_the_path_count_allows(
    geometry: tuple[int, int],
    paths: list[tuple[bool, float, float | None]],
    blocks: int,
) -> None:
    """One path per uplink (each its own peer address): the original per-uplink rule."""
    k, n = geometry
    qualities = [
        PathQuality(f"p{i}", alive=alive, loss=loss, rtt=rtt)
        for i, (alive, loss, rtt) in enumerate(paths)
    ]
    alive = {q.path_id for q in qualities if q.alive}
    s = scheduler(k, n, qualities)
    if alive:
        assert sum(s.shares.values()) == pytest.approx(n)
    for _ in range(blocks):
        assignment = s.assign()
        if not alive:
            assert assignment == ()
            continue
        assert len(assignment) == n
        assert set(assignment) <= alive
        most = max(Counter(assignment).values())
        if n > k and len(alive) >= math.ceil(n / (n - k)):
            assert most <= n - k
        # Otherwise as even as possible.
        assert most <= max(n - k, math.ceil(n / len(alive)))


# ---------------------------------------------------------------- both ends: paths are
# (local uplink, peer address) pairs.

Path = tuple[str, str]


def mesh(
    locals_: str, remotes: str, *, missing: set[Path] | None = None
) -> list[PathQuality[Path]]:
    return [
        PathQuality((local, remote), local=local, remote=remote)
        for local in locals_
        for remote in remotes
        if (local, remote) not in (missing or set())
    ]


def both_ends(k: int, n: int, paths: list[PathQuality[Path]], **kw: bool) -> ShardScheduler[Path]:
    s: ShardScheduler[Path] = ShardScheduler(k, n, **kw)
    s.update(paths)
    return s


def loads(assignment: tuple[Path, ...]) -> tuple[Counter[str], Counter[str]]:
    return Counter(p[0] for p in assignment), Counter(p[1] for p in assignment)


def test_three_by_three_three_of_five_peer_addresses_carry_two_two_one() -> None:
    """The issue's case: 3 uplinks a side, (3, 5). Before, every uplink walked the peer's
    addresses in lockstep: 3/2/0 per peer address, 6-7 blocks of 20 lost with one peer
    uplink. Now each peer address carries at most 2 of each block, as each local uplink."""
    s = both_ends(3, 5, mesh("abc", "xyz"))
    per_remote: Counter[str] = Counter()
    per_local: Counter[str] = Counter()
    for _ in range(CYCLE_BLOCKS):
        local, remote = loads(s.assign())
        assert sorted(local.values()) == [1, 2, 2]
        assert sorted(remote.values()) == [1, 2, 2]
        per_remote.update(remote)
        per_local.update(local)
    assert per_remote == {"x": 400, "y": 400, "z": 400}
    assert max(per_local.values()) - min(per_local.values()) <= 2
    # Any one peer uplink lost: at most n - k = 2 shards of a block gone, none lost.
    for dead in "xyz":
        for _ in range(60):
            assert sum(1 for _, remote in s.assign() if remote == dead) <= 2


def test_two_by_two_three_of_six_three_per_uplink_and_per_peer_address() -> None:
    s = both_ends(3, 6, mesh("ab", "xy"))
    assert s.protected and s.protection == PROTECTED
    for _ in range(CYCLE_BLOCKS):
        local, remote = loads(s.assign())
        assert local == {"a": 3, "b": 3}
        assert remote == {"x": 3, "y": 3}


def test_partial_mesh_still_balances_both_ends() -> None:
    """Uplink b cannot reach peer address x: a carries all of x's shards, and still
    neither end takes more than n - k."""
    s = both_ends(2, 4, mesh("ab", "xy", missing={("b", "x")}))
    assert s.protected
    for _ in range(CYCLE_BLOCKS):
        local, remote = loads(s.assign())
        assert local == {"a": 2, "b": 2}
        assert remote == {"x": 2, "y": 2}


def test_one_peer_address_spreads_our_end_and_says_unprotected() -> None:
    s = both_ends(3, 5, mesh("abc", "x"), add_parity=True)
    assert not s.protected
    assert s.protection == "not protected: the far gate has one address"
    assert s.effective_n == 5
    for _ in range(30):
        local, _ = loads(s.assign())
        assert max(local.values()) <= 2  # our uplinks still survive one loss


def test_weighting_moves_shards_off_a_lossy_path_within_both_caps() -> None:
    paths = mesh("ab", "xy")
    paths[0] = PathQuality(("a", "x"), loss=0.3, local="a", remote="x")
    s = both_ends(3, 6, paths)
    counts: Counter[Path] = Counter()
    for _ in range(CYCLE_BLOCKS):
        assignment = s.assign()
        local, remote = loads(assignment)
        assert max(local.values()) <= 3 and max(remote.values()) <= 3
        counts.update(assignment)
    # Both ends at their cap of 3 leave no room: a-x carries as much as b-y.
    assert counts[("a", "x")] == counts[("b", "y")]
    s = both_ends(3, 6, [*paths, PathQuality(("c", "z"), local="c", remote="z")])
    counts = Counter()
    for _ in range(CYCLE_BLOCKS):
        counts.update(s.assign())
    assert counts[("a", "x")] < counts[("b", "y")]


def max_placeable(paths: list[PathQuality[Path]], cap: int) -> int:
    """Independent of the scheduler: max shards placeable with at most `cap` per local
    uplink and per peer address (min cut = min over sets S of local uplinks of
    cap * (locals outside S) + cap * (remotes reachable from S))."""
    alive = [p.path_id for p in paths if p.alive]
    locals_ = sorted({local for local, _ in alive})
    best = cap * len(locals_)
    for size in range(1, len(locals_) + 1):
        for chosen in itertools.combinations(locals_, size):
            reached = {remote for local, remote in alive if local in chosen}
            best = min(best, cap * (len(locals_) - size) + cap * len(reached))
    return best


@st.composite
def meshes(draw: st.DrawFn) -> list[PathQuality[Path]]:
    local_count = draw(st.integers(1, 4))
    remote_count = draw(st.integers(1, 4))
    full = draw(st.booleans())
    paths = []
    for local in "abcd"[:local_count]:
        for remote in "wxyz"[:remote_count]:
            if full or draw(st.booleans()):
                paths.append(
                    PathQuality(
                        (local, remote),
                        alive=full or draw(st.integers(0, 5)) > 0,
                        loss=draw(st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.0])),
                        rtt=draw(st.sampled_from([None, 0.005, 0.02, 0.2])),
                        local=local,
                        remote=remote,
                    )
                )
    return paths


@settings(max_examples=400, deadline=None)
@given(
    paths=meshes(),
    geometry=st.integers(1, 12).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))),
    skip=st.integers(0, CYCLE_BLOCKS),
    add_parity=st.booleans(),
)
def test_property_no_uplink_and_no_peer_address_above_n_minus_k_when_possible(
    paths: list[PathQuality[Path]],
    geometry: tuple[int, int],
    skip: int,
    add_parity: bool,
) -> None:
    k, n = geometry
    s = both_ends(k, n, paths, add_parity=add_parity)
    alive = {p.path_id for p in paths if p.alive}
    for _ in range(skip):
        s.assign()
    shards = s.effective_n
    assert shards == n or (add_parity and n < shards <= 2 * k)
    possible = shards > k and bool(alive) and max_placeable(paths, shards - k) >= shards
    if add_parity and shards > n:
        assert possible, "parity added without protecting anything"
    if add_parity and n > k and alive and len({p[0] for p in alive}) > 1:
        # The smallest n' that protects, if any up to 2k does.
        wanted = next(
            (m for m in range(n, 2 * k + 1) if max_placeable(paths, m - k) >= m),
            n,
        )
        if len({p[1] for p in alive}) > 1:
            assert shards == wanted
    assert s.protected == possible
    for _ in range(60):  # many consecutive blocks, across the cycle's wrap
        assignment = s.assign()
        if not alive:
            assert assignment == ()
            continue
        assert len(assignment) == shards
        assert set(assignment) <= alive
        if possible:
            local, remote = loads(assignment)
            assert max(local.values()) <= shards - k
            assert max(remote.values()) <= shards - k


# ---------------------------------------------------------------- added parity


def test_three_of_five_on_two_uplinks_a_side_adds_a_parity_shard_until_a_third_returns() -> None:
    s: ShardScheduler[Path] = ShardScheduler(3, 5, add_parity=True)
    assert s.update(mesh("ab", "xy")) == ParityChange(
        added=True, k=3, n=5, effective_n=6, uplinks=2, peer_addresses=2
    )
    assert s.effective_n == 6 and s.protected
    assert s.update(mesh("ab", "xy")) is None  # reported once
    for _ in range(30):
        local, remote = loads(s.assign())
        assert local == {"a": 3, "b": 3} and remote == {"x": 3, "y": 3}
    # A third uplink at each end: (3, 5) fits again.
    assert s.update(mesh("abc", "xyz")) == ParityChange(
        added=False, k=3, n=5, effective_n=5, uplinks=3, peer_addresses=3
    )
    assert s.protected and len(s.assign()) == 5
    # Two local uplinks, three peer addresses: m = 2 still needs n' = 2k.
    assert s.update(mesh("ab", "xyz")) is not None
    assert s.effective_n == 6


@pytest.mark.parametrize(
    ("k", "n", "uplinks", "expected"),
    [
        (3, 5, 2, 6),  # ceil(3 * 2 / 1)
        (3, 5, 3, 5),  # ceil(3 * 3 / 2) = 5: no change
        (4, 5, 3, 6),  # ceil(4 * 3 / 2)
        (4, 5, 4, 6),  # ceil(4 * 4 / 3)
        (8, 9, 2, 16),  # bounded by 2k
        (8, 9, 4, 11),  # ceil(8 * 4 / 3)
        (2, 4, 2, 4),
    ],
)
def test_effective_n_is_the_smallest_code_that_protects(
    k: int, n: int, uplinks: int, expected: int
) -> None:
    s = both_ends(k, n, mesh("abcd"[:uplinks], "wxyz"[:uplinks]), add_parity=True)
    assert s.effective_n == expected == max(n, math.ceil(k * uplinks / (uplinks - 1)))
    assert s.protected


def test_unprotectable_paths_keep_the_configured_code_and_say_why() -> None:
    s: ShardScheduler[Path] = ShardScheduler(3, 5, add_parity=True)
    s.update(mesh("ab", "xy"))
    assert s.effective_n == 6
    change = s.update(mesh("a", "xy"))  # one of our uplinks is gone
    assert change is not None and not change.added and change.effective_n == 5
    assert s.protection == "not protected: one uplink here"
    assert len(s.assign()) == 5
    s.update(mesh("ab", "xy"))
    assert s.effective_n == 6
    s.update([])
    assert s.protection == "not protected: no path to the far gate"
    assert s.assign() == ()
    s = both_ends(3, 3, mesh("ab", "xy"), add_parity=True)
    assert s.effective_n == 3
    assert s.protection == "not protected: no parity (num_shards = required_shards)"
    # Without the survive_uplink_loss parity, the verdict is still honest.
    s = both_ends(3, 5, mesh("ab", "xy"))
    assert s.effective_n == 5 and not s.protected
    assert s.protection.startswith("not protected: ")


def test_shard_order_puts_data_shards_on_the_fastest_paths() -> None:
    paths = [
        PathQuality(("a", "x"), rtt=0.08, local="a", remote="x"),
        PathQuality(("b", "y"), rtt=0.01, local="b", remote="y"),
    ]
    assert both_ends(2, 4, paths).assign()[:2] == (("b", "y"), ("b", "y"))
