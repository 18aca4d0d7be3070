"""Control socket server, `warp status` client, rendering and --watch."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from rich.console import Console

from warp.status import (
    ControlServer,
    ControlSocketError,
    StatusError,
    StatusSnapshot,
    query_status,
    register_status,
    render_plain,
    render_status,
    run_status,
    status_main,
    watch_status,
)

SNAPSHOT: StatusSnapshot = {
    "version": "0.1.0",
    "uptime_s": 3725.5,
    "public_key": "7ZQ3K8W1N2P4R6T8V0X2Z4B6D8F0H2J4L6N8Q0S2U4W6Y8A0C2E4",
    "paths": [
        {
            "uplink": "wwan0",
            "local_address": "10.64.1.2:40001",
            "remote_address": "198.51.100.7:40002",
            "source": "map",
            "state": "active",
            "rtt_ms": 48.25,
            "loss_pct": 0.4,
            "last_rx_age_s": 0.3,
            "tx_bytes": 123456789,
            "tx_packets": 98765,
            "rx_bytes": 2345678,
            "rx_packets": 4321,
        },
        {
            "uplink": "wwan1",
            "local_address": "10.80.3.9:40001",
            "remote_address": "198.51.100.7:40002",
            "source": "learned",
            "state": "dead",
            "rtt_ms": None,
            "loss_pct": 100.0,
            "last_rx_age_s": 17.0,
            "tx_bytes": 1000,
            "tx_packets": 10,
            "rx_bytes": 0,
            "rx_packets": 0,
        },
        {
            "uplink": "wlan0",
            "local_address": "192.168.8.20:40001",
            "remote_address": "203.0.113.9:13116",
            "source": "relay",
            "state": "probing",
            "rtt_ms": 310.0,
            "loss_pct": 25.0,
            "last_rx_age_s": None,
            "tx_bytes": 0,
            "tx_packets": 0,
            "rx_bytes": 0,
            "rx_packets": 0,
        },
    ],
    "tunnels": [
        {
            "name": "wireguard",
            "tunnel_id": 7,
            "gate": {"kind": "loopback", "address": "127.0.0.1:59401"},
            "datagrams_in": 1000,
            "datagrams_out": 990,
            "bytes_in": 1400000,
            "bytes_out": 1386000,
            "blocks_rebuilt": 42,
            "datagrams_lost": 3,
            "drops": {"no_application": 2, "send_deadline": 5},
        }
    ],
    "map": {
        "address": "warp-map.example.net:13116",
        "registered": True,
        "reflexive": {"wwan0": "100.64.9.1:61000", "wwan1": None},
        "last_registration_age_s": 4.2,
    },
    "session": {
        "far_gate": "AB12CD34EF56GH78JK90MN12PQ34RS56TV78WX90YZ12AB34CD56",
        "handshake_state": "established",
        "last_handshake_age_s": 61.0,
        "rekeys": 3,
    },
    "uplinks": [
        {"name": "wwan0", "local_address": "10.64.1.2", "state": "up", "send_errors": 0},
        {"name": "wwan1", "local_address": "10.80.3.9", "state": "up", "send_errors": 12},
        {"name": "wlan0", "local_address": "192.168.8.20", "state": "up", "send_errors": 0},
    ],
}


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="warp-st-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class ServerThread:
    """A ControlServer on its own event loop in a thread, so blocking clients can be tested."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self.error = exc
            self.started.set()
            return
        self.started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.started.wait(5)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        assert not self.thread.is_alive()


def serve(path: str, snapshot: Any = lambda: SNAPSHOT) -> ServerThread:
    return ServerThread(ControlServer(path, snapshot))


def recording_console() -> Console:
    return Console(file=io.StringIO(), record=True, width=200, force_terminal=False)


def args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "config": None,
        "socket": None,
        "json": False,
        "watch": False,
        "interval": 1.0,
        "timeout": 2.0,
    }
    base.update(kw)
    return argparse.Namespace(**base)


# ---------------------------------------------------------------------------------------
# server + client


def test_query_returns_the_snapshot(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    with serve(path):
        assert query_status(path) == SNAPSHOT
        assert query_status(path) == SNAPSHOT  # served again
    assert not os.path.exists(path)  # removed on close


def test_json_output_parses_and_equals_the_snapshot(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    console = recording_console()
    with serve(path):
        assert run_status(args(socket=path, json=True), console=console) == 0
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert json.loads(out) == SNAPSHOT


def test_status_main_json_to_stdout(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "warp.sock")
    with serve(path):
        assert status_main(["--socket", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == SNAPSHOT


def terminal_console(width: int = 200) -> Console:
    return Console(file=io.StringIO(), record=True, width=width, force_terminal=True)


def test_rich_rendering_shows_every_path_and_table(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    console = terminal_console()
    with serve(path):
        assert run_status(args(socket=path), console=console) == 0
    text = console.export_text()
    for table in ("Paths", "Uplinks", "Tunnels", "Map", "Session"):
        assert table in text
    rows = [line for line in text.splitlines() if "198.51.100.7:40002" in line]
    assert len(rows) == 2
    (wwan0,) = [r for r in rows if "wwan0" in r]
    assert "active" in wwan0 and "48.2" in wwan0 and "0.4" in wwan0 and "0.3s" in wwan0
    (wwan1,) = [r for r in rows if "wwan1" in r]
    # a dead path: when it was last heard, no loss figure (even from an older gateway)
    assert "dead" in wwan1 and "17s ago" in wwan1 and "learned" in wwan1
    assert "100.0" not in wwan1
    (wlan0,) = [line for line in text.splitlines() if "203.0.113.9:13116" in line]
    assert "probing" in wlan0 and "relay" in wlan0 and "25.0" in wlan0
    assert "117.7 MiB / 98.8k" in wwan0  # tx bytes / packets
    assert "1 hour" not in text and "1h02m" in text  # uptime
    assert "wireguard" in text and "loopback 127.0.0.1:59401" in text
    assert "no_application=2" in text and "send_deadline=5" in text
    assert "100.64.9.1:61000" in text and "established" in text


def test_rendering_colours_path_state() -> None:
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    console.print(render_status(SNAPSHOT))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[1;31mdead" in out  # bold red
    assert "\x1b[1;32mactive" in out  # bold green
    assert "\x1b[1;33mprobing" in out  # bold yellow
    assert "\x1b[1;31mwwan1" in out  # the dead modem's name is red too
    assert "\x1b[1;31m17s ago" in out  # and when it was last heard


def test_rendering_tolerates_a_sparse_snapshot() -> None:
    console = terminal_console()
    console.print(render_status({"version": "9.9", "map": None}))
    text = console.export_text()
    assert "warp 9.9" in text and "no paths yet" in text and "none configured" in text


def test_missing_socket_exit_2_one_line(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "warp.sock")
    assert status_main(["--socket", path]) == 2
    err = capsys.readouterr().err
    assert err == f"warp status: is the gateway running? socket {path} not found\n"


def test_stale_socket_refused_exit_2(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "warp.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert status_main(["--socket", path, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the gateway running?" in err and "refuses" in err


def test_silent_gateway_times_out_exit_2(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "warp.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)  # accepts into the backlog, never answers
    try:
        assert status_main(["--socket", path, "--timeout", "0.2"]) == 2
    finally:
        s.close()
    err = capsys.readouterr().err
    assert err == f"warp status: the gateway on {path} did not answer within 0.2 s\n"


def test_server_errors_are_replies_not_crashes(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    calls = 0

    def flaky() -> Mapping[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in the gateway")
        return SNAPSHOT

    with serve(path, flaky):
        with pytest.raises(StatusError, match="failed to build its status"):
            query_status(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(2)
            c.connect(path)
            f = c.makefile("rwb")
            for request in (b"not json\n", b"[1]\n", b'{"cmd": "nope"}\n', b'{"cmd": "status"}\n'):
                f.write(request)
                f.flush()
            replies = [json.loads(f.readline()) for _ in range(4)]
        assert "not a JSON line" in replies[0]["error"]
        assert "JSON object" in replies[1]["error"]
        assert replies[2] == {"error": "unknown command 'nope'; known: status"}
        assert replies[3] == SNAPSHOT  # several requests on one connection
        assert query_status(path) == SNAPSHOT


def exchange(path: str, request: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``request`` (from a thread: the server may stop reading) and read everything until
    the server closes; (what came back, whether the server closed within ``timeout``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(path)

        def send() -> None:
            with contextlib.suppress(OSError):
                c.sendall(request)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = b""
        closed = False
        with contextlib.suppress(TimeoutError):
            try:
                while chunk := c.recv(1 << 16):
                    received += chunk
            except ConnectionResetError:
                pass  # closed with our request unread: a close all the same
            closed = True
        with contextlib.suppress(OSError):
            c.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
        return received, closed


def test_hostile_requests_get_an_error_line_and_are_closed_without_a_traceback(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sockdir, "warp.sock")
    deep = b"[" * 10_000 + b"]" * 10_000 + b"\n"
    deep_object = b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"\n"
    huge = b'{"cmd": "' + b"x" * (16 << 20) + b'"}\n'
    with serve(path):
        for request, expected in (
            (deep, "nested deeper"),
            (deep_object, "nested deeper"),
            (huge, "too long"),
        ):
            received, closed = exchange(path, request)
            assert closed  # the connection does not stay open for more
            (line,) = received.splitlines()
            assert expected in json.loads(line)["error"]
        assert query_status(path) == SNAPSHOT  # and the gateway keeps serving
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    rejected = [r.getMessage() for r in caplog.records if "control.rejected" in r.getMessage()]
    assert any("reason=too_deep" in m for m in rejected)
    assert any("reason=too_long" in m for m in rejected)


def test_a_slow_client_gets_an_error_and_is_closed(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    with ServerThread(ControlServer(path, lambda: SNAPSHOT, request_timeout=0.3)):
        t0 = time.monotonic()
        received, closed = exchange(path, b'{"cmd": "sta')  # and nothing more, ever
        assert closed and time.monotonic() - t0 < 2.0
        assert "no request line within 0.3 s" in json.loads(received)["error"]


def test_connections_beyond_the_cap_are_refused_with_an_error(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    with ServerThread(ControlServer(path, lambda: SNAPSHOT, max_connections=4)) as thread:
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        for c in idle:
            c.connect(path)
        deadline = time.monotonic() + 5
        while len(thread.server._connections) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        received, closed = exchange(path, b'{"cmd": "status"}\n')
        assert closed
        assert json.loads(received) == {"error": "busy: 4 connections open"}
        idle.pop().close()
        deadline = time.monotonic() + 5
        while len(thread.server._connections) > 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert query_status(path) == SNAPSHOT
        assert thread.server.rejected["busy"] == 1
        for c in idle:
            c.close()


def test_server_socket_file_dir_modes_and_cleanup(sockdir: str) -> None:
    path = os.path.join(sockdir, "run", "warp", "warp.sock")
    old_umask = os.umask(0o077)
    try:
        with serve(path):
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
            assert query_status(path)["version"] == "0.1.0"
    finally:
        os.umask(old_umask)
    assert not os.path.exists(path)


def test_server_replaces_stale_refuses_live_and_non_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with serve(path):
        assert query_status(path) == SNAPSHOT
        # a second gateway on the same socket is refused, and does not break the first
        with pytest.raises(ControlSocketError, match="in use"), serve(path):
            pass
        assert query_status(path) == SNAPSHOT
    other = os.path.join(sockdir, "notes.txt")
    with open(other, "w") as f:
        f.write("x")
    with pytest.raises(ControlSocketError, match="not a socket"), serve(other):
        pass
    assert os.path.exists(other)


def test_server_close_ends_open_connections_and_is_idempotent(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")

    async def main() -> None:
        server = ControlServer(path, lambda: SNAPSHOT)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"cmd": "status"}\n')
        assert json.loads(await reader.readline()) == SNAPSHOT
        # the connection stays open and idle; close must not hang on it
        await asyncio.wait_for(server.close(), 5)
        await server.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert not os.path.exists(path)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# config, CLI registration


def test_socket_from_config(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    seen: list[str] = []

    def from_config(config: str) -> str:
        seen.append(config)
        return path

    console = recording_console()
    with serve(path):
        code = run_status(
            args(config="/etc/warp/warp.toml", json=True),
            socket_path_from_config=from_config,
            console=console,
        )
    assert code == 0 and seen == ["/etc/warp/warp.toml"]
    assert json.loads(console.file.getvalue()) == SNAPSHOT  # type: ignore[attr-defined]


def test_bad_config_exit_1(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = os.path.join(sockdir, "warp.toml")
    with open(config, "w") as f:
        f.write("this is = = not toml\n")
    assert status_main(["-c", config]) == 1
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err
    assert status_main(["-c", os.path.join(sockdir, "missing.toml")]) == 1


def test_register_status_with_a_cli_parser(sockdir: str) -> None:
    parser = argparse.ArgumentParser(prog="warp")
    register_status(parser.add_subparsers())
    ns = parser.parse_args(["status", "--socket", "/x.sock", "--json", "--watch"])
    assert ns.handler is run_status
    assert (ns.socket, ns.json, ns.watch, ns.config, ns.interval) == (
        "/x.sock",
        True,
        True,
        None,
        1.0,
    )
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parser.parse_args(["status", "-c", "a.toml", "--socket", "b.sock"])


# ---------------------------------------------------------------------------------------
# --watch


def test_watch_refreshes_until_bounded_stop() -> None:
    fetched: list[int] = []
    slept: list[float] = []

    def fetch() -> Mapping[str, Any]:
        fetched.append(1)
        return {**SNAPSHOT, "uptime_s": float(len(fetched))}

    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    code = watch_status(fetch, console, interval=1.0, max_refreshes=3, sleep=slept.append)
    assert code == 0
    assert len(fetched) == 3 and slept == [1.0, 1.0]
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert out.count("Paths") >= 3  # first frame + two refreshes
    assert "wwan1" in out


def test_watch_ctrl_c_exits_0_and_shows_errors_meanwhile() -> None:
    calls = 0

    def fetch() -> Mapping[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StatusError("is the gateway running? socket /x not found")
        return SNAPSHOT

    def sleep(_: float) -> None:
        if calls == 3:
            raise KeyboardInterrupt

    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    assert watch_status(fetch, console, sleep=sleep) == 0
    assert calls == 3
    assert "is the gateway running?" in console.file.getvalue()  # type: ignore[attr-defined]


def test_watch_first_failure_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def fetch() -> Mapping[str, Any]:
        raise StatusError("is the gateway running? socket /x not found")

    assert watch_status(fetch, recording_console(), sleep=lambda _: None) == 2
    assert capsys.readouterr().err == "warp status: is the gateway running? socket /x not found\n"


def test_watch_against_a_live_server(sockdir: str) -> None:
    path = os.path.join(sockdir, "warp.sock")
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    with serve(path):
        code = watch_status(lambda: query_status(path), console, interval=0.01, max_refreshes=2)
    assert code == 0
    assert console.file.getvalue().count("Tunnels") >= 2  # type: ignore[attr-defined]


def test_watch_json_lines() -> None:
    console = recording_console()
    assert (
        watch_status(
            lambda: SNAPSHOT, console, json_lines=True, max_refreshes=2, sleep=lambda _: None
        )
        == 0
    )
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [json.loads(line) for line in lines] == [SNAPSHOT, SNAPSHOT]


# ---------------------------------------------------------------------------------------
# terminal width, plain text, redundancy

PROTECTED = {
    "k": 2,
    "n": 4,
    "effective_n": 4,
    "spread": "survive_uplink_loss",
    "protected": True,
    "protection": "protected against one uplink loss",
}


def with_redundancy(redundancy: Mapping[str, Any] | None) -> dict[str, Any]:
    snapshot = json.loads(json.dumps(SNAPSHOT))
    if redundancy is not None:
        snapshot["tunnels"][0]["redundancy"] = dict(redundancy)
    return snapshot  # type: ignore[no-any-return]


def screen(snapshot: Mapping[str, Any], width: int) -> str:
    console = terminal_console(width)
    console.print(render_status(snapshot))
    return console.export_text()


def test_80_columns_drop_minor_columns_instead_of_cutting_cells() -> None:
    text = screen(with_redundancy(PROTECTED), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    # every cell shown is whole: the only "…" is the far gate's key, shortened on purpose
    assert text.count("…") == 1 and "AB12CD34EF56…" in text
    for whole in (
        "Uplink", "wwan0", "wlan0", "198.51.100.7:40002", "203.0.113.9:13116", "active",
        "probing", "dead", "48.2", "17s ago", "wireguard", "(2, 4)", "yes",
        "warp-map.example.net:13116", "established",
    ):  # fmt: skip
        assert whole in text, whole
    # the least important went first: local addresses and per-path packet counts
    assert "10.64.1.2:40001" not in text and "98.8k" not in text
    wide = screen(with_redundancy(PROTECTED), 200)
    assert "10.64.1.2:40001" in wide and "117.7 MiB / 98.8k" in wide and "…" not in wide


def test_narrow_terminal_keeps_the_essential_columns_whole() -> None:
    text = screen(with_redundancy(PROTECTED), 60)
    assert max(len(line) for line in text.splitlines()) <= 60
    rows = [line.split() for line in text.splitlines() if "198.51.100.7:40002" in line]
    assert sorted(row[:3] for row in rows) == [
        ["wwan0", "198.51.100.7:40002", "active"],
        ["wwan1", "198.51.100.7:40002", "dead"],
    ]


def test_tunnel_shows_code_effective_n_spread_and_protection() -> None:
    unprotected = {
        **PROTECTED,
        "effective_n": 6,
        "protected": False,
        "protection": "not protected: only one uplink up",
    }
    text = screen(with_redundancy(unprotected), 80)
    (row,) = [line for line in text.splitlines() if line.startswith(" wireguard ")]
    assert "(2, 4)→6" in row and "NO" in row.split()
    flat = " ".join(text.split())
    assert (
        "wireguard: (k, n) = (2, 4)→6, spread survive_uplink_loss: "
        "not protected: only one uplink up" in flat
    )
    # a gateway that does not report redundancy yet: dashes, no crash
    text = screen(with_redundancy(None), 80)
    (row,) = [line for line in text.splitlines() if line.startswith(" wireguard ")]
    assert row.split()[1:3] == ["—", "—"]
    assert "wireguard: (k, n)" not in text


PLAIN = """\
warp 0.1.0 uptime_s=3725.5 public_key=7ZQ3K8W1N2P4R6T8V0X2Z4B6D8F0H2J4L6N8Q0S2U4W6Y8A0C2E4
far_gate AB12CD34EF56GH78JK90MN12PQ34RS56TV78WX90YZ12AB34CD56 handshake=established \
last_handshake_age_s=61 rekeys=3
map warp-map.example.net:13116 registered=yes last_registration_age_s=4.2 \
reflexive=wwan0@100.64.9.1:61000,wwan1@-
uplink wwan0 address=10.64.1.2 state=up paths_active=1 paths=1 send_errors=0
uplink wwan1 address=10.80.3.9 state=up paths_active=0 paths=1 send_errors=12
uplink wlan0 address=192.168.8.20 state=up paths_active=0 paths=1 send_errors=0
path wlan0 203.0.113.9:13116 state=probing source=relay local=192.168.8.20:40001 rtt_ms=310 \
loss_pct=25 last_rx_age_s=- tx_bytes=0 tx_packets=0 rx_bytes=0 rx_packets=0
path wwan0 198.51.100.7:40002 state=active source=map local=10.64.1.2:40001 rtt_ms=48.25 \
loss_pct=0.4 last_rx_age_s=0.3 tx_bytes=123456789 tx_packets=98765 rx_bytes=2345678 \
rx_packets=4321
path wwan1 198.51.100.7:40002 state=dead source=learned local=10.80.3.9:40001 rtt_ms=- \
loss_pct=- last_rx_age_s=17 tx_bytes=1000 tx_packets=10 rx_bytes=0 rx_packets=0
tunnel wireguard id=7 gate=loopback:127.0.0.1:59401 k=2 n=4 effective_n=4 \
spread=survive_uplink_loss protected=yes datagrams_in=1000 datagrams_out=990 bytes_in=1400000 \
bytes_out=1386000 blocks_rebuilt=42 datagrams_lost=3 drops=no_application:2,send_deadline:5 \
protection="protected against one uplink loss"
"""


def test_plain_text_is_one_stable_line_per_record() -> None:
    assert render_plain(with_redundancy(PROTECTED)) == PLAIN


def test_plain_text_without_redundancy_or_map_prints_dashes() -> None:
    snapshot = with_redundancy(None)
    snapshot["map"] = None
    out = render_plain(snapshot)
    assert "None" not in out and "\nmap " not in out
    (tunnel,) = [line for line in out.splitlines() if line.startswith("tunnel ")]
    assert " k=- n=- effective_n=- spread=- protected=- " in tunnel
    assert tunnel.endswith(" protection=-")


def test_piped_status_is_plain_text(sockdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sockdir, "warp.sock")
    snapshot = with_redundancy(PROTECTED)
    with serve(path, lambda: snapshot):
        assert status_main(["--socket", path]) == 0  # pytest's stdout is not a terminal
        assert capsys.readouterr().out == PLAIN
        console = terminal_console()
        assert run_status(args(socket=path, plain=True), console=console) == 0
    assert console.file.getvalue() == PLAIN  # type: ignore[attr-defined]


def test_watch_plain_prints_a_block_per_refresh() -> None:
    console = recording_console()
    snapshot = with_redundancy(PROTECTED)
    code = watch_status(
        lambda: snapshot, console, plain=True, max_refreshes=2, sleep=lambda _: None
    )
    assert code == 0
    assert console.file.getvalue() == PLAIN + "\n" + PLAIN + "\n"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# fleets: several far gates, grouped by far gate

TRUCK1_KEY = "T1" + "A" * 50
TRUCK2_KEY = "T2" + "B" * 50
TRUCK3_KEY = "T3" + "C" * 50


def fleet_path(far_gate: str, uplink: str, remote: str, state: str, **kw: Any) -> dict[str, Any]:
    path: dict[str, Any] = {
        "uplink": uplink,
        "local_address": f"10.0.0.{1 if uplink == 'eth0' else 2}:40001",
        "remote_address": remote,
        "source": "map",
        "state": state,
        "rtt_ms": None if state == "dead" else 20.0,
        "loss_pct": None if state == "dead" else 0.0,
        "last_rx_age_s": 0.5,
        "tx_bytes": 100,
        "tx_packets": 1,
        "rx_bytes": 200,
        "rx_packets": 2,
        "far_gate": far_gate,
    }
    path.update(kw)
    return path


def fleet_tunnel(name: str, tunnel_id: int, far_gate: str, lost: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "tunnel_id": tunnel_id,
        "gate": {"kind": "loopback", "address": f"127.0.0.1:{59400 + tunnel_id}"},
        "datagrams_in": 10,
        "datagrams_out": 9,
        "bytes_in": 1000,
        "bytes_out": 900,
        "blocks_rebuilt": 0,
        "datagrams_lost": lost,
        "drops": {},
        "far_gate": far_gate,
    }


def session(state: str, age: float | None, rekeys: int = 0) -> dict[str, Any]:
    return {
        "handshake_state": state,
        "last_handshake_age_s": age,
        "rekeys": rekeys,
        "handshakes": rekeys + (state == "established"),
    }


RELAY = "203.0.113.9:13116"
FLEET: dict[str, Any] = {
    "version": "0.2.0",
    "uptime_s": 100.0,
    "public_key": "OP" + "Z" * 50,
    # in the gateway's order (config order), not by name
    "paths": [
        fleet_path("truck2", "eth0", RELAY, "active", source="relay"),
        fleet_path("truck1", "eth1", "198.51.100.1:5000", "active"),
        fleet_path("truck1", "eth0", "198.51.100.1:5000", "active"),
        fleet_path("truck2", "eth0", "198.51.100.2:5000", "dead", last_rx_age_s=30.0),
        fleet_path("truck1", "eth0", RELAY, "probing", source="relay"),
    ],
    "tunnels": [
        fleet_tunnel("video2", 2, "truck2", lost=7),
        # a tun gate shared by truck1 and truck2: listed once per far gate
        fleet_tunnel("lan", 9, "truck1"),
        fleet_tunnel("lan", 9, "truck2"),
        fleet_tunnel("video1", 1, "truck1"),
    ],
    "map": {
        "address": RELAY,
        "registered": True,
        "reflexive": {"eth0": "192.0.2.1:40001", "eth1": "192.0.2.2:40001"},
        "last_registration_age_s": 2.0,
    },
    "session": {"far_gate": TRUCK1_KEY, **session("established", 5.0, 1)},
    "far_gates": {
        "truck2": {
            "public_key": TRUCK2_KEY,
            "kind": "warp",
            "session": session("established", 12.0),
            "relay": True,
        },
        "truck1": {
            "public_key": TRUCK1_KEY,
            "kind": "warp",
            "session": session("established", 5.0, 1),
            "relay": False,
        },
        "truck3": {
            "public_key": TRUCK3_KEY,
            "kind": "wireguard",
            "session": session("initiating", None),
            "relay": False,
        },
    },
    "uplinks": [
        {"name": "eth0", "local_address": "10.0.0.1:40001", "state": "up", "send_errors": 0},
        {"name": "eth1", "local_address": "10.0.0.2:40001", "state": "up", "send_errors": 0},
    ],
}

FLEET_PLAIN = f"""\
warp 0.2.0 uptime_s=100 public_key={"OP" + "Z" * 50}
far_gate {TRUCK1_KEY} handshake=established last_handshake_age_s=5 rekeys=1 name=truck1 \
kind=warp relay=no paths_active=2 paths=3
far_gate {TRUCK2_KEY} handshake=established last_handshake_age_s=12 rekeys=0 name=truck2 \
kind=warp relay=yes paths_active=1 paths=2
far_gate {TRUCK3_KEY} handshake=initiating last_handshake_age_s=- rekeys=0 name=truck3 \
kind=wireguard relay=no paths_active=0 paths=0
map 203.0.113.9:13116 registered=yes last_registration_age_s=2 \
reflexive=eth0@192.0.2.1:40001,eth1@192.0.2.2:40001
uplink eth0 address=10.0.0.1:40001 state=up paths_active=2 paths=4 send_errors=0
uplink eth1 address=10.0.0.2:40001 state=up paths_active=1 paths=1 send_errors=0
path eth0 198.51.100.1:5000 state=active source=map local=10.0.0.1:40001 rtt_ms=20 loss_pct=0 \
last_rx_age_s=0.5 tx_bytes=100 tx_packets=1 rx_bytes=200 rx_packets=2 far_gate=truck1
path eth0 203.0.113.9:13116 state=probing source=relay local=10.0.0.1:40001 rtt_ms=20 \
loss_pct=0 last_rx_age_s=0.5 tx_bytes=100 tx_packets=1 rx_bytes=200 rx_packets=2 far_gate=truck1
path eth1 198.51.100.1:5000 state=active source=map local=10.0.0.2:40001 rtt_ms=20 loss_pct=0 \
last_rx_age_s=0.5 tx_bytes=100 tx_packets=1 rx_bytes=200 rx_packets=2 far_gate=truck1
path eth0 198.51.100.2:5000 state=dead source=map local=10.0.0.1:40001 rtt_ms=- loss_pct=- \
last_rx_age_s=30 tx_bytes=100 tx_packets=1 rx_bytes=200 rx_packets=2 far_gate=truck2
path eth0 203.0.113.9:13116 state=active source=relay local=10.0.0.1:40001 rtt_ms=20 \
loss_pct=0 last_rx_age_s=0.5 tx_bytes=100 tx_packets=1 rx_bytes=200 rx_packets=2 far_gate=truck2
tunnel lan id=9 gate=loopback:127.0.0.1:59409 k=- n=- effective_n=- spread=- protected=- \
datagrams_in=10 datagrams_out=9 bytes_in=1000 bytes_out=900 blocks_rebuilt=0 datagrams_lost=0 \
drops=- protection=- far_gate=truck1
tunnel video1 id=1 gate=loopback:127.0.0.1:59401 k=- n=- effective_n=- spread=- protected=- \
datagrams_in=10 datagrams_out=9 bytes_in=1000 bytes_out=900 blocks_rebuilt=0 datagrams_lost=0 \
drops=- protection=- far_gate=truck1
tunnel video2 id=2 gate=loopback:127.0.0.1:59402 k=- n=- effective_n=- spread=- protected=- \
datagrams_in=10 datagrams_out=9 bytes_in=1000 bytes_out=900 blocks_rebuilt=0 datagrams_lost=7 \
drops=- protection=- far_gate=truck2
tunnel lan id=9 gate=loopback:127.0.0.1:59409 k=- n=- effective_n=- spread=- protected=- \
datagrams_in=10 datagrams_out=9 bytes_in=1000 bytes_out=900 blocks_rebuilt=0 datagrams_lost=0 \
drops=- protection=- far_gate=truck2
"""


def test_plain_text_of_a_fleet_has_a_line_per_far_gate_and_names_it_on_every_record() -> None:
    assert render_plain(FLEET) == FLEET_PLAIN
    # the old single-far-gate form is unchanged (no far_gates in the snapshot)
    assert render_plain(with_redundancy(PROTECTED)) == PLAIN


def test_plain_text_of_a_one_far_gate_fleet_snapshot_keeps_the_old_fields_in_place() -> None:
    snapshot = with_redundancy(PROTECTED)
    key = snapshot["session"]["far_gate"]
    snapshot["far_gates"] = {
        "default": {
            "public_key": key,
            "kind": "warp",
            "session": session("established", 61.0, 3),
            "relay": False,
        }
    }
    for row in (*snapshot["paths"], *snapshot["tunnels"]):
        row["far_gate"] = "default"
    old, new = PLAIN.splitlines(), render_plain(snapshot).splitlines()
    assert len(new) == len(old)
    for before, after in zip(old, new, strict=True):
        # same records in the same order, each old line a prefix: fields are only appended
        assert after.startswith(before), (before, after)
    assert new[1].endswith(" name=default kind=warp relay=no paths_active=1 paths=3")
    assert all(line.endswith(" far_gate=default") for line in new if line.startswith("path "))


def fleet_screen(snapshot: Mapping[str, Any], width: int) -> str:
    console = terminal_console(width)
    console.print(render_status(snapshot))
    return console.export_text()


def test_rich_status_groups_paths_and_tunnels_by_far_gate() -> None:
    text = fleet_screen(FLEET, 200)
    lines = text.splitlines()
    # the summary: a row per far gate, by name, with its short key, handshake and paths up
    (t1,) = [line for line in lines if line.split()[:1] == ["truck1"]]
    assert "T1AAAAAAAAAA…" in t1 and "established" in t1 and "2/3" in t1 and "direct" in t1
    (t2,) = [line for line in lines if line.split()[:1] == ["truck2"]]
    assert "12s ago" in t2 and "1/2" in t2 and "relay" in t2 and t2.split()[-1] == "7"
    (t3,) = [line for line in lines if line.split()[:1] == ["truck3"]]
    assert "initiating" in t3 and "0/0" in t3 and "never" in t3 and "wireguard" in t3

    def section(label: str) -> list[str]:
        start = lines.index(f"far gate {label}")
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("far gate ")),
            len(lines),
        )
        return lines[start:end]

    truck1 = section("truck1 (T1AAAAAAAAAA…)")
    assert sum("198.51.100.1:5000" in line for line in truck1) == 2
    assert any(RELAY in line and "probing" in line for line in truck1)
    assert any(line.split()[:1] == ["video1"] for line in truck1)
    assert not any("198.51.100.2" in line or "video2" in line for line in truck1)
    truck2 = section("truck2 (T2BBBBBBBBBB…)")
    assert any("198.51.100.2:5000" in line and "dead" in line for line in truck2)
    assert any(RELAY in line and "active" in line for line in truck2)
    (video2,) = [line for line in truck2 if line.split()[:1] == ["video2"]]
    assert video2.split()[-2] == "7"  # lost, then drops "—"
    assert "no paths yet" in " ".join(section("truck3 (T3CCCCCCCCCC…)"))
    # a tun gate shared by two far gates: its tunnel in each one's section
    for shared_by in (truck1, truck2):
        assert sum(line.split()[:1] == ["lan"] for line in shared_by) == 1
    # the sections come by name
    order = [line for line in lines if line.startswith("far gate ")]
    assert [o.split()[2] for o in order] == ["truck1", "truck2", "truck3"]


def test_rich_fleet_status_fits_80_columns() -> None:
    text = fleet_screen(FLEET, 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    for whole in ("truck1", "truck2", "truck3", "198.51.100.1:5000", "initiating", "video2"):
        assert whole in text, whole


def test_one_far_gate_fleet_snapshot_keeps_the_single_layout_with_its_name() -> None:
    snapshot = with_redundancy(PROTECTED)
    key = snapshot.pop("session")["far_gate"]
    snapshot["far_gates"] = {
        "truck1": {"public_key": key, "kind": "warp", "session": session("established", 61.0)}
    }
    text = fleet_screen(snapshot, 200)
    assert "Far gates" not in text and "far gate " not in text
    (row,) = [line for line in text.splitlines() if line.split()[:1] == ["truck1"]]
    assert key in row and "established" in row and "1m01s ago" in row


def test_fleet_rendering_tolerates_sparse_and_odd_far_gates() -> None:
    sparse = {
        "version": "9.9",
        "far_gates": {"a": {}, "b": "not an object", "c": {"session": None}},
        "paths": [{"uplink": "eth0", "state": "active"}, {"far_gate": "zz", "state": "dead"}],
        "tunnels": [{"name": "t", "far_gate": "nope"}],
    }
    text = fleet_screen(sparse, 100)
    assert "far gate a" in text and "far gate zz" in text and "far gate nope" in text
    out = render_plain(sparse)
    assert "None" not in out
    assert [line.split()[0] for line in out.splitlines()].count("far_gate") == 3


def test_status_shows_each_uplinks_nat_mapping_and_why_a_far_gate_is_relayed() -> None:
    snap = json.loads(json.dumps(SNAPSHOT))
    snap["map"]["nat_mapping"] = {"wwan0": "endpoint-independent", "wwan1": "address-dependent"}
    snap["far_gates"] = {
        "hq": {
            "public_key": SNAPSHOT["session"]["far_gate"],
            "kind": "warp",
            "session": SNAPSHOT["session"],
            "relay": True,
            "relay_reason": "both_symmetric",
        },
        "depot": {
            "public_key": "C" * 52,
            "kind": "warp",
            "session": SNAPSHOT["session"],
            "relay": False,
            "relay_reason": None,
        },
    }
    wide = screen(snap, 200)
    assert "NAT mapping" in wide
    (wwan0,) = [line for line in wide.splitlines() if "100.64.9.1:61000" in line]
    assert "endpoint-independent" in wwan0
    assert "address-dependent" in wide and "relay (both_symmetric)" in wide
    plain = render_plain(snap)
    assert "nat_mapping=wwan0@endpoint-independent,wwan1@address-dependent" in plain
    assert "relay_reason=both_symmetric" in plain
