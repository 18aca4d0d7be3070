"""Raw-socket pinger for the far side (namespace B): the kernel routes our echo requests into
wireguard-go's TUN, so they reach the WARP side as real WireGuard traffic. One echo request per
IP packet size (or a counted run), each checked byte for byte; prints one JSON object.

    ip netns exec B python tests/interop/pinger.py 10.77.0.1 --sizes 28-1420
    ip netns exec B python tests/interop/pinger.py 10.77.0.1 --count 1000 --window 8
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.interop.icmp import (  # noqa: E402
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    checksum,
    payload_for,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst")
    parser.add_argument("--sizes", default="", help="IP packet sizes, e.g. 28-1420")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--count-size", type=int, default=84)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=2.0, help="per echo request")
    parser.add_argument("--first-timeout", type=float, default=10.0, help="for the first one")
    args = parser.parse_args()

    v6 = ":" in args.dst
    header = 48 if v6 else 28
    sizes: list[int] = []
    for part in filter(None, args.sizes.split(",")):
        lo, _, hi = part.partition("-")
        sizes.extend(s - header for s in range(int(lo), int(hi or lo) + 1))
    sizes += [args.count_size - header] * args.count

    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        request_type, reply_type = ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        request_type, reply_type = ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    pending: dict[int, tuple[float, bytes]] = {}
    lost: list[int] = []
    bad: list[int] = []
    rtts: list[float] = []
    t_start = time.monotonic()

    def receive(wait: float) -> None:
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            return
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            if len(icmp) < 8 or icmp[0] != reply_type:
                continue
            rid, seq = struct.unpack_from("!HH", icmp, 4)
            if rid != ident or seq not in pending:
                continue
            sent_at, payload = pending.pop(seq)
            if icmp[8:] != payload or (not v6 and checksum(icmp) != 0):
                bad.append(seq)
            rtts.append(time.monotonic() - sent_at)

    def expire() -> None:
        t = time.monotonic()
        for seq in list(pending):
            limit = args.first_timeout if seq == 0 else args.timeout
            if t - pending[seq][0] > limit:
                lost.append(seq)
                del pending[seq]

    for i, size in enumerate(sizes):
        while len(pending) >= (1 if i == 0 else args.window) or (i == 1 and pending):
            receive(0.01)
            expire()
        seq = i & 0xFFFF
        payload = payload_for(size, seq)
        body = struct.pack("!BBHHH", request_type, 0, 0, ident, seq) + payload
        if not v6:  # the kernel computes ICMPv6 checksums itself
            body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        pending[seq] = (time.monotonic(), payload)
        sock.sendto(body, (args.dst, 0))
        receive(0.0)
    while pending:
        receive(0.01)
        expire()
    print(
        json.dumps(
            {
                "sent": len(sizes),
                "lost": len(lost),
                "lost_seqs": lost[:50],
                "bad": len(bad),
                "bad_seqs": bad[:50],
                "first_rtt_ms": round(rtts[0] * 1000, 3) if rtts else None,
                "rtt_ms_median": round(statistics.median(rtts) * 1000, 3) if rtts else None,
                "elapsed_s": round(time.monotonic() - t_start, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
