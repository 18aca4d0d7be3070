"""The `warp` command: check, print-example-config, help, version, exit codes."""

from __future__ import annotations

import re
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
    for section in ("[interfaces]", "[warp_map]", "[far_gates.truck1]", "[tunnels.wireguard.gate]"):
        assert section in printed.stdout
    for section in ("[tunnels.wireguard.transport.redundancy]", "[control]", "[metrics]", "[log]"):
        assert section in printed.stdout
    config = tmp_path / "warp.toml"
    config.write_text(printed.stdout)
    checked = run("check", str(config))
    assert checked.returncode == 0, checked.stderr
    # the two-vehicle fleet example
    assert checked.stdout.startswith("ok: 2 tunnels (wireguard → id ")
    assert "far gates truck1 " in checked.stdout and "; truck2 " in checked.stdout
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


PUBLISHED_KEY_MARK = "  # PLACEHOLDER: REPLACE (published with the source)"


def test_shipped_example_checks() -> None:
    """The shipped configs load, and `warp check` warns that their private key is public."""
    result = run("check", str(ROOT / "configs" / "example.toml"))
    assert result.returncode == 0, result.stderr
    assert "warning: private_key: marked PLACEHOLDER" in result.stderr
    result = run("check", "--map", str(ROOT / "configs" / "warp-map.toml"))
    assert result.returncode == 0, result.stderr
    assert "warning: private_key: marked PLACEHOLDER" in result.stderr


# --------------------------------------------------------------------------------------------
# warp check: warnings (exit 0 unless --strict), --map --private-key-file, other file kinds


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def warned_paths(stderr: str) -> list[str]:
    return [line.split(": ")[1] for line in stderr.splitlines() if line.startswith("warning: ")]


def test_check_warns_about_the_unedited_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "warp.toml"
    config.write_text(run("print-example-config").stdout)
    code, out, err = check(capsys, str(config))
    assert code == 0 and out.startswith("ok: ")  # automation keeps working
    assert warned_paths(err) == [
        "warp_map.public_key",
        "far_gates.truck1.public_key",
        "far_gates.truck2.public_key",
        "warp_map.address",
    ], err
    assert "warp-map.example.net:13116 is a documentation address" in err
    code, out, err = check(capsys, "--strict", str(config))
    assert code == 1 and out == ""
    assert err.endswith("warp check: 4 warnings (--strict)\n")


def test_check_warns_about_a_migrated_placeholder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "server.toml"
    migrated = run(
        "migrate-engarde", str(ROOT / "tests/unit/data/engarde/server.yml"), "-o", str(config)
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "# PLACEHOLDER: REPLACE" in config.read_text()
    code, _, err = check(capsys, str(config))
    assert code == 0
    assert warned_paths(err) == ["far_gate.public_key"], err
    assert check(capsys, "--strict", str(config))[0] == 1
    # the real key pasted over the placeholder line: no warning left
    text = re.sub(
        r'^public_key = "[^"]+"  # PLACEHOLDER: REPLACE$',
        f'public_key = "{encode_key(public_key_of(generate_private_key()))}"',
        config.read_text(),
        flags=re.M,
    )
    config.write_text(text)
    assert check(capsys, "--strict", str(config))[0] == 0


@pytest.mark.parametrize(
    ("endpoint", "documentation"),
    [
        ("192.0.2.1:51900", True),
        ("198.51.100.7:51900", True),
        ("203.0.113.200:51900", True),
        ("[2001:db8::7]:51900", True),
        ("peer.example.com:51900", True),
        ("example.org:51900", True),
        ("gw.example:51900", True),
        ("198.51.101.7:51900", False),
        ("[2001:db9::7]:51900", False),
        ("peer.example.community:51900", False),
    ],
)
def test_check_warns_about_documentation_endpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], endpoint: str, documentation: bool
) -> None:
    config = tmp_path / "warp.toml"
    text = valid_config().replace("warp-map.example.net:13116", "10.1.2.3:13116")
    config.write_text(text.replace("[far_gate]\n", f'[far_gate]\nendpoints = ["{endpoint}"]\n'))
    code, _, err = check(capsys, "--strict", str(config))
    assert warned_paths(err) == (["far_gate.endpoints[0]"] if documentation else []), err
    assert code == (1 if documentation else 0)


def test_check_warns_about_unset_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private = generate_private_key()
    zero_base64 = "A" * 43 + "="  # WireGuard's all-zero key: what "unset" looks like
    config = tmp_path / "warp.toml"
    config.write_text(
        f'private_key = "{encode_key(private)}"\n'
        "[warp_map]\n"
        'address = "10.1.2.3:13116"\n'
        f'public_key = "{zero_base64}"\n'
        "[far_gate]\n"
        f'public_key = "{zero_base64}"\n'
        "[tunnels.wireguard.gate]\n"
        "application_to_gate = 59401\n"
    )
    code, _, err = check(capsys, str(config))
    assert code == 0
    assert warned_paths(err) == ["far_gate.public_key", "warp_map.public_key"], err
    assert "all zeros: unset" in err


def test_check_map_config_with_the_key_moved_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The layout configs/warp-map.service recommends: the key in its own file, given to
    warp-map with --private-key-file."""
    config = tmp_path / "warp-map.toml"
    shipped = (ROOT / "configs" / "warp-map.toml").read_text()
    config.write_text(re.sub(r"^private_key = .*\n", "", shipped, flags=re.M))
    key = tmp_path / "warp-map.key"
    key.write_text(run_keygen().stdout)  # warp-keygen's two lines, as the unit's sed leaves one
    key.chmod(0o600)
    code, out, err = check(capsys, "--map", "--private-key-file", str(key), str(config))
    assert (code, err) == (0, ""), err
    private = key.read_text().splitlines()[0].split(": ")[1]
    from warp.keys import decode_key

    assert encode_key(public_key_of(decode_key(private)))[:8] in out
    code, out, err = check(capsys, "--map", str(config))
    assert code == 1
    assert err.startswith("private_key: required key is missing") and "--private-key-file" in err
    code, _, err = check(capsys, "--map", "--private-key-file", str(tmp_path / "nope"), str(config))
    assert code == 1 and err.startswith("warp: error: --private-key-file: cannot read")


def run_keygen() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(WARP.with_name("warp-keygen"))], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "args", "says"),
    [
        (
            "wg0.conf",
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n"
            "ListenPort = 51820\n\n[Peer]\n"
            "PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n"
            "Endpoint = 127.0.0.1:59401\nAllowedIPs = 10.0.0.2/32\n",
            (),
            "is a WireGuard (wg-quick) config, not a warp config",
        ),
        (
            "engarde.yml",
            (ROOT / "tests/unit/data/engarde/client.yml").read_text(),
            (),
            "is an engarde config, not a warp config: convert it with `warp migrate-engarde ",
        ),
        (
            "warp-map.toml",
            (ROOT / "configs" / "warp-map.toml").read_text(),
            (),
            "is a warp-map config: check it with `warp check --map ",
        ),
        (
            "warp.toml",
            (ROOT / "configs" / "example.toml").read_text(),
            ("--map",),
            "is a gateway config: check it with `warp check ",
        ),
    ],
)
def test_check_other_file_kinds_say_what_to_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    args: tuple[str, ...],
    says: str,
) -> None:
    path = tmp_path / name
    path.write_text(content)
    code, out, err = check(capsys, *args, str(path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"warp check: {path} {says}"), err


def test_shipped_example_is_what_print_example_config_prints() -> None:
    """configs/example.toml is `warp print-example-config` under a short header, with other
    keys: they must not drift apart."""
    key = re.compile(r"\b[0-9A-Z]{52}\b")
    shipped = (ROOT / "configs" / "example.toml").read_text()
    printed = run("print-example-config").stdout
    body = shipped[shipped.index(printed.splitlines()[0]) :]
    body = body.replace(PUBLISHED_KEY_MARK, "")  # its key is in the source: marked for check
    assert key.sub("KEY", body) == key.sub("KEY", printed)


def test_reload_without_a_running_gateway_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`warp reload -c` finds the control socket even in a config that no longer loads (the
    point of the reload may be to hear what is wrong), and says when nothing listens there."""
    config = tmp_path / "gw.toml"
    socket_path = tmp_path / "gw.sock"
    config.write_text(f'listen_port = "x"\n[control]\nsocket = "{socket_path}"\n')
    assert main(["reload", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"socket {socket_path} not found" in err
