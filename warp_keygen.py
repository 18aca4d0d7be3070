"""warp-keygen: make X25519 key pairs for WARP (and derive public keys)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from warp.keys import (
    WIREGUARD_BASE64_LENGTH,
    KeyFormatError,
    decode_key,
    encode_key,
    generate_private_key,
    public_key_of,
    to_wireguard_base64,
)
from warp.secret_files import write_private_file

# A vanity search is unbounded in principle; cap it so a typo'd regex cannot run forever.
DEFAULT_VANITY_LIMIT = 10_000_000


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warp-keygen",
        description="Print a new X25519 key pair as 'Private key: …' and 'Public key: …' "
        "(Crockford base32; WireGuard base64 with --wireguard).",
    )
    parser.add_argument(
        "--vanity",
        metavar="REGEX",
        help="search for a public key matching REGEX (case-insensitive, re.search)",
    )
    parser.add_argument(
        "--max-tries",
        type=int,
        default=DEFAULT_VANITY_LIMIT,
        help=f"give up a --vanity search after this many keys (default {DEFAULT_VANITY_LIMIT})",
    )
    parser.add_argument(
        "--wireguard", action="store_true", help="print keys in WireGuard's base64 form"
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the private key to FILE (mode 0600; a config's private_key_file or "
        "warp-map's --private-key-file) and print only the public key",
    )
    parser.add_argument(
        "--force", action="store_true", help="with -o: replace FILE if it exists (mode 0600)"
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "pubkey",
        help="read a private key on stdin, print its public key",
        description="Read a private key (Crockford base32 or WireGuard base64) on stdin "
        "and print its public key in the same form (base64 with --wireguard). The input may "
        "be warp-keygen's own two lines: the 'Private key:' line is used.",
    )
    return parser


def _private_key_text(text: str) -> str:
    """The private key in ``pubkey``'s input: a bare key, or the key of a ``Private key:``
    line (warp-keygen's own output, whose ``Public key:`` line is ignored)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        label, sep, value = line.partition(":")
        if sep and label.strip().lower() == "private key":
            return value.strip()
    return text.strip()


def _format(raw: bytes, wireguard: bool) -> str:
    return to_wireguard_base64(raw) if wireguard else encode_key(raw)


def _emit(private: bytes, args: argparse.Namespace) -> int:
    """Print the pair, or with -o write the private key (0600) and print the public key."""
    public = f"Public key: {_format(public_key_of(private), args.wireguard)}"
    if args.output is None:
        print(f"Private key: {_format(private, args.wireguard)}")
        print(public)
        return 0
    try:
        write_private_file(args.output, _format(private, args.wireguard) + "\n", force=args.force)
    except FileExistsError:
        print(f"warp-keygen: {args.output} exists (use --force to replace it)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"warp-keygen: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(public)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.output is not None and args.command == "pubkey":
        print("warp-keygen: -o makes a new key; pubkey prints to standard output", file=sys.stderr)
        return 1
    if args.force and args.output is None:
        print("warp-keygen: --force only applies to -o FILE", file=sys.stderr)
        return 1
    if args.command == "pubkey":
        text = _private_key_text(sys.stdin.read())
        try:
            private = decode_key(text)
        except KeyFormatError as exc:
            print(f"warp-keygen: {exc}", file=sys.stderr)
            return 1
        base64_in = len(text) == WIREGUARD_BASE64_LENGTH
        print(_format(public_key_of(private), args.wireguard or base64_in))
        return 0

    if args.vanity is None:
        return _emit(generate_private_key(), args)

    try:
        pattern = re.compile(args.vanity, re.IGNORECASE)
    except re.error as exc:
        print(f"warp-keygen: --vanity: invalid regex: {exc}", file=sys.stderr)
        return 1
    started = time.monotonic()
    for tries in range(1, args.max_tries + 1):
        private = generate_private_key()
        public = public_key_of(private)
        if pattern.search(_format(public, args.wireguard)):
            elapsed = time.monotonic() - started
            print(f"Tried {tries} keys in {elapsed:.1f} s.", file=sys.stderr)
            return _emit(private, args)
    print(
        f"warp-keygen: no public key matched {args.vanity!r} after {args.max_tries} tries",
        file=sys.stderr,
    )
    return 2


def run() -> None:
    """Console entry point: a closed pipe (`warp-keygen | head -1`) is not an error."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        code = 0
        # Point stdout at /dev/null so the interpreter's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    run()
