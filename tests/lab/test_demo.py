"""`warp demo` end to end in the namespace lab (root): warp-map, two NATed sites with two uplinks
each, traffic through the tunnel, site A's uplink up1 black-holed half-way. Nothing may be lost,
and nothing may be left behind (also after Ctrl-C)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.conftest import require_lab
from warp.netlab import list_namespaces

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]


def _demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "warp.cli", "demo", "--mode", "namespaces", "--no-live", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


def _left_behind(pid: int) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(f"wl{pid}x")]


def test_demo_loses_nothing_when_an_uplink_dies(tmp_path: Path) -> None:
    require_lab()
    summary_path = tmp_path / "summary.json"
    proc = _demo(tmp_path, "--duration", "8", "--rate", "400", "--summary-json", str(summary_path))
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == 0, out
    s = json.loads(summary_path.read_text())
    assert s["mode"] == "namespaces"
    assert s["sent"] == 400 * 8
    assert s["delivered"] == s["sent"], out
    assert s["duplicates"] == 0 and s["lost"] == 0
    # both uplinks carried traffic before the cut, as the scheduler spreads shards
    for uplink in ("up1", "up2"):
        assert s["a_tx_packets_before_cut"][uplink] > 0
        assert s["b_rx_packets_before_cut"][uplink] > 0
    # after the cut, the traffic continued on up2 only (up1 may see a few in-flight packets)
    assert s["delivered_after_cut"] > 0 and s["delivered_before_cut"] > 0
    assert s["b_rx_packets_after_cut"]["up2"] > 0
    after = s["b_rx_packets_after_cut"]
    assert after["up1"] <= 0.05 * (after["up1"] + after["up2"])  # only what was in flight
    assert s["time_to_first_datagram_s"] is not None
    assert "summary" in out and "CUT at" in out
    assert _left_behind(proc.pid) == []


def test_demo_ctrl_c_cleans_up(tmp_path: Path) -> None:
    require_lab()
    proc = _demo(tmp_path, "--duration", "30")
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:  # wait until the gateways run
        if "gateways A and B started" in line or time.monotonic() > deadline:
            break
    assert _left_behind(proc.pid), "the demo built no lab"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert _left_behind(proc.pid) == []
