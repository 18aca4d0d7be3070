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
`run_status` the ``warp status`` command: ``--json`` prints the snapshot as JSON, otherwise
it is rendered as ``rich`` tables (`render_status`); ``--watch`` refreshes every second.
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NotRequired, TypeAlias, TypedDict

from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from warp.gate.base import Gate, GateError, claim_socket_path, remove_socket_path

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "ControlRequestError",
    "ControlServer",
    "ControlSocketError",
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
REJECT_LOG_INTERVAL = 10.0

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2

# ---------------------------------------------------------------------------------------------
# Snapshot schema (what the gateway's ``snapshot()`` returns; JSON-native throughout)

PathState: TypeAlias = Literal["probing", "active", "dead"]
PathSource: TypeAlias = Literal["map", "static", "learned", "relay"]


class PathStatus(TypedDict):
    """One path: (local uplink socket, remote address)."""

    uplink: str  # interface name, e.g. "wwan0"
    local_address: str  # "10.0.0.2:40001"
    remote_address: str  # "198.51.100.7:40002" (for a relay path: the map's address)
    source: PathSource  # where the remote address came from
    state: PathState
    rtt_ms: float | None  # smoothed probe RTT; None before the first reply
    loss_pct: float | None  # probe loss over the recent window, 0–100
    last_rx_age_s: float | None  # seconds since the last authenticated packet on it
    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int


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


class MapStatus(TypedDict):
    address: str  # "warp-map.example.net:13116"
    registered: bool  # at least one uplink holds a live registration
    reflexive: dict[str, str | None]  # uplink → public address the map saw (None: not yet)
    last_registration_age_s: float | None  # seconds since the last acknowledged registration


class SessionStatus(TypedDict):
    far_gate: str  # the peer's public key, text form
    handshake_state: str  # "none" | "initiating" | "established" | "expired"
    last_handshake_age_s: float | None
    rekeys: int


class UplinkStatus(TypedDict):
    name: str
    local_address: str
    state: Literal["up", "down"]
    send_errors: int


class StatusSnapshot(TypedDict):
    version: str
    uptime_s: float
    public_key: NotRequired[str]  # this instance's key
    paths: list[PathStatus]
    tunnels: list[TunnelStatus]
    map: MapStatus | None  # None: no warp_map configured (static endpoints)
    session: SessionStatus
    uplinks: list[UplinkStatus]


def gate_info(gate: Gate) -> GateInfo:
    """The `GateInfo` of a running gate (its counters go in the `TunnelStatus` fields)."""
    return {"kind": gate.kind, "address": gate.address}


Snapshot: TypeAlias = Callable[[], Mapping[str, Any]]

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
    """Serves ``snapshot()`` on a Unix stream socket.

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
    ) -> None:
        self.path = path
        self._snapshot = snapshot
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
        self._last_reject_log: dict[str, float] = {}

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
        now = time.monotonic()
        last = self._last_reject_log.get(reason)
        if last is None or now - last >= REJECT_LOG_INTERVAL:
            self._last_reject_log[reason] = now
            log.warning(
                "control.rejected reason=%s total=%d path=%s",
                reason,
                self.rejected[reason],
                self.path,
            )

    def respond(self, request: Mapping[str, Any]) -> bytes:
        """The response line (with its newline) for one parsed request. Never raises."""
        cmd = request.get("cmd")
        if cmd != "status":
            return _error_line(f"unknown command {cmd!r}; known: status")
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
            sock.sendall(b'{"cmd": "status"}\n')
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
    if set(reply) == {"error"}:
        raise StatusError(f"the gateway on {path} answered: {reply['error']}")
    return reply


# ---------------------------------------------------------------------------------------------
# Rendering

_STATE_STYLE = {"active": "bold green", "probing": "bold yellow", "dead": "bold red"}
_HANDSHAKE_STYLE = {"established": "green", "initiating": "yellow", "none": "red", "expired": "red"}


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


def _paths_table(paths: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Paths", title_justify="left", expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("Uplink", "left"),
        ("Local", "left"),
        ("Remote", "left"),
        ("Via", "left"),
        ("State", "left"),
        ("RTT ms", "right"),
        ("Loss %", "right"),
        ("Last rx", "right"),
        ("TX", "right"),
        ("RX", "right"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for p in sorted(paths, key=lambda p: (str(p.get("uplink")), str(p.get("remote_address")))):
        state = p.get("state")
        table.add_row(
            Text(str(p.get("uplink", "?")), style="bold red" if state == "dead" else "bold"),
            str(p.get("local_address", "")),
            str(p.get("remote_address", "")),
            str(p.get("source", "")),
            _state(state),
            _graded(p.get("rtt_ms"), "{:.1f}", 80, 250),
            _graded(p.get("loss_pct"), "{:.1f}", 1, 10),
            _graded(p.get("last_rx_age_s"), "{:.1f}s", 1.5, 3),
            f"{_bytes(p.get('tx_bytes'))} / {_count(p.get('tx_packets'))}",
            f"{_bytes(p.get('rx_bytes'))} / {_count(p.get('rx_packets'))}",
        )
    if not paths:
        table.add_row(Text("no paths yet", style="yellow"), *[""] * 9)
    return table


def _uplinks_table(
    uplinks: Sequence[Mapping[str, Any]], paths: Sequence[Mapping[str, Any]]
) -> Table:
    """Per uplink (modem): how many of its paths are up, its worst loss, best RTT."""
    table = Table(title="Uplinks", title_justify="left")
    for col in ("Uplink", "Address", "State", "Paths up", "Loss %", "RTT ms", "Send errors"):
        table.add_column(col)
    names = [str(u.get("name")) for u in uplinks]
    names += sorted({str(p.get("uplink")) for p in paths} - set(names))
    by_name = {str(u.get("name")): u for u in uplinks}
    for name in names:
        u = by_name.get(name, {})
        mine = [p for p in paths if str(p.get("uplink")) == name]
        active = [p for p in mine if p.get("state") == "active"]
        # the best of its working paths; with none working, the best of what it has
        measured = active or mine
        losses = [p["loss_pct"] for p in measured if isinstance(p.get("loss_pct"), int | float)]
        rtts = [p["rtt_ms"] for p in measured if isinstance(p.get("rtt_ms"), int | float)]
        up_style = "green" if active else "bold red"
        state = u.get("state", "—")
        table.add_row(
            Text(name, style="bold" if active else "bold red"),
            str(u.get("local_address", "")),
            Text(str(state), style="green" if state == "up" else "bold red"),
            Text(f"{len(active)}/{len(mine)}", style=up_style),
            _graded(min(losses) if losses else None, "{:.1f}", 1, 10),
            _graded(min(rtts) if rtts else None, "{:.1f}", 80, 250),
            _graded(u.get("send_errors"), "{}", 1, 10),
        )
    return table


def _tunnels_table(tunnels: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Tunnels", title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("Tunnel", "left"),
        ("ID", "right"),
        ("Gate", "left"),
        ("In", "right"),
        ("Out", "right"),
        ("Rebuilt", "right"),
        ("Lost", "right"),
        ("Drops", "left"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for t in tunnels:
        gate = t.get("gate") or {}
        drops = t.get("drops") or {}
        drop_text = ", ".join(f"{k}={v}" for k, v in sorted(drops.items()) if v) or "—"
        lost = t.get("datagrams_lost", 0)
        table.add_row(
            Text(str(t.get("name", "?")), style="bold"),
            str(t.get("tunnel_id", "")),
            f"{gate.get('kind', '?')} {gate.get('address', '')}",
            f"{_count(t.get('datagrams_in'))} / {_bytes(t.get('bytes_in'))}",
            f"{_count(t.get('datagrams_out'))} / {_bytes(t.get('bytes_out'))}",
            _count(t.get("blocks_rebuilt")),
            Text(_count(lost), style="bold red" if lost else "green"),
            Text(drop_text, style="yellow" if drop_text != "—" else "dim"),
        )
    return table


def _map_table(m: Mapping[str, Any] | None) -> RenderableType:
    if m is None:
        return Text("Map: none configured (static endpoints)", style="dim")
    registered = bool(m.get("registered"))
    table = Table(title="Map", title_justify="left", show_header=True)
    table.add_column("Map")
    table.add_column("Registered")
    table.add_column("Last registration", justify="right")
    table.add_column("Uplink")
    table.add_column("Reflexive address")
    reflexive: Mapping[str, Any] = m.get("reflexive") or {}
    first: list[RenderableType] = [
        str(m.get("address", "?")),
        Text("yes" if registered else "NO", style="green" if registered else "bold red"),
        _age(m.get("last_registration_age_s")) + " ago"
        if m.get("last_registration_age_s") is not None
        else "never",
    ]
    rows = sorted(reflexive.items()) or [("—", None)]
    for i, (uplink, addr) in enumerate(rows):
        cells: list[RenderableType] = first if i == 0 else ["", "", ""]
        cells.append(str(uplink))
        cells.append(Text(str(addr), style="cyan") if addr else Text("unknown", style="yellow"))
        table.add_row(*cells)
    return table


def _session_table(s: Mapping[str, Any] | None) -> RenderableType:
    if not s:
        return Text("Session: unknown", style="dim")
    table = Table(title="Session", title_justify="left")
    for col in ("Far gate", "Handshake", "Last handshake", "Rekeys"):
        table.add_column(col)
    state = str(s.get("handshake_state", "?"))
    age = s.get("last_handshake_age_s")
    table.add_row(
        str(s.get("far_gate", "?")),
        Text(state, style=_HANDSHAKE_STYLE.get(state, "yellow")),
        _age(age) + " ago" if age is not None else "never",
        str(s.get("rekeys", 0)),
    )
    return table


def render_status(snapshot: Mapping[str, Any]) -> RenderableType:
    """The ``warp status`` screen for one snapshot (tolerates missing fields)."""
    paths: list[Mapping[str, Any]] = list(snapshot.get("paths") or [])
    active = sum(1 for p in paths if p.get("state") == "active")
    header = Text.assemble(
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
    return Group(
        header,
        _paths_table(paths),
        _uplinks_table(list(snapshot.get("uplinks") or []), paths),
        _tunnels_table(list(snapshot.get("tunnels") or [])),
        _map_table(snapshot.get("map")),
        _session_table(snapshot.get("session")),
    )


# ---------------------------------------------------------------------------------------------
# warp status


def watch_status(
    fetch: Callable[[], Mapping[str, Any]],
    console: Console,
    *,
    interval: float = 1.0,
    json_lines: bool = False,
    max_refreshes: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Refresh every ``interval`` until Ctrl-C (exit 0) or ``max_refreshes`` fetches (tests).

    The first fetch failing exits 2; later failures (a gateway restarting) are shown and the
    watch goes on.
    """
    fetches = 0
    try:
        try:
            snapshot = fetch()
        except StatusError as exc:
            _fail(exc)
            return EXIT_RUNTIME
        fetches += 1
        if json_lines:
            while True:
                console.file.write(json.dumps(snapshot, separators=(",", ":")) + "\n")
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
    """``warp status``. ``args``: ``config``, ``socket``, ``json``, ``watch``, ``interval``,
    ``timeout`` (as added by `register_status`)."""
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

    def fetch() -> dict[str, Any]:
        return query_status(path, timeout=timeout)

    if getattr(args, "watch", False):
        return watch_status(fetch, console, interval=interval, json_lines=as_json)
    try:
        snapshot = fetch()
    except StatusError as exc:
        _fail(exc)
        return EXIT_RUNTIME
    if as_json:
        console.file.write(json.dumps(snapshot, indent=2) + "\n")
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
    "loss, bytes), uplinks, tunnels with counters, map registration and session."
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
