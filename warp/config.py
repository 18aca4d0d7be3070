"""Configuration of a warp gateway and of warp-map (docs/configuration.md), as frozen pydantic
models.

Loading goes through :func:`load_gateway_config` / :func:`load_map_config` (or the ``parse_*`` and
``validate_*`` variants for text and already-parsed data). Every problem in a config is collected
and raised at once as a :class:`ConfigError` whose ``problems`` are ``(toml_path, message)``
pairs, e.g. ``("tunnels.wireguard.transport.redundancy.num_shards", "must be ≥ 1, got 0")``.

Value conventions after validation:

* keys are the raw 32 bytes (text accepted: Crockford base32 or WireGuard base64);
* durations are float seconds (TOML: a number of seconds, or ``"250ms"``, ``"10s"``, ``"2m"``,
  ``"1h"``, or a sum such as ``"1m30s"``);
* ``host:port`` values are :class:`HostPort` (IPv6 hosts without their brackets);
* regexes are compiled :class:`re.Pattern` objects, used with ``.search``;
* rates are integer bits per second;
* lists are tuples (the models are frozen).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import math
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeAlias, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from warp.keys import KeyFormatError, decode_key, encode_key, generate_private_key, public_key_of
from warp.paths.budget import UplinkPolicy
from warp.secret_files import access_warning, read_private_key_text

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_MAP_PORT",
    "DOCUMENTATION_DOMAINS",
    "DOCUMENTATION_NETWORKS",
    "ENGARDE_NO_KEY",
    "ConfigError",
    "ControlConfig",
    "EngardeConfig",
    "FarGateConfig",
    "GateConfig",
    "GatewayConfig",
    "HostPort",
    "InterfacesConfig",
    "LogConfig",
    "LoopbackGate",
    "MapLimitsConfig",
    "MapServerConfig",
    "MetricsConfig",
    "RedundancyConfig",
    "RelayConfig",
    "TransportConfig",
    "TunGate",
    "TunnelConfig",
    "UnixGate",
    "WarpMapConfig",
    "check_warnings",
    "derive_tunnel_id",
    "example_gateway_config",
    "example_map_config",
    "is_documentation_host",
    "load_gateway_config",
    "load_map_config",
    "other_config_kind",
    "parse_duration",
    "parse_gateway_config",
    "parse_host_port",
    "parse_map_config",
    "parse_rate",
    "read_config_text",
    "secret_file_warnings",
    "validate_gateway_config",
    "validate_map_config",
]

DEFAULT_MAP_PORT = 13116
DEFAULT_CONTROL_SOCKET = "/run/warp/warp.sock"
TUNNEL_ID_MIN = 1
TUNNEL_ID_MAX = 65535
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """A config could not be loaded. ``problems`` lists every ``(toml_path, message)``.

    ``toml_path`` is ``""`` for problems with the file as a whole (unreadable, TOML syntax).
    ``source`` is the file name (or ``"<string>"``) the config came from.
    """

    def __init__(self, problems: list[tuple[str, str]], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        """One line per problem: ``path: message`` (or ``source: message`` for whole-file ones)."""
        return "\n".join(f"{path or self.source}: {message}" for path, message in self.problems)


class _Problems(ValueError):
    """Raised inside validators to report problems at paths relative to the validated object."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


# --------------------------------------------------------------------------------------------
# Value parsers (usable on their own; each raises ValueError with a user-facing message)


def _describe(value: object) -> str:
    """How a TOML value reads in a message."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)")
_DURATION_FULL = re.compile(r"(?:\s*(?:\d+(?:\.\d*)?|\.\d+)\s*(?:ms|s|m|h))+\s*")


def parse_duration(value: object) -> float:
    """A duration in float seconds: a number of seconds, or a string like ``"250ms"``, ``"1m30s"``.

    Raises ValueError unless the result is finite and > 0.
    """
    if isinstance(value, bool):
        raise ValueError(
            f'expected a duration (seconds, or a string like "250ms"), got {_describe(value)}'
        )
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if value.strip().startswith("-"):
            raise ValueError(f"duration must be > 0, got {value!r}")
        if not _DURATION_FULL.fullmatch(value):
            hint = ""
            if re.fullmatch(r"\s*\d+(?:\.\d*)?\s*", value):
                hint = f" (a bare number is written without quotes: {value.strip()})"
            raise ValueError(
                f"invalid duration {value!r}: expected a number with a unit ms, s, m or h, "
                f'like "250ms", "10s", "2m", "1m30s"{hint}'
            )
        seconds = sum(
            float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(value)
        )
    else:
        raise ValueError(
            f'expected a duration (seconds, or a string like "250ms"), got {_describe(value)}'
        )
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be > 0, got {value!r}")
    return seconds


class HostPort(NamedTuple):
    """A ``host:port`` value; ``host`` is a name, an IPv4 or an IPv6 address (no brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is empty")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is neither an IP address nor a valid host name")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{host!r} is not a valid IPv4 address")


def parse_host_port(value: object) -> HostPort:
    """Parse ``"host:port"`` / ``"[ipv6]:port"`` (port 1..65535); raise ValueError otherwise."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {_describe(value)}')
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f'expected "[IPv6 address]:port", got {value!r}')
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'expected "host:port", got {value!r}')
        if ":" in host:
            raise ValueError(f'an IPv6 address goes in brackets: "[{host}]:{port_text}"')
        _check_host(host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port_text!r} in {value!r}")
    return HostPort(host, int(port_text))


_RATE_BITS = {"": 1, "bit": 1, "bps": 1, "kbit": 10**3, "kbps": 10**3, "mbit": 10**6}
_RATE_BITS |= {"mbps": 10**6, "gbit": 10**9, "gbps": 10**9}
_RATE_BYTES = {"B/s": 8, "kB/s": 8 * 10**3, "KB/s": 8 * 10**3, "MB/s": 8 * 10**6}
_RATE_BYTES |= {"GB/s": 8 * 10**9}
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z/]*)\s*")


def parse_rate(value: object) -> int | None:
    """A rate in bits per second; ``"unlimited"`` gives None.

    Numbers are bits/s. Bit units (case-insensitive, SI prefixes): ``bit``/``bps``,
    ``kbit``/``kbps``, ``Mbit``/``Mbps``, ``Gbit``/``Gbps``. Byte units (capital B, ``/s``):
    ``B/s``, ``kB/s``/``KB/s``, ``MB/s``, ``GB/s``. Unlike ``tc``, ``kbps`` means kilobits.
    """
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'expected a rate like "10Mbit", got {_describe(value)}')
    if isinstance(value, str):
        match = _RATE.fullmatch(value)
        unit = match.group(2) if match else ""
        factor = _RATE_BYTES.get(unit) or _RATE_BITS.get(unit.lower())
        if match is None or factor is None:
            raise ValueError(
                f"invalid rate {value!r}: expected a number with a unit: bit, kbit, Mbit, "
                "Gbit (or bps, kbps, Mbps, Gbps: bits per second) or B/s, kB/s, MB/s, GB/s, "
                '(bytes per second), or "unlimited"'
            )
        bits = float(match.group(1)) * factor
    else:
        bits = float(value)
    if not math.isfinite(bits) or bits < 1:
        raise ValueError(f"rate must be at least 1 bit/s, got {value!r}")
    return round(bits)


# --------------------------------------------------------------------------------------------
# Annotated field types


def _key_validator(what: str, placeholder_hint: str) -> Callable[[object], bytes]:
    def validate(value: object) -> bytes:
        if isinstance(value, bytes) and len(value) == 32:
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected {what} as a string, got {_describe(value)}")
        stripped = value.strip()
        if (stripped.startswith("<") and stripped.endswith(">")) or not stripped:
            raise ValueError(f"placeholder {value!r}: {placeholder_hint}")
        try:
            return decode_key(stripped)
        except KeyFormatError as exc:
            raise ValueError(str(exc)) from None

    return validate


PrivateKey: TypeAlias = Annotated[
    bytes,
    PlainValidator(
        _key_validator(
            "a private key",
            "run `warp-keygen` and put its private key here (never share it)",
        )
    ),
]
PeerPublicKey: TypeAlias = Annotated[
    bytes,
    PlainValidator(
        _key_validator(
            "a public key",
            "put the far gate's public key here (run `warp-keygen` on the peer, "
            "or `warp-keygen pubkey` with its private key)",
        )
    ),
]
MapPublicKey: TypeAlias = Annotated[
    bytes,
    PlainValidator(
        _key_validator(
            "a public key",
            "put warp-map's public key here (warp-map logs it at start; "
            "`warp-keygen pubkey` derives it from the map's private key)",
        )
    ),
]
ClientPublicKey: TypeAlias = Annotated[
    bytes,
    PlainValidator(
        _key_validator("a public key", "put a gateway's public key here (`warp-keygen` prints it)")
    ),
]
PresharedKey: TypeAlias = Annotated[
    bytes,
    PlainValidator(
        _key_validator(
            "a preshared key",
            "generate one with `wg genpsk` (or use a fresh `warp-keygen` private key), "
            "the same on both peers",
        )
    ),
]
Duration: TypeAlias = Annotated[float, PlainValidator(parse_duration)]
Address: TypeAlias = Annotated[HostPort, PlainValidator(parse_host_port)]


def _rate_validator(value: object) -> int | None:
    return parse_rate(value)


Rate: TypeAlias = Annotated[int | None, PlainValidator(_rate_validator)]


def _compile_regex(value: object) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return typing.cast("re.Pattern[str]", value)
    if not isinstance(value, str):
        raise ValueError(f"expected a regex string, got {_describe(value)}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None


Regex: TypeAlias = Annotated[re.Pattern[str], PlainValidator(_compile_regex)]

IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def _interface_address(value: object) -> IPInterface:
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(
            f'expected an address with prefix length like "10.7.0.1/24", got {_describe(value)}'
        )
    try:
        return ipaddress.ip_interface(value.strip())
    except ValueError as exc:
        raise ValueError(f"invalid interface address {value!r}: {exc}") from None


def _network(value: object) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a CIDR like "10.7.0.0/24", got {_describe(value)}')
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"invalid CIDR {value!r}: {exc}") from None


InterfaceAddress: TypeAlias = Annotated[IPInterface, PlainValidator(_interface_address)]
Network: TypeAlias = Annotated[IPNetwork, PlainValidator(_network)]


def _socket_path(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a path string, got {_describe(value)}")
    if not value:
        raise ValueError("the path is empty")
    if "\0" in value:
        raise ValueError("the path contains a NUL character")
    if len(os.fsencode(value)) > UNIX_PATH_MAX:
        raise ValueError(
            f"a Unix socket path is at most {UNIX_PATH_MAX} bytes, got {len(os.fsencode(value))}"
        )
    return value


SocketPath: TypeAlias = Annotated[str, PlainValidator(_socket_path)]

_IFNAME = re.compile(r"[^/\s:]{1,15}")


def _interface_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an interface name, got {_describe(value)}")
    if not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"invalid interface name {value!r}: 1 to 15 characters, no '/', ':' or whitespace"
        )
    return value


InterfaceName: TypeAlias = Annotated[str, PlainValidator(_interface_name)]

Port: TypeAlias = Annotated[StrictInt, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Gateway config


class UplinkPolicyConfig(_Model):
    """``[[interfaces.uplinks]]``: tier and data budget of the uplinks whose name ``match``
    finds (re.search; the first matching entry applies)."""

    match: Regex
    tier: Literal["primary", "backup", "never"] = "primary"
    #: bytes per ``budget_period`` (both ways, UDP payload); unset: no budget
    data_budget: StrictInt | None = Field(default=None, ge=1)
    budget_period: Literal["day", "month"] = "month"


class InterfacesConfig(_Model):
    """``[interfaces]``: which local uplinks are used, and path liveness."""

    interface_scan_interval: Duration = 10.0
    inclusion_patterns: tuple[Regex, ...] = (re.compile(".*"),)
    # Loopback and the usual tunnel interfaces (WireGuard, TUN, Tailscale): a tunnel must never
    # be its own uplink (WireGuard/TUN link kinds are excluded whatever the patterns say).
    exclusion_patterns: tuple[Regex, ...] = tuple(
        re.compile(p) for p in ("^lo$", "^wg", "^tun", "^tailscale")
    )
    bind_to_device: StrictBool = Field(default_factory=lambda: sys.platform.startswith("linux"))
    holepunch_keep_alive_interval: Duration = 1.0
    path_timeout: Duration = 3.0
    #: the TTL (IPv6 hop limit) of the first punches towards a peer address never heard from:
    #: enough to cross our own NAT, too little to reach the peer's, so that a peer router
    #: without a firewall does not pin its port with a conntrack entry; 0: off
    punch_ttl: StrictInt = Field(default=2, ge=0, le=255)
    #: hard-NAT traversal: birthday probing between a cone and a symmetric NAT (many local
    #: ports on the symmetric side, random ports towards it from the cone side)
    birthday_probing: StrictBool = True
    max_consecutive_failures: StrictInt = Field(default=10, ge=1)
    uplinks: tuple[UplinkPolicyConfig, ...] = ()
    #: where the uplinks' usage against their data budgets is kept across restarts
    usage_file: Path | None = None

    def uplink_policy(self, name: str) -> UplinkPolicy:
        """Tier and budget of uplink ``name``: the first ``uplinks`` entry that matches."""
        for entry in self.uplinks:
            if entry.match.search(name):
                return UplinkPolicy(entry.tier, entry.data_budget, entry.budget_period)
        return UplinkPolicy()

    def uses_interface(self, name: str) -> bool:
        """True if an interface of this name is an uplink (an inclusion matches, no exclusion)."""
        return any(p.search(name) for p in self.inclusion_patterns) and not any(
            p.search(name) for p in self.exclusion_patterns
        )

    @model_validator(mode="after")
    def _timeout_longer_than_probe(self) -> InterfacesConfig:
        if self.path_timeout <= self.holepunch_keep_alive_interval:
            raise _Problems(
                [
                    (
                        ("path_timeout",),
                        f"must be longer than holepunch_keep_alive_interval "
                        f"({self.holepunch_keep_alive_interval:g} s), got {self.path_timeout:g} s",
                    )
                ]
            )
        return self


class WarpMapConfig(_Model):
    """``[warp_map]``: the rendezvous server. Unset address: no map (static endpoints).

    ``address`` is one ``host:port`` or a list of them (instances of one map cluster, sharing
    the map's key): the gateway registers with one and fails over to the next.
    """

    address: Address | tuple[Address, ...] | None = None
    public_key: MapPublicKey | None = None

    @field_validator("address", mode="before")
    @classmethod
    def _address_list(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("give at least one map address (or leave address out)")
            return tuple(parse_host_port(item) for item in value)
        return value

    @property
    def addresses(self) -> tuple[HostPort, ...]:
        """Every configured map address, in order of preference."""
        if self.address is None:
            return ()
        if isinstance(self.address, HostPort):
            return (self.address,)
        return self.address

    @model_validator(mode="after")
    def _key_with_address(self) -> WarpMapConfig:
        if self.address is not None and self.public_key is None:
            raise _Problems([(("public_key",), "required when warp_map.address is set")])
        return self


class FarGateConfig(_Model):
    """``[far_gates.<name>]`` (or the single ``[far_gate]``, named ``default``): a peer warp
    instance (or plain WireGuard peer). ``allowed_ips``: the destinations a tun gate shared by
    several far gates sends to this one (cryptokey routing, as WireGuard's AllowedIPs)."""

    public_key: PeerPublicKey
    endpoints: tuple[Address, ...] = ()
    preshared_key: PresharedKey | None = Field(default=None, repr=False)
    kind: Literal["warp", "wireguard"] = "warp"
    allowed_ips: tuple[Network, ...] = ()


#: The name of the far gate of a config written with the single ``[far_gate]`` table.
DEFAULT_FAR_GATE = "default"
_FAR_GATE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class LoopbackGate(_Model):
    """A UDP socket on 127.0.0.1 (or ::1) that applications send their datagrams to."""

    type: Literal["loopback"] = "loopback"
    ipv4: StrictBool = True
    application_to_gate: Port
    gate_to_application: Port | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.ipv4 else "::1"

    @model_validator(mode="after")
    def _distinct_ports(self) -> LoopbackGate:
        if self.gate_to_application == self.application_to_gate:
            raise _Problems(
                [
                    (
                        ("gate_to_application",),
                        "must differ from application_to_gate (the gate would send to itself)",
                    )
                ]
            )
        return self


class UnixGate(_Model):
    """A datagram Unix socket at ``path``; replies go to ``application_path`` or the last sender.

    The socket is 0600, or 0660 for ``group`` (a name or gid); with ``allowed_uids`` /
    ``allowed_gids`` only datagrams from those senders are taken. A directory that other users
    may write to (not sticky) is refused unless ``allow_shared_directory``."""

    type: Literal["unix"] = "unix"
    path: SocketPath
    application_path: SocketPath | None = None
    group: Annotated[str, Field(min_length=1)] | Annotated[StrictInt, Field(ge=0)] | None = None
    allowed_uids: tuple[Annotated[StrictInt, Field(ge=0)], ...] = ()
    allowed_gids: tuple[Annotated[StrictInt, Field(ge=0)], ...] = ()
    allow_shared_directory: StrictBool = False


class TunGate(_Model):
    """A TUN interface: IP packets in and out."""

    type: Literal["tun"] = "tun"
    name: InterfaceName = "warp0"
    address: tuple[InterfaceAddress, ...] = ()
    mtu: StrictInt = Field(default=1420, ge=576, le=65535)
    allowed_ips: tuple[Network, ...] = ()

    @field_validator("address", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


GateConfig: TypeAlias = Annotated[LoopbackGate | UnixGate | TunGate, Field(discriminator="type")]
_GATE_MODELS: dict[str, type[_Model]] = {"loopback": LoopbackGate, "unix": UnixGate, "tun": TunGate}


#: Parity later than this protects little: the receiver gives a block up after 1 s.
MAX_REDUNDANCY_WINDOW = 0.1


class RedundancyConfig(_Model):
    """Erasure coding: ``num_shards`` shards per block, any ``required_shards`` rebuild it."""

    num_shards: StrictInt = Field(default=5, ge=1, le=255)
    required_shards: StrictInt = Field(default=3, ge=1, le=255)
    #: n - k chosen per block from the measured loss, within [min_parity, max_parity] (never
    #: below what surviving an uplink loss needs), so residual loss stays under target_loss
    adaptive: StrictBool = False
    min_parity: StrictInt = Field(default=1, ge=0, le=254)
    max_parity: StrictInt = Field(default=8, ge=0, le=254)
    target_loss: StrictFloat = Field(default=0.001, gt=0.0, lt=1.0)
    #: a block's parity goes out when it has required_shards data shards or this long
    #: after its first one (then over fewer data shards, with the same parity)
    window: Duration = 0.001

    @model_validator(mode="after")
    def _k_le_n(self) -> RedundancyConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.window > MAX_REDUNDANCY_WINDOW:
            problems.append(
                (
                    ("window",),
                    f"must be at most {MAX_REDUNDANCY_WINDOW * 1000:g}ms (the longest a block"
                    f" waits for its parity), got {self.window * 1000:g}ms",
                )
            )
        if self.required_shards > self.num_shards:
            problems.append(
                (
                    ("required_shards",),
                    f"must be ≤ num_shards ({self.num_shards}), got {self.required_shards}",
                )
            )
        if self.min_parity > self.max_parity:
            problems.append(
                (
                    ("min_parity",),
                    f"must be ≤ max_parity ({self.max_parity}), got {self.min_parity}",
                )
            )
        if self.adaptive and self.required_shards + self.max_parity > 255:
            problems.append(
                (
                    ("max_parity",),
                    f"required_shards + max_parity must be ≤ 255 (shards in a block), got "
                    f"{self.required_shards} + {self.max_parity}",
                )
            )
        if problems:
            raise _Problems(problems)
        return self


class TransportConfig(_Model):
    """How a tunnel's datagrams travel."""

    mtu: StrictInt = Field(default=1400, ge=576, le=65535)
    ordered: StrictBool = False
    reorder_timeout: Duration = 0.050
    send_deadline: Duration = 0.100
    priority: StrictInt = Field(default=0, ge=-128, le=127)
    redundancy: RedundancyConfig = Field(default_factory=RedundancyConfig)
    #: ``survive_uplink_loss``: no uplink carries more than n - k shards of a block (parity is
    #: added when the uplinks are too few); ``aggregate``: shards in proportion to capacity
    spread: Literal["survive_uplink_loss", "aggregate"] = "survive_uplink_loss"


ENGARDE_NO_KEY = bytes(32)
"""Stands for the keys an engarde tunnel has no use for (``private_key``,
``far_gate.public_key``) when the config leaves them out: engarde's wire format carries raw
WireGuard datagrams, there is no warp peer and no warp handshake."""


class EngardeConfig(_Model):
    """``[tunnels.<name>.engarde]``: speak engarde's wire format instead of warp's.

    ``client``: every datagram from the gate is sent once from every uplink, to the uplink's
    entry in ``dst_overrides`` (engarde's dstOverrides) or else to the one
    ``far_gate.endpoints`` address (engarde's dstAddr); what any uplink receives from them
    goes to the gate. ``server``: the uplinks listen on ``listen_port``; datagrams from
    engarde clients go to the gate, and the gate's datagrams go to every client address heard
    from within ``client_timeout`` (at most ``max_clients`` addresses, the oldest evicted).
    """

    role: Literal["client", "server"]
    client_timeout: Duration = 30.0
    max_clients: StrictInt = Field(default=64, ge=1, le=65536)
    dst_overrides: dict[InterfaceName, Address] = Field(default_factory=dict)


class TunnelConfig(_Model):
    """``[tunnels.<name>]``. ``tunnel_id`` is always set after loading (derived from the name)."""

    tunnel_id: StrictInt = Field(ge=TUNNEL_ID_MIN, le=TUNNEL_ID_MAX)
    gate: GateConfig
    #: The far gate this tunnel goes to (``far_gates`` key). Set after loading, except for a
    #: tun gate shared by several far gates (None: it routes by ``far_gates.<n>.allowed_ips``).
    far_gate: str | None = None
    transport: TransportConfig = Field(default_factory=TransportConfig)
    engarde: EngardeConfig | None = None

    @field_validator("gate", mode="before")
    @classmethod
    def _infer_gate_type(cls, value: object) -> object:
        if not isinstance(value, dict) or "type" in value:
            return value
        found = {
            kind: sorted(set(value) & set(model.model_fields) - {"type"})
            for kind, model in _GATE_MODELS.items()
        }
        kinds = [kind for kind, keys in found.items() if keys]
        if len(kinds) == 1:
            return {**value, "type": kinds[0]}
        if kinds:
            detail = " and ".join(f"{kind} ({', '.join(found[kind])})" for kind in kinds)
            raise ValueError(f"ambiguous gate: it has keys of {detail}; keep the keys of one kind")
        all_keys = sorted({k for m in _GATE_MODELS.values() for k in m.model_fields} - {"type"})
        hints = []
        for key in value:
            close = difflib.get_close_matches(str(key), all_keys, n=1)
            if close:
                hints.append(f"unknown key {key!r}; did you mean {close[0]!r}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(
            f"cannot tell the gate type from its keys{hint}: a loopback gate needs "
            "application_to_gate, a unix gate path, a tun gate name/address; "
            'or set type = "loopback", "unix" or "tun"'
        )


_TUNNEL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def derive_tunnel_id(name: str) -> int:
    """The tunnel id used when ``tunnel_id`` is not set: a stable hash of the name into 1..65535.

    BLAKE2s-64 of ``b"warp tunnel id\\0" + name (UTF-8)``, as a big-endian integer, mod 65535, + 1.
    Identical on every machine and Python version, so both peers derive the same id.
    """
    digest = hashlib.blake2s(b"warp tunnel id\0" + name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % TUNNEL_ID_MAX + TUNNEL_ID_MIN


class ControlConfig(_Model):
    """``[control]``: the control socket that ``warp status`` talks to."""

    socket: SocketPath = DEFAULT_CONTROL_SOCKET


class MetricsConfig(_Model):
    """``[metrics]``: Prometheus endpoint (off unless ``listen`` is set)."""

    listen: Address | None = None


class LogConfig(_Model):
    """``[log]``."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class _KeyFileProblem(str):
    """Put in place of ``private_key_file`` when the file is unusable: the message that the
    field's validator reports at its TOML path (with every other problem of the config)."""


def _private_key_file(value: object) -> str:
    if isinstance(value, _KeyFileProblem):
        raise ValueError(str(value))
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file name, got {_describe(value)}")
    return value


class GatewayConfig(_Model):
    """A whole warp gateway config (one TOML file)."""

    private_key: PrivateKey = Field(repr=False)
    # The file the private key was read from (made absolute; relative names are relative to
    # the config file's directory), None when the key is in the config.
    private_key_file: Annotated[str, PlainValidator(_private_key_file)] | None = None
    listen_port: StrictInt = Field(default=0, ge=0, le=65535)
    interfaces: InterfacesConfig = Field(default_factory=InterfacesConfig)
    warp_map: WarpMapConfig = Field(default_factory=WarpMapConfig)
    #: The single ``[far_gate]`` table as written (None when ``[far_gates.*]`` is used); code
    #: reads `far_gates`, which is always populated after loading.
    far_gate: FarGateConfig | None = None
    far_gates: dict[str, FarGateConfig] = Field(default_factory=dict)
    tunnels: dict[str, TunnelConfig] = Field(default_factory=dict, validate_default=True)
    control: ControlConfig = Field(default_factory=ControlConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @property
    def public_key(self) -> bytes:
        """This instance's public key."""
        return public_key_of(self.private_key)

    @property
    def engarde_tunnel(self) -> tuple[str, TunnelConfig] | None:
        """The (name, config) of the engarde-mode tunnel, if this gateway speaks engarde's wire
        format (it is then the only tunnel)."""
        for name, tunnel in self.tunnels.items():
            if tunnel.engarde is not None:
                return name, tunnel
        return None

    @model_validator(mode="before")
    @classmethod
    def _derive_tunnel_ids(cls, data: object) -> object:
        if not isinstance(data, dict) or not isinstance(data.get("tunnels"), dict):
            return data
        if any(
            isinstance(table, dict) and "engarde" in table for table in data["tunnels"].values()
        ):
            # engarde mode: no warp peer, no warp handshake; the keys may be left out.
            data = {**data}
            data.setdefault("private_key", ENGARDE_NO_KEY)
            far = data.get("far_gate", {})
            if isinstance(far, dict) and "public_key" not in far:
                data["far_gate"] = {**far, "public_key": ENGARDE_NO_KEY}
        tunnels = {
            name: (
                {**table, "tunnel_id": derive_tunnel_id(name)}
                if isinstance(table, dict) and "tunnel_id" not in table and isinstance(name, str)
                else table
            )
            for name, table in data["tunnels"].items()
        }
        return {**data, "tunnels": tunnels}

    @model_validator(mode="before")
    @classmethod
    def _read_private_key_file(cls, data: object, info: ValidationInfo) -> object:
        """``private_key_file``: read the key (runs before `_derive_tunnel_ids`: pydantic runs
        "before" validators last-defined first). A problem is reported at
        ``private_key_file`` along with every other problem of the config."""
        if not isinstance(data, dict) or "private_key_file" not in data:
            return data
        name = data["private_key_file"]
        data = {**data}
        if not isinstance(name, str) or not name:
            data.setdefault("private_key", ENGARDE_NO_KEY)  # only the file's problem is shown
            return data  # the field's validator says what is wrong
        if "private_key" in data:
            data["private_key_file"] = _KeyFileProblem(
                "give the key either as private_key or in private_key_file, not both"
            )
            return data
        base = (info.context or {}).get("base_dir") or os.getcwd()
        path = os.path.normpath(os.path.join(base, os.path.expanduser(name)))
        try:
            text = read_private_key_text(path)
            data["private_key"] = decode_key(text)
            data["private_key_file"] = path
        except (ValueError, KeyFormatError) as exc:
            data["private_key_file"] = _KeyFileProblem(
                str(exc) if str(exc).startswith(("cannot read", path)) else f"{path}: {exc}"
            )
            # no second, misleading "private_key: required key is missing"
            data["private_key"] = ENGARDE_NO_KEY
        return data

    @field_validator("tunnels", mode="after")
    @classmethod
    def _check_tunnels(cls, tunnels: dict[str, TunnelConfig]) -> dict[str, TunnelConfig]:
        if not tunnels:
            raise ValueError("at least one tunnel is required: add a [tunnels.<name>.gate] table")
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name in tunnels:
            if not _TUNNEL_NAME.fullmatch(name):
                problems.append(
                    (
                        (name,),
                        f"invalid tunnel name {name!r}: 1 to 64 letters, digits, '_' or '-'",
                    )
                )
        seen_binds: dict[tuple[str, object], str] = {}
        for name, tunnel in tunnels.items():
            gate = tunnel.gate
            bind: tuple[str, object]
            if isinstance(gate, LoopbackGate):
                bind, where = ("port", (gate.ipv4, gate.application_to_gate)), "application_to_gate"
            elif isinstance(gate, UnixGate):
                bind, where = ("unix", gate.path), "path"
            else:
                bind, where = ("tun", gate.name), "name"
            other = seen_binds.setdefault(bind, name)
            if other != name:
                problems.append(
                    ((name, "gate", where), f"the same as the gate of tunnel {other!r}")
                )
        if problems:
            raise _Problems(problems)
        return tunnels

    def _engarde_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        found = self.engarde_tunnel
        assert found is not None
        name, tunnel = found
        assert tunnel.engarde is not None
        role = tunnel.engarde.role
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if len(self.far_gates) > 1:
            problems.append((("far_gates",), "an engarde tunnel talks to exactly one far gate"))
        far_name, far = next(iter(self.far_gates.items()))
        far_path = self.far_gate_path(far_name)
        if len(self.tunnels) > 1:
            problems.append(
                (
                    ("tunnels",),
                    f"tunnel {name!r} speaks engarde's wire format (raw WireGuard datagrams, "
                    f"no tunnel ids): it must be the only tunnel, got {len(self.tunnels)}",
                )
            )
        if not isinstance(tunnel.gate, LoopbackGate):
            problems.append(
                (
                    ("tunnels", name, "gate"),
                    "an engarde tunnel needs a loopback gate (WireGuard's endpoint), "
                    f"got a {tunnel.gate.type} gate",
                )
            )
        if far.public_key != ENGARDE_NO_KEY:
            problems.append(
                (
                    (*far_path, "public_key"),
                    "an engarde tunnel has no warp peer (WireGuard's own keys protect the data): "
                    "remove far_gate.public_key, or remove [tunnels." + name + ".engarde] to "
                    "run a full warp tunnel",
                )
            )
        if far.preshared_key is not None:
            problems.append(
                ((*far_path, "preshared_key"), "has no meaning for an engarde tunnel; remove it")
            )
        if far.kind != "warp":
            problems.append(((*far_path, "kind"), "has no meaning for an engarde tunnel"))
        if self.warp_map.address is not None:
            problems.append(
                (
                    ("warp_map", "address"),
                    "an engarde tunnel uses no warp-map (engarde-server has a public address): "
                    "remove [warp_map]",
                )
            )
        if role == "client" and len(far.endpoints) != 1:
            problems.append(
                (
                    (*far_path, "endpoints"),
                    "an engarde client needs exactly one address: the engarde server's, e.g. "
                    '["203.0.113.7:59402"] (engarde\'s dstAddr); an uplink that sends '
                    f"elsewhere goes in tunnels.{name}.engarde.dst_overrides (dstOverrides), "
                    f"got {len(far.endpoints)}",
                )
            )
        if role == "server" and tunnel.engarde.dst_overrides:
            problems.append(
                (
                    ("tunnels", name, "engarde", "dst_overrides"),
                    "has no meaning for an engarde server (it answers each client where it "
                    "was heard from); remove it",
                )
            )
        if role == "server":
            if not self.listen_port:
                problems.append(
                    (
                        ("listen_port",),
                        "required for an engarde server: the UDP port the engarde clients send "
                        "to (engarde-server's listenAddr port)",
                    )
                )
            if far.endpoints:
                problems.append(
                    (
                        (*far_path, "endpoints"),
                        "an engarde server learns its clients' addresses; remove far_gate "
                        '(or make this tunnel role = "client")',
                    )
                )
        return problems

    def far_gate_path(self, name: str) -> tuple[str, ...]:
        """The TOML path of a far gate's table: ``far_gate`` when written as the single
        ``[far_gate]`` table, else ``far_gates.<name>``."""
        return ("far_gate",) if self.far_gate is not None else ("far_gates", name)

    def tunnels_of(self, far_gate: str) -> dict[str, TunnelConfig]:
        """The tunnels that carry traffic to a far gate: its own and the shared tun gates."""
        return {
            name: tunnel
            for name, tunnel in self.tunnels.items()
            if tunnel.far_gate is None or tunnel.far_gate == far_gate
        }

    def _resolve_far_gates(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Populate `far_gates` (the single ``[far_gate]`` is ``default``) and each tunnel's
        ``far_gate``; the problems of the fleet as a whole."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.far_gate is not None:
            if self.far_gates:
                return [
                    (
                        ("far_gates",),
                        "give either one [far_gate] table or [far_gates.<name>] tables, not both",
                    )
                ]
            # (Frozen models: set once here, while loading.)
            object.__setattr__(self, "far_gates", {DEFAULT_FAR_GATE: self.far_gate})
        elif not self.far_gates:
            return [(("far_gate",), "required table [far_gate] is missing")]
        names = list(self.far_gates)
        for name in names:
            if not _FAR_GATE_NAME.fullmatch(name):
                problems.append(
                    (
                        ("far_gates", name),
                        f"invalid far gate name {name!r}: 1 to 64 letters, digits, '_' or '-'",
                    )
                )
        seen_keys: dict[bytes, str] = {}
        seen_networks: list[tuple[IPNetwork, str]] = []
        for name, far in self.far_gates.items():
            other = seen_keys.setdefault(far.public_key, name)
            if other != name:
                problems.append(
                    (
                        (*self.far_gate_path(name), "public_key"),
                        f"the same key as far gate {other!r}: one far gate per key",
                    )
                )
            for index, network in enumerate(far.allowed_ips):
                for taken, owner in seen_networks:
                    if network.version == taken.version and network.overlaps(taken):
                        problems.append(
                            (
                                (*self.far_gate_path(name), "allowed_ips", index),
                                f"{network} overlaps {taken} of far gate {owner!r}: a "
                                "destination must belong to one far gate",
                            )
                        )
                        break
                seen_networks.append((network, name))
        shared = [n for n, t in self.tunnels.items() if t.far_gate is None]
        if len(names) > 1 and any(isinstance(self.tunnels[n].gate, TunGate) for n in shared):
            tun = next(n for n in shared if isinstance(self.tunnels[n].gate, TunGate))
            for name, far in self.far_gates.items():
                if not far.allowed_ips:
                    problems.append(
                        (
                            (*self.far_gate_path(name), "allowed_ips"),
                            f"required: tunnel {tun!r} is a tun gate shared by the far gates "
                            "and sends each packet to the far gate whose allowed_ips hold its "
                            "destination",
                        )
                    )
        seen_ids: dict[tuple[str | None, int], str] = {}
        for name, tunnel in self.tunnels.items():
            if tunnel.far_gate is None:
                if len(names) == 1:
                    object.__setattr__(tunnel, "far_gate", names[0])
                elif not isinstance(tunnel.gate, TunGate):
                    problems.append(
                        (
                            ("tunnels", name, "far_gate"),
                            f"required with several far gates: one of {', '.join(names)} "
                            "(only a tun gate may be shared, routing by allowed_ips)",
                        )
                    )
                    continue
            elif tunnel.far_gate not in self.far_gates:
                problems.append(
                    (
                        ("tunnels", name, "far_gate"),
                        f"unknown far gate {tunnel.far_gate!r}; the far gates are "
                        f"{', '.join(names)}",
                    )
                )
                continue
            # A shared tun gate (far_gate None) goes to every far gate.
            for far_name in names if tunnel.far_gate is None else [tunnel.far_gate]:
                other = seen_ids.setdefault((far_name, tunnel.tunnel_id), name)
                if other != name:
                    problems.append(
                        (
                            ("tunnels", name, "tunnel_id"),
                            f"tunnel id {tunnel.tunnel_id} of tunnel {name!r} collides with "
                            f"tunnel {other!r}"
                            + (f" (towards far gate {far_name!r})" if len(names) > 1 else "")
                            + "; set tunnel_id explicitly on one of them "
                            "(the same value on both peers)",
                        )
                    )
                    break
        return problems

    @model_validator(mode="after")
    def _check_whole(self) -> GatewayConfig:
        fleet_problems = self._resolve_far_gates()
        if fleet_problems:
            raise _Problems(fleet_problems)
        if self.engarde_tunnel is not None:
            engarde_problems = self._engarde_problems()
            if engarde_problems:
                raise _Problems(engarde_problems)
            return self
        problems: list[tuple[tuple[str | int, ...], str]] = []
        own_key = public_key_of(self.private_key)
        for far_name, far in self.far_gates.items():
            path = self.far_gate_path(far_name)
            if far.public_key == own_key:
                problems.append(
                    (
                        (*path, "public_key"),
                        "this is this instance's own public key, not the peer's",
                    )
                )
            if far.kind == "wireguard":
                where = ".".join(path)
                carried = self.tunnels_of(far_name)
                for name, tunnel in carried.items():
                    if not isinstance(tunnel.gate, TunGate):
                        problems.append(
                            (
                                ("tunnels", name, "gate"),
                                f'{where}.kind = "wireguard" allows only tun gates '
                                "(a plain WireGuard peer exchanges bare IP packets)",
                            )
                        )
                if len(carried) > 1:
                    problems.append(
                        (
                            ("tunnels",),
                            f'{where}.kind = "wireguard" carries exactly one tunnel (a tun gate), '
                            f"got {len(carried)}",
                        )
                    )
            if self.warp_map.address is None and not far.endpoints and not self.listen_port:
                named = "" if self.far_gate is not None else f" {far_name!r}"
                problems.append(
                    (
                        ("warp_map", "address"),
                        f"no way to reach the far gate{named}: set warp_map.address "
                        "(rendezvous), far_gate.endpoints (static peer addresses), or listen_port "
                        "(this side has a public address and the peer has it in its endpoints)",
                    )
                )
        if problems:
            raise _Problems(problems)
        return self


# --------------------------------------------------------------------------------------------
# warp-map config


class RelayConfig(_Model):
    """``[relay]``: relaying of (still end-to-end encrypted) shards when no direct path exists."""

    enabled: StrictBool = True
    rate_limit: Rate = 10_000_000


class MapLimitsConfig(_Model):
    """``[limits]``: protection of a public warp-map."""

    max_clients: StrictInt = Field(default=10_000, ge=1)
    max_registrations: StrictInt = Field(default=16, ge=1)
    requests_per_second: StrictInt = Field(default=20, ge=1)
    handshake_load_threshold: StrictInt = Field(default=500, ge=1)


CLUSTER_SCHEMES = ("valkey", "valkeys", "redis", "rediss", "unix")


class ClusterConfig(_Model):
    """``[cluster]``: share the map's state through a Valkey (or Redis) server, so that several
    warp-map instances (same private key) act as one map."""

    url: str
    key_prefix: str = Field(default="warp-map:", min_length=1, max_length=64)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in CLUSTER_SCHEMES or not rest:
            raise ValueError(
                f'expected "valkey://host:6379/0" (or {", ".join(CLUSTER_SCHEMES[1:])}://...), '
                f"got {value!r}"
            )
        return value


class MapServerConfig(_Model):
    """A warp-map config (one TOML file)."""

    bind: Address = HostPort("0.0.0.0", DEFAULT_MAP_PORT)
    #: a second port on the bind address: clients compare the reflexive address seen there
    #: with the one seen on ``bind`` to learn their NAT's mapping (`warp status`)
    secondary_port: Port | None = None
    private_key: PrivateKey = Field(repr=False)
    registration_ttl: Duration = 60.0
    lookup_policy: Literal["mutual", "any"] = "mutual"
    allowed_keys: tuple[ClientPublicKey, ...] | None = None
    relay: RelayConfig = Field(default_factory=RelayConfig)
    limits: MapLimitsConfig = Field(default_factory=MapLimitsConfig)
    cluster: ClusterConfig | None = None
    log: LogConfig = Field(default_factory=LogConfig)

    @property
    def public_key(self) -> bytes:
        return public_key_of(self.private_key)

    @model_validator(mode="after")
    def _secondary_port_differs(self) -> MapServerConfig:
        if self.secondary_port is not None and self.secondary_port == self.bind.port:
            raise _Problems([(("secondary_port",), "must differ from the port of bind")])
        return self


# --------------------------------------------------------------------------------------------
# Loading and error translation

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{key}" if out else key
    return out


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation may hold (Annotated/Optional/Union unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _strip_tags(
    root: type[BaseModel], loc: tuple[str | int, ...]
) -> tuple[tuple[str | int, ...], type[BaseModel] | None]:
    """Drop discriminator tags from a pydantic loc; return it and the model at its end (if any)."""
    current: list[Any] = [root]
    out: list[str | int] = []
    for part in loc:
        models = [t for t in current if isinstance(t, type) and issubclass(t, BaseModel)]
        tagged = {m.model_fields["type"].default: m for m in models if "type" in m.model_fields}
        if len(models) > 1 and part in tagged:
            current = [tagged[part]]
            continue
        out.append(part)
        nxt: list[Any] = []
        for t in current:
            if isinstance(t, type) and issubclass(t, BaseModel):
                field = t.model_fields.get(str(part))
                if field is not None:
                    nxt.extend(_unwrap(field.annotation))
            elif typing.get_origin(t) is dict:
                nxt.extend(_unwrap(typing.get_args(t)[1]))
            elif typing.get_origin(t) is tuple:
                nxt.extend(_unwrap(typing.get_args(t)[0]))
        current = nxt
    models = [t for t in current if isinstance(t, type) and issubclass(t, BaseModel)]
    return tuple(out), models[0] if len(models) == 1 else None


def _unknown_key_message(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return f"unknown key {key!r}"
    valid = [
        name for name in model.model_fields if name != "type" or model in _GATE_MODELS.values()
    ]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    if model in _GATE_MODELS.values():
        for kind, other in _GATE_MODELS.items():
            if key in other.model_fields:
                own = model.model_fields["type"].default
                return f"unknown key {key!r} for a {own} gate ({key!r} belongs to a {kind} gate)"
    return f"unknown key {key!r} (valid keys: {', '.join(valid)})"


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "required key is missing"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected an integer, got {_describe(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_describe(value)}"
    if kind == "string_type":
        return f"expected a string, got {_describe(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"expected an array, got {_describe(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a table, got {_describe(value)}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {_describe(value)}"
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx.get('ge')}, got {value!r}"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx.get('le')}, got {value!r}"
    if kind == "union_tag_invalid":
        return f"unknown gate type {ctx.get('tag')!r}; expected {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return 'the gate needs a type: "loopback", "unix" or "tun"'
    return str(error.get("msg", kind))


def _problems_of(error: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for item in error.errors():
        loc, model = _strip_tags(root, tuple(item["loc"]))
        ctx = item.get("ctx") or {}
        if isinstance(ctx.get("error"), _Problems):
            for sub_loc, message in ctx["error"].problems:
                problems.append((_toml_path(loc + sub_loc), message))
        elif item["type"] == "extra_forbidden":
            _, parent = _strip_tags(root, tuple(item["loc"])[:-1])
            problems.append((_toml_path(loc), _unknown_key_message(str(loc[-1]), parent)))
        elif item["type"] == "missing" and model is not None:
            problems.append((_toml_path(loc), f"required table [{_toml_path(loc)}] is missing"))
        else:
            problems.append((_toml_path(loc), _message(item)))
    return problems


_ModelT = typing.TypeVar("_ModelT", bound=BaseModel)


def _validate(model: type[_ModelT], data: Mapping[str, Any], source: str) -> _ModelT:
    # relative file names in a config (private_key_file) are relative to the config's directory
    base_dir = os.path.dirname(os.path.abspath(source)) if not source.startswith("<") else None
    try:
        return model.model_validate(dict(data), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_problems_of(exc, model), source) from None


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
        if match:
            message = f"line {match[2]}, column {match[3]}: {match[1]}"
        raise ConfigError([("", f"TOML syntax error: {message}")], source) from None


def _read(path: str | os.PathLike[str]) -> str:
    source = os.fspath(path)
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([("", "no such file")], source) from None
    except PermissionError:
        raise ConfigError([("", "permission denied")], source) from None
    except IsADirectoryError:
        raise ConfigError([("", "is a directory, not a config file")], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [("", f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})")],
            source,
        ) from None
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror or exc}")], source) from None


def read_config_text(path: str | os.PathLike[str]) -> str:
    """A config file's text; ConfigError (one whole-file problem) if it cannot be read."""
    return _read(path)


def validate_gateway_config(data: Mapping[str, Any], source: str = "<config>") -> GatewayConfig:
    """Validate already-parsed TOML data; raise ConfigError with every problem."""
    return _validate(GatewayConfig, data, source)


def parse_gateway_config(text: str, source: str = "<string>") -> GatewayConfig:
    """Validate TOML text; raise ConfigError with every problem."""
    return validate_gateway_config(_parse_toml(text, source), source)


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway config file; raise ConfigError with every problem."""
    return parse_gateway_config(_read(path), os.fspath(path))


def secret_file_warnings(
    config: GatewayConfig | MapServerConfig, source: str | os.PathLike[str]
) -> list[str]:
    """Warnings (as `wg`'s) for the files holding ``config``'s private key that its group or
    others may access: ``private_key_file`` if used, else the config file ``source`` itself
    (an engarde-mode gateway config holds no key)."""
    if isinstance(config, GatewayConfig) and config.private_key_file is not None:
        path: str | os.PathLike[str] = config.private_key_file
    elif config.private_key == ENGARDE_NO_KEY:
        return []
    else:
        path = source
    warning = access_warning(path)
    return [warning] if warning else []


def validate_map_config(
    data: Mapping[str, Any],
    source: str = "<config>",
    *,
    overrides: Mapping[str, Any] | None = None,
) -> MapServerConfig:
    """Validate parsed warp-map config data; ``overrides`` replace top-level keys (CLI flags)."""
    return _validate(MapServerConfig, {**data, **(overrides or {})}, source)


def parse_map_config(
    text: str, source: str = "<string>", *, overrides: Mapping[str, Any] | None = None
) -> MapServerConfig:
    return validate_map_config(_parse_toml(text, source), source, overrides=overrides)


def load_map_config(
    path: str | os.PathLike[str] | None, *, overrides: Mapping[str, Any] | None = None
) -> MapServerConfig:
    """Read and validate a warp-map config (``path`` None: defaults + ``overrides`` only).

    ``overrides`` are top-level keys in their TOML form, e.g. ``{"bind": "[::]:13116",
    "private_key": "<key text>"}``, for the ``--bind`` / ``--private-key-file`` flags.
    """
    if path is None:
        return validate_map_config({}, "<command line>", overrides=overrides)
    return parse_map_config(_read(path), os.fspath(path), overrides=overrides)


# --------------------------------------------------------------------------------------------
# `warp check`: warnings about configs that load but cannot work as they stand, and files
# of other kinds

#: RFC 5737 / RFC 3849 documentation networks: never a real peer or map
DOCUMENTATION_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
#: RFC 2606 documentation domains (and their subdomains)
DOCUMENTATION_DOMAINS = ("example.com", "example.net", "example.org", "example")
#: how generated configs mark a value to replace: `key = "…"  # PLACEHOLDER: REPLACE`
_PLACEHOLDER_LINE = re.compile(
    r"""^\s*([A-Za-z0-9_-]+)\s*=\s*(?:"[^"]*"|'[^']*'|[^#]*?)\s*#.*\bPLACEHOLDER\b""", re.I
)
_TABLE_LINE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")


def is_documentation_host(host: str) -> bool:
    """True for an address or name reserved for documentation (example.net, 203.0.113.7...)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.rstrip(".").lower()
        return any(name == d or name.endswith("." + d) for d in DOCUMENTATION_DOMAINS)
    return any(address in network for network in DOCUMENTATION_NETWORKS)


def _placeholder_lines(text: str) -> list[str]:
    """The TOML path of every line marked ``# PLACEHOLDER`` (the generated configs' mark on
    a random key that stands in for the far side's real one)."""
    found: list[str] = []
    table = ""
    for line in text.splitlines():
        header = _TABLE_LINE.match(line)
        if header:
            table = header.group(1).replace(" ", "")
            continue
        marked = _PLACEHOLDER_LINE.match(line)
        if marked:
            found.append(f"{table}.{marked.group(1)}" if table else marked.group(1))
    return found


def check_warnings(config: GatewayConfig | MapServerConfig, text: str) -> list[tuple[str, str]]:
    """``(toml_path, message)`` for what `warp check` warns about in a valid config: values
    marked as placeholders, documentation hosts (example.net, 192.0.2.0/24...) and unset
    (all-zero) keys. ``text`` is the config file's TOML."""
    warnings = [
        (path, "marked PLACEHOLDER: a stand-in; put the real value here (and drop the mark)")
        for path in _placeholder_lines(text)
    ]
    zero = bytes(32)
    if isinstance(config, MapServerConfig):
        if config.private_key == zero:
            warnings.append(("private_key", "all zeros: unset (make one with `warp-keygen`)"))
        return warnings
    if config.engarde_tunnel is None:
        keys: list[tuple[str, bytes | None]] = [("private_key", config.private_key)]
        for name, far in config.far_gates.items():
            keys.append((".".join(config.far_gate_path(name)) + ".public_key", far.public_key))
        keys.append(("warp_map.public_key", config.warp_map.public_key))
        for name, far in config.far_gates.items():
            path = ".".join(config.far_gate_path(name))
            keys.append((f"{path}.preshared_key", far.preshared_key))
        for path, key in keys:
            if key == zero:
                warnings.append((path, "all zeros: unset (make a key pair with `warp-keygen`)"))
    hosts: list[tuple[str, HostPort]] = []
    map_addresses = config.warp_map.addresses
    if len(map_addresses) == 1:
        hosts.append(("warp_map.address", map_addresses[0]))
    else:
        hosts += [(f"warp_map.address[{i}]", a) for i, a in enumerate(map_addresses)]
    for name, far in config.far_gates.items():
        path = ".".join(config.far_gate_path(name))
        hosts += [(f"{path}.endpoints[{i}]", e) for i, e in enumerate(far.endpoints)]
    for path, endpoint in hosts:
        if is_documentation_host(endpoint.host):
            warnings.append(
                (path, f"{endpoint} is a documentation address (example only): put the real one")
            )
    return warnings


_WG_QUICK_SECTION = re.compile(r"^\s*\[(Interface|Peer)\]\s*$", re.M | re.I)
_WG_QUICK_KEY = re.compile(
    r"^\s*(PrivateKey|PublicKey|Endpoint|AllowedIPs|ListenPort)\s*=", re.M | re.I
)
_ENGARDE_SECTION = re.compile(r"^(client|server)\s*:\s*(#.*)?$", re.M)
_ENGARDE_KEY = re.compile(r"^\s+(listenAddr|dstAddr)\s*:", re.M)
_MAP_ONLY_KEYS = frozenset(
    {
        "bind",
        "secondary_port",
        "registration_ttl",
        "lookup_policy",
        "allowed_keys",
        "relay",
        "limits",
    }
)
_GATEWAY_ONLY_KEYS = frozenset(
    {"far_gate", "far_gates", "tunnels", "warp_map", "interfaces", "listen_port", "control"}
)


def other_config_kind(text: str, path: str, *, expected: Literal["gateway", "map"]) -> str | None:
    """For a file that is not the config `warp check` expected: one line saying what it is
    and what to run instead; None if it looks like no other kind."""
    if _WG_QUICK_SECTION.search(text) and _WG_QUICK_KEY.search(text):
        return (
            f"{path} is a WireGuard (wg-quick) config, not a warp config: it runs with "
            f"`wg-quick up`; to carry WireGuard over warp, point its peer's Endpoint at a warp "
            "gate (docs/wireguard-over-warp.md) and write the warp config with "
            "`warp print-example-config`"
        )
    if _ENGARDE_SECTION.search(text) and _ENGARDE_KEY.search(text):
        return (
            f"{path} is an engarde config, not a warp config: convert it with "
            f"`warp migrate-engarde {path}` and check what that writes"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None
    if expected == "gateway" and set(data) & _MAP_ONLY_KEYS and not set(data) & _GATEWAY_ONLY_KEYS:
        return f"{path} is a warp-map config: check it with `warp check --map {path}`"
    if expected == "map" and set(data) & _GATEWAY_ONLY_KEYS and not set(data) & _MAP_ONLY_KEYS:
        return f"{path} is a gateway config: check it with `warp check {path}` (without --map)"
    return None


# --------------------------------------------------------------------------------------------
# Examples

_GATEWAY_EXAMPLE = """\
# WARP gateway configuration (EXAMPLE, printed by `warp print-example-config`).
#
# Check it with `warp check FILE`, run it with `warp run FILE`; after an edit,
# `warp reload -c FILE` applies it to the running gateway (or says why it cannot).
# Durations are a number of seconds or a string with a unit: "250ms", "10s", "2m", "1h".
# Keys are X25519, Crockford base32 (52 characters) or WireGuard base64 (44 characters).
# Every value below is the default, except the keys, warp_map.address and the redundancy.

# This instance's private key (required). This one is fresh; keep it secret: save this
# file with `umask 077` (warp check and warp run warn when others may read it).
# Its public key, to give to the far gate: {public_key}
private_key = "{private_key}"
# Or, instead of private_key, a file holding the key (relative to this file's directory;
# `warp-keygen -o FILE` writes one, mode 0600):
# private_key_file = "gateway.key"

# Local UDP port of the uplink sockets; 0 = any. Set it on a peer with a public address
# that the other side reaches through far_gate.endpoints.
listen_port = 0

[interfaces]
# Full rescan of the local interfaces; netlink link/address changes are acted on at once.
interface_scan_interval = "10s"
# An interface is an uplink if one inclusion regex matches its name (re.search)...
inclusion_patterns = [".*"]
# ...and no exclusion regex does.
exclusion_patterns = ["^lo$", "^wg", "^tun", "^tailscale"]
# SO_BINDTODEVICE per uplink socket, so each uplink's packets really leave through it
# (default: true on Linux, false elsewhere).
bind_to_device = {bind_to_device}
# Path probe / NAT keep-alive period per path.
holepunch_keep_alive_interval = "1s"
# A path with no authenticated packet for this long is dead.
path_timeout = "3s"
# TTL of the first punch towards a far gate's address from the map: crosses our own NAT, dies
# before the far one, so a far router without a firewall cannot pin its port (0: off).
punch_ttl = 2
# A far gate relayed because one side is a cone and the other a symmetric NAT: birthday
# probing (256 extra local ports on the symmetric side, random ports towards it from the cone
# side, 200 probes/s, 10 s at most, once per relay episode). false: stay relayed.
birthday_probing = true
# Local send errors in a row before an uplink socket is rebuilt.
max_consecutive_failures = 10
# Where the uplinks' usage against their data_budget is kept across restarts (written
# atomically; unset: usage starts over at every start).
# usage_file = "/var/lib/warp/uplink-usage.json"

# Tier and data budget per uplink, by interface name (the first match applies; an uplink no
# entry matches is a primary without budget). tier: "primary" carries traffic; "backup"
# only probes while a primary path answers, the traffic within a second when none does;
# "never" is not used. data_budget: bytes per budget_period ("day" or "month", UTC), both
# ways; when it runs out the uplink carries no traffic until the period ends.
# [[interfaces.uplinks]]
# match = "^wwan2$"
# tier = "backup"
# data_budget = 2_000_000_000
# budget_period = "month"

[warp_map]
# The rendezvous server, host:port ([IPv6]:port). Leave out the whole table when the far
# gate is reached through far_gate.endpoints only. A map cluster: a list of instances, e.g.
# ["map1.example.net:13116", "map2.example.net:13116"] (a name with several addresses also
# counts as several); the gateway registers with one and fails over to the next.
address = "warp-map.example.net:13116"
# The map's public key (required with address; warp-map logs it at start). The one below
# is a random key standing in for it: `warp check` warns until it is replaced.
public_key = "{map_key}"  # PLACEHOLDER: REPLACE

# The far gates: one table per peer (here an operator station with two vehicles). One
# WireGuard device, one set of uplinks and one map registration serve them all; each has its
# own paths, session and back-pressure. A gateway with one peer may write a single
# [far_gate] table instead (the far gate named "default").
[far_gates.truck1]
# The peer's public key (required; `warp-keygen` on the peer prints it). The one below is
# a random key standing in for it: `warp check` warns until it is replaced.
public_key = "{far_key}"  # PLACEHOLDER: REPLACE
# Static peer addresses (host:port), for a peer with a public address; may be used
# without a map.
endpoints = []
# Optional WireGuard preshared key (the same on both sides), e.g. from `wg genpsk`.
# preshared_key = "..."
# "warp", or "wireguard" when the peer is a plain WireGuard (then only one tun gate).
kind = "warp"
# Only for a tun gate shared by several far gates (a tun tunnel naming no far_gate): the
# destinations routed to this far gate (as WireGuard's AllowedIPs); no overlaps.
allowed_ips = []

[far_gates.truck2]
public_key = "{far_key2}"  # PLACEHOLDER: REPLACE

# One table per tunnel; the name is shared with the peer.
[tunnels.wireguard]
# The far gate this tunnel goes to (optional with exactly one far gate). A tunnel id must
# be unique per far gate.
far_gate = "truck1"
# Small integer on the wire; both peers must agree. Default: derived from the name
# (for "wireguard": {tunnel_id}).
# tunnel_id = {tunnel_id}

[tunnels.wireguard.gate]
# The gate type is inferred from the keys; type = "loopback" | "unix" | "tun" may be given.
# loopback: a UDP socket the application talks to. ipv4 = true: 127.0.0.1, false: ::1.
ipv4 = true
# The port the gate binds; the application (e.g. WireGuard's Endpoint) sends here.
application_to_gate = 59401
# Where data from the tunnel goes; default: the last application sender, from the
# application_to_gate socket.
# gate_to_application = 51820
#
# unix gate instead:
#   path = "/run/warp/app.sock"           # the datagram socket warp binds (mode 0600)
#   application_path = "/run/app.sock"    # optional; default: the last sender
#   group = "warp-apps"                   # optional: socket 0660 for this group
#   allowed_uids = [1000]                 # optional: only datagrams from these senders
#   allowed_gids = [1000]                 #   (uid or gid, checked per datagram)
#   allow_shared_directory = false        # true: allow a directory others may write to
# tun gate instead:
#   name = "warp0"                        # interface name
#   address = "10.7.0.1/24"               # interface address(es), CIDR
#   mtu = 1420
#   allowed_ips = ["10.7.0.0/24"]         # CIDRs routed through the tunnel

# engarde's wire format instead of warp's, while the far end still runs engarde
# (docs/engarde-migration.md): raw WireGuard datagrams duplicated over every uplink, no FEC,
# no warp keys (leave out private_key and [far_gate] public_key; a loopback gate, the only
# tunnel; client: far_gate.endpoints = engarde-server; server: listen_port).
# [tunnels.wireguard.engarde]
# role = "client"                         # or "server"
# client_timeout = "30s"                  # server: answer clients heard within this long

[tunnels.wireguard.transport]
# Largest UDP payload warp puts on the wire for this tunnel.
mtu = 1400
# Deliver in order (the reorder buffer waits at most reorder_timeout for a gap).
ordered = false
reorder_timeout = "50ms"
# A datagram not on the wire by then is dropped, never sent late.
send_deadline = "100ms"
# Higher goes first when the uplinks are congested (-128..127).
priority = 0
# How blocks are spread over uplinks of uneven speed (each is paced below the capacity
# measured from the far gate's receive reports): "survive_uplink_loss" keeps "one uplink
# may die and nothing is lost" (status shows the protected rate); "aggregate" puts shards
# in proportion to capacity (the sum of the uplinks; FEC covers random loss only).
spread = "survive_uplink_loss"

[tunnels.wireguard.transport.redundancy]
# Each datagram block is sent as num_shards shards; any required_shards rebuild it.
# 1 <= required_shards <= num_shards <= 255; 1 and 1 = no FEC. Default without this
# table: 5 and 3.
# (2, 4) keeps "one uplink may die and nothing is lost" on two uplinks: no uplink carries
# more than num_shards - required_shards shards of a block, so (2, 4) puts 2 + 2 on two
# uplinks, while (3, 5) needs three (2 + 2 + 1). When the uplinks are too few for the
# code, warp adds parity shards (and status says so). Bandwidth: num_shards /
# required_shards = 2x the data.
num_shards = 4
required_shards = 2
# adaptive = true: n follows the measured loss, the fewest parity shards keeping residual
# loss under target_loss (0.001), min_parity (1) to max_parity (8): docs/configuration.md.
# Data shards go out at once; a block's parity when it has required_shards data shards,
# or window after its first (then over fewer data shards, with the same parity).
window = "1ms"

# The second vehicle's tunnel (every key not given takes its default).
[tunnels.video2]
far_gate = "truck2"
gate = {{ application_to_gate = 59402 }}

[control]
# Control socket for `warp status`.
socket = "{control_socket}"

[metrics]
# host:port of a Prometheus endpoint; off when not set.
# listen = "127.0.0.1:9716"

[log]
# debug, info, warning or error.
level = "info"
# text, or json for one JSON object per line.
format = "text"
"""

_MAP_EXAMPLE = """\
# warp-map configuration (EXAMPLE, printed by `warp print-example-config --map`).
#
# Run it with `warp-map --config FILE`. Durations: seconds, or "250ms", "10s", "2m", "1h".

# Address and UDP port to listen on ("[::]:13116" for IPv6).
bind = "0.0.0.0:13116"
# A second UDP port on the same address: gateways compare the public address seen there with
# the one seen on `bind` to learn each uplink's NAT mapping (`warp status`: NAT mapping), which
# tells the hard-NAT traversal what to try. Open it in the firewall too.
# secondary_port = 13117
# The map's private key (required; there is no default key). This one is fresh; keep it
# secret. Its public key, for the gateways' warp_map.public_key: {public_key}
private_key = "{private_key}"
# A registration not refreshed for this long is dropped.
registration_ttl = "60s"
# "mutual": a lookup of key X is answered only if X registered the asker as its far gate;
# "any": every registered key can be looked up.
lookup_policy = "mutual"
# Optional allow-list of gateway public keys; absent = any key may register.
# allowed_keys = ["..."]

[relay]
# Relay (end-to-end encrypted) shards when no direct path can be made.
enabled = true
# Per client. Bits/s with a unit: bit, kbit, Mbit, Gbit (kbps, Mbps, Gbps are bits/s too),
# or bytes/s: B/s, kB/s, MB/s, GB/s; or "unlimited".
rate_limit = "10Mbit"

[limits]
# Registered gateway keys at most.
max_clients = 10000
# Registered uplink endpoints per gateway key at most.
max_registrations = 16
# Requests per second per source address; more are dropped.
requests_per_second = 20
# Handshake initiations per second above which the map answers with cookie replies
# (WireGuard's under-load mode).
handshake_load_threshold = 500

# A map cluster: several warp-map instances with this same private key share their state
# (registrations, lookup policy data, relay routing, pushes) through one Valkey or Redis
# server. Without [cluster] the map keeps everything in memory (a single instance).
# [cluster]
# url = "valkey://127.0.0.1:6379/0"       # or valkeys://, redis://, rediss://, unix://
# key_prefix = "warp-map:"                # lets several map clusters share one Valkey

[log]
level = "info"
format = "text"
"""


def example_gateway_config() -> str:
    """A complete, commented gateway config with a fresh private key, valid as printed."""
    private = generate_private_key()
    return _GATEWAY_EXAMPLE.format(
        private_key=encode_key(private),
        public_key=encode_key(public_key_of(private)),
        map_key=encode_key(public_key_of(generate_private_key())),
        far_key=encode_key(public_key_of(generate_private_key())),
        far_key2=encode_key(public_key_of(generate_private_key())),
        bind_to_device=str(sys.platform.startswith("linux")).lower(),
        tunnel_id=derive_tunnel_id("wireguard"),
        control_socket=DEFAULT_CONTROL_SOCKET,
    )


def example_map_config() -> str:
    """A complete, commented warp-map config with a fresh private key, valid as printed."""
    private = generate_private_key()
    return _MAP_EXAMPLE.format(
        private_key=encode_key(private), public_key=encode_key(public_key_of(private))
    )
