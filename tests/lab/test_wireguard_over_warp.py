"""WireGuard over WARP: the seed scenario, end to end (docs/wireguard-over-warp.md).

Sites "a" and "b" behind cone NAT, two uplinks each, `warp-map` in the public namespace (the
`Net` harness of test_gateway.py). Each site host runs `warp run` with a loopback gate
(`application_to_gate` 59401, `gate_to_application` 51820, (k, n) = (2, 4)) and a
`wireguard-go` interface listening on 51820 whose only peer has
`Endpoint = 127.0.0.1:59401`: WireGuard sends into the local gate, and warp delivers the far
side's WireGuard packets from that same gate socket to port 51820, so WireGuard sees its
endpoint answer and never roams. Nothing about WireGuard changes except its Endpoint.

Over the WireGuard addresses (10.99.0.1 ↔ 10.99.0.2): ping, iperf3 TCP 5 s each way, and a
ping stream (every 50 ms) during which one of site a's two uplinks is black-holed: no ping is
lost and WireGuard does not re-handshake (its latest-handshake time and the count of
"Sending handshake initiation" lines in its debug log are unchanged).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.netlab import Lab, Site
from tests.lab.test_gateway import MAP_PORT, ROOT, WARP_MAP, Net, cpe_firewall
from warp.keys import encode_key, generate_private_key, public_key_of

GATE_PORT = 59401  # application_to_gate: WireGuard's peer Endpoint is 127.0.0.1:59401
WG_PORT = 51820  # WireGuard's ListenPort = the gate's gate_to_application
WG_ADDR = {"a": "10.99.0.1", "b": "10.99.0.2"}
UAPI_DIR = Path("/var/run/wireguard")
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "debug"}
INITIATION = "Sending handshake initiation"


def wg_gate() -> str:
    return f"ipv4 = true\napplication_to_gate = {GATE_PORT}\ngate_to_application = {WG_PORT}"


@dataclass
class Wg:
    site: Site
    ifname: str
    proc: subprocess.Popen[str]
    log: Path

    def run(self, argv: list[str], timeout: float = 10.0) -> str:
        return self.site.lab.run(self.site.host_ns, argv, timeout).stdout

    def latest_handshake(self) -> int:
        out = self.run(["wg", "show", self.ifname, "latest-handshakes"]).split()
        return int(out[1]) if len(out) >= 2 else 0

    def initiations(self) -> int:
        return self.log.read_text(errors="replace").count(INITIATION)


def start_wireguard(
    lab: Lab, site: Site, name: str, private: bytes, peer_public: bytes, peer_addr: str
) -> Wg:
    """wireguard-go in the site's host namespace: ListenPort 51820, one peer whose Endpoint is
    the local warp gate. Interface names carry the lab prefix (UAPI sockets are global)."""
    ifname = f"{lab.prefix}w{name}"
    assert len(ifname) <= 15, ifname
    log = lab.workdir / f"wg-{name}.log"
    proc = lab.spawn(
        site.host_ns,
        ["wireguard-go", "-f", ifname],
        120,
        env={**os.environ, **WG_ENV},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    sock = UAPI_DIR / f"{ifname}.sock"
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no UAPI socket {sock}: {log.read_text()}"
        time.sleep(0.02)
    key = lab.workdir / f"wg-{name}.key"
    key.write_text(_b64(private) + "\n")
    key.chmod(0o600)
    wg = Wg(site, ifname, proc, log)
    wg.run(
        [
            "wg", "set", ifname, "listen-port", str(WG_PORT), "private-key", str(key),
            "peer", _b64(peer_public), "endpoint", f"127.0.0.1:{GATE_PORT}",
            "allowed-ips", f"{peer_addr}/32",
        ]
    )  # fmt: skip
    wg.run(["ip", "addr", "add", f"{WG_ADDR[name]}/24", "dev", ifname])
    wg.run(["ip", "link", "set", ifname, "up"])
    return wg


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
def wnet(lab: Lab) -> Iterator[tuple[Net, dict[str, Wg]]]:
    a = lab.add_site("a", "cone", uplinks=2)
    b = lab.add_site("b", "cone", uplinks=2)
    for site in (a, b):
        cpe_firewall(site)
    net = Net(lab, a, b, generate_private_key())
    net.keys = {"a": generate_private_key(), "b": generate_private_key()}
    (lab.workdir / "map.toml").write_text(
        f'bind = "{lab.public_address}:{MAP_PORT}"\nprivate_key = "{encode_key(net.map_key)}"\n'
    )
    net.map_proc = lab.spawn(
        lab.public_ns,
        [*WARP_MAP, "--config", str(lab.workdir / "map.toml")],
        150,
        stdout=net.map_log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    wgs: dict[str, Wg] = {}
    try:
        deadline = time.monotonic() + 10
        while "map.listening" not in net.map_log.read_text():
            assert time.monotonic() < deadline, net.map_log.read_text()
            time.sleep(0.02)
        yield net, wgs
    finally:
        for wg in wgs.values():
            lab.stop(wg.proc)
            with contextlib.suppress(OSError):
                (UAPI_DIR / f"{wg.ifname}.sock").unlink()
        for gw in net.gws.values():
            if gw.proc is not None:
                lab.stop(gw.proc)
        lab.stop(net.map_proc)


def ping(wg: Wg, dest: str, count: int, interval: float, timeout: float) -> dict[str, float]:
    out = wg.site.lab.run(
        wg.site.host_ns,
        ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", "1", dest],
        timeout,
        check=False,
    ).stdout
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    rtt = re.search(r"= [\d.]+/([\d.]+)/([\d.]+)/", out)
    return {
        "sent": int(m.group(1)),
        "received": int(m.group(2)),
        "avg_ms": float(rtt.group(1)) if rtt else -1.0,
        "max_ms": float(rtt.group(2)) if rtt else -1.0,
    }


def iperf3(lab: Lab, client: Site, server: Site, server_addr: str, seconds: int = 5) -> float:
    """iperf3 TCP client → one-shot server (both under `timeout`); received Mbit/s."""
    srv = lab.spawn(
        server.host_ns,
        ["iperf3", "-s", "-1", "-B", server_addr],
        seconds + 20,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not lab.run(server.host_ns, ["ss", "-Hltn", "sport", "=", ":5201"]).stdout.strip():
            assert time.monotonic() < deadline and srv.poll() is None, "iperf3 server not up"
            time.sleep(0.05)
        res = lab.run(
            client.host_ns,
            ["iperf3", "-c", server_addr, "-t", str(seconds), "-J"],
            seconds + 15,
            check=False,
        )
    finally:
        lab.stop(srv)
    report = json.loads(res.stdout)
    assert not report.get("error"), report.get("error")
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def test_wireguard_over_warp_ping_iperf3_and_uplink_cut(
    wnet: tuple[Net, dict[str, Wg]],
) -> None:
    net, wgs = wnet
    lab = net.lab
    gw = {name: net.write_config(name, wg_gate(), k=2, n=4) for name in ("a", "b")}
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    net.wait_paths("b", 4)
    wg_keys = {"a": generate_private_key(), "b": generate_private_key()}
    for name, other in (("a", "b"), ("b", "a")):
        site = net.a if name == "a" else net.b
        wgs[name] = start_wireguard(
            lab, site, name, wg_keys[name], public_key_of(wg_keys[other]), WG_ADDR[other]
        )

    # First ping brings up the WireGuard session (the handshake travels through warp).
    first = ping(wgs["a"], WG_ADDR["b"], 5, 0.2, 15)
    assert first["received"] >= 4, (first, wgs["a"].log.read_text()[-2000:])
    back = ping(wgs["b"], WG_ADDR["a"], 5, 0.2, 15)
    assert back["received"] == 5, back
    print(f"\nping a→b over WireGuard over WARP: {first}; b→a: {back}")

    up_mbps = iperf3(lab, net.a, net.b, WG_ADDR["b"])
    down_mbps = iperf3(lab, net.b, net.a, WG_ADDR["a"])
    print(f"iperf3 TCP 5 s through WireGuard over WARP: a→b {up_mbps:.1f} Mbit/s, "
          f"b→a {down_mbps:.1f} Mbit/s")  # fmt: skip
    assert up_mbps > 1 and down_mbps > 1

    # Ping stream (50 ms, 200 pings ≈ 10 s); black-hole a's up1 3 s in.
    hs_before = {n: w.latest_handshake() for n, w in wgs.items()}
    init_before = {n: w.initiations() for n, w in wgs.items()}
    assert all(hs_before.values()), hs_before
    # iperf3 fills every queue on purpose (TCP finds the capacity by loss), so count warp's
    # lost datagrams only from here: the uplink cut itself must lose nothing. A datagram whose
    # every shard was lost is seen missing when a later one arrives (its number shows the
    # gap) and counted block_timeout (1 s) after: a few pings both ways, then 1.5 s, so
    # iperf3's last losses are counted before.
    settle = ping(wgs["a"], WG_ADDR["b"], 3, 0.2, 15)
    assert settle["received"] == 3, settle
    time.sleep(1.5)
    lost_before = {n: g.status()["tunnels"][0]["datagrams_lost"] for n, g in gw.items()}
    stream = lab.spawn(
        net.a.host_ns,
        ["ping", "-n", "-q", "-c", "200", "-i", "0.05", "-W", "1", WG_ADDR["b"]],
        30,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(3.0)
    up1 = net.a.uplink("up1")
    up1.blackhole()
    holed = time.time()
    out, _ = stream.communicate(timeout=30)
    dead = [e["ts"] - holed for e in gw["a"].events("path.dead") if e["uplink"] == "up1"]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    hs_after = {n: w.latest_handshake() for n, w in wgs.items()}
    init_after = {n: w.initiations() for n, w in wgs.items()}
    print(f"ping stream with up1 of site a black-holed: {m.group(0)}; up1 paths dead after "
          f"{[round(d, 2) for d in dead]} s; latest handshake {hs_before} → {hs_after}; "
          f"initiations {init_before} → {init_after}")  # fmt: skip
    assert dead, "the black-holed uplink's paths never died (was it cut?)"
    assert m.group(1) == m.group(2) == "200", out
    assert hs_after == hs_before
    assert init_after == init_before
    for name in ("a", "b"):
        (tunnel,) = gw[name].status()["tunnels"]
        assert tunnel["datagrams_lost"] == lost_before[name], (lost_before, tunnel)
