"""warp-map as a real process on loopback, with real WireGuard sessions from MapClientDrivers.

Each client has two "uplinks": two UDP sockets of its own, so the map sees two endpoints.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warp.keys import generate_private_key, public_key_of
from warp.map_client.client import (
    LookupRefused,
    PeerEndpointsChanged,
    RelayReceived,
    UplinkRegistered,
)
from warp.map_client.driver import MapClientDriver
from warp.wireguard import Outgoing

from .map_process import MapProcess

REFRESH = 1.0
# not an IP packet (first nibble 4 or 6) and not a map frame: some other warp frame
HELLO = b"\x7fhello through the map"
WIREGUARD_TYPES = (b"\x01", b"\x02", b"\x03", b"\x04")
TIMEOUT = 0.2


@pytest.fixture
def map_process(tmp_path: Path) -> Iterator[MapProcess]:
    process = MapProcess(
        tmp_path,
        extra_config='registration_ttl = "30s"\n[relay]\nrate_limit = "200kbit"\n'
        "[limits]\nrequests_per_second = 200\n",
    )
    process.start()
    yield process
    process.kill()


def make_driver(
    map_process: MapProcess, key: bytes, far: bytes, **kwargs: object
) -> MapClientDriver:
    return MapClientDriver(
        key,
        map_process.public_key,
        map_process.address,
        public_key_of(far),
        refresh_interval=REFRESH,
        response_timeout=TIMEOUT,
        **kwargs,  # type: ignore[arg-type]
    )


async def start(driver: MapClientDriver, *names: str) -> None:
    for name in names:
        await driver.add_uplink(name, ("127.0.0.1", 0))


def test_register_lookup_and_push_within_100ms(map_process: MapProcess) -> None:
    key_a, key_b = generate_private_key(), generate_private_key()

    async def scenario() -> None:
        a = make_driver(map_process, key_a, key_b)
        b = make_driver(map_process, key_b, key_a)
        await start(a, "a-lte", "a-wifi")
        await a.wait_for(a.registered, 5.0)
        await a.wait_for(lambda: a.first_event(LookupRefused) is not None, 5.0)
        # reflexive address = the socket's own address on loopback (no NAT in between)
        assert a.reflexive_addresses() == a.uplinks

        t0 = a.now()
        await start(b, "b-lte", "b-wifi")
        a_endpoints = set(a.uplinks.values())
        b_endpoints = set(b.uplinks.values())
        await b.wait_for(lambda: set(b.client.peer_endpoints) == a_endpoints, 2.0)
        t_b = b.now()
        await a.wait_for(lambda: set(a.client.peer_endpoints) == b_endpoints, 2.0)
        t_a = a.now()
        pushed = a.first_event(PeerEndpointsChanged, since=t0)
        assert pushed is not None and pushed[1].pushed
        registered = [at for at, e in b.events if isinstance(e, UplinkRegistered)]
        print(
            f"\npush latency: B registered {1000 * (max(registered) - t0):.1f} ms after start "
            f"(incl. handshake); B learned A's endpoints after {1000 * (t_b - t0):.1f} ms; "
            f"A got the push after {1000 * (t_a - t0):.1f} ms"
        )
        assert t_b - t0 <= 0.1
        assert t_a - t0 <= 0.1
        assert b.reflexive_addresses() == b.uplinks

        # deregistering one uplink keeps the other, and the far gate is told at once
        b.remove_uplink("b-wifi")
        remaining = {b.uplinks["b-lte"]}
        await a.wait_for(lambda: set(a.client.peer_endpoints) == remaining, 1.0)

        assert await a.stop()
        await b.wait_for(lambda: b.client.peer_endpoints == (), 1.0)
        await b.stop()

    asyncio.run(scenario())
    assert "map.registered" in map_process.log_since_start()
    assert "map.push" in map_process.log_since_start()
    assert map_process.stop() == 0
    assert "map.stopped" in map_process.log_since_start()


def test_map_restart_both_clients_registered_again_within_one_refresh(
    map_process: MapProcess,
) -> None:
    key_a, key_b = generate_private_key(), generate_private_key()

    async def registered_again(
        drivers: list[MapClientDriver], since: float, timeout: float
    ) -> float:
        def done() -> bool:
            for d in drivers:
                names = {
                    e.uplink
                    for at, e in d.events
                    if isinstance(e, UplinkRegistered) and at >= since
                }
                if names != set(d.uplinks):
                    return False
            return True

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError
            await asyncio.sleep(0.005)
        return drivers[0].now()

    async def restart(delay: float) -> float:
        map_process.kill()
        await asyncio.sleep(delay)
        listening = await asyncio.to_thread(map_process.start)
        return listening

    async def scenario() -> None:
        a = make_driver(map_process, key_a, key_b)
        b = make_driver(map_process, key_b, key_a)
        await start(a, "a-lte", "a-wifi")
        await start(b, "b-lte", "b-wifi")
        for d in (a, b):
            await d.wait_for(d.registered, 5.0)
        await a.wait_for(lambda: len(a.client.peer_endpoints) == 2, 5.0)

        # 1) killed, down for one refresh interval, restarted
        await restart(REFRESH)
        up = a.now()
        done = await registered_again([a, b], up, 10 * REFRESH)
        await a.wait_for(lambda: len(a.client.peer_endpoints) == 2, 5.0)
        await b.wait_for(lambda: len(b.client.peer_endpoints) == 2, 5.0)
        print(
            f"\nmap down {REFRESH:.1f} s: both clients registered "
            f"{1000 * (done - up):.0f} ms after it was back"
        )
        assert done - up <= REFRESH

        # 2) killed and restarted at once (the clients only notice at their next request)
        await asyncio.sleep(0.3)
        await restart(0.0)
        up = a.now()
        done = await registered_again([a, b], up, 10 * REFRESH)
        print(
            f"instant restart: both clients registered "
            f"{1000 * (done - up):.0f} ms after it was back"
        )
        # next refresh (<= REFRESH), two timeouts (<= 3 * TIMEOUT), handshake and retry
        assert done - up <= REFRESH + 3 * TIMEOUT + 0.2

        await a.stop()
        await b.stop()

    asyncio.run(scenario())


def test_relay_carries_a_wireguard_session_and_enforces_its_rate(map_process: MapProcess) -> None:
    key_a, key_b = generate_private_key(), generate_private_key()
    received_b: list[bytes] = []
    opaque_b: list[bytes] = []

    async def scenario() -> None:
        drivers: dict[str, MapClientDriver] = {}

        def relay_out(name: str) -> object:
            def hook(out: Outgoing) -> bool:
                drivers[name].relay(out.data)
                return True

            return hook

        def relay_in(name: str) -> object:
            def hook(event: object) -> None:
                if isinstance(event, RelayReceived):
                    d = drivers[name]
                    got = d.device.receive(event.payload, d.map_address, d.now())
                    if got is not None and got.plaintext:
                        received_b.append(got.plaintext.rstrip(b"\0"))  # WireGuard padding
                    elif got is None and event.payload[:1] not in WIREGUARD_TYPES:
                        opaque_b.append(event.payload)

            return hook

        a = make_driver(
            map_process, key_a, key_b, on_outgoing=relay_out("a"), on_event=relay_in("a")
        )
        b = make_driver(
            map_process, key_b, key_a, on_outgoing=relay_out("b"), on_event=relay_in("b")
        )
        drivers.update(a=a, b=b)
        # the gateways know each other as WireGuard peers, with no endpoint at all: only the map
        a.device.add_peer(public_key_of(key_b))
        b.device.add_peer(public_key_of(key_a))
        await start(a, "a-lte", "a-wifi")
        await start(b, "b-lte", "b-wifi")
        await a.wait_for(lambda: len(a.client.peer_endpoints) == 2, 5.0)
        await b.wait_for(lambda: len(b.client.peer_endpoints) == 2, 5.0)

        # A -> B through the map: handshake and data, end-to-end encrypted (the map cannot read)
        t0 = a.now()
        assert a.device.seal(public_key_of(key_b), HELLO, a.now()) is None
        a._process()
        await b.wait_for(lambda: received_b == [HELLO], 3.0)
        print(f"\nrelayed handshake + first datagram in {1000 * (b.now() - t0):.1f} ms")

        # rate limit: 200 kbit/s with a burst of max(0.25 s, 2 max payloads) = 147 456 bits
        payload = b"\xee" * 1000
        sent = 0
        start_time = a.now()
        while a.now() - start_time < 0.5:
            a.relay(payload)
            sent += 1
            await asyncio.sleep(0.0025)
        elapsed = a.now() - start_time
        await asyncio.sleep(0.3)
        expected = (147_456 + 200_000 * elapsed) / 8 / 1000
        got = len([p for p in opaque_b if p == payload])
        print(
            f"relay rate limit: offered {sent} x 1000 B in {elapsed:.2f} s "
            f"({sent * 8 / elapsed:.0f} kbit/s); delivered {got} (expected ~{expected:.0f})"
        )
        assert abs(got - expected) <= 0.2 * expected + 2
        stats = map_process.stats()
        assert stats["registry_relay_dropped"] == sent - got
        assert stats["registry_relay_forwarded"] >= got + 3

        await a.stop()
        await b.stop()

    asyncio.run(scenario())
    assert "map.relay.dropped" in map_process.log_since_start()


def test_allowed_keys_refuses_other_keys(tmp_path: Path) -> None:
    from warp.keys import encode_key

    allowed = generate_private_key()
    stranger = generate_private_key()
    process = MapProcess(
        tmp_path, extra_config=f'allowed_keys = ["{encode_key(public_key_of(allowed))}"]\n'
    )
    process.start()
    try:

        async def scenario() -> None:
            good = make_driver(process, allowed, stranger)
            bad = make_driver(process, stranger, allowed)
            await start(good, "u")
            await start(bad, "u")
            await good.wait_for(good.registered, 5.0)
            await asyncio.sleep(3 * TIMEOUT)
            assert not bad.registered()
            assert bad.device.counters["responses_received"] == 0
            await good.stop()
            bad.close()

        asyncio.run(scenario())
        stats = process.stats()
        assert stats["sessions_refused_key"] >= 1
        assert stats["registry_clients"] == 0
    finally:
        process.kill()
