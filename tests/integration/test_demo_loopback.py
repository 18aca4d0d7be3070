"""`warp demo --mode loopback` end to end: the no-root subset of the demo (warp-map and two
gateways as processes on 127.0.0.x, no namespaces, the cut simulated inside gateway A)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(90)
def test_loopback_demo_end_to_end(tmp_path: Path) -> None:
    """The no-root subset: warp-map and two gateways as processes on 127.0.0.x, the cut
    simulated in gateway A. Nothing lost, both uplinks used before the cut, lo-a2 after."""
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "warp.cli", "demo", "--mode", "loopback", "--no-live",
         "--duration", "5", "--rate", "300", "--summary-json", str(summary_path)],
        capture_output=True, text=True, timeout=80, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(summary_path.read_text())
    assert s["mode"] == "loopback" and "simulated" in s["simulated"]
    assert s["sent"] == 1500 and s["delivered"] == 1500
    assert s["duplicates"] == 0 and s["lost"] == 0
    assert all(s["a_tx_packets_before_cut"][u] > 0 for u in ("lo-a1", "lo-a2"))
    assert s["b_rx_packets_after_cut"]["lo-a2"] > 0
    after = s["b_rx_packets_after_cut"]
    assert after["lo-a1"] <= 0.05 * (after["lo-a1"] + after["lo-a2"])  # only what was in flight
    assert s["delivered_after_cut"] > 0
