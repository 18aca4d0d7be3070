"""Live reload of a real `warp run` process on loopback (no root, no namespaces): three
gateways whose only uplink is ``lo``, reached by their static endpoints.

The operator streams 1 000 datagrams/s to truck1 through a Unix gate while ``warp reload``
adds a second far gate (truck2, with its own tunnel) and removes another tunnel: truck1's
stream loses nothing and no new handshake happens with it. Then a broken config is refused
(``warp reload -c`` exits 1 printing its TOML path, the gateway logs ``reload.refused``) and
the gateway keeps running the old one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.map_process import ROOT, free_udp_port
from tests.integration.test_run_lifecycle import Runs
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.status import StatusError, query_status

pytestmark = pytest.mark.timeout(120)

RATE = 1000
SECONDS = 4.0


class Site:
    def __init__(self, tmp: Path, name: str) -> None:
        self.tmp = tmp
        self.name = name
        self.key = generate_private_key()
        self.public = encode_key(public_key_of(self.key))
        self.port = free_udp_port()
        self.config = tmp / f"{name}.toml"
        self.socket = tmp / f"{name}.ctl"
        self.log = tmp / f"{name}.log"

    def gate(self, tunnel: str) -> Path:
        return self.tmp / f"{self.name}-{tunnel}.sock"

    def app(self, tunnel: str) -> Path:
        return self.tmp / f"{self.name}-{tunnel}-app.sock"

    def write(
        self, far_gates: str, tunnels: list[tuple[str, str | None]], udp: int | None = None
    ) -> None:
        """``udp``: the first tunnel's gate is a loopback one delivering to that port (a
        receiver whose queue is not net.unix.max_dgram_qlen = 10 datagrams deep)."""
        text = (
            f'private_key = "{encode_key(self.key)}"\nlisten_port = {self.port}\n'
            '[interfaces]\ninclusion_patterns = ["^lo$"]\nexclusion_patterns = []\n'
            'bind_to_device = false\nholepunch_keep_alive_interval = "200ms"\n'
            f'[control]\nsocket = "{self.socket}"\n' + far_gates
        )
        for tunnel, far in tunnels:
            text += f"[tunnels.{tunnel}]\n" + (f'far_gate = "{far}"\n' if far else "")
            if udp is not None and tunnel == tunnels[0][0]:
                text += (
                    f'gate = {{ type = "loopback", application_to_gate = {free_udp_port()}, '
                    f"gate_to_application = {udp} }}\n"
                )
            else:
                text += (
                    f'gate = {{ type = "unix", path = "{self.gate(tunnel)}", '
                    f'application_path = "{self.app(tunnel)}" }}\n'
                )
        self.config.write_text(text)
        self.config.chmod(0o600)

    def far(self, name: str | None = None) -> str:
        table = f"far_gates.{name}" if name else "far_gate"
        return f'[{table}]\npublic_key = "{self.public}"\nendpoints = ["127.0.0.1:{self.port}"]\n'

    def status(self) -> dict[str, Any]:
        return query_status(str(self.socket))

    def session(self, far: str) -> dict[str, Any]:
        session: dict[str, Any] = self.status()["far_gates"][far]["session"]
        return session


def udp_receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    return sock


def bound(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def collect(sock: socket.socket, into: list[bytes], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            into.append(sock.recv(65536))
        except TimeoutError:
            continue


def wait_until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (KeyError, OSError, ValueError, StatusError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def warp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warp.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_reload_adds_a_far_gate_and_removes_a_tunnel_while_another_streams(
    tmp_path: Path,
) -> None:
    op, truck1, truck2 = Site(tmp_path, "op"), Site(tmp_path, "truck1"), Site(tmp_path, "truck2")
    op.write(truck1.far("truck1"), [("video", "truck1"), ("logs", "truck1")])
    video_receiver = udp_receiver()
    truck1.write(op.far(), [("video", None), ("logs", None)], udp=video_receiver.getsockname()[1])
    truck2.write(op.far(), [("cam", None)])
    runs = Runs(tmp_path)
    received: list[bytes] = []
    cam: list[bytes] = []
    stop = threading.Event()
    sockets = [video_receiver, bound(truck2.app("cam")), bound(op.app("video"))]
    receivers = [
        threading.Thread(target=collect, args=(sockets[0], received, stop), daemon=True),
        threading.Thread(target=collect, args=(sockets[1], cam, stop), daemon=True),
    ]
    try:
        for site in (truck1, truck2, op):
            runs.start(site.config, log=site.log.name)
        for thread in receivers:
            thread.start()
        wait_until(lambda: op.session("truck1")["handshake_state"] == "established", "handshake")
        before = (op.session("truck1")["handshakes"], truck1.session("default")["handshakes"])

        def reload_then_refuse() -> None:
            # (in a thread: the stream keeps its 1 000/s meanwhile)
            time.sleep(1.0)
            op.write(
                truck1.far("truck1") + truck2.far("truck2"),
                [("video", "truck1"), ("cam", "truck2")],
            )
            outcome["reloaded"] = warp("reload", "--socket", str(op.socket))
            time.sleep(1.0)
            good = op.config.read_text()
            op.config.write_text(good + "[tunnels.cam.transport]\nmtu = 10\n")
            outcome["refused"] = warp("reload", "-c", str(op.config))
            op.config.write_text(good)

        outcome: dict[str, subprocess.CompletedProcess[str]] = {}
        operator = threading.Thread(target=reload_then_refuse, daemon=True)
        sender = sockets[2]
        sent: list[bytes] = []
        start = time.monotonic()
        operator.start()
        for seq in range(int(RATE * SECONDS)):
            delay = start + seq / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            datagram = b"video %06d " % seq + bytes(200)
            sender.sendto(datagram, str(op.gate("video")))
            sent.append(datagram)
        operator.join(20)
        time.sleep(1.0)

        reloaded, refused = outcome["reloaded"], outcome["refused"]
        assert reloaded.returncode == 0, reloaded
        assert "far gates added truck2" in reloaded.stdout
        assert "tunnels removed logs" in reloaded.stdout
        assert refused.returncode == 1, refused
        assert "tunnels.cam.transport.mtu:" in refused.stderr
        log = op.log.read_text()
        assert "reload.applied far_gates_added=truck2" in log
        assert "reload.refused path=tunnels.cam.transport.mtu" in log

        # the untouched tunnel: every datagram, exactly once; no new handshake
        missing = sorted(set(sent) - set(received))
        rows = [
            {k: t[k] for k in ("name", "datagrams_in", "datagrams_out", "datagrams_lost", "drops")}
            for site in (op, truck1)
            for t in site.status()["tunnels"]
            if t["name"] == "video"
        ]
        assert not missing, (len(missing), [m[:12] for m in missing[:10]], rows)
        assert len(received) == len(sent) == RATE * SECONDS
        assert sorted(received) == sorted(sent)
        after = (op.session("truck1")["handshakes"], truck1.session("default")["handshakes"])
        assert after == before
        # the added far gate carries its tunnel; the removed tunnel's gate is gone
        wait_until(lambda: op.session("truck2")["handshake_state"] == "established", "truck2")
        cam_sender = bound(op.app("cam"))
        try:
            for i in range(20):
                cam_sender.sendto(b"cam %d" % i, str(op.gate("cam")))
                time.sleep(0.01)
            wait_until(lambda: len(cam) == 20, "cam datagrams at truck2", timeout=5)
        finally:
            cam_sender.close()
        assert not op.gate("logs").exists()
        assert "logs" not in {t["name"] for t in op.status()["tunnels"]}
        assert runs.procs[2].poll() is None  # still running after the refused reload
    finally:
        stop.set()
        for thread in receivers:
            if thread.is_alive():
                thread.join(2)
        for sock in sockets:
            sock.close()
        runs.close()
