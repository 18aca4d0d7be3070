"""Secrets on disk: files holding a private key are written 0600 (also over an existing 0644
file), files that others may read get `wg`'s warning from `warp check`, `warp run` and
`warp-map`, and a gateway config may keep its key in `private_key_file`."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from warp.cli import main as warp
from warp.config import ConfigError, load_gateway_config, parse_gateway_config
from warp.instance_lock import claim_instance
from warp.keys import decode_key, encode_key, generate_private_key, public_key_of
from warp_keygen import main as keygen
from warp_map_server.cli import main as warp_map

ENGARDE_CLIENT = Path(__file__).parent / "data" / "engarde" / "client.yml"


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The usual umask 022: a file made without care would be 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def gateway_toml(key_line: str, tmp_path: Path) -> str:
    far = encode_key(public_key_of(generate_private_key()))
    return (
        f"{key_line}\n"
        "listen_port = 51000\n"
        f'[far_gate]\npublic_key = "{far}"\n'
        f'[tunnels.t.gate]\npath = "{tmp_path / "gate.sock"}"\n'
        f'[control]\nsocket = "{tmp_path / "warp.sock"}"\n'
    )


# --------------------------------------------------------------------------------------------
# private_key_file


def test_private_key_file_relative_to_the_config(tmp_path: Path) -> None:
    private = generate_private_key()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "gw.key").write_text(encode_key(private) + "\n")
    config = tmp_path / "gw.toml"
    config.write_text(gateway_toml('private_key_file = "keys/gw.key"', tmp_path))
    loaded = load_gateway_config(config)
    assert loaded.private_key == private
    assert loaded.private_key_file == str(tmp_path / "keys" / "gw.key")
    # warp-keygen's printed pair works as well
    (tmp_path / "keys" / "gw.key").write_text(
        f"Private key: {encode_key(private)}\nPublic key: {encode_key(public_key_of(private))}\n"
    )
    assert load_gateway_config(config).private_key == private


@pytest.mark.parametrize(
    ("key_line", "key_file_text", "expected"),
    [
        ('private_key_file = "gw.key"\nprivate_key = "{key}"', "{key}", "not both"),
        ('private_key_file = "missing.key"', None, "cannot read {dir}/missing.key: no such file"),
        ('private_key_file = "gw.key"', "not a key", "{dir}/gw.key: "),
        ('private_key_file = "gw.key"', "a\nb\n", "must hold one private key"),
        ("private_key_file = 7", None, "expected a file name, got integer 7"),
    ],
)
def test_private_key_file_problems_name_the_toml_path(
    tmp_path: Path, key_line: str, key_file_text: str | None, expected: str
) -> None:
    key = encode_key(generate_private_key())
    if key_file_text is not None:
        (tmp_path / "gw.key").write_text(key_file_text.format(key=key))
    config = tmp_path / "gw.toml"
    # and one more problem elsewhere: every problem is reported at once
    config.write_text(gateway_toml(key_line.format(key=key), tmp_path) + "[log]\nlevel = 3\n")
    with pytest.raises(ConfigError) as error:
        load_gateway_config(config)
    problems = dict(error.value.problems)
    assert set(problems) == {"private_key_file", "log.level"}, problems
    assert expected.format(dir=tmp_path) in problems["private_key_file"]


def test_a_config_from_text_resolves_a_relative_key_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = generate_private_key()
    (tmp_path / "gw.key").write_text(encode_key(private))
    monkeypatch.chdir(tmp_path)
    config = parse_gateway_config(gateway_toml('private_key_file = "gw.key"', tmp_path))
    assert config.private_key == private


# --------------------------------------------------------------------------------------------
# warnings


def test_check_warns_about_a_key_others_may_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(
        gateway_toml(f'private_key = "{encode_key(generate_private_key())}"', tmp_path)
    )
    config.chmod(0o644)
    assert warp(["check", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: ")
    assert err == (
        f"Warning: `{config}' is world accessible (mode 0644) and holds a private key; "
        f"chmod 600 {config}\n"
    )
    config.chmod(0o640)
    assert warp(["check", str(config)]) == 0
    assert "is group accessible (mode 0640)" in capsys.readouterr().err
    config.chmod(0o600)
    assert warp(["check", str(config)]) == 0
    assert capsys.readouterr().err == ""

    # the key in its own file: that file is checked, not the config
    key = tmp_path / "gw.key"
    key.write_text(encode_key(generate_private_key()))
    key.chmod(0o604)
    config.write_text(gateway_toml('private_key_file = "gw.key"', tmp_path))
    config.chmod(0o644)
    assert warp(["check", str(config)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"Warning: `{key}' is world accessible (mode 0604)")
    assert str(config) not in err


def test_check_map_warns_about_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "map.toml"
    config.write_text(f'private_key = "{encode_key(generate_private_key())}"\n')
    config.chmod(0o644)
    assert warp(["check", "--map", str(config)]) == 0
    assert f"Warning: `{config}' is world accessible" in capsys.readouterr().err


def test_run_warns_before_it_starts(tmp_path: Path) -> None:
    """`warp run` warns too (here it then stops at once: the key is held by "another" run)."""
    private = generate_private_key()
    config = tmp_path / "gw.toml"
    config.write_text(gateway_toml(f'private_key = "{encode_key(private)}"', tmp_path))
    config.chmod(0o644)
    env = dict(os.environ, WARP_RUNTIME_DIR=str(tmp_path / "run"))
    with claim_instance(
        public_key_of(private), str(tmp_path / "other.sock"), lock_dir=env["WARP_RUNTIME_DIR"]
    ):
        run = subprocess.run(
            [sys.executable, "-m", "warp.cli", "run", str(config)],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
    assert run.returncode == 1, run.stderr
    err = run.stderr.splitlines()
    assert err[0].startswith(f"Warning: `{config}' is world accessible (mode 0644)")
    assert err[1].startswith("warp: error: another warp is running with this key")


@pytest.mark.parametrize("key_mode", [0o644, 0o600])
def test_warp_map_warns_about_its_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_mode: int
) -> None:
    key = tmp_path / "map.key"
    key.write_text(encode_key(generate_private_key()) + "\n")
    key.chmod(key_mode)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # the port is taken: warp-map warns, then fails to listen (exit 2)
        assert warp_map(["--private-key-file", str(key), "--bind", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    warning = f"Warning: `{key}' is world accessible (mode 0644)"
    assert (warning in err) == (key_mode == 0o644), err


# --------------------------------------------------------------------------------------------
# writing 0600


def test_keygen_output_file_is_0600_even_over_a_0644_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gw.key"
    assert keygen(["-o", str(out)]) == 0
    assert mode(out) == 0o600
    public_line = capsys.readouterr().out.strip()
    assert public_line.startswith("Public key: ")
    assert public_key_of(decode_key(out.read_text())) == decode_key(
        public_line.removeprefix("Public key: ")
    )
    first = out.read_text()
    assert keygen(["-o", str(out)]) == 1  # never replaces a key by accident
    assert "exists (use --force" in capsys.readouterr().err
    assert out.read_text() == first
    out.chmod(0o644)
    assert keygen(["-o", str(out), "--force"]) == 0
    assert mode(out) == 0o600 and out.read_text() != first


def test_migrate_engarde_force_over_a_0644_file_makes_it_0600(tmp_path: Path) -> None:
    out = tmp_path / "client.toml"
    out.write_text("# old\n")
    out.chmod(0o644)
    assert warp(["migrate-engarde", str(ENGARDE_CLIENT), "-o", str(out), "--force"]) == 0
    assert mode(out) == 0o600
    assert load_gateway_config(out).far_gate.endpoints


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_migrate_engarde_never_writes_over_its_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], force: list[str]
) -> None:
    engarde = tmp_path / "engarde.yml"
    original = ENGARDE_CLIENT.read_text()
    engarde.write_text(original)
    link = tmp_path / "link.yml"
    link.symlink_to(engarde)
    for out in (engarde, link):
        assert warp(["migrate-engarde", str(engarde), "-o", str(out), *force]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is the engarde config being converted" in err
        assert engarde.read_text() == original
