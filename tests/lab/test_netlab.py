"""The lab's own tests: NAT behaviour, uplink routing, black holes, impairments, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.lab.conftest import lab_unavailable, require_lab
from tests.lab.netlab import (
    UDP_TOOLS,
    Lab,
    LabError,
    NetemUnavailable,
    cleanup_stale,
    list_namespaces,
    read_jsonl,
)

pytestmark = [pytest.mark.lab, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def _ns_of(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]


# --- NAT kinds --------------------------------------------------------------------------------


def test_cone_nat_same_mapping_for_two_destinations(lab: Lab) -> None:
    site = lab.add_site("a", nat="cone", uplinks=1)
    up = site.uplinks[0]
    # the "public" namespace is where warp-map will live
    targets = [(lab.public_address, 3478), (lab.public_address, 3479)]
    echo = lab.udp_echo(lab.public_ns, targets, lifetime_s=10)
    res = lab.udp_probe(site.host_ns, targets, bind=("0.0.0.0", 40000), device=up.name)
    m1, m2 = res.mapping(targets[0]), res.mapping(targets[1])
    assert m1 is not None and m2 is not None, res
    assert m1 == m2, f"cone NAT must map endpoint-independently: {m1} != {m2}"
    assert m1[0] == up.public_address
    seen = {(e["local"], e["peer"]) for e in echo.received()}
    assert seen == {(f"{t[0]}:{t[1]}", f"{m1[0]}:{m1[1]}") for t in targets}


def test_symmetric_nat_new_port_per_destination(lab: Lab) -> None:
    site = lab.add_site("b", nat="symmetric", uplinks=1)
    up = site.uplinks[0]
    srv = lab.add_public_host("srv")
    targets = [(srv.address, 3478), (srv.address, 3479)]
    lab.udp_echo(srv.ns, targets, lifetime_s=10)
    res = lab.udp_probe(site.host_ns, targets, bind=("0.0.0.0", 40000), device=up.name)
    m1, m2 = res.mapping(targets[0]), res.mapping(targets[1])
    assert m1 is not None and m2 is not None, res
    assert m1[0] == m2[0] == up.public_address
    assert m1[1] != m2[1], f"symmetric NAT must use a new port per destination: {m1} {m2}"


SEND_ONE = """
import socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[3])))
ttl = [(socket.IPPROTO_IP, socket.IP_TTL, struct.pack("=i", int(sys.argv[4])))]
sock.sendmsg([b"punch"], ttl, 0, (sys.argv[1], int(sys.argv[2])))
"""


def _send_one(lab: Lab, ns: str, to: tuple[str, int], port: int, ttl: int = 64) -> None:
    lab.run(ns, [sys.executable, "-c", SEND_ONE, to[0], str(to[1]), str(port), str(ttl)])


@pytest.mark.parametrize(
    ("kind", "pinned"), [("port-restricted", False), ("cone-no-firewall", True)]
)
def test_router_without_firewall_pins_a_port_on_an_unsolicited_packet(
    lab: Lab, kind: str, pinned: bool
) -> None:
    """A packet from a peer that arrives before the host sent anything to it: a firewall drops
    it; without one its conntrack entry takes the host's mapping towards that peer, so the
    host's own packets to it leave from another port."""
    site = lab.add_site("a", nat=kind, uplinks=1)  # type: ignore[arg-type]
    up = site.uplinks[0]
    srv = lab.add_public_host("srv")
    _send_one(lab, srv.ns, (up.public_address, 40000), 3478)
    time.sleep(0.2)
    lab.udp_echo(srv.ns, [(srv.address, 3478)], lifetime_s=10)
    res = lab.udp_probe(site.host_ns, [(srv.address, 3478)], bind=("0.0.0.0", 40000))
    mapping = res.mapping((srv.address, 3478))
    assert mapping is not None, res
    assert (mapping[1] != 40000) == pinned, mapping


def test_ttl_2_crosses_its_own_router_and_dies_before_the_far_one(lab: Lab) -> None:
    """The low-TTL punch (interfaces.punch_ttl): sites are one routed hop apart."""
    a = lab.add_site("a", nat="cone-no-firewall", uplinks=1)
    b = lab.add_site("b", nat="cone-no-firewall", uplinks=1)
    far = (b.uplinks[0].public_address, 6000)
    _send_one(lab, a.host_ns, far, 5000, ttl=2)
    _send_one(lab, a.host_ns, far, 5001, ttl=64)
    time.sleep(0.2)
    assert "sport=5000" in a.conntrack() and "sport=5001" in a.conntrack()
    assert "sport=5000" not in b.conntrack() and "sport=5001" in b.conntrack()


# --- uplinks: routing, own public addresses ---------------------------------------------------


def test_bindtodevice_leaves_through_that_uplink(lab: Lab) -> None:
    site = lab.add_site("a", nat="cone", uplinks=3)
    srv = lab.add_public_host("srv")
    target = (srv.address, 5000)
    echo = lab.udp_echo(srv.ns, [target], lifetime_s=15)
    publics = {u.public_address for u in site.uplinks}
    assert len(publics) == 3, "each uplink has its own public address"
    for up in site.uplinks:
        # SO_BINDTODEVICE, no source address: the device's own default route is used
        res = lab.udp_probe(site.host_ns, [target], device=up.name)
        mapped = res.mapping(target)
        assert mapped is not None, (up.name, res)
        assert mapped[0] == up.public_address, (up.name, mapped)
        # bound to the uplink's address only: policy routing (from <addr> lookup <table>)
        res = lab.udp_probe(site.host_ns, [target], bind=(up.address, 0))
        mapped = res.mapping(target)
        assert mapped is not None and mapped[0] == up.public_address, (up.name, res)
    # unbound traffic takes the lowest-metric default: uplink 1
    res = lab.udp_probe(site.host_ns, [target])
    assert res.mapping(target) is not None
    assert res.mapping(target)[0] == site.uplinks[0].public_address  # type: ignore[index]
    assert {e["peer"].split(":")[0] for e in echo.received()} == publics


# --- black hole, down, runtime changes --------------------------------------------------------


def test_blackholed_uplink_delivers_nothing_either_way(lab: Lab) -> None:
    site = lab.add_site("a", nat="cone", uplinks=2)
    up1, up2 = site.uplinks
    srv = lab.add_public_host("srv")
    target = (srv.address, 5000)
    # each datagram is answered 20 times over 2 s: replies keep coming after the black hole
    echo = lab.udp_echo(srv.ns, [target], lifetime_s=20, replies=20, reply_interval_s=0.1)

    # inbound: open a mapping through up1, then black-hole up1 while replies are flowing
    log = lab.workdir / "probe-in.jsonl"
    argv = [sys.executable, str(UDP_TOOLS), "probe", "--to", f"{target[0]}:{target[1]}"]
    argv += ["--device", up1.name, "--timeout", "2", "--linger", "2.5", "--log", str(log)]
    probe = lab.spawn(site.host_ns, argv, lifetime_s=10, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 3
    while not read_jsonl(log) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read_jsonl(log), "no reply before the black hole"
    up1.blackhole()
    t_hole = time.time()
    probe.wait(10)
    late = [e for e in read_jsonl(log) if e["ts"] > t_hole + 0.05]
    assert late == [], f"black-holed uplink delivered inbound datagrams: {late}"
    sent_after = [e for e in echo.events() if e.get("event") == "sent" and e["ts"] > t_hole + 0.2]
    assert sent_after, "test is meaningless: the server sent nothing after the black hole"

    # outbound: nothing reaches the server through up1; up2 still works
    before = len(echo.received())
    res = lab.udp_probe(site.host_ns, [target], device=up1.name, timeout_s=1.0)
    assert res.mapping(target) is None and res.sent > 0 and res.received == 0, res
    assert len(echo.received()) == before, "black-holed uplink delivered outbound datagrams"
    res = lab.udp_probe(site.host_ns, [target], device=up2.name)
    assert res.mapping(target) is not None and res.mapping(target)[0] == up2.public_address  # type: ignore[index]
    # the link itself stays up
    link = lab.run(site.host_ns, ["ip", "-o", "link", "show", up1.name]).stdout
    assert "state UP" in link and "NO-CARRIER" not in link

    up1.restore()
    res = lab.udp_probe(site.host_ns, [target], device=up1.name)
    assert res.mapping(target) is not None


def test_downed_uplink_is_link_down_and_comes_back(lab: Lab) -> None:
    site = lab.add_site("a", nat="cone", uplinks=2)
    up1 = site.uplinks[0]
    target = (lab.public_address, 5000)
    lab.udp_echo(lab.public_ns, [target], lifetime_s=15)
    up1.set_down()
    link = lab.run(site.host_ns, ["ip", "-o", "link", "show", up1.name]).stdout
    assert "NO-CARRIER" in link, link
    res = lab.udp_probe(site.host_ns, [target], device=up1.name, timeout_s=0.5)
    assert res.mapping(target) is None
    up1.set_up()
    res = lab.udp_probe(site.host_ns, [target], device=up1.name, timeout_s=3)
    assert res.mapping(target) is not None and res.mapping(target)[0] == up1.public_address  # type: ignore[index]


def test_add_and_remove_uplink_at_runtime(lab: Lab) -> None:
    site = lab.add_site("a", nat="symmetric", uplinks=1)
    target = (lab.public_address, 5000)
    lab.udp_echo(lab.public_ns, [target], lifetime_s=15)
    up2 = site.add_uplink()
    assert up2.name == "up2" and up2.public_address == "203.0.113.12"
    res = lab.udp_probe(site.host_ns, [target], device=up2.name)
    assert res.mapping(target) is not None and res.mapping(target)[0] == up2.public_address  # type: ignore[index]
    site.remove_uplink(up2)
    links = lab.run(site.host_ns, ["ip", "-o", "link", "show"]).stdout
    assert "up2" not in links and "up1" in links
    res = lab.udp_probe(site.host_ns, [target], device=site.uplinks[0].name)
    assert res.mapping(target) is not None


def test_conntrack_flush_and_udp_timeout(lab: Lab) -> None:
    site = lab.add_site("a", nat="cone", uplinks=1)
    target = (lab.public_address, 5000)
    lab.udp_echo(lab.public_ns, [target], lifetime_s=15)
    site.set_udp_timeout(7, stream_seconds=9)
    out = lab.run(site.router_ns, ["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"])
    assert out.stdout.strip() == "7"
    # per namespace: the public namespace keeps the default
    out = lab.run(lab.public_ns, ["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"])
    assert out.stdout.strip() != "7"
    lab.udp_probe(site.host_ns, [target], bind=("0.0.0.0", 41000))
    assert "sport=41000" in site.conntrack()
    site.flush_conntrack()
    assert "sport=41000" not in site.conntrack()


def _ping(lab: Lab, ns: str, dev: str, dst: str, count: int = 3) -> tuple[int, float | None]:
    """(packets received, average RTT in ms or None) of a short bounded ping."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-I", dev, dst]
    out = lab.run(ns, argv, timeout=10, check=False).stdout
    received = int(out.split(" received")[0].rsplit(",", 1)[1])
    rtt = None
    if "rtt" in out:  # rtt min/avg/max/mdev = 0.040/0.052/0.064/0.010 ms
        rtt = float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])
    return received, rtt


def test_loss_and_rate_limit(lab: Lab) -> None:
    site = lab.add_site("a", nat="cone", uplinks=2)
    up1, up2 = site.uplinks
    assert _ping(lab, site.host_ns, up1.name, lab.public_address)[0] == 3
    up1.impair(loss_pct=100, direction="down")  # replies towards the host are lost
    assert _ping(lab, site.host_ns, up1.name, lab.public_address)[0] == 0
    assert _ping(lab, site.host_ns, up2.name, lab.public_address)[0] == 3
    up1.impair(loss_pct=100, direction="up")  # replaces "down": only requests are lost
    assert _ping(lab, site.host_ns, up1.name, lab.public_address)[0] == 0
    up1.clear_impairment()
    assert _ping(lab, site.host_ns, up1.name, lab.public_address)[0] == 3
    # partial loss is random per packet: 200 datagrams at 50 % loss
    echo = lab.udp_echo(lab.public_ns, [(lab.public_address, 7000)], lifetime_s=15, replies=0)
    up2.impair(loss_pct=50, direction="up")
    argv = ["send", "--to", f"{lab.public_address}:7000", "--count", "200", "--device", up2.name]
    assert json.loads(lab.python(site.host_ns, UDP_TOOLS, argv))["sent"] == 200
    time.sleep(0.3)
    assert 60 <= len(echo.received()) <= 140, len(echo.received())
    up2.impair(rate_kbit=2000)
    for ns, dev in ((site.host_ns, up2.name), (site.router_ns, up2.router_if)):
        qdisc = lab.run(ns, ["tc", "qdisc", "show", "dev", dev]).stdout
        assert "tbf" in qdisc and "rate 2Mbit" in qdisc, qdisc
    assert _ping(lab, site.host_ns, up2.name, lab.public_address)[0] == 3
    up2.clear_impairment()
    assert "tbf" not in lab.run(site.host_ns, ["tc", "qdisc", "show", "dev", up2.name]).stdout


def test_netem_delay_jitter_bursty_loss(lab: Lab) -> None:
    """With netem: delay, jitter and bursty loss take effect. Without it (this project's CI
    kernel has no CONFIG_NET_SCH_NETEM): asking for delay is refused with a clear error,
    never silently ignored."""
    site = lab.add_site("a", nat="cone", uplinks=1)
    up = site.uplinks[0]
    if not lab.has_netem:
        with pytest.raises(NetemUnavailable, match="netem"):
            up.impair(delay_ms=40, direction="both")
        with pytest.raises(NetemUnavailable):
            up.impair(gemodel=(1, 20, 100, 0))
        return
    rtt = _ping(lab, site.host_ns, up.name, lab.public_address)[1]
    assert rtt is not None and rtt < 20
    up.impair(delay_ms=40, direction="both")
    rtt = _ping(lab, site.host_ns, up.name, lab.public_address)[1]
    assert rtt is not None and rtt >= 80
    up.impair(delay_ms=10, jitter_ms=2, gemodel=(1, 20, 100, 0), rate_kbit=5000, direction="up")
    qdisc = lab.run(site.host_ns, ["tc", "qdisc", "show", "dev", up.name]).stdout
    assert "tbf" in qdisc and "gemodel" in qdisc and "delay 10ms" in qdisc, qdisc
    up.clear_impairment()
    rtt = _ping(lab, site.host_ns, up.name, lab.public_address)[1]
    assert rtt is not None and rtt < 20


# --- processes and teardown -------------------------------------------------------------------


def test_spawn_has_bounded_lifetime(lab: Lab) -> None:
    site = lab.add_site("a", uplinks=1)
    t0 = time.monotonic()
    proc = lab.spawn(site.host_ns, ["sleep", "60"], lifetime_s=0.5)
    assert proc.wait(10) == 124  # timeout(1)'s exit status
    assert time.monotonic() - t0 < 5
    out = lab.run(site.host_ns, ["ip", "-o", "addr", "show", "dev", "up1"]).stdout
    assert "10.1.1.2/24" in out
    with pytest.raises(LabError, match="not a namespace of this lab"):
        lab.run("some-other-ns", ["true"])


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    require_lab()
    links_before = _root_links()
    with Lab() as lab:
        a = lab.add_site("a", "cone", 3)
        lab.add_site("b", "symmetric", 2)
        lab.add_public_host("map")
        proc = lab.spawn(a.host_ns, ["sleep", "60"], lifetime_s=60)
        # a grandchild in its own process group, unknown to the lab: found via `ip netns pids`
        stray = lab.spawn(a.router_ns, ["setsid", "sleep", "60"], lifetime_s=60)
        names = lab.namespaces()
        assert len(names) == 6 and all(n.startswith(lab.prefix + "-") for n in names)
        assert set(names) <= set(list_namespaces())
        pids = lab.run(a.router_ns, ["ip", "netns", "pids", a.router_ns]).stdout.split()
    assert proc.returncode is not None and stray.returncode is not None
    assert _ns_of(lab.prefix) == []
    assert not lab.workdir.exists()
    assert pids and all(_gone(int(pid)) for pid in pids)
    assert _root_links() <= links_before, "the lab created links in the root namespace"


def test_teardown_on_failure() -> None:
    require_lab()
    prefix = ""
    with pytest.raises(ZeroDivisionError), Lab() as lab:
        prefix = lab.prefix
        lab.add_site("a", uplinks=1)
        lab.spawn(lab.public_ns, ["sleep", "60"], lifetime_s=60)
        _ = 1 / 0
    assert prefix and _ns_of(prefix) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_teardown_on_signal(sig: signal.Signals) -> None:
    """A run killed by SIGTERM or interrupted by Ctrl-C (SIGINT) still tears its lab down."""
    require_lab()
    script = textwrap.dedent(
        """
        import sys, time
        from tests.lab.netlab import Lab
        lab = Lab()
        site = lab.add_site("a", uplinks=1)
        lab.spawn(site.host_ns, ["sleep", "60"], lifetime_s=60)
        print(lab.prefix, flush=True)
        for _ in range(300):
            time.sleep(0.1)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert child.stdout is not None
        prefix = child.stdout.readline().strip()
        assert prefix.startswith("wl"), prefix
        assert _ns_of(prefix)
        child.send_signal(sig)
        child.wait(15)
        assert _ns_of(prefix) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        cleanup_stale()


def test_cleanup_stale_removes_only_dead_owners() -> None:
    require_lab()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: the "crashed run"
    stale = f"wl{dead.pid}x0-pub"
    alive = f"wl{os.getpid()}x999-pub"
    try:
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        removed = cleanup_stale()
        assert stale in removed and alive not in removed
        assert stale not in list_namespaces() and alive in list_namespaces()
    finally:
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_udp_tools_summary_is_json(lab: Lab) -> None:
    """udp_tools ``send`` works from a public host (fire and forget) and reports JSON."""
    srv = lab.add_public_host("srv")
    cli = lab.add_public_host("cli")
    echo = lab.udp_echo(srv.ns, [(srv.address, 6000)], lifetime_s=10)
    argv = ["send", "--to", f"{srv.address}:6000", "--count", "3", "--interval", "0.01"]
    out = json.loads(lab.python(cli.ns, UDP_TOOLS, argv))
    assert out["sent"] == 3
    deadline = time.monotonic() + 3
    while len(echo.received()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {e["peer"].split(":")[0] for e in echo.received()} == {cli.address}


def test_unbuildable_lab_fails_under_ci_and_skips_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="under CI"):
        lab_unavailable("not root")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not root"):
        lab_unavailable("not root")
