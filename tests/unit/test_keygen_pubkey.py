"""`warp-keygen pubkey` answers in the form it was given and reads warp-keygen's own output;
`warp gauge report --help` prints a plain `%`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from warp.cli import main
from warp.keys import encode_key, generate_private_key, public_key_of, to_wireguard_base64

KEYGEN = [sys.executable, "-m", "warp_keygen"]


def keygen(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYGEN, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_pubkey_answers_in_the_form_of_its_input() -> None:
    private = generate_private_key()
    public = public_key_of(private)
    base64_in = keygen("pubkey", stdin=to_wireguard_base64(private) + "\n")
    assert (base64_in.returncode, base64_in.stdout) == (0, to_wireguard_base64(public) + "\n")
    base32_in = keygen("pubkey", stdin=encode_key(private) + "\n")
    assert (base32_in.returncode, base32_in.stdout) == (0, encode_key(public) + "\n")
    forced = keygen("--wireguard", "pubkey", stdin=encode_key(private))
    assert forced.stdout == to_wireguard_base64(public) + "\n"


@pytest.mark.parametrize("wireguard", [False, True])
def test_pubkey_reads_warp_keygens_own_two_lines(wireguard: bool) -> None:
    made = keygen(*(["--wireguard"] if wireguard else []))
    private_line, public_line = made.stdout.splitlines()
    derived = keygen("pubkey", stdin=made.stdout)
    assert derived.returncode == 0, derived.stderr
    assert derived.stdout == public_line.removeprefix("Public key: ") + "\n"
    assert private_line.startswith("Private key: ")


def test_gauge_report_help_prints_percent_signs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["gauge", "report", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "%%" not in out and "Print loss %, reorder %, latency" in out
