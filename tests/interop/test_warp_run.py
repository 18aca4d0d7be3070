"""``warp run`` with one tun gate and ``far_gate.kind = "wireguard"`` (namespace A) against
wireguard-go (namespace B): a standard userspace WireGuard, seen from the outside only (CLI
contract, ping, iperf3, ``warp status --json``, wireguard-go's debug log).

Tests marked ``xfail`` describe node behaviour that is known to be missing (see each reason);
they are strict where the outcome is deterministic, so a fix shows up as XPASS → remove the mark.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.interop.conftest import Pair, start_pair
from tests.interop.wglab import (
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    WarpRun,
    WgLab,
    iperf3,
    start_warp_run,
    warp_run_config,
)

pytestmark = pytest.mark.interop

MTU = 1420
MIN_MBPS = 20.0


def ping_ok(lab: WgLab, side: str, dst: str, *extra: str, count: int = 10) -> None:
    out = lab.exec(
        side, ["ping", "-c", str(count), "-i", "0.05", "-W", "3", *extra, dst], timeout=30
    )
    assert " 0% packet loss" in out.stdout, out.stdout


def warm_up(lab: WgLab, side: str, dst: str) -> None:
    """One echo answered (allows for a handshake retry), so later pings measure steady state."""
    out = lab.exec(side, ["ping", "-c", "1", "-w", "15", dst], timeout=30, check=False)
    assert out.returncode == 0, out.stdout


def check_iperf(run: dict[str, Any]) -> None:
    assert run["exit"] == 0, run
    assert run["received_mbps"] > MIN_MBPS, run
    assert all(x > MIN_MBPS / 4 for x in run["interval_mbps"]), run


class Node:
    def __init__(self, lab: WgLab, pair: Pair, run: WarpRun) -> None:
        self.lab, self.pair, self.run = lab, pair, run

    def tun_exists(self) -> bool:
        return self.lab.exec("a", ["ip", "link", "show", "warp0"], check=False).returncode == 0


def make_node(
    wglab: WgLab, *, far_knows_endpoint: bool = True, we_know_endpoint: bool = True, **kw: Any
) -> Node:
    pair = start_pair(wglab, far_knows_endpoint=far_knows_endpoint)
    config = warp_run_config(
        wglab,
        ours=pair.ours,
        theirs=pair.theirs,
        psk=pair.psk,
        endpoint="192.168.77.2:51820" if we_know_endpoint else None,
        **kw,
    )
    return Node(wglab, pair, start_warp_run(wglab, config))


@pytest.fixture
def node(wglab: WgLab) -> Iterator[Node]:
    n = make_node(wglab)
    try:
        yield n
    finally:
        print(f"---- warp run log (tail) ----\n{n.run.log()[-4000:]}")
        n.run.stop()


def test_warp_run_ping_iperf3_and_clean_stop(node: Node) -> None:
    """Ping both ways (IPv4, IPv6, exactly the MTU with DF), iperf3 TCP 5 s each way; status
    shows the session; SIGTERM exits 0 and removes the interface and the control socket."""
    lab = node.lab
    warm_up(lab, "a", TUNNEL_B)
    ping_ok(lab, "a", TUNNEL_B)
    ping_ok(lab, "b", TUNNEL_A)
    ping_ok(lab, "a", TUNNEL6_B)
    ping_ok(lab, "b", TUNNEL6_A)
    ping_ok(lab, "a", TUNNEL_B, "-s", str(MTU - 28), "-M", "do")
    ping_ok(lab, "b", TUNNEL_A, "-s", str(MTU - 28), "-M", "do")
    ping_ok(lab, "b", TUNNEL6_A, "-s", str(MTU - 48), "-M", "do")
    figures = {
        "a->b": iperf3(lab, TUNNEL_B),
        "b->a": iperf3(lab, TUNNEL_B, reverse=True),
    }
    print(json.dumps(figures, indent=1))
    check_iperf(figures["a->b"])
    check_iperf(figures["b->a"])
    status = node.run.status()
    assert status is not None
    assert status["session"]["handshake_state"] == "established", status["session"]
    (tunnel,) = status["tunnels"]
    assert tunnel["gate"] == {"kind": "tun", "address": "warp0"}
    assert tunnel["drops"] == {}, tunnel
    assert tunnel["datagrams_in"] > 1000 and tunnel["datagrams_out"] > 1000, tunnel
    assert node.run.stop() == 0, node.run.log()[-3000:]
    assert not node.tun_exists(), "the tun interface is removed on stop"
    assert not node.run.socket.exists(), "the control socket is removed on stop"


def test_warp_run_as_responder(wglab: WgLab) -> None:
    """No endpoint on our side (only listen_port: the peer reaches us, as an engarde server):
    wireguard-go initiates, the node answers, and traffic flows both ways."""
    n = make_node(wglab, we_know_endpoint=False)
    try:
        warm_up(wglab, "b", TUNNEL_A)
        ping_ok(wglab, "b", TUNNEL_A)
        ping_ok(wglab, "a", TUNNEL_B)
        assert n.pair.log_count("Sending handshake initiation") >= 1
        assert n.pair.log_count("Received handshake response") >= 1
        assert n.pair.log_count("Received handshake initiation") == 0
    finally:
        print(f"---- warp run log (tail) ----\n{n.run.log()[-4000:]}")
        assert n.run.stop() == 0


def test_warp_run_first_ping_right_after_start(node: Node) -> None:
    out = node.lab.exec("a", ["ping", "-c", "1", "-W", "2", TUNNEL_B], check=False)
    assert out.returncode == 0, out.stdout


def test_warp_run_sends_nothing_wireguard_go_rejects(node: Node) -> None:
    warm_up(node.lab, "a", TUNNEL_B)
    ping_ok(node.lab, "a", TUNNEL_B)
    time.sleep(2.5)  # > holepunch_keep_alive_interval
    log = node.pair.far.log()
    for bad in ("Received invalid", "invalid IP version", "disallowed source address"):
        assert bad not in log, bad


def test_warp_run_does_not_use_its_tun_as_uplink(wglab: WgLab) -> None:
    n = make_node(wglab, exclude_tun=False)
    try:
        status = n.run.status()
        assert status is not None
        assert [u["name"] for u in status["uplinks"]] == ["a0"], status["uplinks"]
    finally:
        n.run.stop()


def test_warp_run_rekey_mid_transfer(node: Node) -> None:
    """A forced rekey from our side 2 s into each iperf3 transfer: TCP never stalls."""
    lab = node.lab
    warm_up(lab, "a", TUNNEL_B)

    def rekey() -> None:
        os.kill(node.run.process.pid, signal.SIGUSR1)

    rekey()  # first on an idle session: fail fast if the signal is not handled
    time.sleep(0.5)
    assert node.run.process.poll() is None, "warp run died on SIGUSR1"
    check_iperf(iperf3(lab, TUNNEL_B, during=rekey))
    check_iperf(iperf3(lab, TUNNEL_B, reverse=True, during=rekey))
    status = node.run.status()
    assert status is not None and status["session"]["rekeys"] == 3, status
    assert node.pair.log_count("Received handshake initiation") >= 4
