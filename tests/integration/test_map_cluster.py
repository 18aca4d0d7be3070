"""warp-map as a cluster: real warp-map processes sharing one real redis-server (Valkey protocol),
real WireGuard sessions from MapClientDrivers on loopback.

A is attached to map 1, B to map 2: they must learn each other, relay to each other, keep
working while Valkey is down and catch up when it returns; junk never crosses instances; a burst
of registrations keeps Valkey within the configured caps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warp.config import validate_map_config
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.map_client.client import PeerEndpointsChanged, RelayReceived
from warp.map_client.driver import MapClientDriver
from warp.map_client.messages import Register, Relay, encode
from warp_map_server.server import MapServer

from .map_process import MapProcess, free_udp_port
from .valkey_server import ValkeyServer

REFRESH = 1.0
TIMEOUT = 0.2
HELLO = b"\x7fhello across the cluster"


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    server = ValkeyServer(tmp_path / "valkey")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cluster_map(tmp_path: Path, name: str, key: bytes, url: str, extra: str = "") -> MapProcess:
    """A warp-map process of the cluster: the shared key, ``[cluster] url``."""
    workdir = tmp_path / name
    workdir.mkdir()
    process = MapProcess(workdir)
    process.private_key = key
    process.public_key = public_key_of(key)
    process.config_path.write_text(
        f'bind = "127.0.0.1:{process.port}"\n'
        f'private_key = "{encode_key(key)}"\n'
        'registration_ttl = "30s"\n'
        "[limits]\nrequests_per_second = 200\n"
        f'[cluster]\nurl = "{url}"\n' + extra
    )
    return process


@pytest.fixture
def maps(tmp_path: Path, valkey: ValkeyServer) -> Iterator[tuple[MapProcess, MapProcess]]:
    key = generate_private_key()
    map1 = cluster_map(tmp_path, "map1", key, valkey.url)
    map2 = cluster_map(tmp_path, "map2", key, valkey.url)
    try:
        for process in (map1, map2):
            process.start()
        wait_log(map1, "map.cluster.up")
        wait_log(map2, "map.cluster.up")
        yield map1, map2
    finally:
        map1.kill()
        map2.kill()


def wait_log(process: MapProcess, text: str, timeout: float = 10.0, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while process.log_since_start().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in: {process.log_since_start()[-3000:]}")
        time.sleep(0.02)


def stats_line(process: MapProcess) -> str:
    """Ask the map for its counters (SIGUSR1) and return the map.stats line."""
    before = process.log_since_start().count("map.stats")
    os.kill(process.pid, signal.SIGUSR1)
    wait_log(process, "map.stats", count=before + 1)
    return [line for line in process.log_since_start().splitlines() if "map.stats" in line][-1]


def driver(process: MapProcess, key: bytes, far: bytes) -> MapClientDriver:
    return MapClientDriver(
        key,
        process.public_key,
        process.address,
        public_key_of(far),
        refresh_interval=REFRESH,
        response_timeout=TIMEOUT,
    )


def test_clients_on_two_instances_learn_each_other_and_relay(
    maps: tuple[MapProcess, MapProcess],
) -> None:
    map1, map2 = maps
    key_a, key_b = generate_private_key(), generate_private_key()

    async def scenario() -> None:
        a = driver(map1, key_a, key_b)
        b = driver(map2, key_b, key_a)
        await a.add_uplink("a-lte", ("127.0.0.1", 0))
        await a.wait_for(a.registered, 5.0)
        t0 = b.now()
        await b.add_uplink("b-lte", ("127.0.0.1", 0))
        await b.add_uplink("b-wifi", ("127.0.0.1", 0))
        await b.wait_for(lambda: set(b.client.peer_endpoints) == set(a.uplinks.values()), 2.0)
        t_b = b.now()
        await a.wait_for(lambda: set(a.client.peer_endpoints) == set(b.uplinks.values()), 2.0)
        t_a = a.now()
        pushed = a.first_event(PeerEndpointsChanged, since=t0)
        assert pushed is not None and pushed[1].pushed  # a push across instances, not a lookup
        print(
            f"\npush across instances: B (map 2) learned A (map 1) {1000 * (t_b - t0):.1f} ms "
            f"after starting; A got B's endpoints pushed {1000 * (t_a - t0):.1f} ms after"
        )
        assert t_a - t0 <= 1.0 and t_b - t0 <= 1.0

        # relay across instances, both ways, every payload
        for i in range(20):
            assert a.relay(HELLO + bytes([i]))
            assert b.relay(HELLO + bytes([100 + i]))
        await b.wait_for(lambda: len(relayed(b)) == 20, 2.0)
        await a.wait_for(lambda: len(relayed(a)) == 20, 2.0)
        assert relayed(b) == [HELLO + bytes([i]) for i in range(20)]
        assert {e.sender for e in relayed_events(b)} == {public_key_of(key_a)}

        # B leaves: A is told at once, through the cluster
        assert await b.stop()
        await a.wait_for(lambda: a.client.peer_endpoints == (), 1.0)
        a.close()
        b.close()

    asyncio.run(scenario())
    assert "relay_forwarded_cluster=20" in stats_line(map1)
    assert "cluster_relay_delivered=20" in stats_line(map2)


def relayed_events(d: MapClientDriver) -> list[RelayReceived]:
    return [e for _, e in d.events if isinstance(e, RelayReceived)]


def relayed(d: MapClientDriver) -> list[bytes]:
    return [e.payload for e in relayed_events(d)]


def test_junk_from_one_client_never_reaches_another_instances_clients(
    maps: tuple[MapProcess, MapProcess], valkey: ValkeyServer
) -> None:
    map1, map2 = maps
    key_a, key_b, key_c = (generate_private_key() for _ in range(3))

    async def scenario() -> None:
        # A (map 1) names B as far gate; B (map 2) names C, not A: under `mutual`, A may not
        # reach B. C (map 2) names A.
        a = driver(map1, key_a, key_b)
        b = driver(map2, key_b, key_c)
        c = driver(map2, key_c, key_a)
        for d, name in ((a, "a"), (b, "b"), (c, "c")):
            await d.add_uplink(name, ("127.0.0.1", 0))
            await d.wait_for(d.registered, 5.0)
        await asyncio.sleep(0.3)  # (C may not look A up: A does not name C; let records spread)
        # junk from A: malformed map frames, relays to a target that did not name A, relays to
        # nobody, non-map plaintexts
        for i in range(200):
            a._send_map_frame("a", bytes([0x16]) + os.urandom(40 + i % 50), a.now())
            a._send_map_frame("a", encode(Relay(public_key_of(key_b), b"\x7fjunk")), a.now())
            a._send_map_frame("a", encode(Relay(os.urandom(32), b"\x7fjunk")), a.now())
        a._process()
        # and junk injected straight into the cluster's channels
        for channel in ("warp-map:events", f"warp-map:i:{0:016x}"):
            valkey.command("PUBLISH", channel, "not msgpack \x00\xff")
        # one legitimate relay to C (who named A) afterwards: it arrives, and it alone
        assert a.relay(HELLO)  # a's far gate is B: relay() targets B; send C's by hand
        a._send_map_frame("a", encode(Relay(public_key_of(key_c), HELLO)), a.now())
        a._process()
        await c.wait_for(lambda: relayed(c) == [HELLO], 2.0)
        await asyncio.sleep(0.3)
        assert relayed(b) == []
        assert relayed(c) == [HELLO]
        for d in (a, b, c):
            d.close()

    asyncio.run(scenario())
    line1, line2 = stats_line(map1), stats_line(map2)
    assert "relay_forwarded_cluster=1 " in line1 + " "
    assert "relay_refused=" in line1  # A -> B refused at map 1, never published
    assert "cluster_relay_delivered=1 " in line2 + " "
    assert "cluster_invalid=" in line2 and "cluster_invalid=" in line1
    assert "Traceback" not in map1.log_since_start() + map2.log_since_start()


def test_valkey_down_keeps_serving_and_catches_up(
    maps: tuple[MapProcess, MapProcess], valkey: ValkeyServer
) -> None:
    map1, map2 = maps
    key_a, key_b, key_c, key_d = (generate_private_key() for _ in range(4))

    async def scenario() -> None:
        a = driver(map1, key_a, key_b)
        b = driver(map2, key_b, key_a)
        await a.add_uplink("a", ("127.0.0.1", 0))
        await b.add_uplink("b", ("127.0.0.1", 0))
        await a.wait_for(lambda: a.client.peer_endpoints == tuple(b.uplinks.values()), 3.0)

        valkey.stop()
        await asyncio.to_thread(wait_log, map1, "map.cluster.down")
        await asyncio.to_thread(wait_log, map2, "map.cluster.down")
        # still serving what it holds: refreshes and lookups go on, A still sees B
        since = a.now()
        a.refresh()
        await a.wait_for(lambda: any(at > since for at, _ in a.events) and a.registered(), 2.0)
        assert a.client.peer_endpoints == tuple(b.uplinks.values())
        # C (map 1) and D (map 2) register while Valkey is down: each map holds its own
        c = driver(map1, key_c, key_d)
        d = driver(map2, key_d, key_c)
        await c.add_uplink("c", ("127.0.0.1", 0))
        await d.add_uplink("d", ("127.0.0.1", 0))
        await c.wait_for(c.registered, 3.0)
        await d.wait_for(d.registered, 3.0)
        assert c.client.peer_endpoints == ()

        valkey.start()  # same port, empty: the maps reconnect and announce what they hold
        t0 = c.now()
        await c.wait_for(lambda: c.client.peer_endpoints == tuple(d.uplinks.values()), 8.0)
        await d.wait_for(lambda: d.client.peer_endpoints == tuple(c.uplinks.values()), 2.0)
        print(f"\ncaught up {c.now() - t0:.2f} s after Valkey came back")
        for x in (a, b, c, d):
            x.close()

    asyncio.run(scenario())
    for process in (map1, map2):
        wait_log(process, "map.cluster.up", count=2)
        assert "serving=local" in process.log_since_start()
        assert "Traceback" not in process.log_since_start()
    assert "cluster_up=1" in stats_line(map1)


def test_registration_burst_keeps_valkey_within_caps(tmp_path: Path) -> None:
    """10 000 registrations (as from allowed keys: straight into the registry, after the
    handshake that the map would have checked) into two instances capped at 500 clients at
    once: Valkey holds at most the cap, however the two race, and its memory stays small."""
    valkey = ValkeyServer(tmp_path / "valkey")
    valkey.start()
    cap = 500

    async def scenario() -> None:
        map_key = generate_private_key()
        servers = []
        for _ in range(2):
            config = validate_map_config(
                {
                    "bind": f"127.0.0.1:{free_udp_port()}",
                    "private_key": encode_key(map_key),
                    "limits": {"max_clients": cap, "requests_per_second": 100_000},
                    "cluster": {"url": valkey.url},
                },
                "<test>",
            )
            server = MapServer(config)
            await server.start()
            assert server.cluster is not None and await server.cluster.wait_up(10.0)
            servers.append(server)
        baseline = valkey.used_memory()
        loop = asyncio.get_running_loop()
        far = public_key_of(generate_private_key())
        for i in range(10_000):
            server = servers[i % 2]
            key = public_key_of(generate_private_key())
            frame = encode(Register(i, 1, far, 7))
            now = loop.time()
            server.core.registry.handle(key, frame, (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                                                     40000), now)  # fmt: skip
            server.core.flush(now)
            server._drain(server.core)
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the link write and read
        await asyncio.sleep(1.0)
        grown = valkey.used_memory() - baseline
        print(f"\nValkey: {valkey.dbsize()} records, +{grown / 1024:.0f} KiB after the burst")
        # the records (and their index), never more than the cap, however the instances race
        assert valkey.dbsize() <= cap + 1
        assert grown < 2 * cap * 1024  # ~0.5 KiB per record and its index entry, measured
        for server in servers:
            held = len(server.registry.clients) + len(server.registry.remote)
            assert held <= cap
            assert server.registry.counters["clients.refused"] > 0
            server.close()

    try:
        asyncio.run(scenario())
    finally:
        valkey.stop()
