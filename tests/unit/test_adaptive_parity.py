"""Adaptive parity: the scheduler picks n from the measured path losses (fewest parity
shards within the target, never below the uplink-loss spread), with hysteresis."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from warp.config import ConfigError, parse_gateway_config
from warp.keys import encode_key
from warp.metrics import snapshot_metrics
from warp.paths.scheduler import AdaptiveParity, PathQuality, ShardScheduler, block_loss
from warp.status import render_plain

Path = tuple[str, str]


def mesh(locals_: str, remotes: str, loss: float = 0.0) -> list[PathQuality[Path]]:
    return [
        PathQuality((local, remote), loss=loss, local=local, remote=remote)
        for local in locals_
        for remote in remotes
    ]


def adaptive(
    k: int, *, min_parity: int = 0, max_parity: int = 8, target: float = 0.001
) -> ShardScheduler[Path]:
    policy = AdaptiveParity(min_parity, max_parity, target)
    return ShardScheduler(k, k + 2, add_parity=True, adaptive=policy)


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(more than n - k of n shards lost), each with p."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n - k + 1, n + 1))


def test_block_loss_is_the_binomial_tail_and_follows_each_paths_own_loss() -> None:
    assert block_loss([3, 3], [0.1, 0.1], 3) == pytest.approx(binomial_tail(6, 3, 0.1))
    assert block_loss([6], [0.1], 3) == pytest.approx(binomial_tail(6, 3, 0.1))
    # A clean path carrying 3 of k = 3: the block always arrives whatever the other does.
    assert block_loss([3, 3], [0.0, 0.9], 3) == 0.0
    assert block_loss([1, 1], [1.0, 1.0], 1) == 1.0


def test_clean_two_by_two_keeps_the_uplink_loss_floor_not_below() -> None:
    """No loss measured, min_parity 0: k = 3 still gets n = 6 on two uplinks a side (3 + 3:
    either uplink alone rebuilds every block)."""
    s = adaptive(3)
    s.update(mesh("ab", "xy"))
    assert s.effective_n == 6 and s.protected


def test_one_path_clean_uses_min_parity() -> None:
    s = adaptive(3, min_parity=1)
    s.update(mesh("a", "x"))
    assert s.effective_n == 4 and not s.protected


def test_ten_percent_loss_takes_the_fewest_shards_within_the_target() -> None:
    """10 % on every path: (3, 6) loses 0.13 % of blocks, (3, 7) 0.018 %: n = 7, whose
    prediction is within half the target (room for a loss figure that reads low)."""
    s = adaptive(3)
    change = s.update(mesh("ab", "xy", 0.10))
    assert s.effective_n == 7
    assert s.residual_loss is not None and s.residual_loss <= 0.0005
    assert binomial_tail(6, 3, 0.1) > 0.001
    assert change is not None and change.previous_n == 5 and change.loss == pytest.approx(0.10)
    assert change.effective_n == 7


def test_heavier_loss_more_parity_capped_at_max_parity() -> None:
    s = adaptive(3, max_parity=6)
    codes = []
    for loss in (0.0, 0.05, 0.2, 0.4):
        s.update(mesh("ab", "xy", loss))
        codes.append(s.effective_n)
    assert codes == sorted(codes) and codes[0] == 6 and codes[-1] == 9


def test_uplink_loss_floor_wins_over_max_parity() -> None:
    s = adaptive(3, max_parity=1)
    s.update(mesh("ab", "xy", 0.3))
    assert s.effective_n == 6 and s.protected


def test_hysteresis_grows_at_once_shrinks_only_with_room_and_does_not_flap() -> None:
    s = adaptive(2)
    s.update(mesh("ab", "xy", 0.10))
    high = s.effective_n
    assert high > 4
    # Loss figures wavering around the (2, 4) boundary (one probe in 32 each way).
    changes = 0
    for loss in [0.06, 0.09, 0.06, 0.09] * 5:
        if s.update(mesh("ab", "xy", loss)) is not None:
            changes += 1
    assert changes <= 2
    # Back to clean: down to the floor (2 + 2 on two uplinks a side).
    s.update(mesh("ab", "xy", 0.0))
    assert s.effective_n == 4


def test_a_lossy_path_is_judged_on_its_own_loss_and_the_pool() -> None:
    """One of two single-path uplinks loses 20 %: the prediction uses that path's loss, not
    the mean, and the code grows accordingly (more than with both at the mean)."""
    lossy = [
        PathQuality(("a", "x"), loss=0.2, local="a", remote="x"),
        PathQuality(("b", "y"), loss=0.0, local="b", remote="y"),
    ]
    s = adaptive(2)
    s.update(lossy)
    even = adaptive(2)
    even.update([PathQuality(p.path_id, loss=0.1, local=p.local, remote=p.remote) for p in lossy])
    assert s.effective_n >= even.effective_n > 4


def test_assignments_carry_the_adapted_shard_count() -> None:
    s = adaptive(3)
    s.update(mesh("ab", "xy", 0.10))
    blocks = [s.assign() for _ in range(10)]
    assert all(len(b) == 7 for b in blocks)
    # Still at most n - k = 4 per uplink at both ends.
    for block in blocks:
        assert max(sum(1 for local, _ in block if local == u) for u in "ab") <= 4
        assert max(sum(1 for _, remote in block if remote == r) for r in "xy") <= 4


def test_policy_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        AdaptiveParity(3, 2, 0.001)
    with pytest.raises(ValueError):
        AdaptiveParity(0, 2, 1.0)


KEY = encode_key(bytes(range(32)))
CONFIG = f"""private_key = "{KEY}"
[far_gates.b]
public_key = "{KEY}"
endpoints = ["192.0.2.1:51820"]
[tunnels.t]
far_gate = "b"
gate = {{ application_to_gate = 5000 }}
[tunnels.t.transport.redundancy]
"""
PREFIX = "tunnels.t.transport.redundancy."


@pytest.mark.parametrize(
    ("lines", "path", "message"),
    [
        ("adaptive = true\nmin_parity = 3\nmax_parity = 2", "min_parity", "≤ max_parity (2)"),
        ("adaptive = true\ntarget_loss = 1.0", "target_loss", "less than 1"),
        ("adaptive = true\ntarget_loss = 0", "target_loss", "greater than 0"),
        ("adaptive = true\nrequired_shards = 5\nmax_parity = 251", "max_parity", "≤ 255"),
        ("adaptive = true\nmin_parity = -1", "min_parity", "must be ≥ 0"),
    ],
)
def test_config_errors_name_the_toml_path(lines: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_gateway_config(CONFIG + lines + "\n")
    assert PREFIX + path in str(caught.value) and message in str(caught.value)


def test_config_defaults_and_values() -> None:
    redundancy = parse_gateway_config(CONFIG).tunnels["t"].transport.redundancy
    assert (redundancy.adaptive, redundancy.min_parity, redundancy.max_parity) == (False, 1, 8)
    assert redundancy.target_loss == 0.001
    text = CONFIG + "adaptive = true\nmin_parity = 2\nmax_parity = 4\ntarget_loss = 0.01\n"
    redundancy = parse_gateway_config(text).tunnels["t"].transport.redundancy
    assert (redundancy.adaptive, redundancy.min_parity, redundancy.max_parity) == (True, 2, 4)


def test_plain_status_appends_adaptive_fields() -> None:
    redundancy: dict[str, Any] = {
        "k": 2, "n": 4, "effective_n": 5, "spread": "survive_uplink_loss", "protected": True,
        "protection": "protected against one uplink loss", "adaptive": True,
        "target_loss": 0.001, "min_parity": 1, "max_parity": 8, "parity": 3,
        "residual_loss": 0.0004,
    }  # fmt: skip
    snapshot = {"version": "x", "tunnels": [{"name": "t", "redundancy": redundancy}]}
    line = next(x for x in render_plain(json.loads(json.dumps(snapshot))).splitlines()
                if x.startswith("tunnel t"))  # fmt: skip
    assert line.endswith("adaptive=yes parity=3 target_loss=0.001")
    assert "effective_n=5" in line


def test_metrics_show_the_shards_per_block_in_use() -> None:
    redundancy = {"k": 2, "n": 4, "effective_n": 6, "adaptive": True}
    snapshot = {"tunnels": [{"name": "t", "far_gate": "b", "redundancy": redundancy}]}
    families = {m.name: m for m in snapshot_metrics(snapshot)}
    (sample,) = families["warp_tunnel_shards_per_block"].samples
    assert sample.value == 6 and sample.labels == {"far_gate": "b", "tunnel": "t"}


def test_status_screen_shows_the_adaptive_code_in_use() -> None:
    from tests.unit.test_status import PROTECTED, screen, with_redundancy

    redundancy = {**PROTECTED, "effective_n": 5, "adaptive": True, "target_loss": 0.001}
    text = screen(with_redundancy(redundancy), 100)
    (row,) = [line for line in text.splitlines() if line.startswith(" wireguard ")]
    assert "(2, 5) adaptive" in row
