"""Self-test of `warp.gate.tun.TunGate` inside one network namespace, no peer: the gate answers
ICMP echo requests that the kernel routes into it (so real ``ping`` works through it), and we
check setup, data path, flow control and teardown. Prints one JSON object ``{check: result}``
where every result must be ``true``::

    ip netns exec NS .venv/bin/python tests/interop/tun_selftest.py [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.interop.icmp import echo_reply, parse_echo  # noqa: E402
from warp.gate.base import Gate, GateError  # noqa: E402
from warp.gate.tun import TunGate  # noqa: E402


async def sh(*argv: str, timeout: float = 20.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "timeout"
    return proc.returncode or 0, out.decode(errors="replace")


async def ip_json(*argv: str) -> Any:
    code, out = await sh("ip", "-j", *argv)
    return json.loads(out) if code == 0 and out.strip() else []


def exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


async def main() -> dict[str, Any]:
    checks: dict[str, Any] = {}
    seen: list[bytes] = []
    answer = True
    pause_next = False

    def on_datagram(gate: Gate, packet: bytes) -> bool | None:
        nonlocal pause_next
        seen.append(packet)
        echo = parse_echo(packet)
        if answer and echo is not None and echo.request:
            gate.deliver(echo_reply(echo))
        if pause_next:
            pause_next = False
            return False
        return None

    gate = TunGate(
        on_datagram,
        name="warpt0",
        addresses=["10.99.0.1/24", "fd99::1/64"],
        mtu=1280,
        allowed_ips=["10.98.0.0/16", "fd98::/48", "10.99.0.0/24"],
    )
    checks["is a Gate"] = isinstance(gate, Gate) and gate.kind == "tun"
    await gate.start()
    checks["reading after start"] = gate.is_reading
    link = (await ip_json("link", "show", "warpt0"))[0]
    checks["mtu 1280"] = link["mtu"] == 1280
    checks["up"] = "UP" in link["flags"]
    addrs = {
        (a["local"], a["prefixlen"])
        for a in (await ip_json("addr", "show", "warpt0"))[0]["addr_info"]
        if a.get("scope") == "global"
    }
    checks["addresses"] = addrs == {("10.99.0.1", 24), ("fd99::1", 64)}
    routes = {r["dst"] for r in await ip_json("route", "show", "dev", "warpt0")}
    routes6 = {r["dst"] for r in await ip_json("-6", "route", "show", "dev", "warpt0")}
    checks["routes"] = "10.98.0.0/16" in routes and "fd98::/48" in routes6
    checks["existing connected route kept"] = "10.99.0.0/24" in routes

    code, out = await sh("ping", "-c", "5", "-i", "0.05", "-W", "2", "10.98.0.7")
    checks["ping v4 through the gate"] = code == 0 and " 0% packet loss" in out
    code, out = await sh("ping", "-6", "-c", "5", "-i", "0.05", "-W", "2", "fd98::7")
    checks["ping v6 through the gate"] = code == 0 and " 0% packet loss" in out
    code, out = await sh(
        "ping", "-c", "2", "-i", "0.05", "-s", str(1280 - 28), "-M", "do", "10.98.0.7"
    )
    checks["ping of exactly the MTU"] = code == 0 and " 0% packet loss" in out
    code, out = await sh("ping", "-c", "1", "-s", str(1280 - 27), "-M", "do", "10.98.0.7")
    checks["MTU + 1 refused locally"] = code != 0
    checks["counters"] = gate.counters.datagrams_in >= 12 and gate.counters.datagrams_out >= 12
    checks["bytes counted"] = gate.counters.bytes_in == sum(map(len, seen))

    checks["invalid packet refused"] = gate.deliver(b"\x00" * 40) is False
    checks["invalid packet counted"] = gate.counters.drops.get("invalid_packet") == 1

    gate.pause_reading()
    checks["paused"] = not gate.is_reading
    code, _ = await sh("ping", "-c", "1", "-W", "1", "10.98.0.7")
    checks["no reply while paused"] = code != 0
    gate.resume_reading()
    await asyncio.sleep(0.05)  # the queued echo request is read and answered (late)
    pause_next = True
    code, out = await sh("ping", "-c", "1", "-W", "2", "10.98.0.8")
    checks["False from on_datagram pauses"] = not gate.is_reading
    gate.resume_reading()
    code, out = await sh("ping", "-c", "3", "-i", "0.05", "-W", "2", "10.98.0.7")
    checks["resumed"] = code == 0 and " 0% packet loss" in out

    await gate.close()
    checks["device removed on close"] = not exists("warpt0")
    checks["deliver after close"] = gate.deliver(b"\x45" + b"\x00" * 19) is False
    checks["deliver after close counted"] = gate.counters.drops.get("closed") == 1
    await gate.close()  # idempotent
    try:
        await gate.start()
        checks["start after close refused"] = False
    except GateError:
        checks["start after close refused"] = True

    # a non-TUN interface of that name (a veth: this kernel may lack the dummy module)
    code, out = await sh("ip", "link", "add", "warpd0", "type", "veth", "peer", "name", "warpd1")
    checks["veth made"] = code == 0 or out
    try:
        await TunGate(on_datagram, name="warpd0").start()
        checks["name taken by a veth"] = False
    except GateError as exc:
        checks["name taken by a veth"] = "warpd0" in str(exc)

    # a persistent TUN made beforehand is kept, and cleaned of what the gate added
    await sh("ip", "tuntap", "add", "mode", "tun", "name", "warpp0")
    gate = TunGate(
        on_datagram, name="warpp0", addresses=["10.97.0.1/24"], allowed_ips=["10.96.0.0/16"]
    )
    await gate.start()
    up = (await ip_json("addr", "show", "warpp0"))[0]
    checks["persistent: configured"] = any(a["local"] == "10.97.0.1" for a in up["addr_info"])
    await gate.close()
    after = await ip_json("addr", "show", "warpp0")
    checks["persistent: kept"] = exists("warpp0")
    checks["persistent: address removed"] = not any(
        a.get("local") == "10.97.0.1" for a in (after[0]["addr_info"] if after else [])
    )
    checks["persistent: route removed"] = not await ip_json("route", "show", "10.96.0.0/16")

    # allowed_ips 0.0.0.0/0 keeps the default route (two /1 routes instead)
    await sh("ip", "link", "set", "warpd1", "up")
    await sh("ip", "link", "set", "warpd0", "up")
    await sh("ip", "route", "add", "default", "dev", "warpd0")
    gate = TunGate(
        on_datagram, name="warpt1", addresses=["10.95.0.1/24"], allowed_ips=["0.0.0.0/0"]
    )
    await gate.start()
    routes = {r["dst"] for r in await ip_json("route", "show", "dev", "warpt1")}
    default = await ip_json("route", "show", "default")
    checks["/0 as two /1"] = {"0.0.0.0/1", "128.0.0.0/1"} <= routes
    checks["default route kept"] = bool(default) and default[0].get("dev") == "warpd0"
    await gate.close()
    default = await ip_json("route", "show", "default")
    checks["default route still there after close"] = bool(default)
    return checks


def run() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(main())
    else:
        result = asyncio.run(main())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())
