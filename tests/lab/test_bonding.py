"""Bonding uneven uplinks over real namespaces (issue 18): site a's two uplinks shaped by tc
tbf to 3 and 1 Mbit/s upwards (the issue's 30 + 10 at a tenth: the box is small), spread =
aggregate, no FEC. a sends 1200-byte datagrams to b at 85 % of what the two carry: after a
warm-up stream (the capacities get measured), a second stream arrives with under 1 % lost,
and status shows both uplinks' capacity."""

from __future__ import annotations

import time

from tests.lab.test_gateway import Net, app_args, app_result, loopback_gate, net

__all__ = ["net"]  # the fixture

RATES_KBIT = (3000, 1000)
SIZE = 1200
# 85 % of the two uplinks in 1200-byte datagrams (WireGuard and the shard header take ~5 %).
RATE = 0.85 * sum(RATES_KBIT) * 1000 / 8 * 0.95 / SIZE
WARM_UP = 6
SECONDS = 10


def stream(net: Net, seconds: float) -> dict[str, object]:
    """a -> b at RATE for `seconds`: b's application summary."""
    count = int(RATE * seconds)
    start_at = time.time() + 0.5
    more = ("--start-at", f"{start_at:.3f}", "--sizes", str(SIZE))
    # (the receiver sends nothing: it waits `--grace` from its start for the stream)
    receiver = net.app(
        "b", app_args(2, 0, RATE, count, *more, "--grace", f"{seconds + 3:g}"), seconds + 10
    )
    sender = net.app("a", app_args(1, count, RATE, 0, *more, "--grace", "1"), seconds + 10)
    app_result(sender, seconds + 20)
    return app_result(receiver, seconds + 20)


def test_aggregate_uses_both_shaped_uplinks_without_loss(net: Net) -> None:
    for name in ("a", "b"):
        gw = net.write_config(name, loopback_gate(), k=1, n=1)
        gw.config.write_text(
            gw.config.read_text() + '[tunnels.app.transport]\nspread = "aggregate"\n'
        )
    for uplink, rate in zip(("up1", "up2"), RATES_KBIT, strict=True):
        net.a.uplink(uplink).impair(rate_kbit=rate, direction="up")
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    stream(net, WARM_UP)
    result = stream(net, SECONDS)
    status = net.gws["a"].status()
    capacity = {
        uplink: row["capacity"]
        for far in status["far_gates"].values()
        for uplink, row in far["uplink_capacity"].items()
    }
    count = int(RATE * SECONDS)
    print(f"\nsent {count} at {RATE:.0f}/s, received {result['unique']}; capacity {capacity}")
    assert result["unique"] >= 0.99 * count, result
    # Both uplinks measured near their shaping (wire bytes/s; tbf counts a few more).
    for uplink, rate in zip(("up1", "up2"), RATES_KBIT, strict=True):
        assert 0.7 * rate * 125 < capacity[uplink] < 1.2 * rate * 125, capacity
