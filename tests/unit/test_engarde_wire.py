"""engarde's wire format (warp/migrate/engarde_wire.py): config validation, the client table,
and a client + server `EngardeGateway` pair on loopback (static uplinks, no root)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from warp.cli import gateway_summary
from warp.config import ConfigError, parse_gateway_config
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.migrate.engarde_wire import ClientTable, EngardeGateway
from warp.status import query_status


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_gateway_config(text)
    return dict(info.value.problems)


CLIENT = """
[far_gate]
endpoints = ["198.51.100.10:5555"]
[tunnels.wireguard.gate]
application_to_gate = 59401
[tunnels.wireguard.engarde]
role = "client"
"""


def test_engarde_config_needs_no_keys_and_summarises() -> None:
    config = parse_gateway_config(CLIENT)
    found = config.engarde_tunnel
    assert found is not None and found[1].engarde is not None
    assert found[1].engarde.client_timeout == 30.0
    assert "engarde client" in gateway_summary(config)
    server = parse_gateway_config(
        "listen_port = 5555\n[tunnels.w.gate]\napplication_to_gate = 59401\n"
        'gate_to_application = 51820\n[tunnels.w.engarde]\nrole = "server"\n'
        'client_timeout = "10s"\n'
    )
    assert "port 5555" in gateway_summary(server)
    assert parse_gateway_config(CLIENT.replace("[far_gate]", 'private_key = "' + encode_key(
        generate_private_key()) + '"\n[far_gate]')).engarde_tunnel is not None  # fmt: skip


def test_engarde_config_problems() -> None:
    problems = _problems(
        f'[far_gate]\npublic_key = "{encode_key(public_key_of(generate_private_key()))}"\n'
        '[tunnels.a.gate]\npath = "/tmp/a.sock"\n[tunnels.a.engarde]\nrole = "client"\n'
        "[tunnels.b.gate]\napplication_to_gate = 1\n"
    )
    assert set(problems) == {"tunnels", "tunnels.a.gate", "far_gate.public_key",
                             "far_gate.endpoints"}  # fmt: skip
    assert "only tunnel" in problems["tunnels"]
    assert "no warp peer" in problems["far_gate.public_key"]
    problems = _problems(
        '[far_gate]\nendpoints = ["1.2.3.4:5"]\n[warp_map]\naddress = "m.example:1"\n'
        f'public_key = "{encode_key(public_key_of(generate_private_key()))}"\n'
        '[tunnels.a.gate]\napplication_to_gate = 1\n[tunnels.a.engarde]\nrole = "server"\n'
    )
    assert set(problems) == {"listen_port", "far_gate.endpoints", "warp_map.address"}
    assert (
        "did you mean 'client_timeout'"
        in _problems(CLIENT + "clienttimeout = 3\n")["tunnels.wireguard.engarde.clienttimeout"]
    )
    # Without an engarde table, far_gate is still required.
    assert "far_gate" in _problems(
        f'private_key = "{encode_key(generate_private_key())}"\nlisten_port = 1\n'
        "[tunnels.a.gate]\napplication_to_gate = 1\n"
    )


def test_client_table_expires_and_evicts() -> None:
    table = ClientTable(timeout=30.0, max_clients=2)
    assert table.heard("up1", ("1.1.1.1", 1), 0.0)
    assert not table.heard("up1", ("1.1.1.1", 1), 5.0)
    assert table.heard("up2", ("2.2.2.2", 2), 10.0)
    assert table.live(20.0) == [("up1", ("1.1.1.1", 1)), ("up2", ("2.2.2.2", 2))]
    assert table.live(36.0) == [("up2", ("2.2.2.2", 2))]  # up1 last heard at 5
    assert table.expired == 1
    table.heard("up1", ("3.3.3.3", 3), 37.0)
    table.heard("up1", ("4.4.4.4", 4), 38.0)  # a third address: the oldest goes
    assert table.evicted == 1 and len(table) == 2
    assert ("up2", ("2.2.2.2", 2)) not in table.live(38.0)


def test_client_and_server_on_loopback(tmp_path: Path) -> None:
    asyncio.run(_loopback_pair(tmp_path))


async def _loopback_pair(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    listen = _free_port("127.0.0.3")
    client_gate, server_gate = _free_port(), _free_port()
    wg_client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the client's WireGuard
    wg_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the server's WireGuard
    for sock in (wg_client, wg_server):
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
    client_config = parse_gateway_config(
        f'[far_gate]\nendpoints = ["127.0.0.3:{listen}"]\n[tunnels.wg.gate]\n'
        f'application_to_gate = {client_gate}\n[tunnels.wg.engarde]\nrole = "client"\n'
    )
    server_config = parse_gateway_config(
        f"listen_port = {listen}\n[tunnels.wg.gate]\napplication_to_gate = {server_gate}\n"
        f"gate_to_application = {wg_server.getsockname()[1]}\n"
        '[tunnels.wg.engarde]\nrole = "server"\nclient_timeout = "30s"\n'
    )
    client = EngardeGateway(
        client_config,
        static_uplinks=[("lo1", "127.0.0.1"), ("lo2", "127.0.0.2")],
        control_socket=str(tmp_path / "c.sock"),
    )
    server = EngardeGateway(
        server_config,
        static_uplinks=[("lo3", "127.0.0.3")],
        control_socket=str(tmp_path / "s.sock"),
    )
    stop = asyncio.Event()
    tasks = [loop.create_task(g.run(stop)) for g in (client, server)]
    try:
        for _ in range(200):
            if client.gate is not None and server.gate is not None and server.control:
                break
            await asyncio.sleep(0.01)
        # WireGuard (client side) → both uplinks → server → its WireGuard: two copies.
        await loop.run_in_executor(
            None, wg_client.sendto, b"initiation", ("127.0.0.1", client_gate)
        )
        got = [await loop.run_in_executor(None, wg_server.recvfrom, 2048) for _ in range(2)]
        assert [data for data, _ in got] == [b"initiation"] * 2
        assert {src for _, src in got} == {("127.0.0.1", server_gate)}
        # The reply goes to both client addresses heard: two copies back, from the gate port.
        await loop.run_in_executor(None, wg_server.sendto, b"response", ("127.0.0.1", server_gate))
        back = [await loop.run_in_executor(None, wg_client.recvfrom, 2048) for _ in range(2)]
        assert [data for data, _ in back] == [b"response"] * 2
        assert {src for _, src in back} == {("127.0.0.1", client_gate)}

        status = await loop.run_in_executor(None, query_status, str(tmp_path / "s.sock"))
        assert status["engarde"]["clients"] == 2
        assert {p["uplink"] for p in status["paths"]} == {"lo3"}
        assert len(status["paths"]) == 2 and all(p["state"] == "active" for p in status["paths"])
        assert status["tunnels"][0]["datagrams_out"] == 2
        snap = client.snapshot()
        assert sorted((p["uplink"], p["tx_packets"], p["rx_packets"]) for p in snap["paths"]) == [
            ("lo1", 1, 1),
            ("lo2", 1, 1),
        ]
        assert snap["counters"]["copies_sent"] == 2
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        wg_client.close()
        wg_server.close()
    assert not (tmp_path / "c.sock").exists() and not (tmp_path / "s.sock").exists()


ENGARDE_YML = {
    "client": {
        "listenAddr": "127.0.0.1:59401",
        "dstAddr": "198.51.100.10:5555",
        "excludedInterfaces": ["wg0"],
    },
    "server": {"listenAddr": ":5555", "dstAddr": "127.0.0.1:51820", "clientTimeout": 20},
}


def test_migrate_one_side_writes_engarde_mode_configs() -> None:
    from warp.migrate.engarde import MigrationError, migrate

    client = parse_gateway_config(migrate(ENGARDE_YML, role="client", one_side=True).toml)
    found = client.engarde_tunnel
    assert found is not None and found[1].engarde is not None
    assert found[1].engarde.role == "client"
    assert [str(e) for e in client.far_gate.endpoints] == ["198.51.100.10:5555"]
    server = parse_gateway_config(migrate(ENGARDE_YML, role="server", one_side=True).toml)
    found = server.engarde_tunnel
    assert found is not None and found[1].engarde is not None
    assert (found[1].engarde.role, found[1].engarde.client_timeout) == ("server", 20.0)
    assert server.listen_port == 5555
    with pytest.raises(MigrationError, match="no meaning with --one-side"):
        migrate(ENGARDE_YML, role="client", one_side=True, far_public_key="x")


def test_client_sends_one_copy_per_uplink_to_its_own_destination(tmp_path: Path) -> None:
    """engarde's dstOverrides: 3 uplinks, 2 destinations → 3 copies (each uplink to its
    override, else to dstAddr), not 3 × 2."""
    asyncio.run(_overrides(tmp_path))


async def _overrides(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    servers = {}
    for name, host in (("default", "127.0.0.9"), ("override", "127.0.0.10")):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.settimeout(2.0)
        servers[name] = sock
    default, override = (servers[n].getsockname() for n in ("default", "override"))
    gate_port = _free_port()
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    wg.settimeout(2.0)
    config = parse_gateway_config(
        f'[far_gate]\nendpoints = ["{default[0]}:{default[1]}"]\n[tunnels.wg.gate]\n'
        f'application_to_gate = {gate_port}\n[tunnels.wg.engarde]\nrole = "client"\n'
        f'dst_overrides = {{ up3 = "{override[0]}:{override[1]}" }}\n'
    )
    client = EngardeGateway(
        config,
        static_uplinks=[("up1", "127.0.0.1"), ("up2", "127.0.0.2"), ("up3", "127.0.0.3")],
        control_socket=str(tmp_path / "c.sock"),
    )
    stop = asyncio.Event()
    task = loop.create_task(client.run(stop))
    try:
        for _ in range(200):
            if client.gate is not None:
                break
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, wg.sendto, b"initiation", ("127.0.0.1", gate_port))

        def receive(sock: socket.socket) -> list[str]:
            sources = []
            sock.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                while True:
                    data, source = sock.recvfrom(2048)
                    assert data == b"initiation"
                    sources.append(source[0])
            return sorted(sources)

        got = {name: await loop.run_in_executor(None, receive, s) for name, s in servers.items()}
        assert got == {"default": ["127.0.0.1", "127.0.0.2"], "override": ["127.0.0.3"]}
        assert client.snapshot()["counters"]["copies_sent"] == 3
        # the override's server answers on up3: accepted and handed to WireGuard
        up3 = client.snapshot()["uplinks"][2]["local_address"].rsplit(":", 1)
        servers["override"].sendto(b"response", (up3[0], int(up3[1])))
        data, _ = await loop.run_in_executor(None, wg.recvfrom, 2048)
        assert data == b"response"
        assert client.snapshot()["engarde"]["dst_overrides"] == {
            "up3": f"{override[0]}:{override[1]}"
        }
    finally:
        stop.set()
        await task
        wg.close()
        for sock in servers.values():
            sock.close()


def test_engarde_client_takes_one_server_address() -> None:
    problems = _problems(CLIENT.replace('"198.51.100.10:5555"', '"198.51.100.10:5555", "[::1]:5"'))
    assert "exactly one address" in problems["far_gate.endpoints"]
    assert "dst_overrides" in problems["far_gate.endpoints"]
    problems = _problems(
        "listen_port = 5555\n[tunnels.w.gate]\napplication_to_gate = 59401\n"
        '[tunnels.w.engarde]\nrole = "server"\ndst_overrides = { up1 = "192.0.2.1:5" }\n'
    )
    assert "no meaning for an engarde server" in problems["tunnels.w.engarde.dst_overrides"]


def test_migrate_one_side_keeps_dst_overrides_per_interface() -> None:
    from warp.migrate.engarde import migrate

    data = {
        "client": {
            **ENGARDE_YML["client"],
            "dstOverrides": [
                {"ifName": "starlink0", "dstAddr": "192.0.2.20:5555"},
                {"ifName": "wwan1", "dstAddr": "198.51.100.10:5555"},
                {"ifName": "starlink0", "dstAddr": "192.0.2.99:5555"},
            ],
        }
    }
    migration = migrate(data, role="client", one_side=True)
    config = parse_gateway_config(migration.toml)
    found = config.engarde_tunnel
    assert found is not None and found[1].engarde is not None
    assert [str(e) for e in config.far_gate.endpoints] == ["198.51.100.10:5555"]
    assert {k: str(v) for k, v in found[1].engarde.dst_overrides.items()} == {
        "starlink0": "192.0.2.20:5555",  # engarde takes the first entry for an interface
        "wwan1": "198.51.100.10:5555",
    }
    # no promise of path probing (this mode has none)
    assert not any("keeps the paths that work" in w for w in migration.warnings)
    assert any("second override for 'starlink0'" in w for w in migration.warnings)
