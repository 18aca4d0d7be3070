"""A datagram application for gateway lab tests: sends numbered, verifiable datagrams to a
warp gate and receives the far side's datagrams, then prints one JSON object.

Runs inside a lab namespace (``ip netns exec NS python tests/lab/gw_app.py ...``). Every
datagram is ``seq (u32) | tag (u8) | send wall time (f64) | filler``; the filler is derived
from (tag, seq, size), so the receiver checks each datagram byte-exact. Bounded: it stops after
``--lifetime`` seconds at the latest.

    --bind 127.0.0.1:59500 --to 127.0.0.1:59401          loopback gate
    --bind /tmp/x/app.sock --to /tmp/x/gate.sock          unix gate
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from typing import Any

HEADER = struct.Struct("!IBd")


def payload(tag: int, seq: int, size: int, sent_at: float) -> bytes:
    head = HEADER.pack(seq, tag, sent_at)
    return head + filler(tag, seq, size - len(head))


def filler(tag: int, seq: int, length: int) -> bytes:
    if length <= 0:
        return b""
    block = hashlib.blake2b(struct.pack("!BII", tag, seq, length), digest_size=64).digest()
    return (block * (length // 64 + 1))[:length]


def open_socket(bind: str) -> tuple[socket.socket, Any]:
    if bind.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if os.path.exists(bind):
            os.unlink(bind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(bind)
        return sock, bind
    host, port = bind.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, int(port)))
    return sock, (host, int(port))


def target(to: str) -> Any:
    if to.startswith("/"):
        return to
    host, port = to.rsplit(":", 1)
    return (host, int(port))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--count", type=int, default=0, help="datagrams to send")
    ap.add_argument("--rate", type=float, default=1000.0, help="datagrams/s (0: as fast)")
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--sizes", default="", help="comma list: cycle through these sizes")
    ap.add_argument("--tag", type=int, default=1, help="tag of what this side sends")
    ap.add_argument("--expect", type=int, default=0, help="datagrams to receive (peer tag)")
    ap.add_argument("--peer-tag", type=int, default=2)
    ap.add_argument("--start-at", type=float, default=0.0, help="wall time to start sending")
    ap.add_argument("--until-first", action="store_true",
                    help="keep sending (at --rate) until the first datagram arrives")  # fmt: skip
    ap.add_argument("--grace", type=float, default=3.0, help="wait after sending for arrivals")
    ap.add_argument("--lifetime", type=float, default=60.0)
    ap.add_argument("--wait-file", default="", help="do not send before this file exists")
    ap.add_argument("--gap", type=float, default=0.1,
                    help="report silences longer than this between arrivals (s)")  # fmt: skip
    args = ap.parse_args()

    began = time.time()
    hard_end = began + args.lifetime
    sock, _ = open_socket(args.bind)
    dest = target(args.to)
    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.size]
    recv: dict[str, Any] = {
        "received": 0,
        "unique": 0,
        "duplicates": 0,
        "corrupt": 0,
        "foreign": 0,
        "first_rx": None,
        "last_rx": None,
        "latencies": [],
        "gaps": [],
    }
    seen: set[int] = set()
    first_event = threading.Event()
    done_sending = threading.Event()
    print(json.dumps({"ready": True, "t": time.time()}), flush=True)

    def receiver() -> None:
        while time.time() < hard_end:
            if done_sending.is_set() and (
                recv["unique"] >= args.expect or time.time() > send_end[0] + args.grace
            ):
                return
            try:
                if not select.select([sock], [], [], 0.2)[0]:
                    continue
                data = sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                recv["error"] = str(exc)
                return
            now = time.time()
            recv["received"] += 1
            if len(data) < HEADER.size:
                recv["corrupt"] += 1
                continue
            seq, tag, sent_at = HEADER.unpack_from(data)
            if tag != args.peer_tag:
                recv["foreign"] += 1
                continue
            if data[HEADER.size :] != filler(tag, seq, len(data) - HEADER.size):
                recv["corrupt"] += 1
                continue
            if seq in seen:
                recv["duplicates"] += 1
                continue
            seen.add(seq)
            recv["unique"] += 1
            if recv["first_rx"] is None:
                recv["first_rx"] = now
                recv["first_seq"] = seq
                first_event.set()
            last = recv["last_rx"]
            if last is not None and now - last > args.gap and len(recv["gaps"]) < 1000:
                recv["gaps"].append([round(last, 3), round(now - last, 3)])
            recv["last_rx"] = now
            if len(recv["latencies"]) < 200_000:
                recv["latencies"].append(now - sent_at)

    send_end = [time.time() + 1e9]
    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()

    if args.wait_file:
        while not os.path.exists(args.wait_file) and time.time() < hard_end:
            time.sleep(0.005)
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    sent = 0
    send_errors = 0
    send_started = time.time()
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    limit = args.count if not args.until_first else 1 << 30
    while sent < limit and time.time() < hard_end:
        if args.until_first and first_event.is_set():
            break
        if interval:
            due = send_started + sent * interval
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
        size = sizes[sent % len(sizes)]
        try:
            sock.sendto(payload(args.tag, sent, size, time.time()), dest)
        except OSError:
            send_errors += 1
            time.sleep(0.001)
            if send_errors > 100000:
                break
            continue
        sent += 1
    send_end[0] = time.time()
    done_sending.set()
    thread.join(max(0.0, hard_end - time.time()) + 1)
    lat = sorted(recv.pop("latencies"))

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

    out = {
        "sent": sent,
        "send_errors": send_errors,
        "send_started": send_started,
        "send_seconds": round(send_end[0] - send_started, 3),
        **recv,
        "missing": max(0, args.expect - recv["unique"]),
        "latency_ms_p50": pct(0.5),
        "latency_ms_p99": pct(0.99),
    }
    print(json.dumps(out), flush=True)
    sock.close()
    if args.bind.startswith("/"):
        with contextlib.suppress(OSError):
            os.unlink(args.bind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
