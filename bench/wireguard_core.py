"""Micro-benchmark of the WireGuard core's hot paths: ``Device.seal`` and the transport branch of
``Device.receive`` for 1400-byte plaintexts, ``Device.seal_many`` on blocks of 5 (the shards of
one (3, 5) block), plus a full handshake for scale.

Run: ``python bench/wireguard_core.py [--rounds 15] [--batch 20000]``. Prints medians in µs per
call (median over rounds of the mean per batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warp.wireguard import Device
from warp.wireguard.testing import Link, make_device

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("198.51.100.2", 51820)


def pair() -> tuple[Device, Device]:
    a, b = make_device(1, mtu=1420), make_device(2, mtu=1420)
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key)
    a.initiate_handshake(b.public_key, 0.0)
    Link(a, b, A_ADDR, B_ADDR).pump(0.0)
    return a, b


def bench(rounds: int, batch: int, size: int) -> dict[str, float]:
    a, b = pair()
    key_b = b.public_key
    plaintext = b"\x01" + bytes(size - 1)  # a warp frame, not subject to the IP checks
    seal_times: list[float] = []
    recv_times: list[float] = []
    both_times: list[float] = []
    many_times: list[float] = []
    now = 1.0
    for _ in range(rounds):
        seal = a.seal
        t0 = time.perf_counter()
        msgs = [seal(key_b, plaintext, now) for _ in range(batch)]
        t1 = time.perf_counter()
        receive = b.receive
        for m in msgs:
            receive(m, A_ADDR, now)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        for _ in range(batch):
            receive(seal(key_b, plaintext, now), A_ADDR, now)  # type: ignore[arg-type]
        t3 = time.perf_counter()
        seal_many = a.seal_many
        block = [plaintext] * 5
        for _ in range(batch // 5):
            seal_many(key_b, block, now)
        t4 = time.perf_counter()
        many_times.append((t4 - t3) / (batch // 5 * 5) * 1e6)
        seal_times.append((t1 - t0) / batch * 1e6)
        recv_times.append((t2 - t1) / batch * 1e6)
        both_times.append((t3 - t2) / batch * 1e6)
        a.drain_outgoing()
        b.drain_outgoing()
        now += 0.001
    assert b.rejected == {}, b.rejected
    hs_times = []
    for _ in range(max(3, rounds // 3)):
        t0 = time.perf_counter()
        n = 50
        for _ in range(n):
            a.initiate_handshake(key_b, now, force=True)
            (init,) = a.drain_outgoing()
            b.receive(init.data, A_ADDR, now)
            (resp,) = b.drain_outgoing()
            a.receive(resp.data, B_ADDR, now)
            a.drain_outgoing()
            now += 0.021
        hs_times.append((time.perf_counter() - t0) / n * 1e6)
    return {
        f"seal {size} B": statistics.median(seal_times),
        f"receive {size} B": statistics.median(recv_times),
        f"seal+receive {size} B": statistics.median(both_times),
        f"seal_many 5 x {size} B, per packet": statistics.median(many_times),
        "handshake (initiation+response+completion, both sides)": statistics.median(hs_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1400)
    args = parser.parse_args()
    results = bench(args.rounds, args.batch, args.size)
    width = max(len(k) for k in results)
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.2f} µs (median)")


if __name__ == "__main__":
    main()
