"""Keys: both text forms round-trip, bad input gets the stated errors, and our public keys
equal what WireGuard's own `wg pubkey` computes."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warp.keys import (
    KeyFormatError,
    decode_key,
    encode_key,
    generate_private_key,
    public_key_of,
    to_wireguard_base64,
)

KEYGEN = [sys.executable, "-m", "warp_keygen"]


def _keygen(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYGEN, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


@given(st.binary(min_size=32, max_size=32))
def test_crockford_round_trip(raw: bytes) -> None:
    text = encode_key(raw)
    assert len(text) == 52
    assert text == text.upper()
    assert decode_key(text) == raw
    assert decode_key(text.lower()) == raw


@given(st.binary(min_size=32, max_size=32))
def test_wireguard_base64_round_trip(raw: bytes) -> None:
    text = to_wireguard_base64(raw)
    assert len(text) == 44
    assert decode_key(text) == raw


def test_crockford_reads_o_as_zero_and_i_l_as_one() -> None:
    raw = bytes(32)
    canonical = encode_key(raw)
    assert set(canonical) == {"0"}
    assert decode_key("O" * 52) == raw
    ones = "1" * 51 + "0"  # the last character only holds 1 key bit, so it must stay 0
    expected = decode_key(ones)
    assert expected != raw
    assert decode_key("I" * 51 + "0") == decode_key("l" * 51 + "0") == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("U" * 52, "invalid character 'U'"),
        ("!" + "0" * 51, "invalid character '!'"),
        ("A" * 53, "secp256k1 key from the Rust prototype"),
        ("A" * 10, "52 characters"),
        ("<run warp-keygen to generate>", "run `warp-keygen`"),
        ("@" * 44, "not valid WireGuard base64"),
    ],
)
def test_bad_keys_are_rejected_with_a_clear_message(text: str, fragment: str) -> None:
    with pytest.raises(KeyFormatError) as excinfo:
        decode_key(text)
    assert fragment in str(excinfo.value)


def test_keygen_prints_private_and_public_key() -> None:
    result = _keygen()
    assert result.returncode == 0, result.stderr
    private_line, public_line = result.stdout.splitlines()
    assert private_line.startswith("Private key: ")
    assert public_line.startswith("Public key: ")
    private = decode_key(private_line.removeprefix("Private key: "))
    assert public_key_of(private) == decode_key(public_line.removeprefix("Public key: "))


def test_keygen_pubkey_reads_private_key_on_stdin() -> None:
    private = generate_private_key()
    for text in (encode_key(private), to_wireguard_base64(private)):
        result = _keygen("pubkey", stdin=text + "\n")
        assert result.returncode == 0, result.stderr
        assert decode_key(result.stdout.strip()) == public_key_of(private)


def test_keygen_pubkey_rejects_prototype_key() -> None:
    result = _keygen("pubkey", stdin="Z" * 53)
    assert result.returncode == 1
    assert "secp256k1" in result.stderr and "warp-keygen" in result.stderr
    assert "Traceback" not in result.stderr


def test_keygen_vanity_matches_case_insensitively_and_counts_tries() -> None:
    result = _keygen("--vanity", "^q")
    assert result.returncode == 0, result.stderr
    public = result.stdout.splitlines()[1].removeprefix("Public key: ")
    assert public.startswith("Q")
    assert "Tried" in result.stderr and "keys" in result.stderr


def test_keygen_vanity_bad_regex() -> None:
    result = _keygen("--vanity", "(")
    assert result.returncode == 1
    assert "invalid regex" in result.stderr


def _wg() -> str:
    path = shutil.which("wg")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("wireguard-tools (wg) is required in CI")
        pytest.skip("wg (wireguard-tools) not installed")
    return path


def test_public_keys_match_wg_pubkey() -> None:
    wg = _wg()
    for _ in range(20):
        result = _keygen()
        private_text, public_text = (line.split(": ", 1)[1] for line in result.stdout.splitlines())
        private_b64 = to_wireguard_base64(decode_key(private_text))
        wg_public = subprocess.run(
            [wg, "pubkey"], input=private_b64, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert base64.b64decode(wg_public) == decode_key(public_text)


def test_wg_genkey_keys_are_accepted() -> None:
    wg = _wg()
    private_b64 = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True)
    private = decode_key(private_b64.stdout.strip())
    wg_public = subprocess.run(
        [wg, "pubkey"], input=private_b64.stdout, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert to_wireguard_base64(public_key_of(private)) == wg_public
