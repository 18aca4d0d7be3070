"""`warp run` start and stop on loopback: a real warp-map process and `warp run` processes whose
only uplink is ``lo`` (no root, no namespaces).

* A second instance with the same key, or with the same control socket, exits 1 with one line
  and sends nothing: no handshake with the map, no registration, no deregistration.
* After ``kill -9`` the leftover socket and lock files do not block a restart.
* SIGHUP reloads the config (a broken one is refused and logged) and does not stop it;
  SIGTERM deregisters at the map, removes the control socket and exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.map_process import ROOT, MapProcess
from warp.keys import encode_key, generate_private_key, public_key_of

pytestmark = pytest.mark.timeout(90)


def short(private_key: bytes) -> str:
    """The key as warp-map logs it."""
    return encode_key(public_key_of(private_key))[:12]


def gateway_config(
    tmp: Path, name: str, key: bytes, warp_map: MapProcess, socket: Path, gate: str = ""
) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f'private_key = "{encode_key(key)}"\n'
        "[interfaces]\n"
        'inclusion_patterns = ["^lo$"]\n'
        "exclusion_patterns = []\n"
        "bind_to_device = false\n"
        "[warp_map]\n"
        f'address = "127.0.0.1:{warp_map.port}"\n'
        f'public_key = "{encode_key(warp_map.public_key)}"\n'
        "[far_gate]\n"
        f'public_key = "{encode_key(public_key_of(generate_private_key()))}"\n'
        "[tunnels.app.gate]\n"
        f'path = "{tmp / ((gate or name) + "-gate.sock")}"\n'
        f'[control]\nsocket = "{socket}"\n'
    )
    path.chmod(0o600)
    return path


class Runs:
    """`warp run` processes of one test (all stopped at the end)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), WARP_RUNTIME_DIR=str(tmp / "run"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config: Path, *more: str, log: str) -> subprocess.Popen[bytes]:
        with (self.tmp / log).open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "warp.cli", "run", str(config), *more],
                stdout=out,
                stderr=out,
                env=self.env,
                cwd=ROOT,
            )
        self.procs.append(proc)
        return proc

    def run(self, config: Path, *more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "warp.cli", "run", str(config), *more],
            capture_output=True,
            text=True,
            timeout=30,
            env=self.env,
            cwd=ROOT,
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    the_runs = Runs(tmp_path)
    try:
        yield the_runs
    finally:
        the_runs.close()


@pytest.fixture
def warp_map(tmp_path: Path) -> Iterator[MapProcess]:
    process = MapProcess(tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.kill()


def wait_for(predicate: str, text: Callable[[], str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while predicate not in text():
        assert time.monotonic() < deadline, f"no {predicate!r} in:\n{text()}"
        time.sleep(0.02)


def test_second_instance_is_refused_before_it_sends_anything(
    tmp_path: Path, runs: Runs, warp_map: MapProcess
) -> None:
    key_a = generate_private_key()
    socket_a = tmp_path / "a.sock"
    config_a = gateway_config(tmp_path, "a", key_a, warp_map, socket_a)
    first = runs.start(config_a, log="a.log")
    wait_for(f"map.registered client={short(key_a)}", warp_map.log_since_start)
    handshakes = warp_map.stats()["handshakes_completed"]

    # the same config with another control socket: a double start, a typo'd --socket
    same_key = runs.run(config_a, "--socket", str(tmp_path / "typo.sock"))
    assert same_key.returncode == 1, same_key.stderr
    assert same_key.stderr.count("\n") == 1, same_key.stderr
    assert same_key.stderr.startswith("warp: error: another warp is running with this key ")
    assert f"pid {first.pid}" in same_key.stderr

    # another key, the same control socket
    key_c = generate_private_key()
    config_c = gateway_config(tmp_path, "c", key_c, warp_map, socket_a)
    same_socket = runs.run(config_c)
    assert same_socket.returncode == 1, same_socket.stderr
    assert same_socket.stderr.count("\n") == 1, same_socket.stderr
    assert same_socket.stderr.startswith(f"warp: error: control socket {socket_a} is in use ")

    # another key and control socket, a's gate: the gate is claimed before the network
    key_d = generate_private_key()
    config_d = gateway_config(tmp_path, "d", key_d, warp_map, tmp_path / "d.sock", gate="a")
    same_gate = runs.run(config_d)
    assert same_gate.returncode == 2, same_gate.stderr
    assert same_gate.stderr.splitlines()[-1].endswith(
        "a-gate.sock is in use by another running program"
    )
    assert "uplink.added" not in same_gate.stderr  # (its log lines are on stderr too)

    # none sent anything: no handshake, no registration, no deregistration at the map
    assert warp_map.stats()["handshakes_completed"] == handshakes
    log = warp_map.log_since_start()
    assert "map.deregistered" not in log
    assert log.count(f"map.registered client={short(key_a)}") == 1
    assert short(key_c) not in log and short(key_d) not in log
    assert first.poll() is None and socket_a.exists()

    # kill -9: the stale control socket and lock files do not block the restart
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    assert socket_a.exists()
    restarted = runs.start(config_a, log="a-restarted.log")
    wait_for("gateway.started", (tmp_path / "a-restarted.log").read_text)
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(10) == 0
    assert not socket_a.exists()


def test_sighup_reloads_and_a_broken_config_is_refused_and_logged(
    tmp_path: Path, runs: Runs, warp_map: MapProcess
) -> None:
    """SIGHUP (`systemctl reload`, `kill -HUP`) re-reads the config instead of stopping; a
    broken file is refused with its TOML path and the gateway keeps running the old one."""
    key = generate_private_key()
    socket_path = tmp_path / "a.sock"
    config = gateway_config(tmp_path, "a", key, warp_map, socket_path)
    gateway = runs.start(config, log="a.log")
    wait_for(f"map.registered client={short(key)}", warp_map.log_since_start)
    log = (tmp_path / "a.log").read_text
    wait_for("gateway.started", log)

    gateway.send_signal(signal.SIGHUP)
    wait_for("reload.applied", log)
    good = config.read_text()
    config.write_text(good.replace("[far_gate]\n", '[far_gate]\nkind = "tcp"\n'))
    gateway.send_signal(signal.SIGHUP)
    wait_for("reload.refused problems=1", log)
    assert "reload.refused path=far_gate.kind" in log()
    time.sleep(0.3)
    assert gateway.poll() is None and socket_path.exists()
    assert "map.deregistered" not in warp_map.log_since_start()
    assert "gateway.stop_requested" not in log()

    gateway.send_signal(signal.SIGTERM)
    assert gateway.wait(10) == 0, log()
    assert not socket_path.exists()
    assert f"map.deregistered client={short(key)}" in warp_map.log_since_start()
    assert "gateway.stopped" in log()
    assert list((tmp_path / "run").iterdir()) == []  # the key lock file is gone too
