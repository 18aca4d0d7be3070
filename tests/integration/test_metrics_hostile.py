"""The metrics endpoint of a gateway against slow clients, in a process of its own (the gateway's
wiring: `start_gateway_metrics` on an asyncio loop, `refresh_forever` in a task)."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SERVER = """
import asyncio
from warp.metrics import start_gateway_metrics

SNAPSHOT = {
    "version": "0.1.0",
    "uptime_s": 1.0,
    "paths": [
        {"uplink": f"eth{i}", "remote_address": f"198.51.100.{i}:4000", "state": "active"}
        for i in range(8)
    ],
}

async def main() -> None:
    exporter = start_gateway_metrics(("127.0.0.1", 0), lambda: SNAPSHOT, interval=0.2)
    print(exporter.server.port, flush=True)
    await exporter.refresh_forever()

asyncio.run(main())
"""


def proc_status(pid: int, field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:  # aborted (RST): closed all the same
        return True


def test_300_slow_clients_leave_threads_and_rss_flat_and_metrics_answers() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )
    slow: list[socket.socket] = []
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        assert "warp_up 1.0" in scrape(port)
        threads_before = proc_status(process.pid, "Threads")
        rss_before = proc_status(process.pid, "VmRSS")
        for _ in range(300):  # a request head that never ends
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
            slow.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        text = scrape(port)
        answered_in = time.monotonic() - t0
        threads_after = proc_status(process.pid, "Threads")
        rss_after = proc_status(process.pid, "VmRSS")
        # most of them were closed to make room (the cap), the rest wait for the head timeout
        readable, _, _ = select.select(slow, [], [], 0.5)
        closed = sum(1 for s in readable if closed_by_peer(s))
        print(
            f"\nmetrics: threads {threads_before} -> {threads_after}, RSS {rss_before} -> "
            f"{rss_after} KiB, /metrics answered in {1000 * answered_in:.0f} ms with 300 slow "
            f"clients ({closed} of them closed already)"
        )
        assert 'remote="198.51.100.7:4000"' in text  # the whole snapshot, not an error
        assert threads_after == threads_before
        assert rss_after - rss_before < 8 * 1024
        assert answered_in < 1.0
        assert closed >= 250
    finally:
        for s in slow:
            s.close()
        process.kill()
        process.wait(5)
