"""``warp-map``: run the rendezvous server.

Exit codes: 0 after SIGINT/SIGTERM, 1 for a usage or config error (one line per problem, never a
traceback), 2 for a runtime failure (e.g. the address is in use).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from warp.secret_files import read_private_key_text

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2

log = logging.getLogger("warp_map_server")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 1, as every warp command
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="warp-map",
        description=(
            "Run warp-map, the rendezvous server of WARP: a WireGuard responder on UDP (default "
            "0.0.0.0:13116) where gateways register their uplinks, learn their reflexive "
            "addresses, find their far gate and, when no direct path exists, relay. "
            "It logs its public key at start (gateways need it as warp_map.public_key)."
        ),
    )
    parser.add_argument("--config", metavar="MAP.toml", help="warp-map config file (TOML)")
    parser.add_argument(
        "--bind", metavar="HOST:PORT", help="address to listen on (overrides `bind`)"
    )
    parser.add_argument(
        "--private-key-file",
        metavar="PATH",
        help="file holding the map's private key (overrides `private_key`); "
        "there is no default key: make one with `warp-keygen`",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides log.level",
    )
    return parser


def _read_key_file(path: str) -> str:
    try:
        return read_private_key_text(path)
    except ValueError as exc:
        raise _UsageError(f"--private-key-file: {exc}") from None


class _UsageError(Exception):
    pass


def _configure_logging(level: str, fmt: str) -> None:
    try:
        from warp.logs import configure_logging
    except ImportError:  # pragma: no cover - warp.logs ships with warp
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(message)s")
        return
    configure_logging(level, fmt)


async def _serve(server: Any) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGUSR1, server.log_stats)  # counters on demand
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from warp.config import ConfigError, load_map_config

    overrides: dict[str, Any] = {}
    try:
        if args.bind is not None:
            overrides["bind"] = args.bind
        if args.private_key_file is not None:
            overrides["private_key"] = _read_key_file(args.private_key_file)
        config = load_map_config(args.config, overrides=overrides)
    except _UsageError as exc:
        print(f"warp-map: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        for path, message in exc.problems:
            if path == "private_key" and "missing" in message:
                message = (
                    "required: warp-map has no default key; give --private-key-file PATH or "
                    "private_key in the config (make one with `warp-keygen`)"
                )
            where = path or exc.source
            print(f"warp-map: {where}: {message}", file=sys.stderr)
        return EXIT_USAGE

    from warp.secret_files import access_warning

    # as `wg` does: the file holding the private key should be readable by us alone
    key_holder = args.private_key_file or args.config
    warning = access_warning(key_holder) if key_holder else None
    if warning:
        print(warning, file=sys.stderr)
    _configure_logging(args.log_level or config.log.level, config.log.format)
    from warp_map_server.server import MapServer

    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        runner = asyncio.run
    server = MapServer(config)
    try:
        runner(_serve(server))
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print(f"warp-map: cannot listen on {config.bind}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # a bug: say so in one line, details only at debug level
        print(f"warp-map: runtime failure: {type(exc).__name__}: {exc}", file=sys.stderr)
        log.debug("map.crashed\n%s", traceback.format_exc())
        return EXIT_RUNTIME
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
