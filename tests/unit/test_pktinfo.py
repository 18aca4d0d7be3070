"""Sticky source address (warp/pktinfo.py): warp-map and a gateway's uplink socket bound to a
wildcard address reply from the address each request arrived at, on loopback with two
addresses (127.0.0.1 and 127.0.0.2, both on ``lo``; ``::1`` for IPv6). Without it the
kernel answers a request to 127.0.0.2 from 127.0.0.1, which a client behind NAT never hears.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from warp.config import parse_map_config
from warp.keys import encode_key, generate_private_key
from warp.paths.uplinks import Uplink, UplinkManager
from warp.pktinfo import StickyTransport, is_wildcard
from warp.wireguard import Device
from warp_map_server.server import MapServer


def _free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return int(probe.getsockname()[1])


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


async def _ask(local: str, server: tuple[str, int], data: bytes) -> tuple[bytes, str]:
    """Send ``data`` from ``local`` to ``server``; (the reply, the address it came from)."""
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.bind((local, 0))
        client.setblocking(False)
        client.sendto(data, server)
        deadline = time.monotonic() + 3.0
        while True:
            try:
                reply, source = client.recvfrom(2048)
                return reply, str(source[0])
            except BlockingIOError:
                assert time.monotonic() < deadline, "no reply"
                await asyncio.sleep(0.01)


def test_wildcard_addresses() -> None:
    assert is_wildcard("0.0.0.0") and is_wildcard("::")
    assert not is_wildcard("127.0.0.1") and not is_wildcard("map.example") and not is_wildcard("")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_warp_map_on_a_wildcard_address_answers_from_the_address_asked(bind: str) -> None:
    """A WireGuard initiation to warp-map at 127.0.0.2 (and at 127.0.0.1) is answered from
    that address, whether the map is bound to 0.0.0.0 or to dual-stack ::."""
    port = _free_port(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    map_key = generate_private_key()
    host = f"[{bind}]" if ":" in bind else bind
    config = parse_map_config(f'bind = "{host}:{port}"\nprivate_key = "{encode_key(map_key)}"\n')

    async def main() -> None:
        server = MapServer(config)
        await server.start()
        try:
            for asked in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
                client = Device(generate_private_key())
                client.add_peer(server.public_key, endpoint=(asked, port))
                client.initiate_handshake(server.public_key, time.time())
                (initiation,) = client.drain_outgoing()
                response, source = await _ask("127.0.0.1", (asked, port), initiation.data)
                assert source == asked
                client.receive(response, (asked, port), time.time())
                peer = client.peer(server.public_key)
                assert peer is not None and peer.has_session  # the map's handshake response
        finally:
            server.close()

    asyncio.run(main())


def _echo_uplink(address: str, port: int) -> tuple[UplinkManager, list[str]]:
    """An uplink socket on ``address`` (a wildcard) with ``listen_port``, echoing what it gets."""
    seen: list[str] = []

    def echo(uplink: Uplink, data: bytes, addr: tuple[str, int]) -> None:
        seen.append(addr[0])
        # as the gateway sends: a batch (send_many) — it must not bypass the sticky source
        uplink.send_many([(data, addr), (data, addr)])

    manager = UplinkManager.from_static([("any", address)], on_datagram=echo, listen_port=port)
    return manager, seen


@pytest.mark.parametrize(
    ("bind", "asked", "client"),
    [
        ("0.0.0.0", "127.0.0.2", "127.0.0.1"),
        ("::", "::1", "::1"),
    ],
)
def test_gateway_uplink_on_a_wildcard_address_answers_from_the_address_asked(
    bind: str, asked: str, client: str
) -> None:
    if ":" in bind and not _has_ipv6_loopback():
        if os.environ.get("CI"):
            pytest.fail("no IPv6 loopback (::1) on this CI machine: the IPv6 case cannot run")
        pytest.skip("no IPv6 loopback here")
    port = _free_port(socket.AF_INET6 if ":" in bind else socket.AF_INET)

    async def main() -> None:
        manager, seen = _echo_uplink(bind, port)
        await manager.start()
        try:
            for payload in (b"first", b"second"):
                reply, source = await _ask(client, (asked, port), payload)
                assert (reply, source) == (payload, asked)
            assert seen == [client, client]
        finally:
            await manager.close()

    asyncio.run(main())


def test_sticky_table_is_bounded_and_follows_the_address_asked() -> None:
    """Hostile input: many peers do not grow the table past its bound; a peer that asks at
    another address gets its replies from that one from then on."""
    port = _free_port()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("0.0.0.0", port))

        class Echo(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                transport.sendto(data, addr)

        transport = StickyTransport(loop, sock, Echo(), max_peers=4)
        peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
        try:
            for peer in peers:
                peer.bind(("127.0.0.1", 0))
                peer.sendto(b"x", ("127.0.0.2", port))
            await asyncio.sleep(0.2)
            assert len(transport._sources) == 4  # the oldest two forgotten
            one = peers[-1]
            for asked in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
                one.sendto(b"y", (asked, port))
                await asyncio.sleep(0.1)
                one.setblocking(False)
                replies = []
                while True:
                    try:
                        replies.append(one.recvfrom(64))
                    except BlockingIOError:
                        break
                assert replies[-1] == (b"y", (asked, port))
                assert transport.sticky_source(one.getsockname()) == asked
        finally:
            for peer in peers:
                peer.close()
            transport.close()
            await asyncio.sleep(0)

    asyncio.run(main())
