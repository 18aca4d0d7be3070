"""The TUN gate (`warp.gate.tun.TunGate`): on its own in a namespace, and as the IP interface of
a userspace WireGuard made of WARP's parts (tests/interop/tun_peer.py: TunGate + the sans-I/O
core + a UDP socket) against wireguard-go: real ``ping`` and ``iperf3`` through it."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
from typing import Any

import pytest

from tests.interop.conftest import ReadyProcess, start_pair
from tests.interop.wglab import (
    HERE,
    PYTHON,
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    WgLab,
    iperf3,
)
from warp.gate.base import GateError
from warp.gate.tun import TunGate, routes_for

MTU_DEFAULT = 1420

MTU = 1420
#: a floor far below what this path does (hundreds of Mbit/s), so a busy CI box still passes
MIN_MBPS = 20.0


def test_routes_for_splits_default_routes() -> None:
    """No root needed: a /0 becomes two /1 (the default route stays), others are kept."""
    nets = [ipaddress.ip_network(n) for n in ("0.0.0.0/0", "::/0", "10.1.0.0/16")]
    assert [str(n) for n in routes_for(nets)] == [
        "0.0.0.0/1",
        "128.0.0.0/1",
        "::/1",
        "8000::/1",
        "10.1.0.0/16",
    ]


def test_tun_gate_before_start() -> None:
    """No root needed: configuration is parsed up front; deliver before start is a counted
    drop, never an exception; a bad name is refused at once."""
    gate = TunGate(
        lambda g, p: None, addresses=["10.0.0.1/24", "fd00::1/64"], allowed_ips=["10.9.0.0/16"]
    )
    assert gate.kind == "tun" and gate.address == "warp0" and gate.mtu == MTU_DEFAULT
    assert [str(a) for a in gate.addresses] == ["10.0.0.1/24", "fd00::1/64"]
    assert not gate.is_reading and gate.fileno is None
    assert gate.deliver(b"\x45" + bytes(19)) is False
    assert gate.counters.drops == {"closed": 1}
    with pytest.raises(GateError):
        TunGate(lambda g, p: None, name="a-name-longer-than-15")


@pytest.mark.interop
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tun_gate_selftest(wglab: WgLab, loop: str) -> None:
    """Setup (MTU, addresses, routes, /0 split), ping through the gate, exact MTU, invalid
    packets, pause/resume, close removes the device, name clash, persistent device kept."""
    proc = wglab.exec(
        "a", [PYTHON, str(HERE / "tun_selftest.py"), "--loop", loop], timeout=90, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: result for name, result in checks.items() if result is not True}
    assert not failed, failed


def ping_ok(lab: WgLab, side: str, dst: str, *extra: str) -> str:
    out = lab.exec(side, ["ping", "-c", "10", "-i", "0.05", "-W", "3", *extra, dst], timeout=30)
    assert " 0% packet loss" in out.stdout, out.stdout
    return out.stdout


def check_iperf(run: dict[str, Any]) -> None:
    assert run["exit"] == 0, run
    assert run["received_mbps"] > MIN_MBPS, run
    assert all(x > MIN_MBPS / 4 for x in run["interval_mbps"]), run


@pytest.mark.interop
def test_tun_peer_against_wireguard_go(wglab: WgLab) -> None:
    """Ping both ways (IPv4 and IPv6, up to exactly the MTU with DF), then iperf3 TCP 5 s each
    way, each with a forced rekey from our side 2 s into the transfer: the TCP connection
    never stalls, and wireguard-go saw three initiations from us."""
    pair = start_pair(wglab, far_knows_endpoint=True)
    peer = ReadyProcess(
        wglab, "a", [PYTHON, str(HERE / "tun_peer.py"), str(pair.tun_peer_config())]
    )
    figures: dict[str, Any] = {}
    try:
        ping_ok(wglab, "a", TUNNEL_B)
        ping_ok(wglab, "b", TUNNEL_A)
        ping_ok(wglab, "a", TUNNEL6_B)
        ping_ok(wglab, "b", TUNNEL6_A)
        ping_ok(wglab, "a", TUNNEL_B, "-s", str(MTU - 28), "-M", "do")
        ping_ok(wglab, "b", TUNNEL_A, "-s", str(MTU - 28), "-M", "do")
        ping_ok(wglab, "b", TUNNEL6_A, "-s", str(MTU - 48), "-M", "do")
        too_big = wglab.exec(
            "a", ["ping", "-c", "1", "-s", str(MTU - 27), "-M", "do", TUNNEL_B], check=False
        )
        assert too_big.returncode != 0

        def rekey() -> None:
            os.kill(peer.pid, signal.SIGUSR1)

        figures["a->b"] = iperf3(wglab, TUNNEL_B, during=rekey)
        figures["b->a"] = iperf3(wglab, TUNNEL_B, reverse=True, during=rekey)
    finally:
        result = peer.stop()
    print(json.dumps(figures, indent=1))
    check_iperf(figures["a->b"])
    check_iperf(figures["b->a"])
    assert result["handshakes"] == [True, True, True], result["handshakes"]
    assert result["rejected"] == {}, result["rejected"]
    gate = result["gate"]
    assert gate["drops"] == {}, gate
    assert pair.log_count("Received handshake initiation") == 3
