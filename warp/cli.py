"""The ``warp`` command.

Each subcommand is one ``register_<name>(subparsers)`` function that adds its parser and sets
``handler`` (a function ``Namespace -> exit code``) as its default; add it to ``COMMANDS``.

Exit codes: 0 success, 1 usage or config error (one line per cause, never a
traceback), 2 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeAlias

from warp import __version__
from warp.config import (
    ConfigError,
    GatewayConfig,
    LoopbackGate,
    MapServerConfig,
    TunGate,
    UnixGate,
    check_warnings,
    example_gateway_config,
    example_map_config,
    load_gateway_config,
    other_config_kind,
    parse_gateway_config,
    parse_map_config,
    read_config_text,
    secret_file_warnings,
)
from warp.demo import register_demo
from warp.gauge import register_gauge
from warp.keys import encode_key
from warp.migrate.engarde import register_migrate_engarde
from warp.secret_files import read_private_key_text
from warp.status import register_status

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2

Handler: TypeAlias = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[ArgumentParser]"


class UsageError(Exception):
    """A usage or config problem: printed as one line, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 1 on usage errors (argparse's default is 2, our runtime failure)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------------------------
# warp check


def _gate_summary(gate: LoopbackGate | UnixGate | TunGate) -> str:
    if isinstance(gate, LoopbackGate):
        host = "127.0.0.1" if gate.ipv4 else "[::1]"
        return f"loopback {host}:{gate.application_to_gate}"
    if isinstance(gate, UnixGate):
        return f"unix {gate.path}"
    addresses = ", ".join(str(a) for a in gate.address)
    return f"tun {gate.name}" + (f" {addresses}" if addresses else "")


def gateway_summary(config: GatewayConfig) -> str:
    """One line describing a valid gateway config (what `warp check` prints)."""
    engarde = config.engarde_tunnel
    if engarde is not None and engarde[1].engarde is not None:
        name, tunnel = engarde
        mode = engarde[1].engarde
        if mode.role == "client":
            endpoints = next(iter(config.far_gates.values())).endpoints
            far = "to engarde server " + ", ".join(str(e) for e in endpoints)
        else:
            far = (
                f"engarde clients on port {config.listen_port}, "
                f"client_timeout {mode.client_timeout:g} s"
            )
        return (
            f"ok: engarde {mode.role} (engarde's wire format: no FEC, no warp encryption), "
            f"tunnel {name}, {_gate_summary(tunnel.gate)}, {far}"
        )
    count = len(config.tunnels)
    tunnels = "; ".join(
        f"{name} → id {tunnel.tunnel_id}, {_gate_summary(tunnel.gate)}"
        for name, tunnel in config.tunnels.items()
    )
    fars = []
    for name, far_gate in config.far_gates.items():
        far = f"{encode_key(far_gate.public_key)[:8]}…"
        if config.far_gate is None:
            far = f"{name} {far}"
        if far_gate.kind == "wireguard":
            far += " (plain WireGuard)"
        if far_gate.endpoints:
            far += " at " + ", ".join(str(e) for e in far_gate.endpoints)
        fars.append(far)
    far = ("far gate " if len(fars) == 1 else "far gates ") + "; ".join(fars)
    if config.warp_map.address is not None:
        reach = "map " + ", ".join(str(a) for a in config.warp_map.addresses)
    elif all(far_gate.endpoints for far_gate in config.far_gates.values()):
        reach = "no map"
    else:
        reach = f"no map, listening on port {config.listen_port}"
    return f"ok: {count} tunnel{'s' if count != 1 else ''} ({tunnels}), {far}, {reach}"


def map_summary(config: MapServerConfig) -> str:
    """One line describing a valid warp-map config."""
    relay = "relay off"
    if config.relay.enabled:
        limit = config.relay.rate_limit
        relay = "relay unlimited" if limit is None else f"relay {limit / 1e6:g} Mbit/s per client"
    allowed = "any key" if config.allowed_keys is None else f"{len(config.allowed_keys)} keys"
    return (
        f"ok: warp-map on {config.bind}, public key {encode_key(config.public_key)[:8]}…, "
        f"lookup {config.lookup_policy}, {allowed}, {relay}"
    )


def _read_private_key_file(path: str) -> str:
    """The key in a `--private-key-file`, read as warp-map reads it."""
    try:
        return read_private_key_text(path)
    except ValueError as exc:
        raise UsageError(f"--private-key-file: {exc}") from None


def _run_check(args: argparse.Namespace) -> int:
    if args.private_key_file is not None and not args.map:
        raise UsageError("--private-key-file is for --map (a gateway's key is in its config)")
    config: GatewayConfig | MapServerConfig
    text = read_config_text(args.config)  # a ConfigError (one line) if unreadable
    try:
        if args.map:
            overrides = {}
            if args.private_key_file is not None:
                overrides["private_key"] = _read_private_key_file(args.private_key_file)
            config = parse_map_config(text, args.config, overrides=overrides)
            summary = map_summary(config)
        else:
            config = parse_gateway_config(text, args.config)
            summary = gateway_summary(config)
    except ConfigError as exc:
        other = other_config_kind(text, args.config, expected="map" if args.map else "gateway")
        if other is not None:
            print(f"warp check: {other}", file=sys.stderr)
        else:
            for path, message in exc.problems:
                if args.map and path == "private_key" and "missing" in message:
                    message = (
                        "required key is missing (moved out of the file? give it with "
                        "--private-key-file PATH, as to warp-map)"
                    )
                print(f"{path or exc.source}: {message}", file=sys.stderr)
        return EXIT_USAGE
    warnings = check_warnings(config, text)
    for path, message in warnings:
        print(f"warning: {path}: {message}", file=sys.stderr)
    if warnings and args.strict:
        print(f"warp check: {len(warnings)} warning{'s' if len(warnings) > 1 else ''} "
              "(--strict)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    # The key's holder: the --private-key-file when given, else the config (or its key file).
    key_holder = args.private_key_file or args.config
    for warning in secret_file_warnings(config, key_holder):
        print(warning, file=sys.stderr)
    print(summary)
    return EXIT_OK


def register_check(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate a config and print every problem with its TOML path",
        description="Validate a gateway config (or, with --map, a warp-map config). "
        "Prints each problem as 'path: cause' and exits 1, or prints a one-line summary "
        "and exits 0. What would load but cannot work as it stands (a value marked "
        "PLACEHOLDER, a documentation address such as example.net or 203.0.113.0/24, an "
        "all-zero key) is printed as 'warning: path: cause' on stderr; exit 0 unless "
        "--strict. Given a file of another kind (wg-quick, engarde YAML, the other config "
        "kind), says in one line what to run instead and exits 1.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the TOML config file")
    parser.add_argument("--map", action="store_true", help="CONFIG is a warp-map config")
    parser.add_argument(
        "--private-key-file",
        metavar="PATH",
        help="with --map: the map's private key, as given to warp-map (overrides private_key)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.set_defaults(handler=_run_check)


# --------------------------------------------------------------------------------------------
# warp print-example-config


def _run_print_example_config(args: argparse.Namespace) -> int:
    sys.stdout.write(example_map_config() if args.map else example_gateway_config())
    return EXIT_OK


def register_print_example_config(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "print-example-config",
        help="print a complete, commented, valid config with fresh keys",
        description="Print a complete, commented gateway config that `warp check` accepts, "
        "with a fresh private key. The far gate and map keys are random placeholders "
        "to replace.",
    )
    parser.add_argument("--map", action="store_true", help="print a warp-map config instead")
    parser.set_defaults(handler=_run_print_example_config)


# --------------------------------------------------------------------------------------------
# warp run


def _run_gateway(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from warp.event_loop import install_event_loop_policy
    from warp.gate.base import GateError
    from warp.instance_lock import InstanceBusy, InstanceLockError, claim_instance
    from warp.logs import configure_logging
    from warp.metrics import MetricsError
    from warp.node import Gateway
    from warp.status import ControlSocketError

    config = load_gateway_config(args.config)
    for warning in secret_file_warnings(config, args.config):
        print(warning, file=sys.stderr)
    configure_logging(args.log_level or config.log.level, config.log.format)
    loop_name = install_event_loop_policy()
    engarde = config.engarde_tunnel is not None
    control_socket: str = args.socket or config.control.socket

    async def main_task() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        logger = logging.getLogger("warp.engarde" if engarde else "warp.node")

        def request_stop(signum: signal.Signals) -> None:
            logger.info("gateway.stop_requested signal=%s", signum.name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, request_stop, signum)
        if engarde:
            from warp.migrate.engarde_wire import EngardeGateway

            def refuse_reload() -> None:
                logger.warning("reload.refused reason=engarde_mode_needs_a_restart")

            loop.add_signal_handler(signal.SIGHUP, refuse_reload)
            engarde_gateway = EngardeGateway(config, control_socket=control_socket)
            logger.info("engarde.starting loop=%s", loop_name)
            await engarde_gateway.run(stop)
            return
        gateway = Gateway(config, control_socket=control_socket, config_path=args.config)
        # SIGHUP (`systemctl reload`, `kill -HUP`): re-read the config and apply what changed.
        loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
        logger.info("gateway.starting loop=%s", loop_name)
        await gateway.run(stop)

    try:
        # Before anything touches the network: a second instance with this key or this
        # control socket must not handshake with the far gate or deregister from the map.
        with claim_instance(None if engarde else config.public_key, control_socket):
            asyncio.run(main_task())
    except InstanceBusy as exc:
        print(f"warp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InstanceLockError, GateError, ControlSocketError, MetricsError) as exc:
        print(f"warp: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except PermissionError as exc:
        print(f"warp: error: {exc} (warp run needs root for tun gates and SO_BINDTODEVICE)",
              file=sys.stderr)  # fmt: skip
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"warp: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def register_run(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a gateway until SIGINT/SIGTERM (SIGHUP reloads CONFIG)",
        description="Run a gateway: carry every tunnel of CONFIG over every usable path to the "
        "far gate. A second instance with the same key or control socket is refused (exit 1) "
        "before it sends anything. On SIGINT or SIGTERM it deregisters from warp-map, "
        "removes its socket files and exits 0. On SIGHUP it re-reads CONFIG and applies what "
        "changed (as `warp reload`; refusals are logged as reload.refused).",
    )
    parser.add_argument("config", metavar="CONFIG.toml", help="gateway config file")
    parser.add_argument("--socket", help="control socket path (overrides control.socket)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override log.level"
    )
    parser.set_defaults(handler=_run_gateway)


# --------------------------------------------------------------------------------------------
# warp reload


def _reload_socket_path(config_path: str) -> str:
    """The control socket named by a config file; read leniently (the point of a reload may
    be to have the gateway report what is wrong with the file)."""
    import tomllib

    from warp.status import DEFAULT_CONTROL_SOCKET

    try:
        return str(load_gateway_config(config_path).control.socket)
    except ConfigError:
        pass
    try:
        data = tomllib.loads(read_config_text(config_path))
    except (ConfigError, tomllib.TOMLDecodeError):
        return DEFAULT_CONTROL_SOCKET
    control = data.get("control")
    socket_path = control.get("socket") if isinstance(control, dict) else None
    return socket_path if isinstance(socket_path, str) else DEFAULT_CONTROL_SOCKET


def _run_reload(args: argparse.Namespace) -> int:
    from warp.status import DEFAULT_CONTROL_SOCKET, StatusError, query_control

    path: str = args.socket or (
        _reload_socket_path(args.config) if args.config else DEFAULT_CONTROL_SOCKET
    )
    try:
        reply = query_control(path, {"cmd": "reload"}, timeout=args.timeout)
    except StatusError as exc:
        print(f"warp reload: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    if "error" in reply:
        print(f"warp reload: the gateway on {path} answered: {reply['error']}", file=sys.stderr)
        return EXIT_RUNTIME
    if not reply.get("reloaded"):
        for problem in reply.get("problems") or []:
            pair = isinstance(problem, list) and len(problem) == 2
            print(f"{problem[0] or '-'}: {problem[1]}" if pair else problem, file=sys.stderr)
        print("warp reload: refused; the gateway keeps its running config", file=sys.stderr)
        return EXIT_USAGE
    changes = reply.get("changes") or {}
    done = [
        f"{key.replace('_', ' ')} {', '.join(value)}"
        for key, value in changes.items()
        if isinstance(value, list) and value
    ]
    if changes.get("patterns_changed"):
        done.append("interface patterns")
    print("reloaded: " + ("; ".join(done) if done else "no change"))
    for problem in reply.get("gate_errors") or []:
        print(f"warning: {problem}", file=sys.stderr)
    return EXIT_OK


def register_reload(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "reload",
        help="have a running gateway re-read its config and apply what changed",
        description="Ask a running gateway (over its control socket) to re-read the config "
        "file it was started with and apply what changed: far gates and tunnels added or "
        "removed, redundancy, priorities and other transport settings, interface patterns. "
        "What did not change keeps its sessions and datagrams. An invalid config, or a "
        "change that needs a restart (private_key, control.socket, listen_port, warp_map, "
        "metrics, log, other interface settings), is refused: each problem is printed as "
        "'path: cause', the gateway keeps running its old config, exit 1. Same as SIGHUP.",
        epilog="Exit codes: 0 reloaded, 1 refused, 2 gateway not reachable.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="the gateway's config file (its control.socket is used)",
    )
    where.add_argument("--socket", metavar="PATH", help="the gateway's control socket")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the gateway's answer (default 10)",
    )
    parser.set_defaults(handler=_run_reload)


# --------------------------------------------------------------------------------------------
# main

COMMANDS: list[Callable[[SubParsers], None]] = [
    register_run,
    register_reload,
    register_check,
    register_print_example_config,
    register_status,
    register_demo,
    register_migrate_engarde,
    register_gauge,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="warp",
        description="WARP: hole-punching, multi-path, erasure-coded tunnel gateway.",
        epilog="Exit codes: 0 success, 1 usage or config error, 2 runtime failure.",
    )
    parser.add_argument("--version", action="version", version=f"warp {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except UsageError as exc:
        print(f"warp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(exc.format(), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error; silence the flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("WARP_DEBUG"):
            traceback.print_exc()
        print(f"warp: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
