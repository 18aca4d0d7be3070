"""Micro-bench: per-datagram cost of warp/paths/batch_io.py on loopback, C extension
(`recvmmsg`/`sendmmsg`) against the pure-Python path and a plain `sendto`/`recvfrom` loop.

    .venv/bin/python bench/batch_io.py [--size 528] [--batch 64] [--rounds 300] [--repeat 7]

Send: `--batch` datagrams of `--size` B (528 B: one (3, 5) shard of a 1400 B datagram), round
robin to 4 receiver sockets (4 paths), per call; the receivers are drained between rounds,
untimed; "GSO per address" (for comparison, not used by warp) sends the same datagrams as
one UDP_SEGMENT `sendmsg` per address. Receive: `--batch` datagrams from 4 senders wait on
one socket; one call (or loop) reads them all. Prints µs per datagram (CPU time of this
process, user + system, so the kernel's UDP path is in it), medians of `--repeat`
interleaved runs.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warp.paths.batch_io import NATIVE, PYTHON, BatchIO

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)


def _sock() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _empty(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(70000)
        except BlockingIOError:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=528)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    source = _sock()
    sinks = [_sock() for _ in range(4)]
    payload = bytes(args.size)
    messages = [(payload, sinks[i % 4].getsockname()) for i in range(args.batch)]

    def send_loop() -> None:
        sendto = source.sendto
        for data, address in messages:
            sendto(data, address)

    def send_with(io: BatchIO) -> Callable[[], None]:
        def run() -> None:
            i = 0
            while i < len(messages):
                i += io.send_many(source, messages, i)

        return run

    by_address: dict[tuple[str, int], list[bytes]] = {}
    for data, address in messages:
        by_address.setdefault(address, []).append(data)
    gso = [(b"".join(group), address) for address, group in by_address.items()]
    segment = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", args.size))]

    def send_gso() -> None:
        # for comparison only: one UDP_SEGMENT sendmsg per address (equal sizes, reordered
        # across addresses), what GSO would cost if the core's sends were grouped so
        sendmsg = source.sendmsg
        for payload, address in gso:
            sendmsg([payload], segment, 0, address)

    def recv_loop() -> None:
        recv = sinks[0].recvfrom
        for _ in range(args.batch):
            recv(65536)

    def recv_with(io: BatchIO) -> Callable[[], None]:
        def run() -> None:
            got, _, _ = io.recv_many(sinks[0], args.batch, 65536)
            assert len(got) == args.batch

        return run

    sends: dict[str, Callable[[], None]] = {"sendto loop": send_loop}
    if args.size * (args.batch // 4) <= 65507:
        sends["GSO per address"] = send_gso
    recvs: dict[str, Callable[[], None]] = {"recvfrom loop": recv_loop}
    for io in (PYTHON, NATIVE):
        if io is not None:
            sends[f"send_many {io.name}"] = send_with(io)
            recvs[f"recv_many {io.name}"] = recv_with(io)
    senders = [_sock() for _ in range(4)]

    def time_send(run: Callable[[], None]) -> float:
        spent = 0.0
        for _ in range(args.rounds):
            t0 = time.process_time()
            run()
            spent += time.process_time() - t0
            for sink in sinks:
                _empty(sink)
        return spent / (args.rounds * args.batch) * 1e6

    def time_recv(run: Callable[[], None]) -> float:
        spent = 0.0
        target = sinks[0].getsockname()
        for _ in range(args.rounds):
            for i in range(args.batch):
                senders[i % 4].sendto(payload, target)
            t0 = time.process_time()
            run()
            spent += time.process_time() - t0
        return spent / (args.rounds * args.batch) * 1e6

    results: dict[str, list[float]] = {name: [] for name in (*sends, *recvs)}
    for _ in range(args.repeat):
        for name, run in sends.items():
            results[name].append(time_send(run))
        for name, run in recvs.items():
            results[name].append(time_recv(run))
    print(
        f"{args.size} B datagrams, {args.batch} per call, 4 addresses; "
        f"CPU µs per datagram, median of {args.repeat}"
    )
    for name, values in results.items():
        print(f"  {name:22s} {statistics.median(values):6.2f}")


if __name__ == "__main__":
    main()
