"""Micro-benchmark of the receiver gateway's per-shard work without sockets or an event loop:
``Device.receive`` + ``PathProber.on_authenticated`` + ``PathProber.next_deadline`` +
``ShardDecoder.receive`` + ``ShardDecoder.next_deadline``, on a stream of 1400 B datagrams
encoded at (k, n) = (3, 5), sealed by a second device and spread round-robin over 4 paths
(the source address alternates per shard, as in the lab).

Run: ``python bench/receive_path.py [--rounds 9] [--datagrams 4000] [--lose 0] [--mtu 1400]``.
Prints the median µs per shard and per application datagram, and the share of each step.
(At mtu 1400 a 1400 B datagram takes two data shards, at mtu 1472 one.)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warp.paths.prober import PathProber
from warp.redundancy.decoder import ShardDecoder
from warp.redundancy.encoder import ShardEncoder
from warp.redundancy.shard import max_shard_payload
from warp.wireguard.testing import Link, make_device

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("198.51.100.2", 51820)
MTU = 1400  # --mtu
PATHS = [
    ("up1", ("192.0.2.1", 40001)),
    ("up1", ("192.0.2.1", 40002)),
    ("up2", ("192.0.2.9", 40001)),
    ("up2", ("192.0.2.9", 40002)),
]


def stream(datagrams: int, lose: int, seed: int) -> list[tuple[bytes, str, tuple[str, int]]]:
    a = make_device(1, mtu=MTU + 20)
    b = make_device(2, mtu=MTU + 20, roaming_events=False)  # as the gateway runs it
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key)
    a.initiate_handshake(b.public_key, 0.0)
    Link(a, b, A_ADDR, B_ADDR).pump(0.0)
    stream.device = b  # type: ignore[attr-defined]
    enc = ShardEncoder(7, 3, 5, mtu=MTU)
    rng = random.Random(seed)
    out: list[tuple[bytes, str, tuple[str, int]]] = []
    turn = 0
    payload = bytes(1400)
    # Datagrams sent one at a time: 1400 B is two data shards at mtu 1400; a block has 3.
    emitted = [e for _ in range(datagrams) for e in enc.push(payload, 1.0) + enc.flush(1.0)]
    blocks: list[list[bytes]] = []
    for slot, frame in emitted:
        if slot == 0:
            blocks.append([])
        blocks[-1].append(frame)
    for frames in blocks:
        lost = set(rng.sample(range(len(frames)), min(lose, len(frames)))) if lose else set()
        for i, frame in enumerate(frames):
            wire = a.seal(b.public_key, frame, 1.0)
            assert wire is not None
            if i not in lost:
                uplink, remote = PATHS[turn & 3]
                out.append((wire, uplink, remote))
            turn += 1
    return out


def run_once(datagrams: int, lose: int, seed: int) -> tuple[float, int]:
    shards = stream(datagrams, lose, seed)
    device = stream.device  # type: ignore[attr-defined]
    prober = PathProber(1.0, 3.0, random.Random(1))
    decoder = ShardDecoder(7, 3, 5, max_shard_size=max_shard_payload(MTU))
    for uplink, remote in PATHS:
        prober.on_authenticated(uplink, remote, 1.0)
    prober.tick(1.0)
    receive, on_auth, p_deadline = device.receive, prober.on_authenticated, prober.next_deadline
    d_receive, d_deadline = decoder.receive, decoder.next_deadline
    delivered = 0
    now = 1.0
    t0 = time.perf_counter()
    for wire, uplink, remote in shards:
        now += 1e-5
        got = receive(wire, remote, now)
        assert got is not None
        on_auth(uplink, remote, now, len(wire))
        p_deadline()
        delivered += len(d_receive(got.plaintext, now))
        d_deadline()
    total = time.perf_counter() - t0
    assert delivered == datagrams, (delivered, datagrams)
    return total, len(shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--datagrams", type=int, default=4000)
    parser.add_argument("--lose", type=int, default=0, help="shards lost per block (<= n-k)")
    parser.add_argument("--mtu", type=int, default=1400, help="1472: a 1400 B datagram, 1 shard")
    args = parser.parse_args()
    global MTU
    MTU = args.mtu
    per_shard: list[float] = []
    per_datagram: list[float] = []
    for r in range(args.rounds):
        total, shards = run_once(args.datagrams, args.lose, r)
        per_shard.append(total / shards * 1e6)
        per_datagram.append(total / args.datagrams * 1e6)
    print(
        f"receive path, (3, 5), 1400 B, mtu {MTU}, lose {args.lose}/block, 4 paths: "
        f"{statistics.median(per_shard):.2f} µs per shard, "
        f"{statistics.median(per_datagram):.2f} µs per datagram (median of {args.rounds})"
    )


if __name__ == "__main__":
    main()
