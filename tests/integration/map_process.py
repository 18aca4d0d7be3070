"""A real warp-map process on loopback for integration tests (started by ``python -m``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from warp.keys import encode_key, generate_private_key, public_key_of

ROOT = Path(__file__).resolve().parents[2]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MapProcess:
    """``warp-map --config`` in a subprocess, its log in ``log_path``."""

    def __init__(self, tmp_path: Path, *, extra_config: str = "", port: int | None = None):
        self.private_key = generate_private_key()
        self.public_key = public_key_of(self.private_key)
        self.port = port or free_udp_port()
        self.address = ("127.0.0.1", self.port)
        self.config_path = tmp_path / "warp-map.toml"
        self.config_path.write_text(
            f'bind = "127.0.0.1:{self.port}"\n'
            f'private_key = "{encode_key(self.private_key)}"\n' + extra_config
        )
        self.log_path = tmp_path / "warp-map.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, timeout: float = 15.0) -> float:
        """Start and wait for ``map.listening``; return the monotonic time it was seen."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warp_map_server.cli", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=env,
            cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "map.listening" in self.log_since_start():
                return time.monotonic()
            if self.proc.poll() is not None:
                raise RuntimeError(f"warp-map exited: {self.log_since_start()}")
            time.sleep(0.01)
        raise TimeoutError(f"warp-map did not start: {self.log_since_start()}")

    def log_since_start(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))

    def stats(self, timeout: float = 5.0) -> dict[str, int]:
        """Ask for ``map.stats`` (SIGUSR1) and parse the line it logs."""
        before = self.log_since_start().count("map.stats")
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_since_start()
            if text.count("map.stats") > before:
                line = [ln for ln in text.splitlines() if "map.stats" in ln][-1]
                return {k: int(v) for k, v in re.findall(r"(\S+)=(-?\d+)(?=\s|$)", line)}
            time.sleep(0.01)
        raise TimeoutError("no map.stats line")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> int:
        """SIGTERM; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)
