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
