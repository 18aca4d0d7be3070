"""An embedded gateway (`warp.open`) in this test's own event loop talks to `warp run`.

The `net` fixture of test_gateway.py: a map in the public namespace, sites a and b behind cone
NAT with two uplinks each. Site b runs `warp run` with a loopback gate and tests/lab/gw_app.py
as its application. Site a is this test process: its main thread enters a's namespace (setns)
and runs the embedded gateway in the loop of `asyncio.run`, with no gate socket.

Both of a's uplinks are shaped to 2 Mbit/s upstream (tbf on ``upN`` with a queue longer than
the uplink socket's buffer, so the socket fills instead of tbf dropping: what a slow modem does).
a sends 10 000 datagrams as fast as `send` lets it while b's application sends 10 000 at
1 000/s: each arrives exactly once, byte-exact, `send` spent seconds waiting (back-pressure)
and nothing was dropped anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from typing import Any

import warp
from tests.lab.gw_app import HEADER, filler, payload
from tests.lab.netlab import Site
from tests.lab.test_gateway import Net, app_args, app_result, loopback_gate, net
from warp.gate.memory import MemoryGate

__all__ = ["net"]  # the fixture

COUNT = 10_000
SIZE = 100
RATE_KBIT = 2000
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread in network namespace ``ns`` (sockets opened meanwhile stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(own)


def shape_upstream(site: Site, kbit: int) -> None:
    """tbf at ``kbit`` on every uplink's host side, its queue (4 MB) longer than the uplink
    socket's send buffer: the socket fills up first and the gateway sees it unwritable."""
    for up in site.uplinks:
        site.lab.run(
            site.host_ns,
            ["tc", "qdisc", "replace", "dev", up.name, "root", "tbf", "rate", f"{kbit}kbit",
             "burst", "4kb", "limit", "4mb"],
        )  # fmt: skip


async def embedded_side(net: Net) -> dict[str, Any]:
    config = net.lab.workdir / "a.toml"
    async with warp.open(config) as gw:
        deadline = time.monotonic() + 15
        while sum(p["state"] == "active" for p in gw.status()["paths"]) < 4:
            assert time.monotonic() < deadline, gw.status()["paths"]
            await asyncio.sleep(0.05)
        shape_upstream(net.a, RATE_KBIT)
        tunnel = gw.tunnel("app")
        start_at = time.time() + 1.0
        peer = net.app(
            "b",
            app_args(2, COUNT, 1000, COUNT, "--start-at", f"{start_at:.3f}", "--sizes",
                     str(SIZE), "--grace", "60"),
            lifetime_s=90,
        )  # fmt: skip
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def send_all() -> float:
            waited = 0.0
            for seq in range(COUNT):
                began = time.monotonic()
                await tunnel.send(payload(1, seq, SIZE, time.time()))
                waited += time.monotonic() - began
            return waited

        async def receive_all(tunnel: MemoryGate) -> tuple[int, int, int]:
            seen: set[int] = set()
            duplicates = corrupt = 0
            while len(seen) < COUNT:
                data = await asyncio.wait_for(tunnel.recv(), 30)
                seq, tag, _ = HEADER.unpack_from(data)
                if tag != 2 or data[HEADER.size :] != filler(tag, seq, len(data) - HEADER.size):
                    corrupt += 1
                elif seq in seen:
                    duplicates += 1
                else:
                    seen.add(seq)
            return len(seen), duplicates, corrupt

        began = time.monotonic()
        blocked, received = await asyncio.gather(send_all(), receive_all(tunnel))
        send_seconds = time.monotonic() - began
        result = await asyncio.to_thread(app_result, peer, 120)
        await asyncio.sleep(0.5)  # a's last duplicates, if any, arrive
        extra = tunnel.recv_nowait()
        return {
            "peer": result,
            "received": received,
            "extra": extra,
            "blocked": blocked,
            "send_wait": tunnel.send_wait_seconds,
            "send_seconds": send_seconds,
            "status": gw.status(),
            "b_status": await asyncio.to_thread(net.gws["b"].status),
        }


def test_embedded_gateway_exchanges_10k_with_warp_run_and_send_waits_when_shaped(
    net: Net,
) -> None:
    net.write_config("a", loopback_gate())  # its gate table is ignored when embedded
    net.write_config("b", loopback_gate())
    net.start("b")
    net.wait_registered("b")
    with inside(net.a.host_ns):
        out = asyncio.run(embedded_side(net))
    peer, (unique, duplicates, corrupt) = out["peer"], out["received"]
    print(f"\nembedded a sent {COUNT} x {SIZE} B in {out['send_seconds']:.1f} s at "
          f"{RATE_KBIT} kbit/s per uplink, {out['blocked']:.1f} s awaiting send, of which "
          f"{out['send_wait']:.1f} s paused (back-pressure); b received "
          f"{peer['unique']} unique, {peer['duplicates']} dup; a received {unique} unique, "
          f"{duplicates} dup, {corrupt} corrupt")  # fmt: skip
    diag = {k: out[k] for k in ("status", "b_status")}
    # b's application got all of a's, once each, byte-exact; a got all of b's.
    assert peer["unique"] == COUNT and peer["duplicates"] == 0 and peer["corrupt"] == 0, (
        peer,
        diag,
    )
    assert peer["sent"] == COUNT, peer
    assert (unique, duplicates, corrupt, out["extra"]) == (COUNT, 0, 0, None), diag
    # send waited (back-pressure) instead of dropping: seconds of waiting, nothing dropped.
    assert out["blocked"] > 2.0 and out["send_wait"] > 2.0, out
    (tunnel,) = out["status"]["tunnels"]
    assert tunnel["gate"]["kind"] == "embedded", tunnel
    assert tunnel["datagrams_in"] == COUNT and tunnel["datagrams_out"] == COUNT, tunnel
    assert tunnel["drops"] == {} and tunnel["datagrams_lost"] == 0, tunnel
    (b_tunnel,) = out["b_status"]["tunnels"]
    assert b_tunnel["drops"] == {} and b_tunnel["datagrams_out"] == COUNT, b_tunnel
    for uplink in out["status"]["uplinks"]:
        assert uplink["tx_dropped"] == 0, out["status"]["uplinks"]
