"""engarde migration in the lab: WireGuard (wireguard-go on both ends) over engarde's wire format
and over converted configs.

Topology: site "a" behind cone NAT with two uplinks (the engarde client side) and a public host
"srv" (the engarde server side, 198.51.100.10, UDP 5555). Each end runs wireguard-go (10.98.0.1
on a, 10.98.0.2 on srv, ListenPort 51820); a's WireGuard peer has `Endpoint = 127.0.0.1:59401`
(engarde's listenAddr), srv's learns its peer's endpoint.

* `test_engarde_wire_interop[client|server]`: one side is warp in engarde mode, written by
  `warp migrate-engarde --one-side` from an engarde YAML, the other is the reference engarde
  (tests/lab/engarde_peer.py). Ping through WireGuard both ways, then a ping stream during
  which a's up1 is black-holed: not one ping is lost (every datagram went on both uplinks).
* `test_migrated_full_warp_configs`: both sides converted by `warp migrate-engarde` (full warp:
  FEC, keys exchanged with --far-public-key and the printed key pasted into the server's
  config, as docs/engarde-migration.md says): WireGuard pings both ways.
* `test_migrated_full_warp_configs_survive_a_modem_cut`: the same converted pair, the
  redundancy exactly as written: a ping stream during which one of the client's two modems
  is black-holed loses no ping (what engarde promised), and iperf3 still runs over the
  other modem.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netlab import Lab
from tests.lab.test_gateway import ROOT, WARP, cpe_firewall
from warp.keys import generate_private_key, public_key_of
from warp.status import query_status

PEER = str(Path(__file__).with_name("engarde_peer.py"))
SRV_PORT = 5555
GATE_PORT = 59401
WG_PORT = 51820
WG_ADDR = {"a": "10.98.0.1", "srv": "10.98.0.2"}
UAPI_DIR = Path("/var/run/wireguard")
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "debug"}


@dataclass
class Setup:
    lab: Lab
    ns: dict[str, str]
    srv_address: str
    wg_ifs: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(self, side: str, argv: list[str], name: str) -> subprocess.Popen[str]:
        log = self.lab.workdir / f"{name}.log"
        proc = self.lab.spawn(
            self.ns[side], argv, 90, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.lab.workdir / f"{name}.log").read_text(errors="replace")

    def engarde_yml(self) -> Path:
        path = self.lab.workdir / "engarde.yml"
        path.write_text(
            "client:\n"
            '  description: "lab client"\n'
            f'  listenAddr: "127.0.0.1:{GATE_PORT}"\n'
            f'  dstAddr: "{self.srv_address}:{SRV_PORT}"\n'
            f'  excludedInterfaces: ["{self.wg_ifs["a"]}"]\n'
            "server:\n"
            f'  listenAddr: ":{SRV_PORT}"\n'
            f'  dstAddr: "127.0.0.1:{WG_PORT}"\n'
            "  clientTimeout: 30\n"
        )
        return path

    def migrate(self, side: str, role: str, *extra: str) -> tuple[Path, str]:
        """`warp migrate-engarde` (no network: run here); the config path and its stderr."""
        out = self.lab.workdir / f"{side}.toml"
        res = subprocess.run(
            [*WARP, "migrate-engarde", str(self.engarde_yml()), "--role", role, "-o", str(out),
             "--force", "--control-socket", str(self.lab.workdir / f"{side}.sock"), *extra],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return out, res.stderr

    def warp(self, side: str, config: Path) -> dict[str, Any]:
        self.spawn(side, [*WARP, "run", str(config)], f"warp-{side}")
        sock = self.lab.workdir / f"{side}.sock"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sock.exists():
                with contextlib.suppress(Exception):
                    return query_status(str(sock))
            time.sleep(0.05)
        raise AssertionError(self.log(f"warp-{side}"))

    def status(self, side: str) -> dict[str, Any]:
        return query_status(str(self.lab.workdir / f"{side}.sock"))

    def wireguard(self, keys: dict[str, bytes]) -> None:
        """wireguard-go on both ends; a's peer Endpoint is the local engarde/warp gate."""
        for side, other in (("a", "srv"), ("srv", "a")):
            ifname = self.wg_ifs[side]
            proc = self.spawn(side, ["wireguard-go", "-f", ifname], f"wg-{side}")
            wait_until = time.monotonic() + 10
            while not (UAPI_DIR / f"{ifname}.sock").exists():
                assert proc.poll() is None and time.monotonic() < wait_until, self.log(f"wg-{side}")
                time.sleep(0.02)
            key = self.lab.workdir / f"wg-{side}.key"
            key.write_text(base64.b64encode(keys[side]).decode() + "\n")
            key.chmod(0o600)
            peer = ["peer", base64.b64encode(public_key_of(keys[other])).decode()]
            if side == "a":
                peer += ["endpoint", f"127.0.0.1:{GATE_PORT}"]
            peer += ["allowed-ips", f"{WG_ADDR[other]}/32"]
            run = self.lab.run
            run(self.ns[side], ["wg", "set", ifname, "listen-port", str(WG_PORT),
                                "private-key", str(key), *peer])  # fmt: skip
            run(self.ns[side], ["ip", "addr", "add", f"{WG_ADDR[side]}/24", "dev", ifname])
            run(self.ns[side], ["ip", "link", "set", ifname, "up"])

    def full_warp_pair(self) -> None:
        """Both sides converted by `warp migrate-engarde` (full warp), keys exchanged as the
        docs say (server first, client with --far-public-key, the client's printed key pasted
        into the server's config), checked, and running."""
        server_config, server_err = self.migrate("srv", "server")
        server_key = re.search(r"public key \(give it to the client\): (\S+)", server_err)
        assert server_key, server_err
        client_config, client_err = self.migrate(
            "a", "client", "--far-public-key", server_key.group(1)
        )
        client_key = re.search(r"public key \(give it to the server\): (\S+)", client_err)
        assert client_key, client_err
        text, count = re.subn(
            r'^public_key = "[^"]+"  # PLACEHOLDER: REPLACE$',
            f'public_key = "{client_key.group(1)}"',
            server_config.read_text(),
            flags=re.M,
        )
        assert count == 1
        server_config.write_text(text)
        for config in (server_config, client_config):
            check = subprocess.run([*WARP, "check", str(config)], capture_output=True, text=True,
                                   timeout=30, check=False)  # fmt: skip
            assert check.returncode == 0, check.stderr
        self.warp("srv", server_config)
        self.warp("a", client_config)

    def ping(self, side: str, dest: str, count: int, interval: float) -> tuple[int, int]:
        out = self.lab.run(
            self.ns[side],
            ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", "1", dest],
            count * interval + 15,
            check=False,
        ).stdout
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2))

    def iperf3(self, client: str, server: str, seconds: int = 5) -> float:
        """iperf3 TCP from ``client`` to a one-shot server on ``server``'s WireGuard address;
        received Mbit/s."""
        srv = self.lab.spawn(
            self.ns[server],
            ["iperf3", "-s", "-1", "-B", WG_ADDR[server]],
            seconds + 20,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            listening = ["ss", "-Hltn", "sport", "=", ":5201"]
            while not self.lab.run(self.ns[server], listening).stdout.strip():
                assert time.monotonic() < deadline and srv.poll() is None, "iperf3 server not up"
                time.sleep(0.05)
            res = self.lab.run(
                self.ns[client],
                ["iperf3", "-c", WG_ADDR[server], "-t", str(seconds), "-J"],
                seconds + 15,
                check=False,
            )
        finally:
            self.lab.stop(srv)
        report = json.loads(res.stdout)
        assert not report.get("error"), report.get("error")
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


@pytest.fixture
def setup(lab: Lab) -> Iterator[Setup]:
    a = lab.add_site("a", "cone", uplinks=2)
    cpe_firewall(a)
    srv = lab.add_public_host("srv")
    unique = lab.prefix[2:]  # "<pid>x<n>": wireguard-go's UAPI sockets are global
    # "wg…" names: the converted server config excludes "^wg" from its uplinks.
    s = Setup(lab, {"a": a.host_ns, "srv": srv.ns}, srv.address,
              wg_ifs={"a": f"wg{unique}c", "srv": f"wg{unique}s"})  # fmt: skip
    assert all(len(name) <= 15 for name in s.wg_ifs.values())
    try:
        yield s
    finally:
        for proc in reversed(s.procs):
            lab.stop(proc)
        for ifname in s.wg_ifs.values():
            with contextlib.suppress(OSError):
                (UAPI_DIR / f"{ifname}.sock").unlink()


@pytest.mark.parametrize("warp_side", ["client", "server"])
def test_engarde_wire_interop(setup: Setup, warp_side: str) -> None:
    s = setup
    lab = s.lab
    peer = [sys.executable, PEER]
    if warp_side == "client":
        s.spawn("srv", [*peer, "server", "--listen", f"0.0.0.0:{SRV_PORT}",
                        "--dst", f"127.0.0.1:{WG_PORT}", "--client-timeout", "30",
                        "--lifetime", "80"], "engarde-srv")  # fmt: skip
        config, _ = s.migrate("a", "client", "--one-side")
        warp_ns = "a"
    else:
        config, _ = s.migrate("srv", "server", "--one-side")
        s.warp("srv", config)
        s.spawn("a", [*peer, "client", "--listen", f"127.0.0.1:{GATE_PORT}",
                      "--dst", f"{s.srv_address}:{SRV_PORT}", "--ifaces", "up1,up2",
                      "--lifetime", "80"], "engarde-a")  # fmt: skip
        warp_ns = "srv"
    assert "[tunnels.wireguard.engarde]" in config.read_text()
    if warp_side == "client":
        s.warp("a", config)
    s.wireguard({"a": generate_private_key(), "srv": generate_private_key()})

    first = s.ping("a", WG_ADDR["srv"], 5, 0.2)
    assert first[1] >= 4, (first, s.log("warp-" + warp_ns), s.log("wg-a")[-2000:])
    back = s.ping("srv", WG_ADDR["a"], 5, 0.2)
    assert back == (5, 5), back
    status = s.status(warp_ns)
    active = sorted(
        (p["uplink"], p["remote_address"]) for p in status["paths"] if p["state"] == "active"
    )
    print(f"\nwarp as engarde {warp_side}: ping a→srv {first}, srv→a {back}; "
          f"active paths {active}")  # fmt: skip
    assert len(active) == 2, status["paths"]  # client: up1, up2 → srv; server: 2 client addrs

    # Ping stream (50 ms, 100 pings ≈ 5 s); black-hole a's up1 1.5 s in: no ping lost.
    stream = lab.spawn(
        s.ns["a"],
        ["ping", "-n", "-q", "-c", "100", "-i", "0.05", "-W", "1", WG_ADDR["srv"]],
        30,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(1.5)
    lab.sites["a"].uplink("up1").blackhole()
    out, _ = stream.communicate(timeout=30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    after = s.status(warp_ns)
    rx = {(p["uplink"], p["remote_address"]): p["rx_packets"] for p in after["paths"]}
    print(f"ping stream with a's up1 black-holed: {m.group(0)}; warp {warp_side} path rx "
          f"{rx}; tunnel {after['tunnels'][0]}")  # fmt: skip
    assert m.group(1) == m.group(2) == "100", out
    assert after["tunnels"][0]["datagrams_out"] > 100


def test_migrated_full_warp_configs(setup: Setup) -> None:
    s = setup
    s.full_warp_pair()
    s.wireguard({"a": generate_private_key(), "srv": generate_private_key()})
    first = s.ping("a", WG_ADDR["srv"], 5, 0.2)
    assert first[1] >= 4, (first, s.log("warp-a")[-3000:], s.log("warp-srv")[-3000:])
    back = s.ping("srv", WG_ADDR["a"], 5, 0.2)
    assert back == (5, 5), back
    status = {side: s.status(side) for side in ("a", "srv")}
    active = {
        side: sorted(p["uplink"] for p in st["paths"] if p["state"] == "active")
        for side, st in status.items()
    }
    print(f"\nmigrated full-warp configs: ping a→srv {first}, srv→a {back}; active paths "
          f"{active}; session {status['a']['session']['handshake_state']}")  # fmt: skip
    assert active["a"] == ["up1", "up2"], status["a"]["paths"]
    assert status["a"]["session"]["handshake_state"] == "established"


def test_migrated_full_warp_configs_survive_a_modem_cut(setup: Setup) -> None:
    """engarde's promise, kept by the converted configs as written: one of the client's two
    modems dies mid-ping and no ping is lost; traffic goes on over the other."""
    s = setup
    lab = s.lab
    s.full_warp_pair()
    s.wireguard({"a": generate_private_key(), "srv": generate_private_key()})
    first = s.ping("a", WG_ADDR["srv"], 5, 0.2)
    assert first[1] >= 4, (first, s.log("warp-a")[-3000:], s.log("warp-srv")[-3000:])
    lost_before = {side: s.status(side)["tunnels"][0]["datagrams_lost"] for side in ("a", "srv")}

    # Ping stream (50 ms, 200 pings = 10 s); black-hole a's up1 3 s in.
    stream = lab.spawn(
        s.ns["a"],
        ["ping", "-n", "-q", "-c", "200", "-i", "0.05", "-W", "1", WG_ADDR["srv"]],
        40,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(3.0)
    lab.sites["a"].uplink("up1").blackhole()
    out, _ = stream.communicate(timeout=40)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    sent, received = int(m.group(1)), int(m.group(2))
    lost = {
        side: s.status(side)["tunnels"][0]["datagrams_lost"] - lost_before[side]
        for side in ("a", "srv")
    }
    # With the modem still cut: TCP through WireGuard over what is left.
    up_mbps = s.iperf3("a", "srv")
    down_mbps = s.iperf3("srv", "a")
    print(f"\nmigrated full-warp configs, a's up1 black-holed mid-ping: ping {sent} sent, "
          f"{received} received ({100 * (sent - received) / sent:.1f} % loss); warp datagrams "
          f"lost {lost}; iperf3 TCP 5 s with up1 cut: a→srv {up_mbps:.1f} Mbit/s, "
          f"srv→a {down_mbps:.1f} Mbit/s")  # fmt: skip
    assert sent == received == 200, out
    assert lost == {"a": 0, "srv": 0}, lost
    assert up_mbps > 1 and down_mbps > 1
