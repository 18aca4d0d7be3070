"""The warp-map command as a process: start-up log line with the public key, SIGTERM -> 0,
address in use -> 2 (one line, no traceback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from warp.keys import encode_key, generate_private_key, public_key_of
from warp_map_server.cli import EXIT_OK, EXIT_RUNTIME

ROOT = Path(__file__).resolve().parents[2]


def key_file(tmp_path: Path) -> tuple[Path, bytes]:
    private = generate_private_key()
    path = tmp_path / "map.key"
    path.write_text(encode_key(private) + "\n")
    path.chmod(0o600)  # as warp-keygen -o writes it (a readable key file gets a warning line)
    return path, private


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "warp_map_server.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_logs_its_public_key_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    path, private = key_file(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _spawn(["--private-key-file", str(path), "--bind", f"127.0.0.1:{port}"])
    assert proc.stderr is not None
    line = b""
    deadline = time.monotonic() + 15
    while b"map.listening" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_OK
    assert encode_key(public_key_of(private)).encode() in line
    assert f"127.0.0.1:{port}".encode() in line
    assert b"map.stopped" in err and b"Traceback" not in err


def test_address_in_use_is_a_runtime_failure(tmp_path: Path) -> None:
    path, _ = key_file(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = _spawn(["--private-key-file", str(path), "--bind", f"127.0.0.1:{port}"])
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == EXIT_RUNTIME
    assert b"cannot listen" in err and b"Traceback" not in err
    assert len(err.strip().splitlines()) == 1
