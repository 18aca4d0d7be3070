"""The `warp` command: check, print-example-config, help, version, exit codes (SPEC §2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from warp import __version__
from warp.cli import main
from warp.keys import encode_key, generate_private_key, public_key_of

ROOT = Path(__file__).resolve().parents[2]
WARP = Path(sys.executable).parent / "warp"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if not WARP.exists():
        pytest.fail(f"console script {WARP} is not installed (pip install -e .)")
    return subprocess.run(
        [str(WARP), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def valid_config() -> str:
    far = encode_key(public_key_of(generate_private_key()))
    map_key = encode_key(public_key_of(generate_private_key()))
    return f"""
private_key = "{encode_key(generate_private_key())}"
[warp_map]
address = "warp-map.example.net:13116"
public_key = "{map_key}"
[far_gate]
public_key = "{far}"
[tunnels.wireguard]
tunnel_id = 4711
[tunnels.wireguard.gate]
application_to_gate = 59401
"""


def test_print_example_config_piped_into_check(tmp_path: Path) -> None:
    printed = run("print-example-config")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("#")
    # a commented, complete config: every section is shown
    for section in ("[interfaces]", "[warp_map]", "[far_gate]", "[tunnels.wireguard.gate]"):
        assert section in printed.stdout
    for section in ("[tunnels.wireguard.transport.redundancy]", "[control]", "[metrics]", "[log]"):
        assert section in printed.stdout
    config = tmp_path / "warp.toml"
    config.write_text(printed.stdout)
    checked = run("check", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: 1 tunnel (wireguard → id ")
    assert checked.stdout.count("\n") == 1
    assert "map warp-map.example.net:13116" in checked.stdout


def test_print_example_map_config_piped_into_check(tmp_path: Path) -> None:
    printed = run("print-example-config", "--map")
    assert printed.returncode == 0, printed.stderr
    config = tmp_path / "warp-map.toml"
    config.write_text(printed.stdout)
    checked = run("check", "--map", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: warp-map on 0.0.0.0:13116")


def test_check_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "warp.toml"
    config.write_text(valid_config())
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 1 tunnel (wireguard → id 4711, loopback 127.0.0.1:59401), far gate ")
    assert out.endswith("…, map warp-map.example.net:13116\n")


def test_check_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        """
private_key = "<run warp-keygen to generate>"
[interfaces]
interface_scan_intervall = 10
exclusion_patterns = ["^lo$", "wg.*", "(("]
[far_gate]
endpoints = ["203.0.113.7:51900"]
[tunnels.a]
tunnel_id = 9
gate.application_to_gate = 1000
transport.send_deadline = "soon"
transport.redundancy = { num_shards = 2, required_shards = 3 }
[tunnels.b]
tunnel_id = 9
gate.application_to_gate = 1001
"""
    )
    result = run("check", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    paths = [line.split(": ", 1)[0] for line in lines]
    assert paths == [
        "private_key",
        "interfaces.exclusion_patterns[2]",
        "interfaces.interface_scan_intervall",
        "far_gate.public_key",
        "tunnels.a.transport.send_deadline",
        "tunnels.a.transport.redundancy.required_shards",
    ]
    assert "run `warp-keygen`" in lines[0]
    assert "did you mean 'interface_scan_interval'?" in lines[2]


def test_check_duplicate_tunnel_ids(tmp_path: Path) -> None:
    config = tmp_path / "dup.toml"
    config.write_text(
        valid_config() + "[tunnels.other]\ntunnel_id = 4711\ngate.application_to_gate = 2\n"
    )
    result = run("check", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("tunnels.other.tunnel_id: tunnel id 4711 of tunnel 'other'")
    assert "'wireguard'" in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"[far_gate\n", "TOML syntax error: line 1, column"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
)
def test_check_unreadable_files(tmp_path: Path, content: bytes | None, expected: str) -> None:
    config = tmp_path / "c.toml"
    if content is not None:
        config.write_bytes(content)
    result = run("check", str(config))
    assert result.returncode == 1
    assert result.stderr == f"{config}: {expected}" + result.stderr.split(expected, 1)[1]
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_check_directory(tmp_path: Path) -> None:
    result = run("check", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == f"{tmp_path}: is a directory, not a config file\n"


def test_help_and_version() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "check" in result.stdout and "print-example-config" in result.stdout
    for command in ("check", "print-example-config"):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: warp {command}" in result.stdout
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"warp {__version__}\n")


def test_usage_errors_exit_1() -> None:
    for args in ([], ["frobnicate"], ["check"], ["check", "a", "b"], ["--bogus"]):
        result = run(*args)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr
        assert result.stderr


def test_runtime_failure_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import warp.cli

    def boom() -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(warp.cli, "example_gateway_config", boom)
    assert main(["print-example-config"]) == 2


def test_shipped_example_checks() -> None:
    result = run("check", str(ROOT / "configs" / "example.toml"))
    assert result.returncode == 0, result.stderr
    result = run("check", "--map", str(ROOT / "configs" / "warp-map.toml"))
    assert result.returncode == 0, result.stderr
