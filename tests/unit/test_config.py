"""Config schema: defaults, parsing, and every error naming its TOML path."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp.config import (
    DEFAULT_CONTROL_SOCKET,
    ConfigError,
    GatewayConfig,
    HostPort,
    LoopbackGate,
    MapServerConfig,
    TunGate,
    UnixGate,
    derive_tunnel_id,
    example_gateway_config,
    example_map_config,
    load_gateway_config,
    load_map_config,
    parse_duration,
    parse_gateway_config,
    parse_host_port,
    parse_map_config,
    parse_rate,
    validate_gateway_config,
)
from warp.keys import encode_key, generate_private_key, public_key_of, to_wireguard_base64

ROOT = Path(__file__).resolve().parents[2]

PRIVATE = generate_private_key()
PEER = public_key_of(generate_private_key())
MAP = public_key_of(generate_private_key())

# The config block of the product spec, verbatim.
SPEC_EXAMPLE = """\
private_key = "<run warp-keygen to generate>"

[interfaces]
interface_scan_interval = 10
exclusion_patterns = ["lo", "wg.*", "wt.*", "wlp.*", "enp.*", "docker.*"]

[warp_map]
address = "warp-map.example.net:13116"
public_key = "<the map's public key>"

[far_gate]
public_key = "<get from peer>"

[tunnels.wireguard.gate]
ipv4 = true
application_to_gate = 59401

[tunnels.wireguard.transport]
mtu = 1400
ordered = false

[tunnels.wireguard.transport.redundancy]
num_shards = 5
required_shards = 3
"""


def spec_example_with_keys() -> str:
    return (
        SPEC_EXAMPLE.replace("<run warp-keygen to generate>", encode_key(PRIVATE))
        .replace("<the map's public key>", encode_key(MAP))
        .replace("<get from peer>", encode_key(PEER))
    )


def minimal(**overrides: Any) -> dict[str, Any]:
    """A minimal valid config as parsed TOML data; overrides replace top-level keys."""
    data: dict[str, Any] = {
        "private_key": encode_key(PRIVATE),
        "warp_map": {"address": "map.example.net:13116", "public_key": encode_key(MAP)},
        "far_gate": {"public_key": encode_key(PEER)},
        "tunnels": {"wireguard": {"gate": {"application_to_gate": 59401}}},
    }
    data.update(overrides)
    return data


def problems_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_gateway_config(data)
    return dict(info.value.problems)


def tunnel(**table: Any) -> dict[str, Any]:
    return {"tunnels": {"wireguard": {"gate": {"application_to_gate": 59401}, **table}}}


# --------------------------------------------------------------------------------------------
# The SPEC example and defaults


def test_spec_example_loads_with_real_keys() -> None:
    config = parse_gateway_config(spec_example_with_keys())
    assert isinstance(config, GatewayConfig)
    assert config.private_key == PRIVATE
    assert config.public_key == public_key_of(PRIVATE)
    assert config.far_gate.public_key == PEER
    assert config.warp_map.address == HostPort("warp-map.example.net", 13116)
    assert config.warp_map.public_key == MAP
    assert config.interfaces.interface_scan_interval == 10.0
    assert [p.pattern for p in config.interfaces.exclusion_patterns] == [
        "lo",
        "wg.*",
        "wt.*",
        "wlp.*",
        "enp.*",
        "docker.*",
    ]
    wireguard = config.tunnels["wireguard"]
    assert wireguard.gate == LoopbackGate(ipv4=True, application_to_gate=59401)
    assert wireguard.tunnel_id == derive_tunnel_id("wireguard")
    assert wireguard.transport.mtu == 1400
    assert wireguard.transport.ordered is False
    assert wireguard.transport.redundancy.num_shards == 5
    assert wireguard.transport.redundancy.required_shards == 3


def test_spec_example_with_placeholders_says_run_warp_keygen() -> None:
    with pytest.raises(ConfigError) as info:
        parse_gateway_config(SPEC_EXAMPLE)
    problems = dict(info.value.problems)
    assert set(problems) == {"private_key", "warp_map.public_key", "far_gate.public_key"}
    for message in problems.values():
        assert "placeholder" in message
        assert "warp-keygen" in message


def test_defaults() -> None:
    config = validate_gateway_config(minimal())
    assert config.listen_port == 0
    i = config.interfaces
    assert i.interface_scan_interval == 10.0
    assert [p.pattern for p in i.inclusion_patterns] == [".*"]
    assert [p.pattern for p in i.exclusion_patterns] == ["^lo$", "^wg", "^tun", "^tailscale"]
    assert not any(i.uses_interface(n) for n in ("lo", "wg0", "tun0", "tailscale0"))
    assert all(i.uses_interface(n) for n in ("eth0", "wwan0", "wlo1", "enp3s0"))
    assert i.bind_to_device is sys.platform.startswith("linux")
    assert i.holepunch_keep_alive_interval == 1.0
    assert i.path_timeout == 3.0
    assert i.max_consecutive_failures == 10
    assert i.uses_interface("eth0") and not i.uses_interface("lo")
    assert config.far_gate.endpoints == ()
    assert config.far_gate.preshared_key is None
    assert config.far_gate.kind == "warp"
    t = config.tunnels["wireguard"].transport
    assert (t.mtu, t.ordered, t.reorder_timeout, t.send_deadline, t.priority) == (
        1400,
        False,
        0.050,
        0.100,
        0,
    )
    assert (t.redundancy.num_shards, t.redundancy.required_shards) == (5, 3)
    assert config.control.socket == DEFAULT_CONTROL_SOCKET == "/run/warp/warp.sock"
    assert config.metrics.listen is None
    assert (config.log.level, config.log.format) == ("info", "text")


def test_models_are_frozen_and_hide_secrets() -> None:
    config = validate_gateway_config(minimal())
    with pytest.raises(ValueError):
        config.listen_port = 5  # type: ignore[misc]
    assert encode_key(PRIVATE) not in repr(config)
    assert repr(PRIVATE) not in repr(config)


def test_wireguard_base64_keys_are_accepted() -> None:
    data = minimal(private_key=to_wireguard_base64(PRIVATE))
    data["far_gate"] = {"public_key": to_wireguard_base64(PEER), "preshared_key": "A" * 43 + "="}
    config = validate_gateway_config(data)
    assert config.private_key == PRIVATE
    assert config.far_gate.public_key == PEER
    assert config.far_gate.preshared_key == bytes(32)


# --------------------------------------------------------------------------------------------
# The invalid cases required by the issue: each names its TOML path


def test_unknown_key_names_path_and_suggests() -> None:
    problems = problems_of(minimal(interfaces={"interface_scan_intervall": 5}))
    assert problems == {
        "interfaces.interface_scan_intervall": "unknown key 'interface_scan_intervall'; "
        "did you mean 'interface_scan_interval'?"
    }


def test_unknown_keys_at_every_level() -> None:
    data = minimal(tunnel={}, log={"levle": "info"})
    data["tunnels"]["wireguard"]["transport"] = {"redundancy": {"num_shard": 4}, "odrered": True}
    data["tunnels"]["wireguard"]["gate"]["gate_to_aplication"] = 5
    problems = problems_of(data)
    assert problems["tunnel"] == "unknown key 'tunnel'; did you mean 'tunnels'?"
    assert problems["log.levle"] == "unknown key 'levle'; did you mean 'level'?"
    assert (
        "did you mean 'num_shards'?" in problems["tunnels.wireguard.transport.redundancy.num_shard"]
    )
    assert "did you mean 'ordered'?" in problems["tunnels.wireguard.transport.odrered"]
    assert (
        "did you mean 'gate_to_application'?"
        in problems["tunnels.wireguard.gate.gate_to_aplication"]
    )


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    problems = problems_of(minimal(log={"colour": True}))
    assert problems == {"log.colour": "unknown key 'colour' (valid keys: level, format)"}


def test_bad_regex_names_path_and_index() -> None:
    problems = problems_of(minimal(interfaces={"exclusion_patterns": ["^lo$", "wg.*", "wt(.*"]}))
    assert list(problems) == ["interfaces.exclusion_patterns[2]"]
    assert "invalid regex 'wt(.*'" in problems["interfaces.exclusion_patterns[2]"]


def test_k_greater_than_n() -> None:
    problems = problems_of(
        minimal(**tunnel(transport={"redundancy": {"num_shards": 3, "required_shards": 4}}))
    )
    assert problems == {
        "tunnels.wireguard.transport.redundancy.required_shards": "must be ≤ num_shards (3), got 4"
    }


@pytest.mark.parametrize(
    ("redundancy", "path", "message"),
    [
        ({"num_shards": 256}, "num_shards", "must be ≤ 255, got 256"),
        ({"num_shards": 0, "required_shards": 0}, "num_shards", "must be ≥ 1, got 0"),
        ({"required_shards": 0}, "required_shards", "must be ≥ 1, got 0"),
        ({"num_shards": 5.0}, "num_shards", "expected an integer, got float 5.0"),
        ({"num_shards": "5"}, "num_shards", "expected an integer, got string '5'"),
        (
            {"window": "150ms"},
            "window",
            "must be at most 100ms (the longest a block waits for its parity), got 150ms",
        ),
    ],
)
def test_redundancy_bounds(redundancy: dict[str, Any], path: str, message: str) -> None:
    problems = problems_of(minimal(**tunnel(transport={"redundancy": redundancy})))
    assert problems[f"tunnels.wireguard.transport.redundancy.{path}"] == message


def test_redundancy_window_defaults_to_one_millisecond_and_takes_a_duration() -> None:
    default = validate_gateway_config(minimal(**tunnel())).tunnels["wireguard"]
    assert default.transport.redundancy.window == 0.001
    data = minimal(**tunnel(transport={"redundancy": {"window": "5ms"}}))
    redundancy = validate_gateway_config(data).tunnels["wireguard"].transport.redundancy
    assert redundancy.window == pytest.approx(0.005)
    for bad in ("soon", "0ms"):
        problems = problems_of(minimal(**tunnel(transport={"redundancy": {"window": bad}})))
        assert list(problems) == ["tunnels.wireguard.transport.redundancy.window"]


def test_no_fec_and_max_n_are_valid() -> None:
    for n, k in [(1, 1), (255, 255), (255, 1)]:
        data = minimal(**tunnel(transport={"redundancy": {"num_shards": n, "required_shards": k}}))
        redundancy = validate_gateway_config(data).tunnels["wireguard"].transport.redundancy
        assert (redundancy.num_shards, redundancy.required_shards) == (n, k)


def test_duplicate_tunnel_ids_name_both_tunnels() -> None:
    data = minimal(
        tunnels={
            "alpha": {"tunnel_id": 7, "gate": {"application_to_gate": 1000}},
            "beta": {"tunnel_id": 7, "gate": {"application_to_gate": 1001}},
        }
    )
    problems = problems_of(data)
    assert list(problems) == ["tunnels.beta.tunnel_id"]
    assert "'alpha'" in problems["tunnels.beta.tunnel_id"]
    assert "'beta'" in problems["tunnels.beta.tunnel_id"]


def test_explicit_id_colliding_with_derived_id() -> None:
    data = minimal(
        tunnels={
            "wireguard": {"gate": {"application_to_gate": 1000}},
            "video": {"tunnel_id": derive_tunnel_id("wireguard"), "gate": {"path": "/tmp/v"}},
        }
    )
    assert "collides with tunnel 'wireguard'" in problems_of(data)["tunnels.video.tunnel_id"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 parsecs", "invalid duration '10 parsecs'"),
        ("10", "a bare number is written without quotes: 10"),
        ("-5ms", "duration must be > 0"),
        (0, "duration must be > 0"),
        (-1, "duration must be > 0"),
        (True, "expected a duration"),
        ([1], "expected a duration"),
    ],
)
def test_bad_duration(value: object, message: str) -> None:
    problems = problems_of(minimal(**tunnel(transport={"send_deadline": value})))
    assert message in problems["tunnels.wireguard.transport.send_deadline"]


def test_missing_far_gate_key() -> None:
    assert problems_of(minimal(far_gate={"endpoints": ["1.2.3.4:5"]})) == {
        "far_gate.public_key": "required key is missing"
    }
    data = minimal()
    del data["far_gate"]
    assert problems_of(data) == {"far_gate": "required table [far_gate] is missing"}


def test_all_problems_are_reported_at_once() -> None:
    data = minimal(
        private_key="<run warp-keygen to generate>",
        listen_port=70000,
        interfaces={"exclusion_patterns": ["("], "bogus": 1},
        log={"level": "loud"},
    )
    data["tunnels"]["wireguard"]["transport"] = {"mtu": 100, "reorder_timeout": "fast"}
    problems = problems_of(data)
    assert set(problems) == {
        "private_key",
        "listen_port",
        "interfaces.exclusion_patterns[0]",
        "interfaces.bogus",
        "log.level",
        "tunnels.wireguard.transport.mtu",
        "tunnels.wireguard.transport.reorder_timeout",
    }
    assert problems["log.level"] == (
        "expected 'debug', 'info', 'warning' or 'error', got string 'loud'"
    )
    assert problems["listen_port"] == "must be ≤ 65535, got 70000"


# --------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (10, 10.0),
        (0.25, 0.25),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        (" 50 ms ", 0.05),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_in_config() -> None:
    data = minimal(
        interfaces={
            "interface_scan_interval": "2m",
            "holepunch_keep_alive_interval": "250ms",
            "path_timeout": 2,
        }
    )
    interfaces = validate_gateway_config(data).interfaces
    assert interfaces.interface_scan_interval == 120.0
    assert interfaces.holepunch_keep_alive_interval == 0.25
    assert interfaces.path_timeout == 2.0


def test_path_timeout_must_exceed_probe_interval() -> None:
    problems = problems_of(
        minimal(interfaces={"holepunch_keep_alive_interval": "5s", "path_timeout": "3s"})
    )
    assert (
        "must be longer than holepunch_keep_alive_interval" in problems["interfaces.path_timeout"]
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.net:13116", HostPort("example.net", 13116)),
        ("192.0.2.1:1", HostPort("192.0.2.1", 1)),
        ("[2001:db8::1]:13116", HostPort("2001:db8::1", 13116)),
        ("localhost:65535", HostPort("localhost", 65535)),
    ],
)
def test_parse_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("example.net", 'expected "host:port"'),
        ("2001:db8::1:13116", 'an IPv6 address goes in brackets: "[2001:db8::1]:13116"'),
        ("[2001:db8::1]13116", 'expected "[IPv6 address]:port"'),
        ("[example.net]:1", "is not an IPv6 address"),
        ("example.net:0", "port must be 1..65535"),
        ("example.net:65536", "port must be 1..65535"),
        ("example.net:http", "port must be 1..65535"),
        ("exa mple.net:1", "neither an IP address nor a valid host name"),
        ("192.0.2.300:1", "not a valid IPv4 address"),
        (":1", 'expected "host:port"'),
    ],
)
def test_bad_host_port(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_host_port(text)


def test_endpoints_and_metrics() -> None:
    data = minimal(metrics={"listen": "[::1]:9716"}, listen_port=51900)
    data["far_gate"]["endpoints"] = ["203.0.113.7:51900", "[2001:db8::7]:51900"]
    config = validate_gateway_config(data)
    assert config.far_gate.endpoints == (
        HostPort("203.0.113.7", 51900),
        HostPort("2001:db8::7", 51900),
    )
    assert config.metrics.listen == HostPort("::1", 9716)
    assert config.listen_port == 51900
    data["far_gate"]["endpoints"] = ["203.0.113.7:51900", "::1:5"]
    assert "brackets" in problems_of(data)["far_gate.endpoints[1]"]


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("10Mbit", 10_000_000),
        ("10mbit", 10_000_000),
        ("10 Mbps", 10_000_000),
        ("1.5Gbit", 1_500_000_000),
        ("500kbit", 500_000),
        ("500Kbps", 500_000),
        ("64bit", 64),
        ("2MB/s", 16_000_000),
        ("100kB/s", 800_000),
        (1_000_000, 1_000_000),
        ("unlimited", None),
    ],
)
def test_parse_rate(text: object, bits: int | None) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["10 furlongs", "fast", "0Mbit", "-1Mbit", "10mb/s", True])
def test_bad_rate(text: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


# --------------------------------------------------------------------------------------------
# Gates


def test_gate_type_inference() -> None:
    data = minimal(
        tunnels={
            "udp": {"gate": {"application_to_gate": 1000, "ipv4": False}},
            "sock": {"gate": {"path": "/run/warp/a.sock"}},
            "ip": {"gate": {"address": "10.7.0.1/24"}},
        }
    )
    tunnels = validate_gateway_config(data).tunnels
    udp, sock, ip = tunnels["udp"].gate, tunnels["sock"].gate, tunnels["ip"].gate
    assert isinstance(udp, LoopbackGate) and udp.host == "::1"
    assert isinstance(sock, UnixGate) and sock.application_path is None
    assert isinstance(ip, TunGate)
    assert (ip.name, ip.mtu, ip.allowed_ips) == ("warp0", 1420, ())
    assert ip.address == (ipaddress.ip_interface("10.7.0.1/24"),)


def test_tun_gate_fields() -> None:
    gate = {
        "type": "tun",
        "name": "wg-warp",
        "address": ["10.7.0.1/24", "fd00::1/64"],
        "mtu": 1380,
        "allowed_ips": ["10.7.0.0/24", "fd00::/64", "192.168.1.7/24"],
    }
    tun = validate_gateway_config(minimal(tunnels={"t": {"gate": gate}})).tunnels["t"].gate
    assert isinstance(tun, TunGate)
    assert [str(a) for a in tun.address] == ["10.7.0.1/24", "fd00::1/64"]
    assert [str(n) for n in tun.allowed_ips] == ["10.7.0.0/24", "fd00::/64", "192.168.1.0/24"]
    bad = {"name": "way-too-long-name0", "address": "10.7.0.1", "allowed_ips": ["10.7.0/33"]}
    problems = problems_of(minimal(tunnels={"t": {"gate": bad}}))
    assert set(problems) == {
        "tunnels.t.gate.name",
        "tunnels.t.gate.address[0]",
        "tunnels.t.gate.allowed_ips[0]",
    }


def test_ambiguous_and_empty_gates() -> None:
    problems = problems_of(minimal(**tunnel(gate={"application_to_gate": 5, "path": "/x"})))
    assert "ambiguous gate" in problems["tunnels.wireguard.gate"]
    problems = problems_of(minimal(**tunnel(gate={})))
    assert "cannot tell the gate type" in problems["tunnels.wireguard.gate"]
    problems = problems_of(minimal(**tunnel(gate={"aplication_to_gate": 5})))
    assert "did you mean 'application_to_gate'?" in problems["tunnels.wireguard.gate"]


def test_explicit_gate_type() -> None:
    problems = problems_of(minimal(**tunnel(gate={"type": "udp", "application_to_gate": 5})))
    assert problems == {
        "tunnels.wireguard.gate": "unknown gate type 'udp'; expected 'loopback', 'unix', 'tun'"
    }
    problems = problems_of(minimal(**tunnel(gate={"type": "loopback", "path": "/x"})))
    assert problems["tunnels.wireguard.gate.path"] == (
        "unknown key 'path' for a loopback gate ('path' belongs to a unix gate)"
    )
    assert problems["tunnels.wireguard.gate.application_to_gate"] == "required key is missing"


def test_loopback_gate_ports() -> None:
    problems = problems_of(minimal(**tunnel(gate={"application_to_gate": 0})))
    assert problems == {"tunnels.wireguard.gate.application_to_gate": "must be ≥ 1, got 0"}
    problems = problems_of(
        minimal(**tunnel(gate={"application_to_gate": 5, "gate_to_application": 5}))
    )
    assert "must differ" in problems["tunnels.wireguard.gate.gate_to_application"]


def test_gates_cannot_share_a_socket() -> None:
    data = minimal(
        tunnels={
            "a": {"gate": {"application_to_gate": 1000}},
            "b": {"gate": {"application_to_gate": 1000}},
            "c": {"gate": {"application_to_gate": 1000, "ipv4": False}},
            "d": {"gate": {"path": "/run/x.sock"}},
            "e": {"gate": {"path": "/run/x.sock"}},
        }
    )
    problems = problems_of(data)
    assert set(problems) == {"tunnels.b.gate.application_to_gate", "tunnels.e.gate.path"}


def test_unix_socket_path_length() -> None:
    problems = problems_of(minimal(**{"tunnels": {"u": {"gate": {"path": "/" + "x" * 107}}}}))
    assert "at most 107 bytes" in problems["tunnels.u.gate.path"]


def test_wireguard_far_gate_allows_only_one_tun_gate() -> None:
    data = minimal(**tunnel())
    data["far_gate"]["kind"] = "wireguard"
    assert "allows only tun gates" in problems_of(data)["tunnels.wireguard.gate"]
    data["tunnels"] = {"wg": {"gate": {"address": "10.7.0.2/24"}}}
    config = validate_gateway_config(data)
    assert config.far_gate.kind == "wireguard"
    data["tunnels"]["wg2"] = {"gate": {"name": "warp1"}}
    assert "exactly one tunnel" in problems_of(data)["tunnels"]


# --------------------------------------------------------------------------------------------
# Tunnels, keys, reachability


def test_tunnel_id_derivation_is_stable() -> None:
    # Both peers must derive the same id: pin the function's output.
    assert derive_tunnel_id("wireguard") == 17151
    assert derive_tunnel_id("wireguard") == derive_tunnel_id("wireguard")
    ids = {derive_tunnel_id(f"t{i}") for i in range(1000)}
    assert all(1 <= i <= 65535 for i in ids)
    assert len(ids) > 990


def test_explicit_tunnel_id() -> None:
    config = validate_gateway_config(minimal(**tunnel(tunnel_id=4711)))
    assert config.tunnels["wireguard"].tunnel_id == 4711
    for bad in (0, 65536):
        assert "tunnels.wireguard.tunnel_id" in problems_of(minimal(**tunnel(tunnel_id=bad)))


def test_at_least_one_tunnel_and_valid_names() -> None:
    data = minimal(tunnels={})
    assert "at least one tunnel" in problems_of(data)["tunnels"]
    del data["tunnels"]
    assert "at least one tunnel" in problems_of(data)["tunnels"]
    data = minimal(tunnels={"my tunnel": {"gate": {"application_to_gate": 5}}})
    assert "invalid tunnel name" in problems_of(data)['tunnels."my tunnel"']


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("A" * 53, "secp256k1"),
        ("A" * 20, "got 20 characters"),
        ("", "placeholder"),
        (42, "expected a public key as a string, got integer 42"),
    ],
)
def test_bad_keys(value: object, message: str) -> None:
    problems = problems_of(minimal(far_gate={"public_key": value}))
    assert message in problems["far_gate.public_key"]


def test_far_gate_is_not_self() -> None:
    data = minimal(far_gate={"public_key": encode_key(public_key_of(PRIVATE))})
    assert "own public key" in problems_of(data)["far_gate.public_key"]


def test_map_public_key_required_with_address() -> None:
    problems = problems_of(minimal(warp_map={"address": "map.example.net:13116"}))
    assert problems == {"warp_map.public_key": "required when warp_map.address is set"}


def test_reachability() -> None:
    data = minimal(warp_map={})
    assert "no way to reach the far gate" in problems_of(data)["warp_map.address"]
    # engarde client: static endpoints, no map
    data["far_gate"]["endpoints"] = ["203.0.113.7:51900"]
    assert validate_gateway_config(data).warp_map.address is None
    # engarde server: public listen port, the peer finds us
    data = minimal(warp_map={}, listen_port=51900)
    assert validate_gateway_config(data).listen_port == 51900


# --------------------------------------------------------------------------------------------
# Loading files


def test_load_file_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(spec_example_with_keys())
    assert load_gateway_config(good).far_gate.public_key == PEER
    assert load_gateway_config(str(good)).far_gate.public_key == PEER

    with pytest.raises(ConfigError) as info:
        load_gateway_config(tmp_path / "missing.toml")
    assert info.value.problems == [("", "no such file")]
    assert info.value.source.endswith("missing.toml")

    with pytest.raises(ConfigError) as info:
        load_gateway_config(tmp_path)
    assert "directory" in info.value.problems[0][1]

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"private_key = \xff\n")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(binary)
    assert "not UTF-8" in info.value.problems[0][1]


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(tmp_path / "x.toml")
    assert info.value.problems == [("", "permission denied")]


def test_toml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse_gateway_config('private_key = "x"\n[far_gate\n', "gw.toml")
    ((path, message),) = info.value.problems
    assert path == ""
    assert message.startswith("TOML syntax error: line 2, column ")
    assert info.value.format().startswith("gw.toml: TOML syntax error: line 2")


def test_config_error_format() -> None:
    error = ConfigError([("a.b", "bad"), ("", "worse")], "f.toml")
    assert error.format() == "a.b: bad\nf.toml: worse"
    assert str(error) == error.format()


# --------------------------------------------------------------------------------------------
# warp-map config


def test_map_config_defaults_and_values() -> None:
    key = encode_key(generate_private_key())
    config = parse_map_config(f'private_key = "{key}"')
    assert isinstance(config, MapServerConfig)
    assert config.bind == HostPort("0.0.0.0", 13116)
    assert config.registration_ttl == 60.0
    assert config.lookup_policy == "mutual"
    assert config.allowed_keys is None
    assert config.relay.enabled is True
    assert config.relay.rate_limit == 10_000_000
    limits = config.limits
    assert (limits.max_clients, limits.max_registrations) == (10_000, 16)
    assert (limits.requests_per_second, limits.handshake_load_threshold) == (20, 500)
    assert (config.log.level, config.log.format) == ("info", "text")

    text = f"""
private_key = "{key}"
bind = "[::]:4000"
registration_ttl = "2m"
lookup_policy = "any"
allowed_keys = ["{encode_key(PEER)}"]
[relay]
rate_limit = "1Gbit"
"""
    config = parse_map_config(text)
    assert config.bind == HostPort("::", 4000)
    assert config.registration_ttl == 120.0
    assert config.lookup_policy == "any"
    assert config.allowed_keys == (PEER,)
    assert config.relay.rate_limit == 1_000_000_000


def test_map_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse_map_config(
            'bind = "0.0.0.0"\nlookup_policy = "some"\nallowed_keys = ["nope"]\n'
            'registration_ttl = 0\n[relay]\nrate_limit = "10 furlongs"\n[limits]\nmax_client = 5\n'
        )
    problems = dict(info.value.problems)
    assert set(problems) == {
        "bind",
        "private_key",
        "lookup_policy",
        "allowed_keys[0]",
        "registration_ttl",
        "relay.rate_limit",
        "limits.max_client",
    }
    assert problems["private_key"] == "required key is missing"
    assert problems["limits.max_client"] == "unknown key 'max_client'; did you mean 'max_clients'?"


def test_map_config_overrides_and_no_file() -> None:
    key = encode_key(generate_private_key())
    config = load_map_config(None, overrides={"private_key": key, "bind": "127.0.0.1:5000"})
    assert config.bind == HostPort("127.0.0.1", 5000)
    with pytest.raises(ConfigError) as info:
        load_map_config(None)
    assert info.value.problems == [("private_key", "required key is missing")]


# --------------------------------------------------------------------------------------------
# Examples and docs


def test_examples_validate() -> None:
    config = parse_gateway_config(example_gateway_config())
    assert config.tunnels["wireguard"].tunnel_id == derive_tunnel_id("wireguard")
    assert parse_map_config(example_map_config()).lookup_policy == "mutual"
    assert example_gateway_config() != example_gateway_config()  # fresh keys each time


def test_shipped_configs_validate() -> None:
    load_gateway_config(ROOT / "configs" / "example.toml")
    load_map_config(ROOT / "configs" / "warp-map.toml")


def _paths(model: type[Any], prefix: str) -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _paths(annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_docs_mention_every_key() -> None:
    from warp.config import MapLimitsConfig, RelayConfig, TransportConfig

    docs = (ROOT / "docs" / "configuration.md").read_text()
    keys = _paths(GatewayConfig, "") + _paths(MapServerConfig, "")
    keys += _paths(TransportConfig, "tunnels.<name>.transport.")
    keys += _paths(LoopbackGate, "") + _paths(UnixGate, "") + _paths(TunGate, "")
    keys += _paths(RelayConfig, "relay.") + _paths(MapLimitsConfig, "limits.")
    missing = [k for k in keys if f"`{k}`" not in docs and k != "tunnels"]
    assert missing == []


# --------------------------------------------------------------------------------------------
# Robustness: any TOML-shaped data gives a ConfigError or a config, never another exception

_toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=60),
    st.sampled_from(["10s", "-1ms", "[::1]:5", "a:1", "^lo$", "(", "10.0.0.1/8", "tun"]),
)
_toml_values = st.recursive(
    _toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "gate",
                    "type",
                    "path",
                    "mtu",
                    "transport",
                    "redundancy",
                    "num_shards",
                    "x",
                    "name",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_sections = [
    "private_key",
    "listen_port",
    "interfaces",
    "warp_map",
    "far_gate",
    "tunnels",
    "control",
    "metrics",
    "log",
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_sections), _toml_values, max_size=6))
def test_arbitrary_data_never_raises_anything_else(overrides: dict[str, Any]) -> None:
    try:
        validate_gateway_config(minimal(**overrides))
    except ConfigError as exc:
        assert exc.problems
        for path, message in exc.problems:
            assert isinstance(path, str) and message


# --------------------------------------------------------------------------------------------
# Fleets: several far gates


TRUCK1 = public_key_of(generate_private_key())
TRUCK2 = public_key_of(generate_private_key())


def fleet(**overrides: Any) -> dict[str, Any]:
    """An operator with two vehicles (the interface agreed for issue 11), as parsed TOML."""
    data = minimal(
        far_gate=None,
        far_gates={
            "truck1": {"public_key": encode_key(TRUCK1)},
            "truck2": {"public_key": encode_key(TRUCK2)},
        },
        tunnels={
            "video1": {"far_gate": "truck1", "gate": {"application_to_gate": 59401}},
            "video2": {"far_gate": "truck2", "gate": {"application_to_gate": 59402}},
        },
    )
    del data["far_gate"]
    data.update(overrides)
    return data


def test_single_far_gate_is_the_far_gate_named_default() -> None:
    config = validate_gateway_config(minimal())
    assert list(config.far_gates) == ["default"]
    assert config.far_gates["default"].public_key == PEER
    assert config.tunnels["wireguard"].far_gate == "default"


def test_fleet_loads_with_each_tunnel_naming_its_far_gate() -> None:
    config = validate_gateway_config(fleet())
    assert {name: far.public_key for name, far in config.far_gates.items()} == {
        "truck1": TRUCK1,
        "truck2": TRUCK2,
    }
    assert config.tunnels["video1"].far_gate == "truck1"
    assert config.tunnels["video2"].far_gate == "truck2"


def test_the_only_far_gate_of_a_fleet_table_needs_no_naming() -> None:
    data = minimal(far_gates={"truck1": {"public_key": encode_key(TRUCK1)}})
    del data["far_gate"]
    assert validate_gateway_config(data).tunnels["wireguard"].far_gate == "truck1"


def test_tunnel_naming_an_unknown_far_gate() -> None:
    data = fleet()
    data["tunnels"]["video2"]["far_gate"] = "truck3"
    problems = problems_of(data)
    assert list(problems) == ["tunnels.video2.far_gate"]
    assert "unknown far gate 'truck3'" in problems["tunnels.video2.far_gate"]


def test_tunnel_without_far_gate_among_several_is_an_error_unless_a_tun_gate() -> None:
    data = fleet()
    del data["tunnels"]["video2"]["far_gate"]
    assert "required with several far gates" in problems_of(data)["tunnels.video2.far_gate"]
    data["tunnels"]["video2"] = {"gate": {"type": "tun", "name": "warp0"}}
    problems = problems_of(data)  # shared: it routes by each far gate's allowed_ips
    assert list(problems) == ["far_gates.truck1.allowed_ips", "far_gates.truck2.allowed_ips"]
    assert "tun gate shared" in problems["far_gates.truck1.allowed_ips"]
    data["far_gates"]["truck1"]["allowed_ips"] = ["10.9.0.11/32"]
    data["far_gates"]["truck2"]["allowed_ips"] = ["10.9.0.12/32"]
    assert validate_gateway_config(data).tunnels["video2"].far_gate is None


def test_two_far_gates_with_one_key() -> None:
    data = fleet()
    data["far_gates"]["truck2"]["public_key"] = encode_key(TRUCK1)
    problems = problems_of(data)
    assert list(problems) == ["far_gates.truck2.public_key"]
    assert "the same key as far gate 'truck1'" in problems["far_gates.truck2.public_key"]


def test_overlapping_allowed_ips() -> None:
    data = fleet()
    data["far_gates"]["truck1"]["allowed_ips"] = ["10.9.0.0/24"]
    data["far_gates"]["truck2"]["allowed_ips"] = ["10.9.1.0/24", "10.9.0.12/32"]
    problems = problems_of(data)
    assert list(problems) == ["far_gates.truck2.allowed_ips[1]"]
    assert (
        "overlaps 10.9.0.0/24 of far gate 'truck1'" in problems["far_gates.truck2.allowed_ips[1]"]
    )
    data["far_gates"]["truck2"]["allowed_ips"] = ["10.9.1.0/24", "fd00::/64"]
    assert validate_gateway_config(data).far_gates["truck2"].allowed_ips[0] == (
        ipaddress.ip_network("10.9.1.0/24")
    )


def test_tunnel_id_reused_towards_the_same_far_gate_only() -> None:
    data = fleet()
    data["tunnels"]["video1"]["tunnel_id"] = 7
    data["tunnels"]["video2"]["tunnel_id"] = 7
    config = validate_gateway_config(data)  # one id towards two far gates: fine
    assert {t.tunnel_id for t in config.tunnels.values()} == {7}
    data["tunnels"]["video2"]["far_gate"] = "truck1"
    problems = problems_of(data)
    assert list(problems) == ["tunnels.video2.tunnel_id"]
    assert "collides with tunnel 'video1'" in problems["tunnels.video2.tunnel_id"]


def test_far_gate_and_far_gates_together_is_an_error() -> None:
    data = fleet(far_gate={"public_key": encode_key(PEER)})
    assert "not both" in problems_of(data)["far_gates"]


def test_fleet_problems_name_the_far_gate_table() -> None:
    data = fleet()
    data["far_gates"]["truck2"]["public_key"] = encode_key(public_key_of(PRIVATE))
    assert "own public key" in problems_of(data)["far_gates.truck2.public_key"]


def test_example_is_an_operator_with_two_vehicles() -> None:
    config = parse_gateway_config(example_gateway_config())
    assert list(config.far_gates) == ["truck1", "truck2"]
    assert [t.far_gate for t in config.tunnels.values()] == ["truck1", "truck2"]
