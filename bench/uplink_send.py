"""Micro-bench: `Uplink.send` loop vs `Uplink.send_batch` (GSO) on loopback.

    .venv/bin/python bench/uplink_send.py [--seconds 0.4] [--repeat 7] [--size 528]

528 B is the wire size of one (3, 5) shard of a 1400 B datagram. A real uplink socket
(`UplinkManager.from_static`, 128 KiB SO_SNDBUF) sends to a bound receiver socket that nobody
reads (loopback never blocks the sender: the excess is dropped at the receiver, so this
measures the sender's cost only). Prints datagrams/s per mode, medians of `--repeat`
interleaved runs, on uvloop and on the stock asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
from collections.abc import Callable

import uvloop

from warp.paths.uplinks import UplinkManager


async def _run(args: argparse.Namespace) -> dict[str, float]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    remote = receiver.getsockname()
    manager = UplinkManager.from_static([("lo0", "127.0.0.1")], on_datagram=lambda *a: None)
    await manager.start()
    uplink = manager.uplinks["lo0"]
    shard = b"\x5a" * args.size
    modes: dict[str, Callable[[], int]] = {}

    def loop_send(batch: int) -> Callable[[], int]:
        datagrams = [shard] * batch
        send = uplink.send

        def run() -> int:
            for d in datagrams:
                send(d, remote)
            return batch

        return run

    def batch_send(batch: int) -> Callable[[], int]:
        datagrams = [shard] * batch

        def run() -> int:
            uplink.send_batch(datagrams, remote)
            return batch

        return run

    for batch in args.batches:
        modes[f"send loop x{batch}"] = loop_send(batch)
        modes[f"send_batch x{batch}"] = batch_send(batch)
    results: dict[str, list[float]] = {name: [] for name in modes}
    try:
        for _ in range(args.repeat):
            for name, run in modes.items():
                count = 0
                start = time.perf_counter()
                deadline = start + args.seconds
                while time.perf_counter() < deadline:
                    for _ in range(20):
                        count += run()
                elapsed = time.perf_counter() - start
                results[name].append(count / elapsed)
                await asyncio.sleep(0)  # let the loop run (writer callbacks, if any)
        assert uplink.errors == 0, uplink.last_error
    finally:
        await manager.close()
        receiver.close()
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.4)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--size", type=int, default=528)
    parser.add_argument("--batches", type=int, nargs="+", default=[5, 16, 64])
    args = parser.parse_args()
    print(f"{args.size} B datagrams, medians of {args.repeat} × {args.seconds} s")
    print(f"{'loop':8} {'mode':20} {'datagrams/s':>12} {'Mbit/s':>8} {'vs loop':>8}")
    for name, runner in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
        medians = runner(_run(args))
        for mode, rate in medians.items():
            base = medians[f"send loop x{mode.rsplit('x', 1)[1]}"]
            mbit = rate * args.size * 8 / 1e6
            print(f"{name:8} {mode:20} {rate:12,.0f} {mbit:8.0f} {rate / base:7.2f}x")


if __name__ == "__main__":
    main()
