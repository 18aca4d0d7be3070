"""`Uplink.send_with_ttl` on loopback sockets: a first punch leaves with the TTL asked for (as
its own control message), and the datagrams after it with the socket's usual TTL."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from warp.paths.uplinks import UplinkManager

IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_first_punch_leaves_with_the_low_ttl_then_the_usual_one(loop_name: str) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    receiver.settimeout(5)

    async def main() -> None:
        manager = UplinkManager.from_static([("lo0", "127.0.0.1")], on_datagram=lambda *a: None)
        await manager.start()
        try:
            uplink = manager.uplinks["lo0"]
            assert uplink.send_with_ttl(b"punch", receiver.getsockname(), 2)
            assert uplink.send(b"data", receiver.getsockname())
            await asyncio.sleep(0.05)
            assert uplink.tx_packets == 2 and uplink.errors == 0
        finally:
            await manager.close()

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    ttls = {}
    for _ in range(2):
        data, ancillary, _, _ = receiver.recvmsg(100, socket.CMSG_SPACE(4))
        ttls[data] = struct.unpack("=i", ancillary[0][2])[0]
    receiver.close()
    assert ttls[b"punch"] == 2
    assert ttls[b"data"] > 2


def test_extra_sockets_share_the_uplinks_address_each_with_its_own_port() -> None:
    """Birthday probing's hard side: extra sockets on an uplink's address, opened and closed
    on request, in order; what arrives on one is reported under its own name."""
    got: list[tuple[str, bytes]] = []
    opened: list[list[str]] = []

    async def main() -> None:
        manager = UplinkManager.from_static(
            [("lo0", "127.0.0.1")], on_datagram=lambda up, data, addr: got.append((up.name, data))
        )
        await manager.start()
        try:
            names = ["lo0~0", "lo0~1", "lo0~2"]
            manager.request_extra(True, "lo0", names, opened.append)
            manager.request_extra(False, "", ["lo0~1"], opened.append)
            while len(manager._extra_tasks):
                await asyncio.sleep(0.01)
            assert opened == [names] and sorted(manager.extras) == ["lo0~0", "lo0~2"]
            ports = {manager.extras[n].local_port for n in ("lo0~0", "lo0~2")}
            assert len(ports) == 2 and manager.uplinks["lo0"].local_port not in ports
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.sendto(b"hello", manager.extras["lo0~2"].local_address)
            sender.close()
            await asyncio.sleep(0.05)
            assert manager.extras["lo0~2"].send(b"x", ("127.0.0.1", 9))
        finally:
            await manager.close()
        assert not manager.extras

    asyncio.run(main())
    assert got == [("lo0~2", b"hello")]
