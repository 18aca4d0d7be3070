"""A real Valkey/Redis server for map-cluster tests: started by the test on a free loopback port
(or inside a lab namespace), no persistence, in a temp dir, and always stopped.

Under CI (``CI`` set) a server that cannot start fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

SERVER_NAMES = ("valkey-server", "redis-server")
CLIENT_NAMES = ("valkey-cli", "redis-cli")


def _find(names: Sequence[str]) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def unavailable(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"map cluster tests need a Valkey/Redis server: {reason}")
    pytest.skip(reason)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ValkeyServer:
    """``redis-server`` (or ``valkey-server``) on ``host:port``; ``prefix`` runs it elsewhere
    (e.g. ``["ip", "netns", "exec", "ns"]``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
        maxmemory: str | None = None,
    ) -> None:
        binary = _find(SERVER_NAMES)
        if binary is None:
            unavailable("neither valkey-server nor redis-server is installed")
        assert binary is not None
        self.binary = binary
        self.host = host
        self.port = port or free_tcp_port()
        self.prefix = list(prefix)
        self.workdir = workdir
        self.maxmemory = maxmemory
        self.log_path = workdir / f"valkey-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"valkey://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            *self.prefix,
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.maxmemory is not None:
            command += ["--maxmemory", self.maxmemory]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                error = self.proc.stderr.read().decode() if self.proc.stderr else ""
                unavailable(f"{self.binary} exited: {error}{self._log()}")
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.02)
        self.stop()
        unavailable(f"{self.binary} did not answer on port {self.port}: {self._log()}")

    def _log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def command(self, *args: str) -> str:
        """One command through RESP on a plain socket (the test's view, independent of the
        client library the map uses); returns the reply as text."""
        if self.prefix:
            cli = _find(CLIENT_NAMES)
            assert cli is not None, "redis-cli / valkey-cli"
            out = subprocess.run(
                [*self.prefix, cli, "-h", self.host, "-p", str(self.port), *args],
                capture_output=True,
                timeout=5,
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr.decode() or out.stdout.decode())
            return out.stdout.decode().strip()
        with socket.create_connection((self.host, self.port), timeout=2) as conn:
            request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
            conn.sendall(request.encode())
            reply = b""
            while not reply.endswith(b"\r\n") or _incomplete(reply):
                chunk = conn.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed")
                reply += chunk
        return _parse(reply)

    def dbsize(self) -> int:
        return int(self.command("DBSIZE"))

    def used_memory(self) -> int:
        info = self.command("INFO", "memory")
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError(f"no used_memory in {info!r}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def _incomplete(reply: bytes) -> bool:
    if reply.startswith(b"$"):
        header, _, rest = reply.partition(b"\r\n")
        size = int(header[1:])
        return size >= 0 and len(rest) < size + 2
    return False


def _parse(reply: bytes) -> str:
    kind, body = reply[:1], reply[1:]
    if kind in (b"+", b":"):
        return body.split(b"\r\n", 1)[0].decode()
    if kind == b"-":
        raise RuntimeError(body.decode().strip())
    if kind == b"$":
        header, _, rest = body.partition(b"\r\n")
        size = int(header)
        return "" if size < 0 else rest[:size].decode()
    raise RuntimeError(f"unexpected reply {reply[:40]!r}")
