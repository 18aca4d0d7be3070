"""The warp-map command: flags, exit codes (0/1/2, never a traceback), start-up log line."""

from __future__ import annotations

from pathlib import Path

import pytest

from warp.keys import encode_key, generate_private_key, public_key_of
from warp_map_server.cli import EXIT_OK, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[2]


def key_file(tmp_path: Path, text: str | None = None) -> tuple[Path, bytes]:
    private = generate_private_key()
    path = tmp_path / "map.key"
    path.write_text(text if text is not None else encode_key(private) + "\n")
    return path, private


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == EXIT_OK
    out = capsys.readouterr().out
    assert "--private-key-file" in out and "--bind" in out and "--config" in out


def test_refuses_to_start_without_a_private_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no default key" in err and "warp-keygen" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--frobnicate"])
    assert exc.value.code == EXIT_USAGE


def test_bad_bind_and_unreadable_key_file_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = key_file(tmp_path)
    assert main(["--private-key-file", str(path), "--bind", "127.0.0.1:99999"]) == EXIT_USAGE
    assert "bind" in capsys.readouterr().err
    assert main(["--private-key-file", str(tmp_path / "missing.key")]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    bad, _ = key_file(tmp_path, "not a key\n")
    assert main(["--private-key-file", str(bad)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "private_key" in err and "Traceback" not in err


def test_config_errors_name_their_toml_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "map.toml"
    config.write_text(
        f'private_key = "{encode_key(generate_private_key())}"\nlookup_policy = "nobody"\n'
    )
    assert main(["--config", str(config)]) == EXIT_USAGE
    assert "lookup_policy" in capsys.readouterr().err


def test_key_file_may_be_warp_keygen_output(tmp_path: Path) -> None:
    from warp_map_server.cli import _read_key_file

    private = generate_private_key()
    path = tmp_path / "k"
    path.write_text(
        f"Private key: {encode_key(private)}\nPublic key: {encode_key(public_key_of(private))}\n"
    )
    assert _read_key_file(str(path)) == encode_key(private)
