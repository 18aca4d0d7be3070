"""Shard scheduling policy."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp.paths.scheduler import (
    CYCLE_BLOCKS,
    PathQuality,
    ShardScheduler,
    plan_shares,
    shard_cap,
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
    assert sorted(plan_shares(everything_lost, 3, 5).values()) == pytest.approx([5 / 3] * 3)


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
    k, n = geometry
    qualities = [
        PathQuality(f"p{i}", alive=alive, loss=loss, rtt=rtt)
        for i, (alive, loss, rtt) in enumerate(paths)
    ]
    alive = {q.path_id for q in qualities if q.alive}
    s = scheduler(k, n, qualities)
    shares = plan_shares(qualities, k, n)
    if alive:
        assert sum(shares.values()) == pytest.approx(n)
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
        assert most <= shard_cap(k, n, len(alive))
        assert shard_cap(k, n, len(alive)) <= max(n - k, math.ceil(n / len(alive)))
