"""Tiny UDP tools for the lab (``warp.netlab``), run in a namespace as a plain script:
``ip netns exec NS python warp/udp_tools.py`` (it imports nothing from warp).

Every mode has a bounded lifetime and stops by itself.

``echo``  bind one or more ``IP:PORT``; log every datagram (JSON lines with a timestamp) to
          ``--log`` and answer each with ``--replies`` JSON datagrams telling the sender the
          address it was seen from (a minimal STUN):
          ``{"peer": "ip:port", "local": ..., "seq": k}``.
``probe`` one socket (optionally ``--bind`` and ``--device`` = SO_BINDTODEVICE) sends to each
          ``--to`` target every ``--interval`` until each one answered or ``--timeout``; then
          optionally keeps receiving for ``--linger`` seconds. Prints one JSON summary to stdout;
          with ``--log`` every received datagram is logged live as a JSON line.
``send``  fire-and-forget ``--count`` datagrams to each target; prints a JSON summary.
"""

from __future__ import annotations

import argparse
import heapq
import json
import selectors
import socket
import sys
import time
from typing import IO, Any

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host, int(port)


def fmt(addr: tuple[Any, ...]) -> str:
    return f"{addr[0]}:{addr[1]}"


def log_line(stream: IO[str] | None, record: dict[str, Any]) -> None:
    if stream is not None:
        stream.write(json.dumps(record) + "\n")
        stream.flush()


def make_socket(bind: tuple[str, int] | None, device: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if device:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device.encode())
    sock.bind(bind if bind is not None else ("0.0.0.0", 0))
    return sock


def cmd_echo(args: argparse.Namespace) -> int:
    log = open(args.log, "a", buffering=1) if args.log else None  # noqa: SIM115
    sel = selectors.DefaultSelector()
    socks = []
    for bind in args.bind:
        sock = make_socket(bind, args.device)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    log_line(log, {"event": "ready", "ts": time.time(), "binds": [fmt(b) for b in args.bind]})
    pending: list[
        tuple[float, int, int, tuple[str, int], int]
    ] = []  # (due, tiebreak, sock, to, seq)
    tiebreak = 0
    deadline = time.monotonic() + args.duration
    while (now := time.monotonic()) < deadline:
        timeout = deadline - now
        if pending:
            timeout = max(0.0, min(timeout, pending[0][0] - now))
        for key, _ in sel.select(timeout):
            fileobj = key.fileobj
            assert isinstance(fileobj, socket.socket)
            sock = fileobj
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                continue
            local = sock.getsockname()
            log_line(
                log,
                {
                    "event": "recv",
                    "ts": time.time(),
                    "local": fmt(local),
                    "peer": fmt(peer),
                    "len": len(data),
                    "data": data[:200].decode("utf-8", "replace"),
                },
            )
            for seq in range(args.replies):
                due = time.monotonic() + seq * args.reply_interval
                heapq.heappush(pending, (due, tiebreak, socks.index(sock), peer, seq))
                tiebreak += 1
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, idx, peer, seq = heapq.heappop(pending)
            sock = socks[idx]
            reply = {"peer": fmt(peer), "local": fmt(sock.getsockname()), "seq": seq}
            try:
                sock.sendto(json.dumps(reply).encode(), peer)
                log_line(log, {"event": "sent", "ts": time.time(), "to": fmt(peer), "seq": seq})
            except OSError as exc:
                log_line(log, {"event": "send-error", "ts": time.time(), "error": str(exc)})
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    log = open(args.log, "a", buffering=1) if args.log else None  # noqa: SIM115
    sock = make_socket(args.bind, args.device)
    sock.settimeout(0.02)
    targets = [fmt(t) for t in args.to]
    replies: dict[str, str | None] = dict.fromkeys(targets)
    reply_from: dict[str, str] = {}
    sent = 0
    received = 0
    errors: list[str] = []
    payload = args.payload.encode()

    def receive_until(until: float) -> None:
        nonlocal received
        while time.monotonic() < until:
            try:
                data, src = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error
                errors.append(str(exc))
                continue
            received += 1
            record: dict[str, Any] = {"event": "recv", "ts": time.time(), "peer": fmt(src)}
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            if isinstance(body, dict):
                record["reply"] = body
                key = fmt(src)
                if key in replies and replies[key] is None:
                    replies[key] = str(body.get("peer"))
                    reply_from[key] = fmt(src)
            log_line(log, record)

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(v is None for v in replies.values()):
        for target, addr in zip(targets, args.to, strict=True):
            if replies[target] is None:
                try:
                    sock.sendto(payload, addr)
                    sent += 1
                except OSError as exc:
                    errors.append(str(exc))
        receive_until(min(deadline, time.monotonic() + args.interval))
    if args.linger > 0:
        receive_until(time.monotonic() + args.linger)
    summary = {
        "local": fmt(sock.getsockname()),
        "replies": replies,
        "sent": sent,
        "received": received,
        "errors": errors[:10],
    }
    print(json.dumps(summary), flush=True)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    sock = make_socket(args.bind, args.device)
    sent = 0
    errors: list[str] = []
    for i in range(args.count):
        for addr in args.to:
            try:
                sock.sendto(f"{args.payload} {i}".encode(), addr)
                sent += 1
            except OSError as exc:
                errors.append(str(exc))
        if args.interval > 0 and i + 1 < args.count:
            time.sleep(args.interval)
    print(json.dumps({"local": fmt(sock.getsockname()), "sent": sent, "errors": errors[:10]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="SO_BINDTODEVICE interface")

    p_echo = sub.add_parser("echo")
    common(p_echo)
    p_echo.add_argument("--bind", type=parse_addr, action="append", required=True)
    p_echo.add_argument("--log", default=None)
    p_echo.add_argument("--duration", type=float, default=10.0)
    p_echo.add_argument("--replies", type=int, default=1)
    p_echo.add_argument("--reply-interval", type=float, default=0.0)
    p_echo.set_defaults(func=cmd_echo)

    p_probe = sub.add_parser("probe")
    common(p_probe)
    p_probe.add_argument("--to", type=parse_addr, action="append", required=True)
    p_probe.add_argument("--bind", type=parse_addr, default=None)
    p_probe.add_argument("--timeout", type=float, default=2.0)
    p_probe.add_argument("--interval", type=float, default=0.1)
    p_probe.add_argument("--linger", type=float, default=0.0)
    p_probe.add_argument("--payload", default="probe")
    p_probe.add_argument("--log", default=None)
    p_probe.set_defaults(func=cmd_probe)

    p_send = sub.add_parser("send")
    common(p_send)
    p_send.add_argument("--to", type=parse_addr, action="append", required=True)
    p_send.add_argument("--bind", type=parse_addr, default=None)
    p_send.add_argument("--count", type=int, default=1)
    p_send.add_argument("--interval", type=float, default=0.0)
    p_send.add_argument("--payload", default="datagram")
    p_send.set_defaults(func=cmd_send)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
