"""warp migrate-engarde on the engarde configs in tests/unit/data/engarde/: every output passes
the real `warp check`, and the warnings and to-do lines say what they must."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from warp.cli import main
from warp.config import GatewayConfig, LoopbackGate, load_gateway_config, parse_gateway_config
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.migrate.engarde import MigrationError, migrate

DATA = Path(__file__).parent / "data" / "engarde"
WARP = Path(sys.executable).with_name("warp")  # the installed console script (.venv/bin/warp)


def run_warp(*args: str) -> subprocess.CompletedProcess[str]:
    assert WARP.exists(), f"{WARP} missing: install with pip install -e '.[test]'"
    return subprocess.run([str(WARP), *args], capture_output=True, text=True, timeout=60)


def convert(
    tmp_path: Path, name: str, *extra: str, out_name: str | None = None
) -> tuple[GatewayConfig, str, str]:
    """Run the real command on DATA/name, then the real `warp check` on what it wrote."""
    out = tmp_path / (out_name or f"{Path(name).stem}.toml")
    result = run_warp("migrate-engarde", str(DATA / name), "-o", str(out), *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    check = run_warp("check", str(out))
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok: 1 tunnel")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds a private key
    return load_gateway_config(out), out.read_text(), result.stderr


def warnings_of(stderr: str) -> list[str]:
    return [line[len("warning: ") :] for line in stderr.splitlines() if line.startswith("warning:")]


def gate_of(config: GatewayConfig) -> LoopbackGate:
    gate = config.tunnels["wireguard"].gate
    assert isinstance(gate, LoopbackGate)
    return gate


def test_client_only(tmp_path: Path) -> None:
    config, text, stderr = convert(tmp_path, "client.yml")
    patterns = [p.pattern for p in config.interfaces.exclusion_patterns]
    assert patterns == ["^lo$", "^wg0$", "^docker0$", r"^br\-lan\.1$"]
    # anchored: exactly those names, nothing that merely contains them
    assert not config.interfaces.uses_interface("br-lan.1")
    assert config.interfaces.uses_interface("br-lanX1")
    assert config.interfaces.uses_interface("wg01")
    assert not config.interfaces.uses_interface("docker0")
    assert [str(e) for e in config.far_gate.endpoints] == ["engarde.example.net:59501"]
    assert config.warp_map.address is None
    gate = gate_of(config)
    assert (gate.ipv4, gate.application_to_gate, gate.gate_to_application) == (True, 59401, None)
    assert config.tunnels["wireguard"].transport.send_deadline == pytest.approx(0.010)
    assert config.listen_port == 0
    assert config.control.socket == "/run/warp/client.sock"
    assert "# engarde description: Field kit 7" in text
    assert "PLACEHOLDER" in text and "REPLACE" in text
    assert warnings_of(stderr) == []
    assert "1. This side's public key (give it to the server): " in stderr
    assert encode_key(config.public_key) in stderr
    assert "far_gate.public_key is a random PLACEHOLDER" in stderr
    assert "WireGuard: no change (its peer's Endpoint = 127.0.0.1:59401" in stderr
    assert "stop engarde-client (it holds UDP 59401)" in stderr


def test_server_only(tmp_path: Path) -> None:
    config, text, stderr = convert(tmp_path, "server.yml")
    assert config.listen_port == 59501
    assert config.far_gate.endpoints == ()
    gate = gate_of(config)
    assert (gate.application_to_gate, gate.gate_to_application) == (59401, 51820)
    assert [p.pattern for p in config.interfaces.exclusion_patterns] == ["^lo$", "^wg"]
    assert config.tunnels["wireguard"].transport.send_deadline == pytest.approx(0.010)
    (warning,) = warnings_of(stderr)
    assert warning.startswith("server.clientTimeout (30 s) has no meaning in warp")
    assert "WireGuard: no change (it learns 127.0.0.1:59401" in stderr
    assert "keep UDP 59501 open" in stderr
    assert "# engarde description: Control room" in text


def test_both_sections_need_a_role(tmp_path: Path) -> None:
    result = run_warp("migrate-engarde", str(DATA / "both.yml"))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "both a client and a server section" in lines[0] and "--role" in lines[0]


def test_both_sections_with_role_make_a_matching_pair(tmp_path: Path) -> None:
    server, _, server_err = convert(tmp_path, "both.yml", "--role", "server", out_name="s.toml")
    server_key = encode_key(server.public_key)
    client, client_text, client_err = convert(
        tmp_path, "both.yml", "--role", "client", "--far-public-key", server_key, out_name="c.toml"
    )
    assert client.far_gate.public_key == server.public_key
    assert "PLACEHOLDER" not in client_text
    assert "PLACEHOLDER" not in client_err
    # the client reaches the server's listen port; both use the same tunnel id and (k, n)
    assert [e.port for e in client.far_gate.endpoints] == [server.listen_port] == [59501]
    assert client.tunnels["wireguard"].tunnel_id == server.tunnels["wireguard"].tunnel_id
    for side in (client, server):
        redundancy = side.tunnels["wireguard"].transport.redundancy
        # one of two uplinks may die: no uplink carries more than n - k = 2 of the 4 shards
        assert (redundancy.required_shards, redundancy.num_shards) == (2, 4)
    # the server's placeholder is what the user must replace with the client's key
    assert "far_gate.public_key is a random PLACEHOLDER" in server_err
    assert encode_key(client.public_key) in client_err


def test_dst_overrides(tmp_path: Path) -> None:
    config, text, stderr = convert(tmp_path, "overrides.yml")
    assert [str(e) for e in config.far_gate.endpoints] == [
        "203.0.113.10:59501",
        "198.51.100.20:59501",
    ]
    # "lo" listed in engarde is not doubled
    assert [p.pattern for p in config.interfaces.exclusion_patterns] == ["^lo$", "^wg0$"]
    warnings = warnings_of(stderr)
    assert len(warnings) == 2
    assert "dstOverrides[0]" in warnings[0] and "198.51.100.20:59501 was added" in warnings[0]
    assert "'starlink0'" in warnings[0]
    assert "dstOverrides[1]" in warnings[1] and "is already in far_gate.endpoints" in warnings[1]
    assert "#   starlink0 -> 198.51.100.20:59501" in text


def test_labels_ipv6_server_and_web_manager(tmp_path: Path) -> None:
    config, text, stderr = convert(tmp_path, "labels.yml")
    assert [str(e) for e in config.far_gate.endpoints] == ["[2001:db8::10]:59501"]
    for line in ('#   wwan0 = "LTE Vodafone"', '#   wwan1 = "LTE TIM"', '#   wlan0 = "Depot wifi"'):
        assert line in text
    assert "# engarde description: Robot R2 — teleoperation" in text
    warnings = warnings_of(stderr)
    assert any(
        w.startswith("client.webManager (0.0.0.0:9001) has no meaning in warp")
        and "username/password are dropped" in w
        for w in warnings
    )
    assert any(w.startswith("client.interfaceLabels: kept as comments") for w in warnings)
    assert "# [metrics]" in text
    assert "password" not in text


def test_string_write_timeout_is_the_known_trap(tmp_path: Path) -> None:
    config, _, stderr = convert(tmp_path, "string_timeout.yml")
    assert config.tunnels["wireguard"].transport.send_deadline == pytest.approx(0.010)
    assert config.listen_port == 59501  # ":59501" is every address
    warnings = warnings_of(stderr)
    trap = [w for w in warnings if w.startswith("server.writeTimeout '10ms' is a string")]
    assert len(trap) == 1
    assert "really 2 h 46 min" in trap[0] and "intended 10 ms" in trap[0]
    assert any(w.startswith("server.webManager (127.0.0.1:9002)") for w in warnings)


def test_unknown_keys_are_reported_not_ignored(tmp_path: Path) -> None:
    config, _, stderr = convert(tmp_path, "unknown_key.yml")
    warnings = warnings_of(stderr)
    expected_starts = [
        "logLevel: unknown top-level key",
        "client.dstAddress: unknown engarde key, not converted; did you mean 'dstAddr'?",
        "client.excludedinterfaces: unknown engarde key, not converted (engarde's keys are "
        "case-sensitive: 'excludedInterfaces'",
        "client.clientTimeout: a server key, ignored by engarde's client",
        "client.keepAlive: unknown engarde key, not converted",
        "client.excludedInterfaces names no WireGuard-looking interface",
    ]
    assert len(warnings) == len(expected_starts)
    for warning, start in zip(warnings, expected_starts, strict=True):
        assert warning.startswith(start), (warning, start)
    # the misspelt exclusion list is not applied (as in engarde)
    assert [p.pattern for p in config.interfaces.exclusion_patterns] == ["^lo$"]


def test_stdout_output_parses(tmp_path: Path) -> None:
    result = run_warp("migrate-engarde", str(DATA / "client.yml"))
    assert result.returncode == 0, result.stderr
    config = parse_gateway_config(result.stdout)
    assert config.control.socket == "/run/warp/warp.sock"
    assert "→ standard output" in result.stderr


# ---------------------------------------------------------------------------------------------
# Errors: exit 1, one line, no traceback (in process: main() as the console script calls it)


def write(tmp_path: Path, data: Any, name: str = "e.yml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("content", "args", "words"),
    [
        ({"client": {"listenAddr": "127.0.0.1:1"}}, [], "client.dstAddr is missing"),
        ({"nothing": 1}, [], "has no client: or server: section"),
        (
            {"client": {"listenAddr": "127.0.0.1:1", "dstAddr": "x:2"}},
            ["--role", "server"],
            "has no server: section",
        ),
        (
            {"client": {"listenAddr": "127.0.0.1:1", "dstAddr": "x.net:2", "writeTimeout": "soon"}},
            [],
            "client.writeTimeout: 'soon' is neither",
        ),
        ({"client": {"listenAddr": "127.0.0.1", "dstAddr": "x.net:2"}}, [], "(no port)"),
        (
            {"client": {"listenAddr": "127.0.0.1:1", "dstAddr": "127.0.0.1:2"}},
            [],
            "must be reachable",
        ),
        (
            {"server": {"listenAddr": ":1", "dstAddr": "10.1.1.1:51820"}},
            [],
            "WireGuard is on another machine",
        ),
        (
            {"client": {"listenAddr": "127.0.0.1:1", "dstAddr": "x.net:2"}},
            ["--far-public-key", "nope"],
            "--far-public-key",
        ),
        ("client: [unclosed\n", [], "YAML error at line"),
        (
            {
                "client": {
                    "listenAddr": "127.0.0.1:1",
                    "dstAddr": "x.net:2",
                    "excludedInterfaces": "wg0",
                }
            },
            [],
            "expected a list of interface names",
        ),
    ],
)
def test_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, args: list[str], words: str
) -> None:
    path = write(tmp_path, content)
    assert main(["migrate-engarde", path, *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("warp migrate-engarde: error: ")
    assert words in lines[0]


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.toml"
    out.write_text("keep me")
    assert main(["migrate-engarde", str(DATA / "client.yml"), "-o", str(out)]) == 1
    assert "exists (use --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["migrate-engarde", str(DATA / "client.yml"), "-o", str(out), "--force"]) == 0
    assert load_gateway_config(out).far_gate.endpoints
    assert main(["migrate-engarde", str(tmp_path / "missing.yml")]) == 1
    assert "missing.yml: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# writeTimeout semantics (engarde: a Go time.Duration multiplied by a millisecond)

BASE = {"listenAddr": "127.0.0.1:59401", "dstAddr": "203.0.113.1:59501"}


@pytest.mark.parametrize(
    ("value", "deadline", "warning"),
    [
        (None, 0.010, None),  # absent: engarde's default 10 ms
        (0, 0.010, None),
        (25, 0.025, None),
        (-1, 0.100, "negative: no write deadline"),  # none in engarde: warp's default kept
        ("1s", 1.0, "really 277 h 46 min"),
        ("250ms", 0.25, "really 69 h 26 min"),
    ],
)
def test_write_timeout(value: Any, deadline: float, warning: str | None) -> None:
    section = dict(BASE)
    if value is not None:
        section["writeTimeout"] = value
    migration = migrate({"client": {**section, "excludedInterfaces": ["wg0"]}})
    config = parse_gateway_config(migration.toml)
    assert config.tunnels["wireguard"].transport.send_deadline == pytest.approx(deadline)
    if warning is None:
        assert migration.warnings == []
    else:
        assert len(migration.warnings) == 1 and warning in migration.warnings[0]


def test_listen_addr_not_on_127_0_0_1_says_the_wireguard_line() -> None:
    for listen in ("0.0.0.0:59401", ":59401", "127.0.0.2:59401"):
        migration = migrate({"client": {**BASE, "listenAddr": listen, "excludedInterfaces": []}})
        assert any("Endpoint = 127.0.0.1:59401" in item for item in migration.todo)
        assert any("listens on 127.0.0.1:59401 only" in w for w in migration.warnings)
    ipv6 = migrate({"client": {**BASE, "listenAddr": "[::1]:59401", "excludedInterfaces": ["wg0"]}})
    gate = parse_gateway_config(ipv6.toml).tunnels["wireguard"].gate
    assert isinstance(gate, LoopbackGate) and gate.ipv4 is False
    assert any("WireGuard: no change" in item for item in ipv6.todo)


def test_server_gate_port_avoids_wireguard_and_listen_ports() -> None:
    migration = migrate({"server": {"listenAddr": ":59401", "dstAddr": "127.0.0.1:51820"}})
    gate = parse_gateway_config(migration.toml).tunnels["wireguard"].gate
    assert isinstance(gate, LoopbackGate)
    assert gate.application_to_gate not in (59401, 51820)


def test_far_public_key_accepts_wireguard_base64() -> None:
    import base64

    raw = public_key_of(generate_private_key())
    migration = migrate(
        {"client": {**BASE, "excludedInterfaces": ["wg0"]}},
        far_public_key=base64.b64encode(raw).decode(),
    )
    assert parse_gateway_config(migration.toml).far_gate.public_key == raw
    assert not migration.far_key_is_placeholder
    with pytest.raises(MigrationError):
        migrate({"client": BASE}, far_public_key="A" * 53)


def test_every_example_converts() -> None:
    """Belt and braces: every data file converts for each role it has."""
    for path in sorted(DATA.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        for role in ("client", "server"):
            if role in data:
                migration = migrate(data, role=role, source=path.name)
                parse_gateway_config(migration.toml, os.fspath(path))
