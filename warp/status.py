"""The control socket and ``warp status``.

A running gateway serves its state on a Unix stream socket (``control.socket``, default
``/run/warp/warp.sock``). The protocol is one JSON request line and one JSON response line
(several request/response pairs may share a connection):

    → {"cmd": "status"}
    ← {"version": "0.1.0", "uptime_s": 12.5, "paths": [...], ...}      (a `StatusSnapshot`)
    ← {"error": "unknown command 'x'; known: status"}                  (on a bad request)

`ControlServer` is the gateway side: it takes a ``snapshot()`` callable from the gateway and
calls it once per request, on the event loop. Requests are bounded (`MAX_REQUEST` bytes,
`MAX_REQUEST_DEPTH` levels of nesting, `request_timeout` seconds to arrive and to be read back,
`max_connections` at once): beyond any bound the client gets an error line and is closed, and
the gateway logs one ``control.rejected`` line (at most one per reason per 10 s) and counts it.
`parse_request` is the one parsing boundary. `query_status` is the client side, and
`run_status` the ``warp status`` command: ``--json`` prints the snapshot as JSON; on a
terminal it is rendered as ``rich`` tables fitted to the terminal's width (`render_status`),
otherwise (piped, or ``--plain``) as stable plain text, one line per far gate, map, uplink,
path and tunnel (`render_plain`); ``--watch`` refreshes every second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, NotRequired, TypeAlias, TypedDict

from rich import box
from rich.console import (
    Console,
    ConsoleOptions,
    Group,
    JustifyMethod,
    RenderableType,
    RenderResult,
)
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from warp.gate.base import Gate, GateError, claim_socket_path, remove_socket_path
from warp.log_limit import LogLimiter

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "ControlRequestError",
    "ControlServer",
    "ControlSocketError",
    "FarGateStatus",
    "GateInfo",
    "MapStatus",
    "PathStatus",
    "SessionStatus",
    "StatusError",
    "StatusSnapshot",
    "TunnelStatus",
    "UplinkStatus",
    "add_status_command",
    "gate_info",
    "parse_request",
    "query_status",
    "register_status",
    "render_plain",
    "render_status",
    "run_status",
    "status_main",
    "watch_status",
]

log = logging.getLogger("warp.status")

DEFAULT_CONTROL_SOCKET = "/run/warp/warp.sock"
#: longest request line the server reads, longest reply the client reads
MAX_REQUEST = 64 * 1024
MAX_REPLY = 64 * 1024 * 1024
#: deepest nesting of arrays/objects in a request ({"cmd": "status"} is 1)
MAX_REQUEST_DEPTH = 8
#: connections served at once; more are answered with an error and closed
MAX_CONNECTIONS = 16

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2

# ---------------------------------------------------------------------------------------------
# Snapshot schema (what the gateway's ``snapshot()`` returns; JSON-native throughout)

PathState: TypeAlias = Literal["probing", "active", "dead"]
PathSource: TypeAlias = Literal["map", "static", "learned", "relay"]


class PathStatus(TypedDict):
    """One path: (local uplink socket, remote address)."""

    uplink: str  # interface name, e.g. "wwan0"; "relay:wwan0": relayed through the map from it
    local_address: str  # "10.0.0.2:40001"
    remote_address: str  # "198.51.100.7:40002" (relayed: the far gate's address it goes to)
    source: PathSource  # where the remote address came from
    state: PathState
    rtt_ms: float | None  # smoothed probe RTT; None before the first reply
    loss_pct: float | None  # probe loss over the recent window, 0–100
    last_rx_age_s: float | None  # seconds since the last authenticated packet on it
    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int
    far_gate: NotRequired[str]  # the far gate's name (fleet gateways)


class GateInfo(TypedDict):
    kind: str  # "loopback" | "unix" | "tun"
    address: str  # "127.0.0.1:59401", "/run/app.sock", "warp0"


class TunnelStatus(TypedDict):
    name: str
    tunnel_id: int
    gate: GateInfo
    datagrams_in: int  # application → tunnel
    datagrams_out: int  # tunnel → application
    bytes_in: int
    bytes_out: int
    blocks_rebuilt: int  # FEC blocks that needed parity to decode
    datagrams_lost: int  # blocks that could not be rebuilt in time
    drops: dict[str, int]  # reason → count (gate and transport drops)
    far_gate: NotRequired[str]  # the far gate's name (a shared tun gate: an entry per far gate)


class MapStatus(TypedDict):
    address: str  # "warp-map.example.net:13116"
    registered: bool  # at least one uplink holds a live registration
    reflexive: dict[str, str | None]  # uplink → public address the map saw (None: not yet)
    last_registration_age_s: float | None  # seconds since the last acknowledged registration


class SessionStatus(TypedDict):
    far_gate: NotRequired[str]  # the peer's public key, text form (top-level `session` only)
    handshake_state: str  # "none" | "initiating" | "established" | "expired"
    last_handshake_age_s: float | None
    rekeys: int
    handshakes: NotRequired[int]


class FarGateStatus(TypedDict):
    """One far gate (peer) of the gateway; `StatusSnapshot.far_gates` maps its name to this."""

    public_key: str
    kind: str  # "warp" | "wireguard"
    session: SessionStatus
    relay: bool  # traffic to it goes through the map's relay now


class UplinkStatus(TypedDict):
    name: str
    local_address: str
    state: Literal["up", "down"]
    send_errors: int


class StatusSnapshot(TypedDict):
    version: str
    uptime_s: float
    public_key: NotRequired[str]  # this instance's key
    paths: list[PathStatus]  # each with a "far_gate" name (fleet gateways)
    tunnels: list[TunnelStatus]  # each with a "far_gate" name (fleet gateways)
    map: MapStatus | None  # None: no warp_map configured (static endpoints)
    session: SessionStatus  # the first far gate's (for scripts written before fleets)
    far_gates: NotRequired[dict[str, FarGateStatus]]  # name → far gate
    uplinks: list[UplinkStatus]


def gate_info(gate: Gate) -> GateInfo:
    """The `GateInfo` of a running gate (its counters go in the `TunnelStatus` fields)."""
    return {"kind": gate.kind, "address": gate.address}


Snapshot: TypeAlias = Callable[[], Mapping[str, Any]]
#: ``{"cmd": "reload"}``: re-read the config and apply it; the reply object (`warp reload`).
Reload: TypeAlias = Callable[[], Awaitable[Mapping[str, Any]]]

# ---------------------------------------------------------------------------------------------
# Server (gateway side)


class ControlSocketError(Exception):
    """The control socket cannot be set up. The message is one line for users."""


class ControlRequestError(ValueError):
    """A request line the control socket refuses; the message is the error sent back,
    ``reason`` the counter it goes to."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def _nesting_depth(text: str, limit: int) -> int:
    """How deep arrays/objects nest in JSON ``text`` (brackets inside strings do not count);
    stops counting past ``limit`` (json.loads would recurse once per level)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif char in "]}":
            depth -= 1
    return deepest


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line as a JSON object; :class:`ControlRequestError` (with the message for
    the client) for anything else. Never raises anything else, whatever the bytes."""
    if len(line) > MAX_REQUEST:
        raise ControlRequestError(f"request too long (at most {MAX_REQUEST} bytes)", "too_long")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlRequestError("request is not a JSON line") from None
    if _nesting_depth(text, MAX_REQUEST_DEPTH) > MAX_REQUEST_DEPTH:
        raise ControlRequestError(
            f"request nested deeper than {MAX_REQUEST_DEPTH} levels", "too_deep"
        )
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):
        raise ControlRequestError("request is not a JSON line") from None
    if not isinstance(request, dict):
        raise ControlRequestError('request must be a JSON object such as {"cmd": "status"}')
    return request


class ControlServer:
    """Serves ``snapshot()`` on a Unix stream socket (``{"cmd": "status"}``), and with
    ``reload`` given, ``{"cmd": "reload"}`` (`warp reload`: its reply object).

    `start` creates the parent directory (0755) if missing, replaces a stale socket file,
    refuses a live one or a non-socket file, and makes the socket 0660. `close` stops
    serving, ends open connections and removes the socket file. Each connection is one
    task tracked here and cancelled on close: nothing outlives the server.
    """

    def __init__(
        self,
        path: str,
        snapshot: Snapshot,
        *,
        mode: int = 0o660,
        request_timeout: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
        reload: Reload | None = None,
    ) -> None:
        self.path = path
        self._snapshot = snapshot
        self._reload = reload
        self._mode = mode
        self._timeout = request_timeout
        self._max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        #: connection handler -> its writer (close aborts the transports; cancelling a handler
        #: would make asyncio log a traceback for it)
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._closed = False
        #: requests refused, by reason (too_long, too_deep, invalid, timeout, busy)
        self.rejected: Counter[str] = Counter()
        self._reject_log = LogLimiter()

    async def start(self) -> None:
        if self._server is not None:
            return
        if self._closed:
            raise ControlSocketError(f"control socket {self.path} is closed")
        parent = os.path.dirname(self.path)
        if parent and not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o755, exist_ok=True)
                os.chmod(parent, 0o755)  # makedirs' mode is filtered by the umask
            except OSError as exc:
                raise ControlSocketError(
                    f"cannot create {parent} for the control socket: {exc.strerror or exc}"
                ) from None
        try:
            claim_socket_path(self.path, socket.SOCK_STREAM)
        except GateError as exc:
            raise ControlSocketError(f"control socket: {exc}") from None
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_connection, path=self.path, limit=MAX_REQUEST
            )
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, self._mode)
        except OSError as exc:
            await self.close()
            raise ControlSocketError(
                f"cannot listen on control socket {self.path}: {exc.strerror or exc}"
            ) from None
        log.info("control.listening path=%s", self.path)

    async def close(self) -> None:
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        connections = list(self._connections.items())
        for _, writer in connections:
            writer.transport.abort()
        if connections:
            tasks = [task for task, _ in connections]
            _, stuck = await asyncio.wait(tasks, timeout=self._timeout)
            for task in stuck:
                task.cancel()
        if server is not None:
            await server.wait_closed()
        remove_socket_path(self.path, self._inode)
        self._inode = None

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        try:
            if len(self._connections) >= self._max_connections:
                self._reject("busy")
                writer.write(_error_line(f"busy: {self._max_connections} connections open"))
                return
            if task is not None:
                self._connections[task] = writer
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self._timeout)
                except ValueError:  # longer than MAX_REQUEST
                    self._reject("too_long")
                    writer.write(_error_line(f"request too long (at most {MAX_REQUEST} bytes)"))
                    return
                except TimeoutError:
                    self._reject("timeout")
                    writer.write(_error_line(f"no request line within {self._timeout:g} s"))
                    return
                if not line:
                    return
                try:
                    request = parse_request(line)
                except ControlRequestError as exc:
                    self._reject(exc.reason)
                    writer.write(_error_line(str(exc)))
                    if exc.reason != "invalid":
                        return  # built to hurt, not a typo: close
                    continue
                if request.get("cmd") == "reload" and self._reload is not None:
                    writer.write(await self._respond_reload())
                else:
                    writer.write(self.respond(request))
                await asyncio.wait_for(writer.drain(), self._timeout)
        except TimeoutError:
            self._reject("slow_reader")  # did not read its reply in time
        except ConnectionError:
            pass
        finally:
            if task is not None:
                self._connections.pop(task, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that stopped reading must not hold the close
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self._timeout)

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self._reject_log.due(reason, time.monotonic()):
            log.warning(
                "control.rejected reason=%s total=%d path=%s",
                reason,
                self.rejected[reason],
                self.path,
            )

    async def _respond_reload(self) -> bytes:
        assert self._reload is not None
        try:
            reply = await self._reload()
            return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"
        except Exception:
            log.exception("control.reload_failed")
            return _error_line("the gateway failed to reload (see its log)")

    def respond(self, request: Mapping[str, Any]) -> bytes:
        """The response line (with its newline) for one parsed request. Never raises."""
        cmd = request.get("cmd")
        if cmd != "status":
            known = "status, reload" if self._reload is not None else "status"
            return _error_line(f"unknown command {cmd!r}; known: {known}")
        try:
            body = json.dumps(self._snapshot(), separators=(",", ":"), default=str)
        except Exception:
            log.exception("control.snapshot_failed")
            return _error_line("the gateway failed to build its status (see its log)")
        return body.encode() + b"\n"


def _error_line(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# Client


class StatusError(Exception):
    """`query_status` failed; the message is one line for users."""


def query_status(path: str, *, timeout: float = 3.0) -> dict[str, Any]:
    """Ask the gateway on ``path`` for its status snapshot (blocking)."""
    reply = query_control(path, {"cmd": "status"}, timeout=timeout)
    if set(reply) == {"error"}:
        raise StatusError(f"the gateway on {path} answered: {reply['error']}")
    return reply


def query_control(path: str, request: Mapping[str, Any], *, timeout: float = 3.0) -> dict[str, Any]:
    """Send one request to the gateway on ``path``; its reply object (blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
                if size > MAX_REPLY:
                    raise StatusError(f"reply from the gateway on {path} is too long")
        except FileNotFoundError:
            raise StatusError(f"is the gateway running? socket {path} not found") from None
        except ConnectionRefusedError:
            raise StatusError(
                f"is the gateway running? socket {path} refuses connections (stale socket file)"
            ) from None
        except PermissionError:
            raise StatusError(
                f"permission denied on socket {path} (run as root or as a member of its group)"
            ) from None
        except TimeoutError:
            raise StatusError(
                f"the gateway on {path} did not answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise StatusError(
                f"cannot talk to the gateway on {path}: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    data = b"".join(chunks)
    if not data:
        raise StatusError(f"the gateway on {path} closed the connection without answering")
    try:
        reply = json.loads(data)
    except ValueError:
        raise StatusError(f"invalid reply from the gateway on {path}") from None
    if not isinstance(reply, dict):
        raise StatusError(f"invalid reply from the gateway on {path}")
    return reply


# ---------------------------------------------------------------------------------------------
# Rendering
#
# On a terminal: rich tables fitted to its width. A table whose columns do not fit drops or
# shortens its least important columns first (`_Column.forms`), so a cell is never cut to
# `Upli…`. Piped (or --plain): `render_plain`, one line per far gate, uplink, path and tunnel,
# stable for scripts (docs/operations.md, "Reading the status").

_STATE_STYLE = {"active": "bold green", "probing": "bold yellow", "dead": "bold red"}
_HANDSHAKE_STYLE = {"established": "green", "initiating": "yellow", "none": "red", "expired": "red"}
#: a column form with this priority is never dropped
_ALWAYS = 100


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _count(n: Any) -> str:
    if not isinstance(n, int | float):
        return "—"
    n = int(n)
    if n < 10_000:
        return str(n)
    if n < 10_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "—"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _graded(value: Any, fmt: str, warn: float, bad: float) -> Text:
    if not isinstance(value, int | float):
        return Text("—", style="dim")
    style = "green" if value < warn else "yellow" if value < bad else "bold red"
    return Text(fmt.format(value), style=style)


def _state(state: Any) -> Text:
    name = str(state)
    return Text(name, style=_STATE_STYLE.get(name, "magenta"))


def _redundancy(tunnel: Mapping[str, Any]) -> Mapping[str, Any]:
    value = tunnel.get("redundancy")
    return value if isinstance(value, Mapping) else {}


def _code(redundancy: Mapping[str, Any]) -> str:
    """``(k, n)``, and ``→m`` when the sender uses m shards now (parity added)."""
    k, n = redundancy.get("k"), redundancy.get("n")
    if not isinstance(k, int) or not isinstance(n, int):
        return "—"
    effective = redundancy.get("effective_n")
    if redundancy.get("adaptive") is True:
        # Adaptive parity: n follows the measured loss; show the n in use now.
        now = effective if isinstance(effective, int) else n
        return f"({k}, {now}) adaptive"
    more = f"→{effective}" if isinstance(effective, int) and effective != n else ""
    return f"({k}, {n}){more}"


class _Column:
    """A table column in one or more forms, widest first. ``forms``: (priority, header,
    cells); when the table is too wide, the form with the lowest priority gives way to the
    column's next form, or the column is dropped after its last form (unless that form's
    priority is `_ALWAYS`)."""

    def __init__(
        self,
        justify: JustifyMethod,
        forms: Sequence[tuple[int, str, Sequence[RenderableType]]],
    ) -> None:
        self.justify = justify
        self.forms = list(forms)
        self.form = 0

    @property
    def priority(self) -> int:
        return self.forms[self.form][0]


def _fitted_table(
    title: str,
    columns: Sequence[_Column],
    rows: int,
    console: Console,
    options: ConsoleOptions,
    empty: str | None = None,
) -> Table:
    """The table with the most columns (in their widest forms) that fits ``options.max_width``."""
    kept = list(columns)
    for column in kept:
        column.form = 0

    def build() -> Table:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in kept:
            _, header, _ = column.forms[column.form]
            table.add_column(header, justify=column.justify, no_wrap=True, overflow="fold")
        for row in range(rows):
            table.add_row(*[column.forms[column.form][2][row] for column in kept])
        if not rows and empty is not None:
            table.add_row(Text(empty, style="yellow"), *[""] * (len(kept) - 1))
        return table

    while True:
        table = build()
        # measured unconstrained: rich would squeeze the columns into any width
        natural = Measurement.get(console, options.update_width(1 << 16), table).maximum
        if natural <= options.max_width:
            return table
        shrinkable = [c for c in kept if c.form + 1 < len(c.forms) or c.priority < _ALWAYS]
        if not shrinkable:
            return table  # narrower than the essential columns: rich folds them
        column = min(shrinkable, key=lambda c: (c.priority, -kept.index(c)))
        if column.form + 1 < len(column.forms):
            column.form += 1
        else:
            kept.remove(column)


def _paths_columns(paths: Sequence[Mapping[str, Any]]) -> list[_Column]:
    rows = sorted(paths, key=lambda p: (str(p.get("uplink")), str(p.get("remote_address"))))
    dead = [p.get("state") == "dead" for p in rows]
    # A dead path shows when it was last heard, not a loss figure (there is none to show).
    heard = [
        _graded(p.get("last_rx_age_s"), "{:.1f}s", 1.5, 3)
        if not is_dead
        else Text(_age(p.get("last_rx_age_s")) + " ago"
                  if isinstance(p.get("last_rx_age_s"), int | float) else "never",
                  style="bold red")
        for p, is_dead in zip(rows, dead, strict=True)
    ]  # fmt: skip
    tx = [_bytes(p.get("tx_bytes")) for p in rows]
    rx = [_bytes(p.get("rx_bytes")) for p in rows]
    tx_packets = [f"{b} / {_count(p.get('tx_packets'))}" for b, p in zip(tx, rows, strict=True)]
    rx_packets = [f"{b} / {_count(p.get('rx_packets'))}" for b, p in zip(rx, rows, strict=True)]
    uplinks = [
        Text(str(p.get("uplink", "?")), style="bold red" if d else "bold")
        for p, d in zip(rows, dead, strict=True)
    ]
    rtts = [
        Text("—", style="dim") if d else _graded(p.get("rtt_ms"), "{:.1f}", 80, 250)
        for p, d in zip(rows, dead, strict=True)
    ]
    losses = [
        Text("—", style="dim") if d else _graded(p.get("loss_pct"), "{:.1f}", 1, 10)
        for p, d in zip(rows, dead, strict=True)
    ]
    return [
        _Column("left", [(_ALWAYS, "Uplink", uplinks)]),
        _Column("left", [(10, "Local", [str(p.get("local_address", "")) for p in rows])]),
        _Column("left", [(_ALWAYS, "Remote", [str(p.get("remote_address", "")) for p in rows])]),
        _Column("left", [(30, "Via", [str(p.get("source", "")) for p in rows])]),
        _Column("left", [(_ALWAYS, "State", [_state(p.get("state")) for p in rows])]),
        _Column("right", [(80, "RTT ms", rtts)]),
        _Column("right", [(70, "Loss %", losses)]),
        _Column("right", [(75, "Heard", heard)]),
        _Column("right", [(20, "TX", tx_packets), (45, "TX", tx)]),
        _Column("right", [(20, "RX", rx_packets), (40, "RX", rx)]),
    ]


def _uplinks_columns(
    uplinks: Sequence[Mapping[str, Any]], paths: Sequence[Mapping[str, Any]]
) -> tuple[list[_Column], int]:
    """Per uplink (modem): how many of its paths are up, its best loss and RTT."""
    names = [str(u.get("name")) for u in uplinks]
    names += sorted({str(p.get("uplink")) for p in paths} - set(names))
    by_name = {str(u.get("name")): u for u in uplinks}
    cells: list[list[RenderableType]] = [[] for _ in range(7)]
    for name in names:
        u = by_name.get(name, {})
        mine = [p for p in paths if str(p.get("uplink")) == name]
        active = [p for p in mine if p.get("state") == "active"]
        # the best of its working paths; with none working, no figure (dead paths have none)
        losses = [p["loss_pct"] for p in active if isinstance(p.get("loss_pct"), int | float)]
        rtts = [p["rtt_ms"] for p in active if isinstance(p.get("rtt_ms"), int | float)]
        state = u.get("state", "—")
        row: list[RenderableType] = [
            Text(name, style="bold" if active else "bold red"),
            str(u.get("local_address", "")),
            Text(str(state), style="green" if state == "up" else "bold red"),
            Text(f"{len(active)}/{len(mine)}", style="green" if active else "bold red"),
            _graded(min(losses) if losses else None, "{:.1f}", 1, 10),
            _graded(min(rtts) if rtts else None, "{:.1f}", 80, 250),
            _graded(u.get("send_errors"), "{}", 1, 10),
        ]
        for column, cell in zip(cells, row, strict=True):
            column.append(cell)
    columns = [
        _Column("left", [(_ALWAYS, "Uplink", cells[0])]),
        _Column("left", [(20, "Address", cells[1])]),
        _Column("left", [(_ALWAYS, "State", cells[2])]),
        _Column("right", [(_ALWAYS, "Paths up", cells[3])]),
        _Column("right", [(70, "Loss %", cells[4])]),
        _Column("right", [(80, "RTT ms", cells[5])]),
        _Column("right", [(50, "Send errors", cells[6])]),
    ]
    return columns, len(names)


def _tunnels_columns(tunnels: Sequence[Mapping[str, Any]]) -> list[_Column]:
    def drops(t: Mapping[str, Any]) -> Text:
        text = ", ".join(f"{k}={v}" for k, v in sorted((t.get("drops") or {}).items()) if v)
        return Text(text or "—", style="yellow" if text else "dim")

    def protected(t: Mapping[str, Any]) -> Text:
        value = _redundancy(t).get("protected")
        if not isinstance(value, bool):
            return Text("—", style="dim")
        return Text("yes", style="green") if value else Text("NO", style="bold red")

    def lost(t: Mapping[str, Any]) -> Text:
        value = t.get("datagrams_lost", 0)
        return Text(_count(value), style="bold red" if value else "green")

    def gate(t: Mapping[str, Any]) -> str:
        info = t.get("gate") or {}
        return f"{info.get('kind', '?')} {info.get('address', '')}"

    names = [Text(str(t.get("name", "?")), style="bold") for t in tunnels]
    inputs = [_count(t.get("datagrams_in")) for t in tunnels]
    outputs = [_count(t.get("datagrams_out")) for t in tunnels]
    in_bytes = [f"{n} / {_bytes(t.get('bytes_in'))}" for n, t in zip(inputs, tunnels, strict=True)]
    out_bytes = [
        f"{n} / {_bytes(t.get('bytes_out'))}" for n, t in zip(outputs, tunnels, strict=True)
    ]
    return [
        _Column("left", [(_ALWAYS, "Tunnel", names)]),
        _Column("right", [(15, "ID", [str(t.get("tunnel_id", "")) for t in tunnels])]),
        _Column("left", [(25, "Gate", [gate(t) for t in tunnels])]),
        _Column("left", [(_ALWAYS, "(k, n)", [_code(_redundancy(t)) for t in tunnels])]),
        _Column("left", [(_ALWAYS, "Protected", [protected(t) for t in tunnels])]),
        _Column("right", [(35, "In", in_bytes), (55, "In", inputs)]),
        _Column("right", [(35, "Out", out_bytes), (55, "Out", outputs)]),
        _Column("right", [(65, "Rebuilt", [_count(t.get("blocks_rebuilt")) for t in tunnels])]),
        _Column("right", [(_ALWAYS, "Lost", [lost(t) for t in tunnels])]),
        _Column("left", [(30, "Drops", [drops(t) for t in tunnels])]),
    ]


def _protection_lines(tunnels: Sequence[Mapping[str, Any]]) -> list[Text]:
    """Per tunnel, what protects it (wraps at any width instead of a cut table cell)."""
    lines = []
    for t in tunnels:
        r = _redundancy(t)
        if not r:
            continue
        protected = r.get("protected")
        text = r.get("protection") or "—"
        style = "green" if protected is True else "bold red" if protected is False else "dim"
        lines.append(
            Text.assemble(
                (f"{t.get('name', '?')}: ", "bold"),
                f"(k, n) = {_code(r)}, spread {r.get('spread') or '—'}: ",
                (str(text), style),
            )
        )
    return lines


def _map_columns(m: Mapping[str, Any]) -> tuple[list[_Column], int]:
    registered = bool(m.get("registered"))
    reflexive: Mapping[str, Any] = m.get("reflexive") or {}
    rows = sorted(reflexive.items()) or [("—", None)]
    age = m.get("last_registration_age_s")
    first: list[RenderableType] = [
        str(m.get("address", "?")),
        Text("yes" if registered else "NO", style="green" if registered else "bold red"),
        _age(age) + " ago" if age is not None else "never",
    ]
    cells: list[list[RenderableType]] = [[] for _ in range(5)]
    for i, (uplink, addr) in enumerate(rows):
        row = [*(first if i == 0 else ["", "", ""]), str(uplink)]
        row.append(Text(str(addr), style="cyan") if addr else Text("unknown", style="yellow"))
        for column, cell in zip(cells, row, strict=True):
            column.append(cell)
    columns = [
        _Column("left", [(_ALWAYS, "Map", cells[0])]),
        _Column("left", [(60, "Registered", cells[1]), (_ALWAYS, "Reg", cells[1])]),
        _Column("right", [(50, "Last registration", cells[2])]),
        _Column("left", [(40, "Uplink", cells[3])]),
        _Column("left", [(55, "Reflexive address", cells[4]), (40, "Reflexive", cells[4])]),
    ]
    return columns, len(rows)


def _session_columns(s: Mapping[str, Any], name: str | None = None) -> list[_Column]:
    key = str(s.get("far_gate", "?"))
    state = str(s.get("handshake_state", "?"))
    age = s.get("last_handshake_age_s")
    handshake = Text(state, style=_HANDSHAKE_STYLE.get(state, "yellow"))
    last = _age(age) + " ago" if age is not None else "never"
    named = [_Column("left", [(_ALWAYS, "Name", [Text(name, style="bold")])])] if name else []
    return [
        *named,
        _Column("left", [(40, "Far gate", [key]), (_ALWAYS, "Far gate", [_short_key(key)])]),
        _Column("left", [(_ALWAYS, "Handshake", [handshake])]),
        _Column("right", [(60, "Last handshake", [last])]),
        _Column("right", [(30, "Rekeys", [str(s.get("rekeys", 0))])]),
    ]


def _short_key(key: str) -> str:
    return key[:12] + "…" if len(key) > 12 else key


class _FarGateGroup:
    """One far gate's share of a snapshot: its session, paths and tunnels. ``listed``: named
    in the snapshot's ``far_gates`` (else only seen on a path or tunnel)."""

    def __init__(
        self,
        name: str | None,
        public_key: str,
        *,
        kind: str | None = None,
        relay: bool | None = None,
        session: Mapping[str, Any] | None = None,
        listed: bool = True,
    ) -> None:
        self.name = name
        self.public_key = public_key
        self.kind = kind
        self.relay = relay
        self.session: Mapping[str, Any] = session or {}
        self.listed = listed
        self.paths: list[Mapping[str, Any]] = []
        self.tunnels: list[Mapping[str, Any]] = []

    @property
    def label(self) -> str:
        name = self.name if self.name is not None else "?"
        return f"{name} ({_short_key(self.public_key)})" if self.public_key else name


def _far_gates(snapshot: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]] | None:
    """The snapshot's ``far_gates`` object, or None from a gateway older than fleets."""
    value = snapshot.get("far_gates")
    if not isinstance(value, Mapping) or not value:
        return None
    return {str(k): v if isinstance(v, Mapping) else {} for k, v in value.items()}


def _far_gate_groups(snapshot: Mapping[str, Any]) -> list[_FarGateGroup]:
    """Paths and tunnels grouped by far gate, far gates by name; a snapshot without
    ``far_gates`` is one group holding everything, its session the top-level one."""
    paths = [p for p in snapshot.get("paths") or [] if isinstance(p, Mapping)]
    tunnels = [t for t in snapshot.get("tunnels") or [] if isinstance(t, Mapping)]
    far_gates = _far_gates(snapshot)
    if far_gates is None:
        session = snapshot.get("session")
        session = session if isinstance(session, Mapping) else {}
        group = _FarGateGroup(None, str(session.get("far_gate") or ""), session=session)
        group.paths, group.tunnels = paths, tunnels
        return [group]
    groups: dict[str, _FarGateGroup] = {}
    for name in sorted(far_gates):
        info = far_gates[name]
        session = info.get("session")
        relay = info.get("relay")
        groups[name] = _FarGateGroup(
            name,
            str(info.get("public_key") or ""),
            kind=str(info["kind"]) if info.get("kind") is not None else None,
            relay=relay if isinstance(relay, bool) else None,
            session=session if isinstance(session, Mapping) else {},
        )

    only = next(iter(groups)) if len(groups) == 1 else "?"

    def group_of(row: Mapping[str, Any]) -> _FarGateGroup:
        name = row.get("far_gate")
        key = only if name is None else str(name)  # unnamed: the only far gate, if one
        if key not in groups:
            groups[key] = _FarGateGroup(key, "", listed=False)
        return groups[key]

    for p in paths:
        group_of(p).paths.append(p)
    for t in tunnels:
        group_of(t).tunnels.append(t)
    return list(groups.values())


def _far_gates_columns(groups: Sequence[_FarGateGroup]) -> list[_Column]:
    """One row per far gate: who it is, its handshake, how many of its paths are up and
    whether its tunnels lose datagrams (the table to read first with many far gates)."""
    names, keys, kinds, states, lasts, ups, relays, losts = ([] for _ in range(8))
    for g in groups:
        s = g.session
        state = str(s.get("handshake_state", "—"))
        age = s.get("last_handshake_age_s")
        active = sum(1 for p in g.paths if p.get("state") == "active")
        lost = sum(
            int(t["datagrams_lost"]) for t in g.tunnels
            if isinstance(t.get("datagrams_lost"), int | float)
        )  # fmt: skip
        names.append(Text(g.name or "?", style="bold"))
        keys.append(_short_key(g.public_key) if g.public_key else "—")
        kinds.append(g.kind or "—")
        states.append(Text(state, style=_HANDSHAKE_STYLE.get(state, "dim")))
        lasts.append(_age(age) + " ago" if isinstance(age, int | float) else "never")
        ups.append(Text(f"{active}/{len(g.paths)}", style="green" if active else "bold red"))
        relays.append(
            Text("relay", style="yellow") if g.relay
            else Text("direct" if g.relay is False else "—", style="dim")
        )  # fmt: skip
        losts.append(Text(_count(lost), style="bold red" if lost else "green"))
    return [
        _Column("left", [(_ALWAYS, "Far gate", names)]),
        _Column("left", [(60, "Key", keys)]),
        _Column("left", [(20, "Kind", kinds)]),
        _Column("left", [(_ALWAYS, "Handshake", states)]),
        _Column("right", [(50, "Last handshake", lasts)]),
        _Column("right", [(_ALWAYS, "Paths up", ups)]),
        _Column("left", [(40, "Via", relays)]),
        _Column("right", [(_ALWAYS, "Lost", losts)]),
    ]


class StatusView:
    """The ``warp status`` screen for one snapshot, laid out for the width it is drawn at
    (tolerates missing fields)."""

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        self.snapshot = snapshot

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        snapshot = self.snapshot
        paths: list[Mapping[str, Any]] = list(snapshot.get("paths") or [])
        tunnels: list[Mapping[str, Any]] = list(snapshot.get("tunnels") or [])
        groups = _far_gate_groups(snapshot)
        active = sum(1 for p in paths if p.get("state") == "active")
        yield Text.assemble(
            ("warp ", "bold"),
            (str(snapshot.get("version", "?")), "bold"),
            f"  up {_age(snapshot.get('uptime_s'))}",
            f"  key {snapshot['public_key']}" if snapshot.get("public_key") else "",
            "  paths ",
            (
                f"{active}/{len(paths)} active",
                "green" if active and active == len(paths) else "yellow" if active else "bold red",
            ),
        )
        if len(groups) > 1:
            yield from self._fleet(groups, paths, console, options)
            return
        yield _fitted_table(
            "Paths", _paths_columns(paths), len(paths), console, options, empty="no paths yet"
        )
        columns, rows = _uplinks_columns(list(snapshot.get("uplinks") or []), paths)
        yield _fitted_table("Uplinks", columns, rows, console, options)
        yield _fitted_table("Tunnels", _tunnels_columns(tunnels), len(tunnels), console, options)
        yield from _protection_lines(tunnels)
        yield from self._map(console, options)
        (group,) = groups
        if not group.session:
            yield Text("Session: unknown", style="dim")
        else:
            # a fleet snapshot's far gate session names no key: the far gate's entry does
            session = {"far_gate": group.public_key or "?", **group.session}
            name = group.name if group.name not in (None, "default") else None
            yield _fitted_table("Session", _session_columns(session, name), 1, console, options)

    def _map(self, console: Console, options: ConsoleOptions) -> RenderResult:
        m = self.snapshot.get("map")
        if m is None:
            yield Text("Map: none configured (static endpoints)", style="dim")
        else:
            columns, rows = _map_columns(m)
            yield _fitted_table("Map", columns, rows, console, options)

    def _fleet(
        self,
        groups: Sequence[_FarGateGroup],
        paths: Sequence[Mapping[str, Any]],
        console: Console,
        options: ConsoleOptions,
    ) -> RenderResult:
        """Several far gates: a summary row each, the shared uplinks and map, then each far
        gate's paths and tunnels under its name and short key (like ``wg show``'s peers)."""
        yield _fitted_table("Far gates", _far_gates_columns(groups), len(groups), console, options)
        columns, rows = _uplinks_columns(list(self.snapshot.get("uplinks") or []), paths)
        yield _fitted_table("Uplinks", columns, rows, console, options)
        yield from self._map(console, options)
        for group in groups:
            yield Text.assemble(("far gate ", "bold"), (group.label, "bold cyan"))
            yield _fitted_table(
                f"Paths · {group.name}", _paths_columns(group.paths), len(group.paths),
                console, options, empty="no paths yet",
            )  # fmt: skip
            if group.tunnels:
                yield _fitted_table(
                    f"Tunnels · {group.name}", _tunnels_columns(group.tunnels),
                    len(group.tunnels), console, options,
                )  # fmt: skip
                yield from _protection_lines(group.tunnels)


def render_status(snapshot: Mapping[str, Any]) -> RenderableType:
    """The ``warp status`` screen (rich) for one snapshot."""
    return StatusView(snapshot)


# Plain text: one record per line, `kind identity key=value ...`; a missing value is `-`, a
# value with spaces is double-quoted (JSON string). Documented in docs/operations.md.


def _plain_value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    text = str(value)
    if any(ch.isspace() for ch in text) or '"' in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _plain_line(kind: str, identity: Sequence[Any], fields: Sequence[tuple[str, Any]]) -> str:
    parts = [kind, *(_plain_value(v) for v in identity)]
    parts += [f"{key}={_plain_value(value)}" for key, value in fields]
    return " ".join(parts)


def _adaptive_fields(redundancy: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A tunnel line's adaptive parity fields (appended: older scripts keep their columns)."""
    if redundancy.get("adaptive") is not True:
        return []
    return [("adaptive", True), ("parity", redundancy.get("parity")),
            ("target_loss", redundancy.get("target_loss"))]  # fmt: skip


def render_plain(snapshot: Mapping[str, Any]) -> str:
    """``warp status`` for scripts and pipes (like ``wg show``): one line per far gate, map,
    uplink, path and tunnel, in a fixed order, raw numbers (seconds, bytes, packets)."""
    lines = [
        _plain_line("warp", [snapshot.get("version")], [
            ("uptime_s", snapshot.get("uptime_s")),
            ("public_key", snapshot.get("public_key")),
        ])
    ]  # fmt: skip
    # A fleet snapshot (with `far_gates`): one far_gate line per far gate, and its name on
    # them and on every path and tunnel line, appended so older scripts keep working.
    fleet = _far_gates(snapshot) is not None
    for group in _far_gate_groups(snapshot):
        s = group.session
        if not group.listed or not (s or fleet):
            continue  # (unlisted: a far gate only named on a path or tunnel)
        named: list[tuple[str, Any]] = []
        if fleet:
            active = sum(1 for p in group.paths if p.get("state") == "active")
            named = [
                ("name", group.name), ("kind", group.kind), ("relay", group.relay),
                ("paths_active", active), ("paths", len(group.paths)),
            ]  # fmt: skip
        lines.append(
            _plain_line("far_gate", [group.public_key or s.get("far_gate")], [
                ("handshake", s.get("handshake_state")),
                ("last_handshake_age_s", s.get("last_handshake_age_s")),
                ("rekeys", s.get("rekeys")),
                *named,
            ])
        )  # fmt: skip
    m = snapshot.get("map")
    if m:
        reflexive: Mapping[str, Any] = m.get("reflexive") or {}
        lines.append(
            _plain_line("map", [m.get("address")], [
                ("registered", m.get("registered")),
                ("last_registration_age_s", m.get("last_registration_age_s")),
                ("reflexive", ",".join(f"{u}@{a or '-'}" for u, a in sorted(reflexive.items()))),
            ])
        )  # fmt: skip
    paths: list[Mapping[str, Any]] = list(snapshot.get("paths") or [])
    for u in snapshot.get("uplinks") or []:
        name = u.get("name")
        mine = [p for p in paths if p.get("uplink") == name]
        lines.append(
            _plain_line("uplink", [name], [
                ("address", u.get("local_address")),
                ("state", u.get("state")),
                ("paths_active", sum(1 for p in mine if p.get("state") == "active")),
                ("paths", len(mine)),
                ("send_errors", u.get("send_errors")),
            ])
        )  # fmt: skip

    def far_gate(row: Mapping[str, Any]) -> list[tuple[str, Any]]:
        return [("far_gate", row.get("far_gate"))] if fleet else []

    def path_order(p: Mapping[str, Any]) -> tuple[str, str, str]:
        return (str(p.get("far_gate") or ""), str(p.get("uplink")), str(p.get("remote_address")))

    for p in sorted(paths, key=path_order):
        dead = p.get("state") == "dead"
        lines.append(
            _plain_line("path", [p.get("uplink"), p.get("remote_address")], [
                ("state", p.get("state")),
                ("source", p.get("source")),
                ("local", p.get("local_address")),
                ("rtt_ms", None if dead else p.get("rtt_ms")),
                ("loss_pct", None if dead else p.get("loss_pct")),
                ("last_rx_age_s", p.get("last_rx_age_s")),
                ("tx_bytes", p.get("tx_bytes")),
                ("tx_packets", p.get("tx_packets")),
                ("rx_bytes", p.get("rx_bytes")),
                ("rx_packets", p.get("rx_packets")),
                *far_gate(p),
            ])
        )  # fmt: skip
    tunnels: list[Mapping[str, Any]] = list(snapshot.get("tunnels") or [])
    if fleet:
        tunnels.sort(key=lambda t: str(t.get("far_gate") or ""))  # stable: config order within
    for t in tunnels:
        r = _redundancy(t)
        gate = t.get("gate") or {}
        drops = t.get("drops") or {}
        lines.append(
            _plain_line("tunnel", [t.get("name")], [
                ("id", t.get("tunnel_id")),
                ("gate", f"{gate.get('kind', '?')}:{gate.get('address', '?')}"),
                ("k", r.get("k")),
                ("n", r.get("n")),
                ("effective_n", r.get("effective_n")),
                ("spread", r.get("spread")),
                ("protected", r.get("protected")),
                ("datagrams_in", t.get("datagrams_in")),
                ("datagrams_out", t.get("datagrams_out")),
                ("bytes_in", t.get("bytes_in")),
                ("bytes_out", t.get("bytes_out")),
                ("blocks_rebuilt", t.get("blocks_rebuilt")),
                ("datagrams_lost", t.get("datagrams_lost")),
                ("drops", ",".join(f"{k}:{v}" for k, v in sorted(drops.items()) if v)),
                ("protection", r.get("protection")),
                *far_gate(t),
                *_adaptive_fields(r),
            ])
        )  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# warp status


def watch_status(
    fetch: Callable[[], Mapping[str, Any]],
    console: Console,
    *,
    interval: float = 1.0,
    json_lines: bool = False,
    plain: bool = False,
    max_refreshes: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Refresh every ``interval`` until Ctrl-C (exit 0) or ``max_refreshes`` fetches (tests).

    ``json_lines``: one JSON line per refresh; ``plain``: one `render_plain` block per
    refresh, blocks separated by an empty line; else a live rich screen. The first fetch
    failing exits 2; later failures (a gateway restarting) are shown and the watch goes on.
    """
    fetches = 0
    try:
        try:
            snapshot = fetch()
        except StatusError as exc:
            _fail(exc)
            return EXIT_RUNTIME
        fetches += 1
        if json_lines or plain:
            while True:
                if json_lines:
                    console.file.write(json.dumps(snapshot, separators=(",", ":")) + "\n")
                else:
                    console.file.write(render_plain(snapshot) + "\n")
                console.file.flush()
                if max_refreshes is not None and fetches >= max_refreshes:
                    return EXIT_OK
                sleep(interval)
                try:
                    snapshot = fetch()
                except StatusError as exc:
                    _fail(exc)
                fetches += 1
        with Live(render_status(snapshot), console=console, auto_refresh=False) as live:
            while max_refreshes is None or fetches < max_refreshes:
                sleep(interval)
                try:
                    snapshot = fetch()
                    screen = render_status(snapshot)
                except StatusError as exc:
                    # keep showing the last good state under the error
                    error = Text(f"warp status: {exc}", style="bold red")
                    screen = Group(error, render_status(snapshot))
                fetches += 1
                live.update(screen, refresh=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _fail(exc: Exception) -> None:
    print(f"warp status: {exc}", file=sys.stderr)


def _socket_path_from_config(config_path: str) -> str:
    from warp.config import load_gateway_config

    return str(load_gateway_config(config_path).control.socket)


def run_status(
    args: argparse.Namespace,
    *,
    socket_path_from_config: Callable[[str], str] | None = None,
    console: Console | None = None,
) -> int:
    """``warp status``. ``args``: ``config``, ``socket``, ``json``, ``plain``, ``watch``,
    ``interval``, ``timeout`` (as added by `register_status`). On a terminal: tables fitted
    to its width; otherwise (or with ``plain``) `render_plain`."""
    path: str | None = getattr(args, "socket", None)
    config: str | None = getattr(args, "config", None)
    if path is None and config is not None:
        loader = socket_path_from_config or _socket_path_from_config
        try:
            path = loader(config)
        except Exception as exc:
            # a ConfigError lists every problem; a missing file is one line
            message = exc.format() if hasattr(exc, "format") else str(exc)
            print(message or f"{config}: cannot load config", file=sys.stderr)
            return EXIT_USAGE
    if path is None:
        path = DEFAULT_CONTROL_SOCKET
    timeout = float(getattr(args, "timeout", 3.0))
    interval = float(getattr(args, "interval", 1.0))
    as_json = bool(getattr(args, "json", False))
    console = console or Console()
    # piped or redirected: the stable plain text, not a screen drawn for a terminal
    plain = bool(getattr(args, "plain", False)) or not console.is_terminal

    def fetch() -> dict[str, Any]:
        return query_status(path, timeout=timeout)

    if getattr(args, "watch", False):
        return watch_status(fetch, console, interval=interval, json_lines=as_json, plain=plain)
    try:
        snapshot = fetch()
    except StatusError as exc:
        _fail(exc)
        return EXIT_RUNTIME
    if as_json:
        console.file.write(json.dumps(snapshot, indent=2) + "\n")
        console.file.flush()
    elif plain:
        console.file.write(render_plain(snapshot))
        console.file.flush()
    else:
        console.print(render_status(snapshot))
    return EXIT_OK


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="the gateway's config file (its control.socket is used)",
    )
    where.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the gateway's control socket (default {DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON status")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="one line per far gate, map, uplink, path and tunnel (the default when stdout is "
        "not a terminal; format in docs/operations.md)",
    )
    parser.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="refresh period of --watch (default 1)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=3.0,
        metavar="SECONDS",
        help="how long to wait for the gateway's answer (default 3)",
    )


_DESCRIPTION = (
    "Ask a running gateway, over its control socket, for its state: paths (state, RTT, "
    "loss, last heard, bytes), uplinks, tunnels with counters, (k, n) and protection, map "
    "registration and session. On a terminal: tables fitted to its width; piped: one plain "
    "line per far gate, map, uplink, path and tunnel (like `wg show`)."
)
_EPILOG = "Exit codes: 0 success, 1 usage or config error, 2 gateway not reachable."


def register_status(subparsers: Any) -> None:
    """Add ``status`` to the ``warp`` command (sets ``handler`` to `run_status`)."""
    parser = subparsers.add_parser(
        "status", help="show a running gateway's state", description=_DESCRIPTION, epilog=_EPILOG
    )
    _add_arguments(parser)
    parser.set_defaults(handler=run_status)


#: the name the brief asked for
add_status_command = register_status


def status_main(argv: Sequence[str] | None = None) -> int:
    """``warp status`` on its own (tests, ``python -m warp.status``)."""
    parser = argparse.ArgumentParser(prog="warp status", description=_DESCRIPTION, epilog=_EPILOG)
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    return run_status(args)


if __name__ == "__main__":
    sys.exit(status_main())
