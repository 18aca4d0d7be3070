"""`[metrics] listen`: a running gateway pair (loopback) scraped over HTTP shows the same paths
and tunnels as `snapshot()`; a taken port is a one-line error, exit 2."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_node import _payload, gateway_pair, tmp
from warp.config import HostPort, MetricsConfig
from warp.node import Gateway

__all__ = ["tmp"]  # the fixture


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def test_metrics_endpoint_matches_snapshot(tmp: Path) -> None:
    asyncio.run(_metrics_pair(tmp))


async def _metrics_pair(tmp_path: Path) -> None:
    port = _free_tcp_port()

    def enable(a: Gateway, _b: Gateway) -> None:
        a.config = a.config.model_copy(
            update={"metrics": MetricsConfig(listen=HostPort("127.0.0.1", port))}
        )

    async with gateway_pair(tmp_path, before_start=enable) as pair:
        await pair.connected()
        for i in range(20):
            pair.send("a", _payload("a", i))
            await asyncio.sleep(0.005)
        assert len(await pair.receive("b", 20)) == 20
        await asyncio.sleep(1.3)  # one refresh of the exporter's cache
        assert pair.a.metrics is not None and pair.a._metrics_task is not None
        snap = pair.a.snapshot()
        samples = await asyncio.to_thread(_scrape, port)
        paths = {(p["uplink"], p["remote_address"]) for p in snap["paths"]}
        scraped = {(lb["uplink"], lb["remote"]) for lb, _ in samples["warp_path_state"]}
        assert paths and scraped == paths
        tunnels = {t["name"] for t in snap["tunnels"]}
        assert {lb["tunnel"] for lb, _ in samples["warp_tunnel_info"]} == tunnels == {"t"}
        (handshakes,) = samples["warp_session_handshakes_total"]
        assert handshakes[1] == snap["session"]["handshakes"] >= 1
        task = pair.a._metrics_task
    assert task.done() and pair.a.metrics is None
    with socket.socket() as s:  # the port is free again (no listener; TIME_WAIT is fine)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_metrics_port_taken_is_one_line_error_exit_2(tmp: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp / "gw.toml"
        config.write_text(
            'private_key = "' + _key() + '"\n'
            "[interfaces]\n"
            'inclusion_patterns = ["^lo$"]\nexclusion_patterns = []\n'
            "[far_gate]\n"
            'public_key = "' + _key(public=True) + '"\n'
            'endpoints = ["127.0.0.1:9"]\n'
            f'[tunnels.t.gate]\npath = "{tmp / "g.sock"}"\n'
            f'[control]\nsocket = "{tmp / "c.sock"}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "warp.cli", "run", str(config)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("warp: error:")]
    assert len(errors) == 1 and str(port) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _key(public: bool = False) -> str:
    from warp.keys import encode_key, generate_private_key, public_key_of

    key = generate_private_key()
    return encode_key(public_key_of(key) if public else key)
