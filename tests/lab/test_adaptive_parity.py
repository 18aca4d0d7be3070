"""Adaptive parity with real processes, on the two-site lab of test_gateway.py (map, cone NAT,
two uplinks each, a loopback gate at both ends): loss on both of a's uplinks (nftables random
drop, upstream) steps 0 % → 10 % → 1 %. From 2 s after each step, 1 000 datagrams/s a -> b
lose at most 0.1 % with ``adaptive = true`` (k = 2), and the low-loss phases (0 % and 1 %)
send fewer wire bytes (a's paths' ``tx_bytes``, probes included) than the same run with the
fixed (3, 5) tunnel, which the default spread sends as (3, 6) on two uplinks a side. Over
the whole run the two come out about even here (the 10 % phase costs adaptive more: it sits
at 5-6 shards of 100 bytes against the fixed 6 of 67, and these phases are short): the
whole-run comparison is asserted in tests/sim/test_adaptive_sim.py, which is deterministic;
here it is only bounded (at most 3 % more) and printed.

Probes every 100 ms, a lost one counted after 500 ms: the loss figure a 2 s reaction needs
(docs/protocol.md, "Adaptive parity"). Kept short: about 55 s for both runs. The phases
last as long, relative to each other, as in tests/sim/test_adaptive_sim.py (12 : 15 : 15 s):
the bytes saved depend on the time spent at 10 % (where k = 2 takes 5 or 6 shards of 100
bytes against the fixed 6 of 67).
"""

from __future__ import annotations

import time
from typing import Any

from tests.lab.test_gateway import Net, app_args, app_result, loopback_gate, net  # noqa: F401

RATE = 1000
SETTLE_S = 2.0  # after each step, before the datagrams that count
#: (loss on each of a's uplinks, seconds of traffic counted after SETTLE_S)
PHASES = ((0.0, 4.4), (0.10, 6.0), (0.01, 6.0))
TARGET = 0.001
ADAPTIVE = "adaptive = true\nmax_parity = 6\n"


def _configure(lab_net: Net, k: int, n: int, redundancy: str) -> None:
    for name in ("a", "b"):
        gw = lab_net.write_config(name, loopback_gate(), k=k, n=n)
        text = gw.config.read_text()
        text = text.replace('holepunch_keep_alive_interval = "1s"',
                            'holepunch_keep_alive_interval = "100ms"')  # fmt: skip
        text = text.replace('path_timeout = "3s"', 'path_timeout = "500ms"')
        text = text.replace(f"required_shards = {k}\n", f"required_shards = {k}\n{redundancy}")
        gw.config.write_text(text)


def _wire_bytes(lab_net: Net) -> int:
    return sum(int(p["tx_bytes"]) for p in lab_net.gws["a"].status()["paths"])


def _run(lab_net: Net, label: str) -> tuple[int, list[tuple[float, int, int, Any, int]]]:
    """Start both gateways, step the loss; (a's wire bytes, per phase (loss, sent, lost, a's
    tunnel redundancy at the end of the phase, the phase's wire bytes))."""
    lab_net.start("a", lifetime_s=60)
    lab_net.wait_registered("a")
    lab_net.start("b", lifetime_s=60)
    lab_net.wait_paths("a", 4)
    lab_net.wait_paths("b", 4)
    before = _wire_bytes(lab_net)
    results = []
    phase_bytes = []
    for loss, seconds in PHASES:
        phase_start = _wire_bytes(lab_net)
        for uplink in lab_net.lab.sites["a"].uplinks:
            uplink.impair(loss_pct=loss * 100, direction="up")
        count = int(RATE * seconds)
        start_at = f"{time.time() + SETTLE_S:.3f}"
        sink = lab_net.app("b", app_args(2, 0, 0, count, "--grace", str(SETTLE_S + seconds + 2)),
                           lifetime_s=30)  # fmt: skip
        source = lab_net.app("a", app_args(1, count, RATE, 0, "--start-at", start_at, "--size",
                                           "200", "--grace", "0"), lifetime_s=30)  # fmt: skip
        assert app_result(source, 40)["sent"] == count
        received = app_result(sink, 40)
        assert received["duplicates"] == 0 and received["corrupt"] == 0, received
        (tunnel,) = lab_net.gws["a"].status()["tunnels"]
        results.append((loss, count, count - received["unique"], tunnel["redundancy"]))
        phase_bytes.append(_wire_bytes(lab_net) - phase_start)
    wire = _wire_bytes(lab_net) - before
    print(f"\n{label}: wire bytes {wire}")
    for (loss, count, lost, redundancy), size in zip(results, phase_bytes, strict=True):
        print(f"  {loss:.0%} loss: {lost} of {count} lost ({lost / count:.3%}), "
              f"n at the end {redundancy['effective_n']}, {size} wire bytes")  # fmt: skip
    for name in ("a", "b"):
        proc = lab_net.gws[name].proc
        assert proc is not None
        lab_net.lab.stop(proc)
    for uplink in lab_net.lab.sites["a"].uplinks:
        uplink.impair(loss_pct=0.0, direction="up")
    return wire, [(*result, size) for result, size in zip(results, phase_bytes, strict=True)]


def test_adaptive_parity_follows_stepped_loss_on_real_uplinks(net: Net) -> None:  # noqa: F811
    _configure(net, 2, 4, ADAPTIVE)
    adaptive_bytes, adaptive = _run(net, "adaptive (k = 2)")
    _configure(net, 3, 5, "")
    fixed_bytes, fixed = _run(net, "fixed (3, 5)")
    for loss, count, lost, redundancy, _ in adaptive:
        assert lost <= TARGET * count, (loss, lost, count)
        assert redundancy["adaptive"] is True
    codes = [redundancy["effective_n"] for _, _, _, redundancy, _ in adaptive]
    assert codes[1] > codes[0] and codes[1] > codes[2], codes
    assert all(redundancy["effective_n"] == 6 for _, _, _, redundancy, _ in fixed)
    events = net.gws["a"].events("tunnel.parity_adapted")
    assert events == []  # the fixed run's log: no adaptation there
    print(f"whole run: adaptive / fixed wire bytes = {adaptive_bytes / fixed_bytes:.3f}")
    for low_loss_phase in (0, 2):
        assert adaptive[low_loss_phase][4] < fixed[low_loss_phase][4], (adaptive, fixed)
    assert adaptive_bytes <= 1.03 * fixed_bytes, (adaptive_bytes, fixed_bytes)
