"""The receiver's tunnel counters tell the truth, on the two-site lab of test_gateway.py (map,
cone NAT, two uplinks each, (k, n) = (2, 4), a loopback gate at both ends).

* Clean link, 10 000 datagrams a -> b: `warp status --json` on b shows 0 repairs
  (`blocks_rebuilt`), 0 drops, 0 lost, and every parity shard as surplus ((n - k) per block).
* 5 % loss on each of a's uplinks (nftables random drop, independent per packet), 10 000 more:
  `datagrams_lost` equals exactly what b's application did not get, and the repairs are the
  blocks that lacked a data shard: a block (k data + n - k parity shards, each lost with
  p = 5 %) is repaired when a data shard is lost and no more than n - k shards are; the
  count must fall within 4.5 standard deviations of that binomial expectation (about 970 of
  10 000, sd 30), where counting every block decoded with parity (shards of one block take
  different paths, so parity often arrives first) or every block (the old count) would not.
"""

from __future__ import annotations

import math
import time
from typing import Any

from tests.lab.test_gateway import Net, app_args, app_result, loopback_gate, net  # noqa: F401

K, N = 2, 4
COUNT = 10_000
RATE = 1000
LOSS = 0.05
SETTLE_S = 2.5  # repairs and unseen blocks settle within 2 block timeouts (docs: Counters)


def _send(lab_net: Net) -> dict[str, Any]:
    """COUNT datagrams of 200 bytes a -> b; b's application result."""
    start_at = f"{time.time() + 1.0:.3f}"
    grace = str(1.0 + COUNT / RATE + 3.0)
    sink = lab_net.app("b", app_args(2, 0, 0, COUNT, "--grace", grace), lifetime_s=40)
    source = lab_net.app("a", app_args(1, COUNT, RATE, 0, "--start-at", start_at, "--size", "200",
                                   "--grace", "0"), lifetime_s=40)  # fmt: skip
    assert app_result(source, 60)["sent"] == COUNT
    result = app_result(sink, 60)
    assert result["duplicates"] == 0 and result["corrupt"] == 0, result
    time.sleep(SETTLE_S)
    return result


def _tunnel(lab_net: Net) -> dict[str, Any]:
    (tunnel,) = lab_net.gws["b"].status_cli()["tunnels"]
    assert isinstance(tunnel, dict)
    return tunnel


def _repair_probability(p: float) -> float:
    """A block is repaired: some of its k data shards lost, at most n - k of n lost."""
    at_most = sum(math.comb(N, i) * p**i * (1 - p) ** (N - i) for i in range(N - K + 1))
    no_data_lost = (1 - p) ** K * sum(
        math.comb(N - K, i) * p**i * (1 - p) ** (N - K - i) for i in range(N - K + 1)
    )
    return at_most - no_data_lost


def test_counters_clean_link_and_five_percent_loss(net: Net) -> None:  # noqa: F811
    for name in ("a", "b"):
        net.write_config(name, loopback_gate(), k=K, n=N)
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    net.wait_paths("b", 4)

    clean = _send(net)
    tunnel = _tunnel(net)
    print(f"\nclean: delivered {clean['unique']} of {COUNT}; b: repairs "
          f"{tunnel['blocks_rebuilt']}, surplus {tunnel.get('surplus_shards')}, lost "
          f"{tunnel['datagrams_lost']}, drops {tunnel['drops']}")  # fmt: skip
    assert clean["unique"] == COUNT, clean
    assert tunnel["blocks_rebuilt"] == 0, tunnel
    assert tunnel["drops"] == {}, tunnel
    assert tunnel["datagrams_lost"] == 0, tunnel
    assert tunnel["surplus_shards"] == (N - K) * COUNT, tunnel

    for uplink in net.lab.sites["a"].uplinks:
        uplink.impair(loss_pct=LOSS * 100, direction="up")
    lossy = _send(net)
    after = _tunnel(net)
    repairs = after["blocks_rebuilt"] - tunnel["blocks_rebuilt"]
    lost = after["datagrams_lost"] - tunnel["datagrams_lost"]
    probability = _repair_probability(LOSS)
    expected = COUNT * probability
    spread = 4.5 * math.sqrt(COUNT * probability * (1 - probability))
    print(f"5 % loss per uplink: delivered {lossy['unique']} of {COUNT}; b: lost {lost}, "
          f"repairs {repairs} (binomial expectation {expected:.0f} +- {spread:.0f})")  # fmt: skip
    assert lost == COUNT - lossy["unique"], (lost, lossy)
    assert abs(repairs - expected) <= spread, (repairs, expected)
