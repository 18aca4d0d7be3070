"""The receiver's tunnel counters tell the truth, on the two-site lab of test_gateway.py (map,
cone NAT, two uplinks each, (k, n) = (2, 4), a loopback gate at both ends).

Datagrams 4 ms apart and the default `redundancy.window` (1 ms): each datagram is a block of
its own, one data shard and, 1 ms later, the n - k parity shards (a block closed early keeps
the full parity), so the counts below are per datagram.

* Clean link, 5 000 datagrams a -> b: `warp status --json` on b shows 0 repairs
  (`blocks_rebuilt`), 0 drops, 0 lost, and every parity shard as surplus ((n - k) per block).
* 5 % loss on each of a's uplinks (nftables random drop, independent per packet), 5 000 more:
  `datagrams_lost` equals exactly what b's application did not get, and the repairs are the
  blocks that lacked their data shard and got a parity shard (each shard lost with p = 5 %);
  the count must fall within 4.5 standard deviations of that binomial expectation (about 249
  of 5 000, sd 15), where counting every block decoded with parity (shards of one block take
  different paths, so parity often arrives first) would not.
"""

from __future__ import annotations

import math
import time
from typing import Any

from tests.lab.test_gateway import Net, app_args, app_result, loopback_gate, net  # noqa: F401

K, N = 2, 4
COUNT = 5000
RATE = 250
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
    """A block of one data shard is repaired: its data shard lost, a parity shard not all."""
    return p * (1 - p ** (N - K))


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
    # Every parity shard: n - k per block, a block per datagram but for the few sent in one
    # batch with the one before (they share a data shard).
    assert tunnel["surplus_shards"] % (N - K) == 0, tunnel
    assert 0.99 * (N - K) * COUNT <= tunnel["surplus_shards"] <= (N - K) * COUNT, tunnel

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
