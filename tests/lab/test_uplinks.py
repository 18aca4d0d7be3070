"""Uplinks with real sockets.

- Static (loopback) uplinks, no root: datagrams both ways on each uplink, counters, a handler
  that raises, rebuild after `max_consecutive_failures`, nothing left open after close.
- Netlink discovery, root: in fresh network namespaces (veth pairs to a peer namespace), the
  manager finds the right interfaces, binds a socket to each, sees an interface added at
  runtime within 1 s through netlink events (rescan interval 60 s), and closes its socket when
  it is deleted (counted in /proc/self/fd), leaving no task behind.

The namespace part runs this file as a script inside the namespace (`ip netns exec NS python
tests/lab/test_uplinks.py agent ...`); the agent prints one JSON object of observations and
the test asserts on them. Namespaces are removed in `finally`, also on failure or timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path as FsPath
from typing import Any, NoReturn

import pytest

ROOT = FsPath(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as the in-namespace agent
    sys.path.insert(0, str(ROOT))

from warp.paths.uplinks import (  # noqa: E402
    Uplink,
    UplinkEvent,
    UplinkEventKind,
    UplinkManager,
)

Address = tuple[str, int]
LOOPS = ["asyncio", "uvloop"]


def run_loop(kind: str, main: Callable[[], Awaitable[Any]]) -> Any:
    async def wrapper() -> Any:
        return await main()

    if kind == "uvloop":
        import uvloop

        return uvloop.run(wrapper())
    return asyncio.run(wrapper())


def socket_fds() -> int:
    """Sockets this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def other_tasks() -> list[str]:
    current = asyncio.current_task()
    return sorted(t.get_name() for t in asyncio.all_tasks() if t is not current)


async def recv_from(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, Address]:
    """Receive one datagram on a non-blocking socket (uvloop has no loop.sock_recvfrom)."""
    got: list[tuple[bytes, Address]] = []

    def ready() -> bool:
        try:
            data, addr = sock.recvfrom(65536)
        except BlockingIOError:
            return False
        got.append((data, (addr[0], addr[1])))
        return True

    if await wait_for(ready, timeout) < 0:
        raise TimeoutError("no datagram")
    return got[0]


async def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.005) -> float:
    """Seconds until pred() held (bounded loop), or -1 if it never did within timeout."""
    start = time.monotonic()
    for _ in range(int(timeout / step) + 1):
        if pred():
            return time.monotonic() - start
        await asyncio.sleep(step)
    return -1.0


# --- static (loopback) uplinks: no root --------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_static_uplinks_on_loopback(loop_kind: str) -> None:
    async def main() -> None:
        base_fds = socket_fds()
        received: list[tuple[str, bytes, Address]] = []
        events: list[UplinkEvent] = []

        def on_datagram(uplink: Uplink, data: bytes, addr: Address) -> None:
            if data == b"boom":
                raise RuntimeError("handler bug")
            received.append((uplink.name, data, addr))

        manager = UplinkManager.from_static(
            [("lo0", "127.0.0.1"), ("lo1", "127.0.0.2")],
            on_datagram=on_datagram,
            on_change=events.append,
            max_consecutive_failures=3,
        )
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        try:
            await manager.start()
            assert set(manager.uplinks) == {"lo0", "lo1"}
            assert [(e.name, e.uplink.name) for e in events] == [
                ("uplink.added", "lo0"),
                ("uplink.added", "lo1"),
            ]
            assert socket_fds() == base_fds + 3  # two uplinks + the peer, no netlink socket
            assert other_tasks() == ["warp.uplinks"]
            for name, uplink in manager.uplinks.items():
                assert uplink.local_port > 0 and not uplink.bound_to_device
                # peer → uplink: on_datagram gets the uplink and the sender
                peer.sendto(b"boom", uplink.local_address)  # the handler raises: survives
                before = len(received)
                peer.sendto(b"ping " + name.encode(), uplink.local_address)

                def arrived(before: int = before) -> bool:
                    return len(received) > before

                assert await wait_for(arrived, 2) >= 0
                assert received[-1] == (name, b"ping " + name.encode(), peer.getsockname())
                assert uplink.callback_errors == 1 and not uplink.closed
                # uplink → peer, from the uplink's own address
                assert uplink.send(b"pong", peer.getsockname())
                data, src = await recv_from(peer)
                assert (data, src) == (b"pong", uplink.local_address)
                assert (uplink.tx_packets, uplink.tx_bytes) == (1, 4)
                assert (uplink.rx_packets, uplink.rx_bytes) == (2, 4 + 5 + len(name))

            # Local send errors: 127.0.0.1 cannot send off-host (EINVAL). After
            # max_consecutive_failures the uplink is rebuilt on the same port.
            lo0 = manager.uplinks["lo0"]
            port = lo0.local_port
            events.clear()
            for _ in range(3):
                assert not lo0.send(b"x", ("192.0.2.1", 9))
            assert lo0.consecutive_failures == 3 and lo0.errors == 3
            assert await wait_for(lambda: bool(events), 2) >= 0
            assert [(e.kind, e.uplink.name) for e in events] == [(UplinkEventKind.REBUILT, "lo0")]
            assert manager.uplinks["lo0"] is lo0 and lo0.rebuilds == 1
            assert lo0.local_port == port and lo0.consecutive_failures == 0
            assert socket_fds() == base_fds + 3  # the old socket is closed, not leaked
            peer.sendto(b"after rebuild", lo0.local_address)
            assert await wait_for(lambda: received[-1][1] == b"after rebuild", 2) >= 0
            # An error about one datagram (wrong family) is not an uplink failure.
            assert not lo0.send(b"x", ("::1", 9))
            assert lo0.consecutive_failures == 0
        finally:
            await manager.close()
            peer.close()
        assert socket_fds() == base_fds
        assert other_tasks() == []
        assert all(u.closed for u in (e.uplink for e in events))
        assert not lo0.send(b"late", ("127.0.0.1", 9))  # closed: dropped, no exception
        assert lo0.tx_dropped == 1

    run_loop(loop_kind, main)


def test_static_fixed_port_shared_by_uplinks() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        manager = UplinkManager.from_static(
            [("a", "127.0.0.1"), ("b", "127.0.0.2")],
            on_datagram=lambda *_: None,
            listen_port=port,
        )
        async with manager:
            assert {u.local_address for u in manager.uplinks.values()} == {
                ("127.0.0.1", port),
                ("127.0.0.2", port),
            }
        assert manager.uplinks == {}

    run_loop("asyncio", main)


# --- netlink discovery in namespaces: root -------------------------------------------------


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"lab test cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        _unavailable("needs root (network namespaces)")
    if shutil.which("ip") is None:
        _unavailable("needs iproute2 (ip)")
    tag = f"wupl-{os.getpid()}-{secrets.token_hex(3)}"
    ns_a, ns_b = f"{tag}-a", f"{tag}-b"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", ns_a, "link", "set", "lo", "up")
        _ip("-n", ns_b, "link", "set", "lo", "up")
        for i in (0, 1):
            _ip(
                "-n",
                ns_a,
                "link",
                "add",
                f"u{i}",
                "type",
                "veth",
                "peer",
                "name",
                f"p{i}",
                "netns",
                ns_b,
            )
            _ip("-n", ns_a, "addr", "add", f"10.77.{i}.1/24", "dev", f"u{i}")
            _ip("-n", ns_b, "addr", "add", f"10.77.{i}.2/24", "dev", f"p{i}")
            _ip("-n", ns_a, "link", "set", f"u{i}", "up")
            _ip("-n", ns_b, "link", "set", f"p{i}", "up")
        # An IPv6-only uplink (nodad: usable at once, no 1-2 s of tentative state).
        _ip("-n", ns_a, "link", "add", "u3", "type", "veth", "peer", "name", "p3", "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", "fd77:3::1/64", "dev", "u3", "nodad")
        _ip("-n", ns_b, "addr", "add", "fd77:3::2/64", "dev", "p3", "nodad")
        _ip("-n", ns_b, "link", "set", "p3", "up")
        _ip("-n", ns_a, "link", "set", "u3", "up")
        # Excluded by pattern (ex0), and down (dn0): neither may become an uplink. (veth, not
        # dummy: the dummy module is not available everywhere.)
        for name, peer, net, up in (("ex0", "xp0", 8, True), ("dn0", "dp0", 9, False)):
            _ip(
                "-n", ns_a, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", ns_b
            )
            _ip("-n", ns_a, "addr", "add", f"10.77.{net}.1/24", "dev", name)
            _ip("-n", ns_b, "link", "set", peer, "up")
            if up:
                _ip("-n", ns_a, "link", "set", name, "up")
    except (subprocess.SubprocessError, OSError) as exc:
        for ns in created:
            _ip("netns", "del", ns, check=False)
        detail = getattr(exc, "stderr", "") or exc
        _unavailable(f"cannot build namespaces: {detail}")
    try:
        yield ns_a, ns_b
    finally:
        for ns in created:
            _ip("netns", "del", ns, check=False)


@pytest.mark.lab
@pytest.mark.parametrize(("loop_kind", "port"), [("uvloop", 47001), ("asyncio", 0)])
def test_netlink_discovery_in_namespace(
    namespaces: tuple[str, str], loop_kind: str, port: int
) -> None:
    ns_a, ns_b = namespaces
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns_a,
            sys.executable,
            __file__,
            "agent",
            ns_b,
            loop_kind,
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"agent failed:\n{proc.stdout}\n{proc.stderr}"
    obs = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"add latency {obs['add_latency'] * 1000:.1f} ms, del {obs['del_latency'] * 1000:.1f} ms")

    # Discovery: exactly the two veths (not lo, not the excluded or the down dummy).
    initial = obs["initial"]
    assert sorted(initial) == ["u0", "u1", "u3"]
    assert initial["u3"]["sockname"][0] == "fd77:3::1" and initial["u3"]["device"] == "u3"
    for i, name in enumerate(("u0", "u1")):
        info = initial[name]
        assert info["sockname"][0] == f"10.77.{i}.1"
        assert info["device"] == name  # SO_BINDTODEVICE
        if port:
            assert info["sockname"][1] == port  # both share the fixed listen_port
    assert obs["fds_after_start"] == 4  # three uplink sockets + the netlink monitor
    assert obs["tasks_after_start"] == ["warp.uplinks"]
    # Traffic both ways on every uplink, including the one added at runtime.
    assert obs["echo"] == {"u0": True, "u1": True, "u3": True, "u2": True}

    # Runtime add: seen through netlink, not through the (60 s) rescan timer.
    assert 0 <= obs["add_latency"] < 1.0
    assert obs["netlink_events"] > 0 and obs["scans_for_add"] >= 1
    assert obs["fds_with_u2"] == 5
    assert obs["u2_sockname"][0] == "10.77.2.1"
    # Runtime delete: its socket is closed.
    assert 0 <= obs["del_latency"] < 1.0
    assert obs["fds_after_del"] == 4 and obs["u2_gone"]
    assert sorted(obs["events_after_del"][:3]) == [
        ["uplink.added", "u0"],
        ["uplink.added", "u1"],
        ["uplink.added", "u3"],
    ]
    assert obs["events_after_del"][3:] == [["uplink.added", "u2"], ["uplink.removed", "u2"]]
    assert sorted(obs["events"][8:]) == [["uplink.removed", "u1"], ["uplink.removed", "u3"]]
    assert 0 <= obs["readdress_latency"] < 1.0 and 0 <= obs["down_latency"] < 1.0
    assert obs["events_after_changes"] == [
        ["uplink.removed", "u1"],
        ["uplink.added", "u1"],
        ["uplink.removed", "u0"],
    ]
    assert obs["fds_after_changes"] == 3  # u1 (new socket), u3, netlink
    # Close: nothing left.
    assert obs["fds_after_close"] == 0
    assert obs["tasks_after_close"] == []


@pytest.mark.lab
def test_tun_interface_is_never_an_uplink(namespaces: tuple[str, str]) -> None:
    """A real TUN device (what wireguard-go, Tailscale and WARP's tun gate create) named so
    that no pattern excludes it, up and addressed: netlink reports its link kind and it is
    not an uplink (`uplink.excluded`); nor is a veth addressed inside a tun gate's
    `allowed_ips`. The other veths are."""
    ns_a, _ = namespaces
    proc = subprocess.run(
        ["ip", "netns", "exec", ns_a, sys.executable, __file__, "tunagent"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"agent failed:\n{proc.stdout}\n{proc.stderr}"
    obs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert obs["kinds"]["vpn0"] == "tun" and obs["kinds"]["u0"] == "veth"
    assert obs["vpn0_up"], "the tun device has no carrier: the test proves nothing"
    assert obs["uplinks"] == ["u0", "u3"]
    assert obs["excluded"] == {
        "vpn0": "link_kind:tun",
        "u1": "address_in_allowed_ips:10.77.1.0/24",
    }
    assert sorted(obs["logged"]) == [
        "uplink.excluded name=u1 reason=address_in_allowed_ips:10.77.1.0/24",
        "uplink.excluded name=vpn0 reason=link_kind:tun",
    ]


async def _tun_agent() -> dict[str, Any]:
    import fcntl
    import logging
    import struct

    from warp.paths.netlink import dump_interfaces

    tun = os.open("/dev/net/tun", os.O_RDWR)
    try:
        tunsetiff, iff_tun, iff_no_pi = 0x400454CA, 0x0001, 0x1000
        fcntl.ioctl(tun, tunsetiff, struct.pack("16sH", b"vpn0", iff_tun | iff_no_pi))
        _ip("addr", "add", "10.66.0.1/24", "dev", "vpn0")
        _ip("link", "set", "vpn0", "up")
        logged: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("uplink.excluded"):
                    logged.append(record.getMessage())

        logger = logging.getLogger("warp.paths.uplinks")
        logger.setLevel(logging.INFO)
        logger.addHandler(Collect())
        infos = {i.name: i for i in dump_interfaces()}
        manager = UplinkManager(
            exclusion_patterns=["^lo$", "^ex"],
            tunnel_networks=["10.77.1.0/24"],
            on_datagram=lambda *_: None,
        )
        async with manager:
            await manager.rescan()
            return {
                "kinds": {name: info.kind for name, info in infos.items()},
                "vpn0_up": infos["vpn0"].up,
                "uplinks": sorted(manager.uplinks),
                "excluded": manager.excluded,
                "logged": logged,
            }
    finally:
        os.close(tun)


# --- the agent (runs inside the namespace) ---------------------------------------------------


async def _agent(peer_ns: str, port: int) -> dict[str, Any]:
    from pyroute2.netns import create_socket

    obs: dict[str, Any] = {}
    peer = create_socket(peer_ns, socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("0.0.0.0", 0))
    peer.setblocking(False)
    peer_port = peer.getsockname()[1]
    peer6 = create_socket(peer_ns, socket.AF_INET6, socket.SOCK_DGRAM)
    peer6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    peer6.bind(("::", peer_port))
    peer6.setblocking(False)
    base_fds = socket_fds()
    received: list[tuple[str, bytes]] = []
    events: list[list[str]] = []
    manager = UplinkManager(
        inclusion_patterns=[".*"],
        exclusion_patterns=["^lo$", "^ex"],
        bind_to_device=True,
        listen_port=port,
        scan_interval=60.0,
        max_consecutive_failures=10,
        on_datagram=lambda up, data, _addr: received.append((up.name, data)),
        on_change=lambda e: events.append([e.name, e.uplink.name]),
    )

    def describe(uplink: Uplink) -> dict[str, Any]:
        transport = uplink._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        device = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
        return {
            "sockname": list(transport.get_extra_info("sockname")),
            "device": device.rstrip(b"\0").decode(),
        }

    async def echo(uplink: Uplink, peer_ip: str) -> bool:
        tag = f"ping {uplink.name}".encode()
        sock = peer6 if ":" in peer_ip else peer
        sock.sendto(tag, uplink.local_address)
        if await wait_for(lambda: (uplink.name, tag) in received, 2) < 0:
            return False
        uplink.send(b"pong", (peer_ip, peer_port))
        data, src = await recv_from(sock)
        return data == b"pong" and src == uplink.local_address

    try:
        await manager.start()
        obs["initial"] = {name: describe(up) for name, up in manager.uplinks.items()}
        obs["fds_after_start"] = socket_fds() - base_fds
        obs["tasks_after_start"] = other_tasks()
        obs["echo"] = {}
        for i, name in enumerate(("u0", "u1")):
            obs["echo"][name] = await echo(manager.uplinks[name], f"10.77.{i}.2")
        obs["echo"]["u3"] = await echo(manager.uplinks["u3"], "fd77:3::2")

        scans = manager.scans
        _ip("link", "add", "u2", "type", "veth", "peer", "name", "p2", "netns", peer_ns)
        _ip("addr", "add", "10.77.2.1/24", "dev", "u2")
        _ip("-n", peer_ns, "addr", "add", "10.77.2.2/24", "dev", "p2")
        _ip("-n", peer_ns, "link", "set", "p2", "up")
        _ip("link", "set", "u2", "up")
        obs["add_latency"] = await wait_for(lambda: "u2" in manager.uplinks, 3)
        obs["netlink_events"] = manager.netlink_events
        obs["scans_for_add"] = manager.scans - scans  # event-driven: the timer is 60 s
        obs["fds_with_u2"] = socket_fds() - base_fds
        if "u2" in manager.uplinks:
            obs["u2_sockname"] = describe(manager.uplinks["u2"])["sockname"]
            obs["echo"]["u2"] = await echo(manager.uplinks["u2"], "10.77.2.2")

        _ip("link", "del", "u2")
        # The removed event comes once the socket is closed.
        obs["del_latency"] = await wait_for(lambda: events[-1] == ["uplink.removed", "u2"], 3)
        obs["u2_gone"] = "u2" not in manager.uplinks
        obs["fds_after_del"] = socket_fds() - base_fds
        obs["events_after_del"] = [list(e) for e in events]

        # Address change → the uplink is reopened on the new address; link down → removed.
        _ip("addr", "del", "10.77.1.1/24", "dev", "u1")
        _ip("addr", "add", "10.77.1.5/24", "dev", "u1")
        obs["readdress_latency"] = await wait_for(
            lambda: "u1" in manager.uplinks and manager.uplinks["u1"].address == "10.77.1.5", 3
        )
        _ip("link", "set", "u0", "down")
        obs["down_latency"] = await wait_for(lambda: "u0" not in manager.uplinks, 3)
        await asyncio.sleep(0.05)
        obs["events_after_changes"] = [list(e) for e in events[len(obs["events_after_del"]) :]]
        obs["fds_after_changes"] = socket_fds() - base_fds
    finally:
        await manager.close()
        obs["fds_after_close"] = socket_fds() - base_fds
        obs["tasks_after_close"] = other_tasks()
        obs["events"] = events
        peer.close()
        peer6.close()
    return obs


def _agent_main(argv: list[str]) -> int:
    peer_ns, loop_kind, port = argv[0], argv[1], int(argv[2])
    obs = run_loop(loop_kind, lambda: _agent(peer_ns, port))
    print(json.dumps(obs))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["agent"]:
    sys.exit(_agent_main(sys.argv[2:]))
if __name__ == "__main__" and sys.argv[1:2] == ["tunagent"]:
    print(json.dumps(asyncio.run(_tun_agent())))
