"""Fixtures for the interop tests: WARP's WireGuard core against Debian's ``wireguard-go``.

Each test gets its own two-namespace lab (:class:`~tests.interop.wglab.WgLab`), torn down
afterwards also when the test fails. A test that cannot run (not root, wireguard-go missing…)
is skipped with the reason, except under ``CI`` where it fails.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.interop.wglab import (
    HERE,
    PYTHON,
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    UNDERLAY6_A,
    UNDERLAY_A,
    WG_PORT,
    KeyPair,
    LabError,
    WgLab,
    WgPeer,
    WireguardGo,
    cleanup_stale,
    prerequisites_missing,
    stop_process,
)

DRIVER = HERE / "driver.py"
PINGER = HERE / "pinger.py"


def interop_unavailable(reason: str) -> NoReturn:
    """Skip (locally) or fail (under ``CI``) a test whose lab cannot be built."""
    if os.environ.get("CI"):
        pytest.fail(f"interop lab cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"interop lab cannot run: {reason}")


_capability: list[str | None] = []


def require_interop() -> None:
    """Once per session: check prerequisites and remove what crashed runs left behind."""
    if not _capability:
        reason = prerequisites_missing()
        if reason is None:
            try:
                cleanup_stale()
            except LabError as exc:
                reason = str(exc)
        _capability.append(reason)
    if _capability[0]:
        interop_unavailable(_capability[0])


@pytest.fixture
def wglab() -> Iterator[WgLab]:
    require_interop()
    try:
        lab = WgLab()
        lab.__enter__()
    except LabError as exc:
        interop_unavailable(str(exc))
    try:
        yield lab
    finally:
        for wg in lab.wireguard_gos:  # shown by pytest only when the test failed
            print(f"---- {wg.ifname} log (tail) ----\n{wg.log()[-4000:]}")
        lab.close()


@dataclass
class Pair:
    """Our keys and wireguard-go (in namespace B) configured with us as its peer."""

    lab: WgLab
    ours: KeyPair
    theirs: KeyPair
    psk: bytes
    far: WireguardGo
    underlay6: bool

    def driver_config(self, *, mtu: int = 1420) -> Path:
        bind_host = "::" if self.underlay6 else "0.0.0.0"
        far_host = "fd00:77::2" if self.underlay6 else "192.168.77.2"
        cfg = {
            "private_key": self.ours.private.hex(),
            "peer_public_key": self.theirs.public.hex(),
            "preshared_key": self.psk.hex(),
            "bind": [bind_host, WG_PORT],
            "endpoint": [far_host, WG_PORT],
            "addresses": [TUNNEL_A, TUNNEL6_A],
            "peer_allowed_ips": [f"{TUNNEL_B}/32", f"{TUNNEL6_B}/128"],
            "mtu": mtu,
        }
        path = self.lab.workdir / "driver.json"
        path.write_text(json.dumps(cfg))
        return path

    def tun_peer_config(self, *, name: str = "warp0", mtu: int = 1420) -> Path:
        """Config of tests/interop/tun_peer.py (TunGate + Device) for this pair."""
        cfg = {
            "private_key": self.ours.private.hex(),
            "peer_public_key": self.theirs.public.hex(),
            "preshared_key": self.psk.hex(),
            "bind": ["0.0.0.0", WG_PORT],
            "endpoint": ["192.168.77.2", WG_PORT],
            "tun": {
                "name": name,
                "addresses": [f"{TUNNEL_A}/24", f"{TUNNEL6_A}/64"],
                "mtu": mtu,
                "allowed_ips": [f"{TUNNEL_B}/32", f"{TUNNEL6_B}/128"],
            },
        }
        path = self.lab.workdir / "tun_peer.json"
        path.write_text(json.dumps(cfg))
        return path

    def log_count(self, text: str) -> int:
        return self.far.log().count(text)


def start_pair(lab: WgLab, *, far_knows_endpoint: bool, underlay6: bool = False) -> Pair:
    """wireguard-go in B with our public key as its peer (and our endpoint if asked: then it
    can initiate; otherwise it learns our endpoint from our first packet, i.e. roaming)."""
    ours, theirs = KeyPair.generate(), KeyPair.generate()
    psk = os.urandom(32)
    endpoint = None
    if far_knows_endpoint:
        endpoint = f"[{UNDERLAY6_A}]:{WG_PORT}" if underlay6 else f"{UNDERLAY_A}:{WG_PORT}"
    far = lab.wireguard_go(
        "b",
        keys=theirs,
        peers=[
            WgPeer(
                ours.public,
                allowed_ips=[f"{TUNNEL_A}/32", f"{TUNNEL6_A}/128"],
                endpoint=endpoint,
                preshared_key=psk,
            )
        ],
        addresses=[f"{TUNNEL_B}/24", f"{TUNNEL6_B}/64"],
    )
    return Pair(lab, ours, theirs, psk, far, underlay6)


def parse_last_json(stdout: str, what: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise AssertionError(f"{what} printed no JSON result: {stdout[-2000:]!r}")


def run_driver(pair: Pair, args: Sequence[str], *, timeout: float = 60.0) -> dict[str, Any]:
    """Run the driver to completion in namespace A; its JSON result."""
    proc = pair.lab.exec(
        "a", [PYTHON, str(DRIVER), str(pair.driver_config()), *args], timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"driver exit {proc.returncode}: {proc.stderr[-3000:]}"
    return parse_last_json(proc.stdout, "driver")


class ReadyProcess:
    """A background process in a lab namespace that prints ``READY`` once it serves, and one
    JSON object when it stops on SIGTERM."""

    def __init__(
        self, lab: WgLab, side: str, argv: Sequence[str], *, ready_timeout: float = 15.0
    ) -> None:
        self.proc = lab.spawn(side, argv)
        assert self.proc.stdout is not None
        end = time.monotonic() + ready_timeout
        line = b""
        while time.monotonic() < end:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if line.strip() != b"READY":
            stop_process(self.proc)
            err = self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"{argv[1:3]} did not start: {line!r} {err[-3000:]!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> dict[str, Any]:
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise AssertionError("process did not stop on SIGTERM") from None
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}: {err[-3000:]!r}"
        return parse_last_json(out.decode(), "process")


class ServingDriver(ReadyProcess):
    """The driver in ``serve`` mode, running in the background in namespace A."""

    def __init__(self, pair: Pair, args: Sequence[str]) -> None:
        super().__init__(
            pair.lab, "a", [PYTHON, str(DRIVER), str(pair.driver_config()), "serve", *args]
        )


def run_pinger(
    lab: WgLab, dst: str, args: Sequence[str], *, timeout: float = 60.0
) -> dict[str, Any]:
    """Ping ``dst`` from namespace B (raw sockets, through wireguard-go); its JSON result."""
    proc = lab.exec("b", [PYTHON, str(PINGER), dst, *args], timeout=timeout, check=False)
    assert proc.returncode == 0, f"pinger exit {proc.returncode}: {proc.stderr[-3000:]}"
    return parse_last_json(proc.stdout, "pinger")
