"""``warp migrate-engarde``: turn an engarde YAML config into the equivalent warp config.

engarde (github.com/porech/engarde) sits between two WireGuard peers and copies every
WireGuard packet over every uplink of the client to one public engarde server. The warp
equivalent keeps both WireGuard configs as they are:

* client: a loopback gate on engarde's ``listenAddr`` port (WireGuard's ``Endpoint`` already
  points there), ``excludedInterfaces`` as anchored exclusion patterns, ``dstAddr`` (and any
  ``dstOverrides`` address) as ``far_gate.endpoints``: the server keeps its public address
  and no warp-map is needed;
* server: ``listen_port`` from its ``listenAddr`` (the clients keep sending there) and a
  loopback gate whose ``gate_to_application`` is its ``dstAddr`` (the server's WireGuard);
* both: ``writeTimeout`` as the tunnel's ``send_deadline``; a fresh private key for this side;
  the far gate's public key from ``--far-public-key`` or, without it, a random placeholder
  marked REPLACE (so that ``warp check`` passes and nobody mistakes it for a real key).

Every key that has no meaning in warp is reported; so is every unknown key (never silently
dropped). docs/engarde-migration.md is the long form.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from warp.secret_files import write_private_file

__all__ = [
    "CLIENT_KEYS",
    "DEFAULT_SERVER_GATE_PORT",
    "SERVER_KEYS",
    "Migration",
    "MigrationError",
    "load_engarde",
    "migrate",
    "register_migrate_engarde",
]

CLIENT_KEYS = (
    "description",
    "listenAddr",
    "dstAddr",
    "writeTimeout",
    "excludedInterfaces",
    "interfaceLabels",
    "dstOverrides",
    "webManager",
)
SERVER_KEYS = (
    "description",
    "listenAddr",
    "dstAddr",
    "clientTimeout",
    "writeTimeout",
    "webManager",
)
WEB_MANAGER_KEYS = ("listenAddr", "username", "password")
OVERRIDE_KEYS = ("ifName", "dstAddr")
#: application_to_gate of the server's loopback gate (engarde used an ephemeral port there)
DEFAULT_SERVER_GATE_PORT = 59401
TUNNEL = "wireguard"
ENGARDE_DEFAULT_WRITE_TIMEOUT_MS = 10

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2


class MigrationError(Exception):
    """The engarde config cannot be converted; the message is one line for users."""


@dataclass
class Migration:
    """The result: the TOML text, this side's public key, and what to tell the user."""

    role: str
    toml: str
    public_key: str
    far_key_is_placeholder: bool
    warnings: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading engarde values


class _Addr(NamedTuple):
    host: str  # "" for engarde's ":port" (all addresses)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _address(value: object, where: str) -> _Addr:
    """An engarde ``host:port`` (Go's net.ResolveUDPAddr forms: ``[v6]:p``, ``:p``)."""
    if not isinstance(value, str) or not value.strip():
        raise MigrationError(f'{where}: expected "host:port", got {value!r}')
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise MigrationError(f'{where}: expected "[IPv6]:port", got {value!r}')
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise MigrationError(f'{where}: expected "host:port", got {value!r} (no port)')
        if ":" in host:
            raise MigrationError(f"{where}: an IPv6 address goes in brackets, got {value!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise MigrationError(f"{where}: port must be 1..65535, got {port_text!r} in {value!r}")
    return _Addr(host, int(port_text))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def _is_wildcard(host: str) -> bool:
    ip = _ip(host)
    return host == "" or (ip is not None and ip.is_unspecified)


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}
_GO_UNITS |= {"m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _go_duration_seconds(text: str) -> float | None:
    """Go's time.ParseDuration (how yaml.v2 reads a string into a time.Duration), or None."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(body):
        match = _GO_PART.match(body, pos)
        if match is None:
            return None
        total += float(match[1]) * _GO_UNITS[match[2]]
        pos = match.end()
    return sign * total if body else None


def _human(seconds: float) -> str:
    if seconds >= 3600:
        hours, rest = divmod(round(seconds), 3600)
        return f"{hours} h {rest // 60} min"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:g} s"


def _ms(value: float) -> str:
    return f'"{value:g}ms"'


def _write_timeout(section: Mapping[str, Any], where: str, warnings: list[str]) -> tuple[str, str]:
    """(TOML value or "" to keep warp's default, comment) for engarde's writeTimeout.

    engarde declares it a Go time.Duration and multiplies it by a millisecond: an integer
    is milliseconds, 0 (or absent) means 10, negative means no deadline.
    """
    if "writeTimeout" not in section or section["writeTimeout"] is None:
        return (
            _ms(ENGARDE_DEFAULT_WRITE_TIMEOUT_MS),
            "engarde's default write timeout (writeTimeout absent or 0 means 10 ms)",
        )
    raw = section["writeTimeout"]
    key = f"{where}.writeTimeout"
    if isinstance(raw, bool):
        raise MigrationError(f"{key}: expected milliseconds (an integer), got {raw!r}")
    if isinstance(raw, str):
        seconds = _go_duration_seconds(raw)
        if seconds is None:
            raise MigrationError(
                f"{key}: {raw!r} is neither an integer (milliseconds) nor a Go duration; "
                "engarde would refuse this file"
            )
        engarde_seconds = seconds * 1e9 * 1e-3  # the Duration's ns count, times a millisecond
        if seconds <= 0:
            warnings.append(
                f"{key} {raw!r} is a string; engarde reads it as {seconds * 1e9:g} ns "
                "(no deadline). warp always has one: kept its default send_deadline (100 ms)"
            )
            return "", f"engarde writeTimeout {raw!r}: no deadline; warp's default is kept"
        warnings.append(
            f"{key} {raw!r} is a string: engarde parses it as a Go duration "
            f"({seconds * 1e9:.0f} ns) and then multiplies that by a millisecond, so its "
            f"write timeout was really {_human(engarde_seconds)}. Converted as the intended "
            f"{seconds * 1000:g} ms; in engarde write an integer number of milliseconds"
        )
        return _ms(seconds * 1000), f"engarde writeTimeout {raw!r} (meant as {seconds * 1000:g} ms)"
    if isinstance(raw, int | float):
        if raw == 0:
            return (
                _ms(ENGARDE_DEFAULT_WRITE_TIMEOUT_MS),
                "engarde writeTimeout 0, which engarde reads as 10 ms",
            )
        if raw < 0:
            warnings.append(
                f"{key} {raw} (negative: no write deadline in engarde) has no equivalent: warp "
                "always drops a datagram that is not on the wire within send_deadline; "
                "kept warp's default (100 ms)"
            )
            return "", f"engarde writeTimeout {raw}: no deadline; warp's default (100 ms) is kept"
        if isinstance(raw, float) and not raw.is_integer():
            warnings.append(
                f"{key} {raw}: engarde truncates it to {int(raw)} ms; converted as {raw:g} ms"
            )
        return _ms(float(raw)), f"engarde writeTimeout {raw} (milliseconds)"
    raise MigrationError(f"{key}: expected milliseconds (an integer), got {type(raw).__name__}")


def _unknown_keys(
    section: Mapping[str, Any], known: Sequence[str], where: str, warnings: list[str],
    other_role: tuple[str, Sequence[str]] | None = None,
) -> None:  # fmt: skip
    for key in section:
        if key in known:
            continue
        name = str(key)
        if other_role is not None and name in other_role[1]:
            warnings.append(
                f"{where}.{name}: a {other_role[0]} key, ignored by engarde's {where}; "
                "not converted"
            )
            continue
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        lowered = [k for k in known if k.lower() == name.lower()]
        if lowered:
            hint = f" (engarde's keys are case-sensitive: {lowered[0]!r}; engarde ignored it)"
        elif close:
            hint = f"; did you mean {close[0]!r}? (engarde ignored it)"
        else:
            hint = f" (engarde ignores it; known keys: {', '.join(known)})"
        warnings.append(f"{where}.{name}: unknown engarde key, not converted{hint}")


def _string_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MigrationError(f"{where}: expected a list of interface names, got {value!r}")
    return list(value)


def _web_manager(section: Mapping[str, Any], where: str, warnings: list[str]) -> str | None:
    manager = section.get("webManager")
    if manager is None:
        return None
    if not isinstance(manager, Mapping):
        raise MigrationError(f"{where}.webManager: expected a table, got {manager!r}")
    _unknown_keys(manager, WEB_MANAGER_KEYS, f"{where}.webManager", warnings)
    listen = manager.get("listenAddr")
    credentials = " and its username/password are dropped" if manager.get("password") else ""
    warnings.append(
        f"{where}.webManager{f' ({listen})' if listen else ''} has no meaning in warp: there is "
        f"no web UI{credentials}. Use `warp status` (control socket) and, for monitoring, "
        "[metrics] listen (Prometheus; a commented block is in the output)"
    )
    return str(listen) if listen else None


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _comment(text: str) -> str:
    return " ".join(text.splitlines())


def _loud(lines: Sequence[str]) -> list[str]:
    bar = "# " + "!" * 86
    return [bar, *[f"# !!! {line}" for line in lines], bar]


# ---------------------------------------------------------------------------------------------
# Conversion


def _choose_role(data: Mapping[str, Any], role: str | None, source: str) -> str:
    present = [name for name in ("client", "server") if data.get(name) is not None]
    if role is None:
        if len(present) == 2:
            raise MigrationError(
                f"{source} has both a client and a server section: give --role client (for "
                "the machine that ran engarde-client) or --role server"
            )
        if not present:
            raise MigrationError(f"{source} has no client: or server: section")
        return present[0]
    if role not in present:
        raise MigrationError(f"{source} has no {role}: section (it has: {', '.join(present)})")
    return role


def migrate(
    data: Mapping[str, Any],
    *,
    role: str | None = None,
    far_public_key: str | None = None,
    source: str = "engarde.yml",
    control_socket: str | None = None,
    server_gate_port: int = DEFAULT_SERVER_GATE_PORT,
    one_side: bool = False,
) -> Migration:
    """Convert parsed engarde YAML. Raises `MigrationError` (one line) on what cannot be.

    ``one_side``: write an engarde-mode config instead (``[tunnels.wireguard.engarde]``, warp
    speaks engarde's wire format), for when the other side keeps running engarde.
    """
    from warp.keys import (
        KeyFormatError,
        decode_key,
        encode_key,
        generate_private_key,
        public_key_of,
    )

    if not isinstance(data, Mapping):
        raise MigrationError(f"{source}: expected a YAML mapping with a client: or server: section")
    role = _choose_role(data, role, source)
    section = data[role]
    if not isinstance(section, Mapping):
        raise MigrationError(f"{role}: expected a mapping, got {section!r}")
    warnings: list[str] = []
    for key in data:
        if key not in ("client", "server"):
            warnings.append(
                f"{key}: unknown top-level key, not converted (engarde reads only client: and "
                "server:)"
            )
    known = CLIENT_KEYS if role == "client" else SERVER_KEYS
    other = ("server", SERVER_KEYS) if role == "client" else ("client", CLIENT_KEYS)
    _unknown_keys(section, known, role, warnings, other_role=other)

    if one_side:
        if far_public_key is not None:
            raise MigrationError(
                "--far-public-key has no meaning with --one-side (engarde has no keys)"
            )
        return _one_side(section, role, source, warnings, control_socket, server_gate_port)

    private = generate_private_key()
    public = encode_key(public_key_of(private))
    placeholder = far_public_key is None
    if far_public_key is not None:
        try:
            far_raw = decode_key(far_public_key)
        except KeyFormatError as exc:
            raise MigrationError(f"--far-public-key: {exc}") from None
    else:
        far_raw = public_key_of(generate_private_key())
    far = encode_key(far_raw)

    for required in ("listenAddr", "dstAddr"):
        if not section.get(required):
            raise MigrationError(f"{role}.{required} is missing (engarde requires it too)")
    listen = _address(section["listenAddr"], f"{role}.listenAddr")
    dst = _address(section["dstAddr"], f"{role}.dstAddr")
    deadline, deadline_comment = _write_timeout(section, role, warnings)
    web_listen = _web_manager(section, role, warnings)
    description = section.get("description")
    todo: list[str] = []
    other_side = "server" if role == "client" else "client"

    out: list[str] = [
        f"# WARP gateway config converted from engarde ({role} section of {source})",
        "# by `warp migrate-engarde`. Check it with `warp check FILE`; run it with",
        "# `warp run FILE` or, installed as /etc/warp/NAME.toml, with",
        "# `systemctl enable --now warp@NAME`.",
    ]
    if description:
        out.append(f"# engarde description: {_comment(str(description))}")
    out += [
        "",
        "# This instance's private key (fresh; keep it secret).",
        f"# Its public key, for the {other_side}'s far_gate.public_key: {public}",
        f"private_key = {_toml_string(encode_key(private))}",
    ]

    # ----------------------------------------------------------------------- role specifics
    gate: list[str]
    if role == "client":
        interfaces, endpoints, gate, wg_note, _ = _client(section, listen, dst, warnings)
        if endpoints:
            endpoint_block = [
                "# engarde dstAddr (and dstOverrides): the server keeps its public address, so",
                "# no warp-map is needed. warp tries every uplink × every endpoint and keeps the",
                "# paths that work.",
                "endpoints = [" + ", ".join(_toml_string(e) for e in endpoints) + "]",
            ]
        else:  # pragma: no cover - dstAddr is required
            endpoint_block = []
    else:
        interfaces, gate, wg_note = _server(section, listen, dst, warnings, server_gate_port)
        out += [
            "",
            f"# engarde listenAddr {listen}: the clients keep sending to this UDP port.",
            f"listen_port = {listen.port}",
        ]
        endpoint_block = [
            "# The client is behind NAT and reaches this side at listen_port; warp learns its",
            "# addresses from its authenticated packets (as WireGuard roaming does).",
        ]
        if section.get("clientTimeout") is not None:
            warnings.append(
                f"server.clientTimeout ({section['clientTimeout']} s) has no meaning in warp: a "
                "path with no authenticated packet for interfaces.path_timeout (3 s) is dead and "
                "is probed until it comes back; a client's new addresses are learned at once"
            )

    out += ["", "[interfaces]", *interfaces]
    out += ["", "[far_gate]"]
    if placeholder:
        out += _loud(
            [
                "REPLACE public_key below: it is a RANDOM PLACEHOLDER so that `warp check` passes.",
                f"Put the public key of the warp instance on the {other_side} here (its",
                "`warp migrate-engarde` run prints it), or re-run with --far-public-key KEY.",
                "Until then the tunnel cannot come up.",
            ]
        )
        out.append(f"public_key = {_toml_string(far)}  # PLACEHOLDER: REPLACE")
    else:
        out += [
            f"# The warp instance on the {other_side} (given with --far-public-key).",
            f"public_key = {_toml_string(far)}",
        ]
    out += endpoint_block
    out += ["", f"[tunnels.{TUNNEL}]", "# The same tunnel name (hence tunnel id) on both sides."]
    out += ["", f"[tunnels.{TUNNEL}.gate]", *gate]
    out += ["", f"[tunnels.{TUNNEL}.transport]"]
    if deadline:
        out += [f"# {deadline_comment}", f"send_deadline = {deadline}"]
    else:
        out += [f"# {deadline_comment}", '# send_deadline = "100ms"']
    out += [
        "",
        f"[tunnels.{TUNNEL}.transport.redundancy]",
        "# engarde sent every packet once per uplink (N uplinks: N× the bandwidth). warp sends",
        "# num_shards shards of which any required_shards rebuild the packet, spread so that",
        "# no uplink carries more than num_shards - required_shards of them: a lost uplink",
        "# loses nothing. (2, 4) keeps that on two uplinks (2 + 2; (3, 5) needs three: 2 + 2 + 1)",
        "# for 4/2 = 2× the bandwidth; when the uplinks are too few for the code, warp adds",
        "# parity. Use the same on both sides.",
        "num_shards = 4",
        "required_shards = 2",
        "",
        "[control]",
        "# `warp status -c FILE` finds the gateway here (one socket per instance).",
        f"socket = {_toml_string(control_socket or '/run/warp/warp.sock')}",
        "",
    ]
    if web_listen:
        out.append(f"# engarde webManager listened on {web_listen}; warp's nearest is a Prometheus")
        out.append("# endpoint (unauthenticated: keep it on loopback or a management network).")
    else:
        out.append("# Prometheus metrics (docs/metrics.md); off when not set.")
    out += ["# [metrics]", '# listen = "127.0.0.1:9716"', ""]

    # ------------------------------------------------------------------------------- todo
    todo.append(f"This side's public key (give it to the {other_side}): {public}")
    if placeholder:
        todo.append(
            "far_gate.public_key is a random PLACEHOLDER: replace it with the public key of the "
            f"warp instance on the {other_side} (its `warp migrate-engarde` prints it), or re-run "
            "with --far-public-key KEY"
        )
    todo.append(wg_note)
    engarde = f"engarde-{role}"
    held = f"UDP {listen.port}"
    todo.append(
        f"stop {engarde} (it holds {held}), then `warp check FILE` and `warp run FILE` "
        "(or install it as /etc/warp/NAME.toml and `systemctl enable --now warp@NAME`)"
    )
    if role == "server":
        todo.append(
            f"keep UDP {listen.port} open in the firewall / port forward, as for engarde-server"
        )
    text = "\n".join(out)
    return Migration(role, text, public, placeholder, warnings, todo)


ENGARDE_DEFAULT_CLIENT_TIMEOUT = 30


def _client_timeout(section: Mapping[str, Any]) -> int:
    """engarde-server's clientTimeout: integer seconds, 0 or absent = 30."""
    raw = section.get("clientTimeout")
    if raw is None or raw == 0:
        return ENGARDE_DEFAULT_CLIENT_TIMEOUT
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise MigrationError(
            f"server.clientTimeout: expected a positive integer (seconds), got {raw!r}"
        )
    return raw


def _one_side(
    section: Mapping[str, Any],
    role: str,
    source: str,
    warnings: list[str],
    control_socket: str | None,
    server_gate_port: int,
) -> Migration:
    """The engarde-mode config: warp replaces one side, the other keeps running engarde."""
    for required in ("listenAddr", "dstAddr"):
        if not section.get(required):
            raise MigrationError(f"{role}.{required} is missing (engarde requires it too)")
    listen = _address(section["listenAddr"], f"{role}.listenAddr")
    dst = _address(section["dstAddr"], f"{role}.dstAddr")
    _write_timeout(section, role, [])  # validated as engarde would; no meaning here
    if section.get("writeTimeout") is not None:
        warnings.append(
            f"{role}.writeTimeout: not used in engarde mode (warp's sends never block: a copy "
            "that does not fit an uplink's socket buffer is dropped, the other copies go)"
        )
    web_listen = _web_manager(section, role, warnings)
    description = section.get("description")
    other_side = "server" if role == "client" else "client"
    out: list[str] = [
        f"# WARP gateway config in ENGARDE MODE, converted from engarde ({role} section of",
        f"# {source}) by `warp migrate-engarde --one-side`: warp speaks engarde's wire format",
        f"# (raw WireGuard datagrams, duplicated over every uplink), so the {other_side} can keep",
        "# running engarde. No FEC and no encryption of warp's own: WireGuard protects the data.",
        "# Once both sides run warp, convert again without --one-side (docs/engarde-migration.md).",
    ]
    if description:
        out.append(f"# engarde description: {_comment(str(description))}")
    out.append("# No private_key / far_gate.public_key: engarde has no keys.")
    todo: list[str] = []
    if role == "client":
        interfaces, endpoints, gate, wg_note, per_uplink = _client(
            section, listen, dst, warnings, one_side=True
        )
        out += ["", "[interfaces]", *interfaces]
        out += [
            "",
            "[far_gate]",
            "# engarde dstAddr: every WireGuard datagram is sent once from every uplink, to",
            "# this address (an uplink listed in engarde.dst_overrides sends to its own).",
            "endpoints = [" + ", ".join(_toml_string(e) for e in endpoints) + "]",
        ]
        engarde = ['role = "client"']
        if per_uplink:
            engarde += [
                "# engarde dstOverrides: these uplinks send to their own destination instead",
                "# (one copy per uplink, as engarde).",
                "dst_overrides = { "
                + ", ".join(f"{_toml_string(n)} = {_toml_string(a)}" for n, a in per_uplink.items())
                + " }",
            ]
    else:
        timeout = _client_timeout(section)
        interfaces, gate, wg_note = _server(section, listen, dst, warnings, server_gate_port)
        out += [
            "",
            f"# engarde listenAddr {listen}: the engarde clients keep sending to this UDP port.",
            f"listen_port = {listen.port}",
            "",
            "[interfaces]",
            *interfaces,
        ]
        engarde = [
            'role = "server"',
            "# engarde clientTimeout: WireGuard's datagrams go to every client address heard",
            "# from within this long.",
            f'client_timeout = "{timeout}s"',
        ]
    out += ["", f"[tunnels.{TUNNEL}.gate]", *gate]
    out += ["", f"[tunnels.{TUNNEL}.engarde]", *engarde]
    out += [
        "",
        "[control]",
        "# `warp status -c FILE` finds the gateway here (one socket per instance).",
        f"socket = {_toml_string(control_socket or '/run/warp/warp.sock')}",
        "",
    ]
    if web_listen:
        out.append(f"# engarde webManager listened on {web_listen}; warp's nearest is a Prometheus")
        out.append("# endpoint (unauthenticated: keep it on loopback or a management network).")
    else:
        out.append("# Prometheus metrics (docs/metrics.md); off when not set.")
    out += ["# [metrics]", '# listen = "127.0.0.1:9716"', ""]
    todo.append(wg_note)
    todo.append(
        f"stop engarde-{role} (it holds UDP {listen.port}), then `warp check FILE` and "
        "`warp run FILE` (or install it as /etc/warp/NAME.toml and "
        "`systemctl enable --now warp@NAME`)"
    )
    if role == "server":
        todo.append(
            f"keep UDP {listen.port} open in the firewall / port forward, as for engarde-server"
        )
    todo.append(
        f"later, when the {other_side} runs warp too: convert again without --one-side "
        "(FEC instead of duplication, path health)"
    )
    return Migration(role, "\n".join(out), "", False, warnings, todo)


def _client(
    section: Mapping[str, Any],
    listen: _Addr,
    dst: _Addr,
    warnings: list[str],
    one_side: bool = False,
) -> tuple[list[str], list[str], list[str], str, dict[str, str]]:
    """[interfaces] lines, far_gate.endpoints, gate lines, the WireGuard note, and (one-side
    mode) engarde's dstOverrides as {interface: address}: there each uplink keeps its own
    destination, as in engarde; in full warp they are more endpoints for every uplink."""
    excluded = _string_list(section.get("excludedInterfaces"), "client.excludedInterfaces")
    patterns = ["^lo$"]
    for name in excluded:
        pattern = f"^{re.escape(name)}$"
        if pattern not in patterns:
            patterns.append(pattern)
    interfaces = [
        "# engarde excludedInterfaces (exact names) as anchored regexes; warp also never uses lo.",
        "exclusion_patterns = [" + ", ".join(_toml_string(p) for p in patterns) + "]",
    ]
    if not any(name.startswith(("wg", "wt")) for name in excluded):
        warnings.append(
            "client.excludedInterfaces names no WireGuard-looking interface (wg*): if WireGuard's "
            "interface is called something else, add it to interfaces.exclusion_patterns (a "
            "tunnel must never be one of its own uplinks)"
        )
    labels = section.get("interfaceLabels")
    if labels is not None:
        if not isinstance(labels, Mapping):
            raise MigrationError(f"client.interfaceLabels: expected a mapping, got {labels!r}")
        interfaces.append(
            "# engarde interfaceLabels, kept as comments: warp's config has no labels key;"
        )
        interfaces.append("# `warp status` and the metrics name uplinks by interface name.")
        for name, label in labels.items():
            interfaces.append(f"#   {_comment(str(name))} = {_toml_string(str(label))}")
        warnings.append(
            "client.interfaceLabels: kept as comments under [interfaces] (warp's config has no "
            "labels key; status and metrics show interface names)"
        )

    endpoints = [str(dst)]
    per_uplink: dict[str, str] = {}
    overrides = section.get("dstOverrides")
    if overrides is not None:
        if not isinstance(overrides, list):
            raise MigrationError(f"client.dstOverrides: expected a list, got {overrides!r}")
        for index, entry in enumerate(overrides):
            where = f"client.dstOverrides[{index}]"
            if not isinstance(entry, Mapping):
                raise MigrationError(f"{where}: expected {{ifName, dstAddr}}, got {entry!r}")
            _unknown_keys(entry, OVERRIDE_KEYS, where, warnings)
            addr = _address(entry.get("dstAddr"), f"{where}.dstAddr")
            if one_side:
                ifname = entry.get("ifName")
                if not isinstance(ifname, str) or not ifname.strip():
                    raise MigrationError(
                        f"{where}.ifName: expected an interface name, got {ifname!r}"
                    )
                if ifname in per_uplink:  # engarde's getDstByIfname takes the first match
                    warnings.append(
                        f"{where}: a second override for {ifname!r}; engarde used the first "
                        f"({per_uplink[ifname]}), so does warp"
                    )
                    continue
                per_uplink[ifname] = str(addr)
                continue
            added = str(addr) not in endpoints
            if added:
                endpoints.append(str(addr))
            warnings.append(
                f"{where}: warp has no per-interface destination; {addr} "
                f"{'was added to' if added else 'is already in'} far_gate.endpoints, so every "
                f"uplink (not only {entry.get('ifName')!r}) tries it and warp keeps the paths "
                "that work"
            )
        if overrides and not one_side:
            interfaces.append("# engarde dstOverrides (per interface): see far_gate.endpoints.")
            for entry in overrides:
                interfaces.append(f"#   {entry.get('ifName')} -> {entry.get('dstAddr')}")

    for endpoint in [*endpoints, *per_uplink.values()]:
        host = endpoint.rsplit(":", 1)[0].strip("[]")
        if _is_wildcard(host) or _is_loopback(host):
            raise MigrationError(
                f"client.dstAddr {endpoint}: the engarde server's address must be reachable from "
                "this machine (not a wildcard or loopback address)"
            )

    ipv6 = ":" in listen.host
    gate_host = "::1" if ipv6 else "127.0.0.1"
    shown = f"[{gate_host}]:{listen.port}" if ipv6 else f"{gate_host}:{listen.port}"
    gate = [
        f"# engarde listenAddr {listen}: WireGuard's Endpoint points at this port.",
        f"ipv4 = {'false' if ipv6 else 'true'}",
        f"application_to_gate = {listen.port}",
    ]
    if listen.host in ("127.0.0.1", "::1"):
        wg_note = f"WireGuard: no change (its peer's Endpoint = {shown} is now warp's gate)"
    elif _is_loopback(listen.host) or _is_wildcard(listen.host):
        wg_note = (
            f"WireGuard: set the peer's `Endpoint = {shown}` (engarde listened on {listen}; "
            "warp's loopback gate listens on loopback only)"
        )
        warnings.append(
            f"client.listenAddr {listen}: warp's gate listens on {shown} only; WireGuard's "
            f"Endpoint must be {shown}"
        )
    else:
        wg_note = (
            f"WireGuard must run on this machine with `Endpoint = {shown}`: engarde listened on "
            f"{listen}, but warp's loopback gate accepts local applications only"
        )
        warnings.append(
            f"client.listenAddr {listen} is not a loopback address: if WireGuard runs on another "
            f"machine, this does not convert (run warp there); WireGuard's Endpoint must be {shown}"
        )
    return interfaces, endpoints, gate, wg_note, per_uplink


def _server(
    section: Mapping[str, Any], listen: _Addr, dst: _Addr, warnings: list[str], gate_port: int
) -> tuple[list[str], list[str], str]:
    if not (_is_wildcard(listen.host) or _ip(listen.host) is not None):
        raise MigrationError(f"server.listenAddr {listen}: expected an IP address or :PORT")
    if not _is_wildcard(listen.host):
        warnings.append(
            f"server.listenAddr {listen}: warp listens on port {listen.port} of every uplink "
            "(not on one address); restrict uplinks with interfaces.inclusion_patterns / "
            "exclusion_patterns if needed"
        )
    interfaces = [
        "# WireGuard's own interface must never be an uplink (add yours if it is not wg*).",
        'exclusion_patterns = ["^lo$", "^wg"]',
    ]
    if _is_loopback(dst.host) or _is_wildcard(dst.host):
        ipv6 = ":" in dst.host
    else:
        raise MigrationError(
            f"server.dstAddr {dst}: WireGuard is on another machine; warp's loopback gate "
            "delivers to this machine only: run warp on the WireGuard server"
        )
    if gate_port in (dst.port, listen.port):
        gate_port = next(
            p for p in range(DEFAULT_SERVER_GATE_PORT, 65536) if p not in (dst.port, listen.port)
        )
    host = "::1" if ipv6 else "127.0.0.1"
    shown = f"[{host}]:{gate_port}" if ipv6 else f"{host}:{gate_port}"
    gate = [
        "# Where WireGuard's packets come from and go to: warp sends them to WireGuard's listen",
        f"# port (engarde dstAddr {dst}) from {shown}, and WireGuard answers there.",
        f"ipv4 = {'false' if ipv6 else 'true'}",
        f"application_to_gate = {gate_port}",
        f"gate_to_application = {dst.port}",
    ]
    wg_note = (
        f"WireGuard: no change (it learns {shown}, warp's gate, as its peer's endpoint from the "
        "first packet, as it learned engarde's socket)"
    )
    return interfaces, gate, wg_note


# ---------------------------------------------------------------------------------------------
# Files and the command


def load_engarde(path: str | os.PathLike[str]) -> Any:
    """The parsed YAML of an engarde config; `MigrationError` (one line) if unreadable."""
    import yaml

    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MigrationError(f"{name}: no such file") from None
    except UnicodeDecodeError:
        raise MigrationError(f"{name}: not UTF-8 text") from None
    except OSError as exc:
        raise MigrationError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MigrationError(f"{name}: YAML error{where}: {problem}") from None


def _write(path: str, text: str, force: bool, source: str) -> None:
    """Write the config 0600 (it holds a private key), also over an existing 0644 file with
    ``force``; never over ``source``, the engarde YAML being converted."""
    with contextlib.suppress(OSError):
        if os.path.samefile(path, source):
            raise MigrationError(
                f"-o {path} is the engarde config being converted; write the warp config to "
                "another file"
            )
    try:
        write_private_file(path, text, force=force)
    except FileExistsError:
        raise MigrationError(f"{path} exists (use --force to replace it)") from None
    except OSError as exc:
        raise MigrationError(f"cannot write {path}: {exc.strerror or exc}") from None


def run_migrate_engarde(args: argparse.Namespace) -> int:
    from warp.config import ConfigError, parse_gateway_config

    out: str | None = args.output
    if not 1 <= args.gate_port <= 65535:
        print(f"warp migrate-engarde: error: --gate-port must be 1..65535, got {args.gate_port}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    socket_path = args.control_socket
    if socket_path is None and out is not None:
        socket_path = f"/run/warp/{Path(out).stem}.sock"
    try:
        data = load_engarde(args.engarde)
        migration = migrate(
            data,
            role=args.role,
            far_public_key=args.far_public_key,
            source=os.path.basename(args.engarde),
            control_socket=socket_path,
            server_gate_port=args.gate_port,
            one_side=args.one_side,
        )
    except MigrationError as exc:
        print(f"warp migrate-engarde: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:  # the output must be a config that `warp check` accepts
        parse_gateway_config(migration.toml, out or "<output>")
    except ConfigError as exc:
        problem = exc.format().splitlines()[0]
        print(f"warp migrate-engarde: error: the converted config is invalid: {problem}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if out is None:
        sys.stdout.write(migration.toml)
        sys.stdout.flush()
    else:
        try:
            _write(out, migration.toml, args.force, args.engarde)
        except MigrationError as exc:
            print(f"warp migrate-engarde: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    err = sys.stderr
    target = out or "standard output"
    print(f"warp migrate-engarde: {migration.role} section of {args.engarde} → {target}", file=err)
    for warning in migration.warnings:
        print(f"warning: {warning}", file=err)
    print("what you must still do:", file=err)
    for number, item in enumerate(migration.todo, 1):
        print(f"  {number}. {item.replace('FILE', out or 'FILE')}", file=err)
    return EXIT_OK


def register_migrate_engarde(subparsers: Any) -> None:
    """Add ``migrate-engarde`` to the ``warp`` command."""
    parser = subparsers.add_parser(
        "migrate-engarde",
        help="convert an engarde YAML config into a warp config",
        description="Write the warp config equivalent to one side of an engarde config: the "
        "client's listenAddr becomes the loopback gate (WireGuard's Endpoint keeps pointing "
        "there), excludedInterfaces anchored exclusion patterns, dstAddr far_gate.endpoints (no "
        "map needed); the server's listenAddr becomes listen_port and its dstAddr (WireGuard) "
        "the gate's gate_to_application. Prints on stderr what is left to do, and warns about "
        "every key with no meaning in warp and every unknown key. See docs/engarde-migration.md.",
        epilog="Exit codes: 0 converted, 1 the engarde file cannot be converted (one line).",
    )
    parser.add_argument("engarde", metavar="ENGARDE.yml", help="engarde's YAML config")
    parser.add_argument(
        "--role",
        choices=["client", "server"],
        help="which section to convert (required when the file has both)",
    )
    parser.add_argument(
        "-o", "--output", metavar="OUT.toml", help="write here (mode 0600) instead of stdout"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT.toml if it exists")
    parser.add_argument(
        "--far-public-key",
        metavar="KEY",
        help="the other side's warp public key (default: a random placeholder marked REPLACE)",
    )
    parser.add_argument(
        "--one-side",
        action="store_true",
        help="migrate one side only: the other keeps running engarde, so write an engarde-mode "
        "config (warp speaks engarde's wire format: duplication, no FEC, no warp keys)",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="control.socket (default /run/warp/<OUT's name>.sock with -o, else "
        "/run/warp/warp.sock)",
    )
    parser.add_argument(
        "--gate-port",
        type=int,
        default=DEFAULT_SERVER_GATE_PORT,
        metavar="PORT",
        help=f"server: the loopback gate's own port (default {DEFAULT_SERVER_GATE_PORT})",
    )
    parser.set_defaults(handler=run_migrate_engarde)
