"""Two `warp run` gateways behind NAT, a `warp-map` in the public namespace, real traffic.

Topology: sites "a" and "b" behind cone NAT with two uplinks each (tests/lab/netlab.py), the
map on 198.51.100.1:13116. Each site runs `warp run` with a loopback (or unix) gate, and
`tests/lab/gw_app.py` as the application on both ends: numbered datagrams whose content is
checked byte-exact, a JSON summary at the end.

The NAT routers get a CPE-style input filter (`cpe_firewall`): unsolicited inbound UDP to the
router itself is dropped, as any home router does. Without it, Linux conntrack *confirms* an
entry for a punch packet that arrives before the local side has sent (INPUT policy accept, no
listener), and the local side's own mapping then clashes with it and gets a new port: both
sides keep refreshing the wrong entries and cone-to-cone punching never succeeds in the lab
(the two NATs are one veth apart, so the "send at the same time" window is microseconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netlab import Lab, Site
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.status import query_status

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _command(script: str, module: str) -> list[str]:
    """The console script if installed, else the same entry point through ``python -m``."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


WARP = _command("warp", "warp.cli")
WARP_MAP = _command("warp-map", "warp_map_server.cli")
APP = str(Path(__file__).with_name("gw_app.py"))
MAP_PORT = 13116
GATE_PORT = 59401
APP_PORT = 59500

CPE_FIREWALL = """table ip cpe {
    chain input {
        type filter hook input priority filter - 1; policy accept;
        iifname "wan" meta l4proto udp ct state new drop
    }
}
"""


def cpe_firewall(site: Site) -> None:
    """Drop unsolicited inbound UDP to the NAT router itself (before conntrack confirms it)."""
    site.lab.run(site.router_ns, ["nft", "-f", "-"], input=CPE_FIREWALL)


@dataclass
class Gw:
    site: Site
    config: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    started_at: float = 0.0

    def status(self) -> dict[str, Any]:
        """The control socket's snapshot (the socket file is reachable from any namespace)."""
        return query_status(str(self.socket))

    def status_cli(self) -> dict[str, Any]:
        """The same through `warp status --json` run in the site's namespace."""
        out = self.site.lab.run(
            self.site.host_ns, [*WARP, "status", "--socket", str(self.socket), "--json"]
        ).stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def first_event_ts(self, name: str, **match: str) -> float | None:
        for entry in self.events(name):
            if all(entry.get(k) == v for k, v in match.items()):
                return float(entry["ts"])
        return None

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found

    def warp_pid(self) -> int:
        """The pid of the `warp` process itself (spawn runs it under `timeout`)."""
        assert self.proc is not None
        for _ in range(100):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                children = (task / "children").read_text().split()
                if children:
                    return int(children[0])
            time.sleep(0.01)
        raise AssertionError("warp process not found")


@dataclass
class Net:
    lab: Lab
    a: Site
    b: Site
    map_key: bytes
    keys: dict[str, bytes] = field(default_factory=dict)
    gws: dict[str, Gw] = field(default_factory=dict)
    map_proc: subprocess.Popen[str] | None = None

    @property
    def map_log(self) -> Path:
        return self.lab.workdir / "map.log"

    def write_config(self, name: str, gate: str, *, k: int = 2, n: int = 4, extra: str = "") -> Gw:
        site = self.a if name == "a" else self.b
        other = "b" if name == "a" else "a"
        w = self.lab.workdir
        path = w / f"{name}.toml"
        path.write_text(
            f'private_key = "{encode_key(self.keys[name])}"\n'
            f"{extra}"
            "[interfaces]\n"
            'inclusion_patterns = ["^up"]\n'
            "exclusion_patterns = []\n"
            'holepunch_keep_alive_interval = "1s"\n'
            'path_timeout = "3s"\n'
            "[warp_map]\n"
            f'address = "{self.lab.public_address}:{MAP_PORT}"\n'
            f'public_key = "{encode_key(public_key_of(self.map_key))}"\n'
            "[far_gate]\n"
            f'public_key = "{encode_key(public_key_of(self.keys[other]))}"\n'
            f"[tunnels.app.gate]\n{gate}\n"
            "[tunnels.app.transport.redundancy]\n"
            f"num_shards = {n}\nrequired_shards = {k}\n"
            f'[control]\nsocket = "{w / (name + ".sock")}"\n'
            '[log]\nformat = "json"\n'
        )
        gw = Gw(site, path, w / f"{name}.sock", w / f"{name}.log")
        self.gws[name] = gw
        return gw

    def start(self, name: str, lifetime_s: float = 120) -> Gw:
        gw = self.gws[name]
        gw.started_at = time.time()
        gw.proc = self.lab.spawn(
            gw.site.host_ns,
            [*WARP, "run", str(gw.config)],
            lifetime_s,
            stdout=gw.log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        return gw

    def wait_registered(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        gw = self.gws[name]
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if gw.socket.exists():
                try:
                    last = gw.status()
                except Exception:
                    last = {}
                if last.get("map", {}) and last["map"]["registered"]:
                    return last
            assert gw.proc is not None and gw.proc.poll() is None, gw.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"{name} not registered: {last}\n{gw.log.read_text()}")

    def wait_paths(self, name: str, count: int, timeout: float = 10.0) -> dict[str, Any]:
        gw = self.gws[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = gw.status()
            if sum(p["state"] == "active" for p in snap["paths"]) >= count:
                return snap
            time.sleep(0.05)
        raise AssertionError(f"{name}: fewer than {count} active paths: {snap['paths']}")

    def app(self, name: str, args: list[str], lifetime_s: float = 60) -> subprocess.Popen[str]:
        site = self.a if name == "a" else self.b
        return self.lab.spawn(
            site.host_ns,
            [sys.executable, APP, *args, "--lifetime", f"{lifetime_s:g}"],
            lifetime_s + 10,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )


def app_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    results = [x for x in lines if "sent" in x]
    assert results, out
    result: dict[str, Any] = results[-1]
    return result


def loopback_gate() -> str:
    return f"ipv4 = true\napplication_to_gate = {GATE_PORT}\ngate_to_application = {APP_PORT}"


@pytest.fixture
def net(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Net]:
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
        240,
        stdout=net.map_log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 10
    while "map.listening" not in net.map_log.read_text():
        assert time.monotonic() < deadline, net.map_log.read_text()
        assert net.map_proc.poll() is None, net.map_log.read_text()
        time.sleep(0.02)
    try:
        yield net
    finally:
        for gw in net.gws.values():
            if gw.proc is not None:
                lab.stop(gw.proc)
        lab.stop(net.map_proc)
        keep = os.environ.get("WARP_LAB_KEEP")  # a directory: keep the logs of this test
        if keep:
            kept = Path(keep) / request.node.name
            kept.mkdir(parents=True, exist_ok=True)
            for log in lab.workdir.glob("*.log"):
                (kept / log.name).write_bytes(log.read_bytes())


def app_args(tag: int, count: int, rate: float, expect: int, *more: str) -> list[str]:
    return [
        "--bind", f"127.0.0.1:{APP_PORT}", "--to", f"127.0.0.1:{GATE_PORT}",
        "--tag", str(tag), "--peer-tag", str(3 - tag),
        "--count", str(count), "--rate", str(rate), "--expect", str(expect), *more,
    ]  # fmt: skip


def test_cone_nat_first_datagram_then_10k_each_way_exactly_once(net: Net) -> None:
    """First datagram ≤ 1 s after the second gateway starts; 10 000 datagrams at 1 000/s each
    way, each delivered exactly once and byte-exact; status reflects it; SIGTERM deregisters
    (the other side's map client sees the peer's endpoint list empty) and removes the socket."""
    gate = loopback_gate()
    a = net.write_config("a", gate)
    b = net.write_config("b", gate)
    net.start("a")
    net.wait_registered("a")
    # Site a's application sends 200/s for 3 s; b starts 1 s into that.
    sink = net.app("b", app_args(2, 0, 0, 1, "--grace", "10"), lifetime_s=20)
    source = net.app("a", app_args(1, 600, 200, 0, "--grace", "0"), lifetime_s=20)
    time.sleep(1.0)  # both applications up
    net.start("b")
    first = app_result(sink, 25)
    assert first["unique"] == 1 and first["corrupt"] == 0, first
    ttfd = first["first_rx"] - b.started_at
    started = b.events("gateway.started")[0]["ts"]
    print(f"\ntime to first datagram: {ttfd:.3f} s after spawning the second gateway "
          f"({first['first_rx'] - started:.3f} s after its gateway.started)")  # fmt: skip
    assert ttfd <= 1.0
    source.communicate(timeout=30)

    # 10 000 each way at 1 000/s, both directions at once.
    count = 10_000
    start_at = f"{time.time() + 1.0:.3f}"
    pa = net.app("a", app_args(1, count, 1000, count, "--start-at", start_at, "--sizes",
                               "64,200,1000,1400,3000"), lifetime_s=40)  # fmt: skip
    pb = net.app("b", app_args(2, count, 1000, count, "--start-at", start_at, "--sizes",
                               "1400,100,2500"), lifetime_s=40)  # fmt: skip
    ra, rb = app_result(pa, 60), app_result(pb, 60)
    for side, result in (("a", ra), ("b", rb)):
        print(f"{side}: sent {result['sent']} in {result['send_seconds']} s, received "
              f"{result['unique']} unique, {result['duplicates']} dup, {result['corrupt']} "
              f"corrupt, latency p50 {result['latency_ms_p50']} ms p99 "
              f"{result['latency_ms_p99']} ms")  # fmt: skip
        assert result["sent"] == count, result
        assert result["unique"] == count, result
        assert result["duplicates"] == 0 and result["corrupt"] == 0, result
        assert result["foreign"] == 0, result

    # Status reflects it.
    for name in ("a", "b"):
        snap = net.gws[name].status_cli()
        assert snap["session"]["handshake_state"] == "established"
        assert snap["map"]["registered"] is True
        assert set(snap["map"]["reflexive"]) == {"up1", "up2"}
        assert all(v and v.startswith("203.0.113.") for v in snap["map"]["reflexive"].values())
        active = [p for p in snap["paths"] if p["state"] == "active"]
        assert len(active) == 4, snap["paths"]
        assert all(p["tx_packets"] > 0 and p["rx_packets"] > 0 for p in active), active
        (tunnel,) = snap["tunnels"]
        assert tunnel["datagrams_in"] >= count and tunnel["datagrams_out"] >= count
        assert tunnel["datagrams_lost"] == 0, tunnel

    # SIGTERM a: exit 0, socket file gone, deregistered (b is told a has no endpoints).
    assert a.proc is not None
    pushes_before = len(b.events("map.peer_endpoints"))
    assert net.lab.stop(a.proc, grace_s=5) == 0, a.log.read_text()[-2000:]
    assert not a.socket.exists()
    assert a.events("map.deregistered")[0]["acknowledged"] == "True"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        pushes = b.events("map.peer_endpoints")[pushes_before:]
        if any(p.get("endpoints", "") == "" for p in pushes):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"b never saw a deregister: {b.events('map.peer_endpoints')}")
    key_a = encode_key(public_key_of(net.keys["a"]))[:12]
    assert f"map.deregistered client={key_a}" in net.map_log.read_text()


def establish(net: Net, gate: str, **kw: Any) -> tuple[Gw, Gw]:
    a = net.write_config("a", gate, **kw)
    b = net.write_config("b", gate, **kw)
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    net.wait_paths("b", 4)
    return a, b


def paths_of(snap: dict[str, Any], uplink: str) -> list[dict[str, Any]]:
    return [p for p in snap["paths"] if p["uplink"] == uplink]


def socket_count(pid: int) -> int:
    """UDP sockets the process holds (fd inodes found in its namespace's /proc/net/udp*);
    control-socket connections of status queries are not counted."""
    udp: set[str] = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                udp.add(line.split()[9])
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in udp:
            count += 1
    return count


def test_blackholed_uplink_loses_nothing_dies_and_comes_back(net: Net) -> None:
    """(k, n) = (2, 4): black-holing one of a's uplinks mid-stream loses no datagram; its paths
    are `dead` within path_timeout (3 s); restored, they are `active` again and carry shards."""
    a, b = establish(net, loopback_gate(), k=2, n=4)
    count = 12_000
    start_at = time.time() + 1.0
    pa = net.app("a", app_args(1, count, 1000, count, "--start-at", f"{start_at:.3f}"), 40)
    pb = net.app("b", app_args(2, count, 1000, count, "--start-at", f"{start_at:.3f}"), 40)
    time.sleep(max(0.0, start_at + 2.0 - time.time()))
    up1 = net.a.uplink("up1")
    up1.blackhole()
    holed_at = time.monotonic()
    holed_wall = time.time()
    while time.monotonic() - holed_at < 6:
        snap = a.status()
        if all(p["state"] == "dead" for p in paths_of(snap, "up1")):
            break
        time.sleep(0.05)
    dead = [e["ts"] for e in a.events("path.dead") if e["uplink"] == "up1"]
    assert len(dead) == 2, snap["paths"]
    dead_after = max(dead) - holed_wall
    print(f"\nup1 paths dead {dead_after:.3f} s after the black hole (path_timeout 3 s)")
    # dead within path_timeout of the last authenticated packet, checked at the next prober
    # tick; the last packet came just before the black hole (1000 datagrams/s)
    assert dead_after <= 3.0 + 0.3, snap["paths"]
    time.sleep(1.0)
    up1.restore()
    restored_at = time.monotonic()
    restored_wall = time.time()
    active_after = None
    while time.monotonic() - restored_at < 6:
        snap = a.status()
        if all(p["state"] == "active" for p in paths_of(snap, "up1")):
            active = [e["ts"] for e in a.events("path.active") if e["uplink"] == "up1"]
            active_after = max(active) - restored_wall
            break
        time.sleep(0.05)
    print(f"up1 paths active again {active_after} s after restore")
    assert active_after is not None, snap["paths"]
    tx_then = sum(p["tx_packets"] for p in paths_of(snap, "up1"))
    time.sleep(1.0)
    tx_now = sum(p["tx_packets"] for p in paths_of(a.status(), "up1"))
    assert tx_now > tx_then + 500, (tx_then, tx_now)  # carries shards again
    ra, rb = app_result(pa, 60), app_result(pb, 60)
    for result in (ra, rb):
        assert result["sent"] == count, result
        assert result["unique"] == count and result["duplicates"] == 0, result
        assert result["corrupt"] == 0, result
    for gw in (a, b):
        (tunnel,) = gw.status()["tunnels"]
        assert tunnel["datagrams_lost"] == 0, tunnel


def test_uplink_added_at_runtime_is_used_and_removed_cleanly(net: Net) -> None:
    """A new uplink (veth + address) carries shards within 1 s; removed, its paths go and the
    process holds exactly the sockets it held before."""
    a, _b = establish(net, loopback_gate(), k=2, n=4)
    pid = a.warp_pid()
    sockets_before = socket_count(pid)
    threads_before = len(list(Path(f"/proc/{pid}/task").iterdir()))
    count = 8_000
    start_at = time.time() + 0.5
    pa = net.app("a", app_args(1, count, 1000, count, "--start-at", f"{start_at:.3f}"), 30)
    pb = net.app("b", app_args(2, count, 1000, count, "--start-at", f"{start_at:.3f}"), 30)
    time.sleep(max(0.0, start_at + 1.5 - time.time()))
    added_wall = time.time()
    # (Site.add_uplink writes the router's SNAT rule before the host address appears: the
    # gateway's first packet from it is NATed, no conntrack entry to forget.)
    up3 = net.a.add_uplink()
    added_at = time.monotonic()
    used = False
    while time.monotonic() - added_at < 5:
        snap = a.status()
        if any(p["tx_packets"] > 0 and p["state"] == "active" for p in paths_of(snap, up3.name)):
            used = True
            break
        time.sleep(0.02)
    assert used, snap
    # path.active in the gateway's own log (traffic runs at 1000/s: an active path carries
    # shards within a millisecond); polling the status socket would add its own latency.
    active_ts = a.first_event_ts("path.active", uplink=up3.name)
    assert active_ts is not None
    used_after = active_ts - added_wall
    print(f"\nnew uplink {up3.name} active and carrying shards {used_after:.3f} s after it "
          "was added")  # fmt: skip
    assert used_after <= 1.0, snap
    assert socket_count(pid) == sockets_before + 1, (sockets_before, socket_count(pid))
    # The path can carry shards before the map has confirmed the new uplink's registration
    # (the peer learns it from authenticated packets): wait for the reflexive address.
    reflexive_deadline = time.monotonic() + 3
    while not (snap["map"]["reflexive"].get(up3.name) or "").startswith(up3.public_address):
        assert time.monotonic() < reflexive_deadline, snap["map"]
        time.sleep(0.05)
        snap = a.status()
    time.sleep(1.5)
    net.a.remove_uplink(up3)
    removed_at = time.monotonic()
    gone_after = None
    while time.monotonic() - removed_at < 5:
        snap = a.status()
        if not paths_of(snap, up3.name) and all(u["name"] != up3.name for u in snap["uplinks"]):
            gone_after = time.monotonic() - removed_at
            break
        time.sleep(0.02)
    print(f"{up3.name} dropped {gone_after} s after removal")
    assert gone_after is not None, snap
    deadline = time.monotonic() + 2  # the transport closes on a later loop iteration
    while socket_count(pid) != sockets_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert socket_count(pid) == sockets_before
    assert len(list(Path(f"/proc/{pid}/task").iterdir())) == threads_before
    ra, rb = app_result(pa, 40), app_result(pb, 40)
    for result in (ra, rb):
        assert result["unique"] == count and result["duplicates"] == 0, result
        assert result["corrupt"] == 0, result
