"""Interop driver: WARP's sans-I/O WireGuard core (`warp.wireguard.Device`) on a plain UDP
socket, with hand-built ICMP echo packets and no TUN. Run inside namespace A, against
wireguard-go in namespace B::

    ip netns exec A .venv/bin/python tests/interop/driver.py CONFIG.json ping --sizes 28-1420
    ip netns exec A .venv/bin/python tests/interop/driver.py CONFIG.json serve --under-load

``ping`` initiates the handshake, pings the far tunnel address (one echo request per IP packet
size, then a counted run with optional rekeys) and prints one JSON object with the results.
``serve`` prints ``READY``, answers echo requests (so the far side can initiate and ping us)
until SIGTERM or ``--duration``, then prints one JSON object.

CONFIG.json: ``private_key``, ``peer_public_key``, ``preshared_key`` (hex or null), ``bind``
([host, port]), ``endpoint`` ([host, port] or null), ``addresses`` (our tunnel addresses),
``peer_allowed_ips``, ``mtu``.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import random
import select
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.interop.icmp import echo_reply, echo_request, parse_echo, payload_for  # noqa: E402
from warp.wireguard import (  # noqa: E402
    REKEY_AFTER_TIME,
    Device,
    HandshakeComplete,
    MessageKind,
)

TRANSPORT_OVERHEAD = 32


def padded(n: int, mtu: int) -> int:
    """WireGuard's padded plaintext length for an n-byte packet (capped at the MTU)."""
    return min(mtu, (n + 15) // 16 * 16) if n <= mtu else n


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.mtu = int(cfg.get("mtu", 1420))
        bind_host, bind_port = cfg["bind"]
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.bind((bind_host, int(bind_port)))
        self.sock.setblocking(False)
        self.device = Device(bytes.fromhex(cfg["private_key"]), mtu=self.mtu)
        self.peer = bytes.fromhex(cfg["peer_public_key"])
        psk = cfg.get("preshared_key")
        endpoint = cfg.get("endpoint")
        self.device.add_peer(
            self.peer,
            preshared_key=bytes.fromhex(psk) if psk else None,
            endpoint=(endpoint[0], int(endpoint[1])) if endpoint else None,
            allowed_ips=cfg["peer_allowed_ips"],
        )
        self.addresses = {ipaddress.ip_address(a).packed for a in cfg["addresses"]}
        self.offset = 0.0
        self.on_step: Any = None
        self.started = time.monotonic()
        self.replies: dict[tuple[int, int], bytes] = {}
        self.handshakes: list[dict[str, Any]] = []
        self.stats: dict[str, int] = {
            "echo_requests_answered": 0,
            "echo_replies_received": 0,
            "keepalives_received": 0,
            "other_packets": 0,
            "not_for_us": 0,
            "unsent_no_endpoint": 0,
            "send_errors": 0,
            "wire_size_mismatch_sent": 0,
            "wire_size_mismatch_received": 0,
            "transport_sent": 0,
            "transport_received": 0,
        }

    # -- I/O ------------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() + self.offset

    def _sendto(self, data: bytes, dest: tuple[str, int] | None) -> None:
        if dest is None:
            self.stats["unsent_no_endpoint"] += 1
            return
        for _ in range(200):
            try:
                self.sock.sendto(data, dest)
                return
            except BlockingIOError:
                select.select([], [self.sock], [], 0.01)
            except OSError:
                break
        self.stats["send_errors"] += 1

    def flush(self) -> None:
        for out in self.device.drain_outgoing():
            if out.kind is MessageKind.TRANSPORT:
                self.stats["transport_sent"] += 1
            self._sendto(out.data, out.destination)
        for event in self.device.drain_events():
            if isinstance(event, HandshakeComplete):
                self.handshakes.append(
                    {
                        "initiator": event.initiator,
                        "t": round(time.monotonic() - self.started, 4),
                        "index": self._current_index(),
                    }
                )

    def _current_index(self) -> int | None:
        peer = self.device.peer(self.peer)
        return peer.current.local_index if peer is not None and peer.current else None

    def send_ip(self, packet: bytes) -> None:
        msg = self.device.seal(self.peer, packet, self.now())
        self.flush()
        if msg is not None:
            if len(msg) != TRANSPORT_OVERHEAD + padded(len(packet), self.mtu):
                self.stats["wire_size_mismatch_sent"] += 1
            self.stats["transport_sent"] += 1
            peer = self.device.peer(self.peer)
            self._sendto(msg, peer.endpoint if peer is not None else None)

    def handle(self, data: bytes, source: tuple[str, int]) -> None:
        rec = self.device.receive(data, source, self.now())
        if rec is None:
            return
        if not rec.plaintext:
            self.stats["keepalives_received"] += 1
            return
        self.stats["transport_received"] += 1
        if len(data) != TRANSPORT_OVERHEAD + padded(len(rec.plaintext), self.mtu):
            self.stats["wire_size_mismatch_received"] += 1
        echo = parse_echo(rec.plaintext)
        if echo is None:
            self.stats["other_packets"] += 1
        elif echo.request:
            if echo.dst in self.addresses:
                self.stats["echo_requests_answered"] += 1
                self.send_ip(echo_reply(echo))
            else:
                self.stats["not_for_us"] += 1
        else:
            self.stats["echo_replies_received"] += 1
            self.replies[(echo.ident, echo.seq)] = echo.payload

    def step(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for input, process a batch, run due timers, send."""
        deadline = self.device.next_deadline()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - self.now()))
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if readable:
            for _ in range(256):
                try:
                    data, source = self.sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                self.handle(data, source)
        deadline = self.device.next_deadline()
        if deadline is not None and self.now() >= deadline:
            self.device.tick(self.now())
        self.flush()
        if self.on_step is not None:
            self.on_step()

    def wait_for(self, condition: Any, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not condition():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.step(min(left, 0.05))
        return True

    # -- scenarios --------------------------------------------------------------------------------

    def handshake(self, timeout: float = 10.0) -> float | None:
        """Initiate a handshake and wait for it; returns its duration or None."""
        before = len(self.handshakes)
        t0 = time.monotonic()
        self.device.initiate_handshake(self.peer, self.now())
        self.flush()
        ok = self.wait_for(lambda: len(self.handshakes) > before, timeout)
        return time.monotonic() - t0 if ok else None

    def ping(
        self,
        src: str,
        dst: str,
        sizes: list[int],
        *,
        window: int = 1,
        timeout: float = 2.0,
        hooks: dict[int, tuple[str, float]] | None = None,
    ) -> dict[str, Any]:
        """One echo request per entry of ``sizes`` (ICMP payload sizes), at most ``window``
        outstanding; returns sent/lost/bad counts and RTTs. ``hooks`` maps a ping number to
        ``("rekey", _)`` (a forced handshake) or ``("clock", seconds)`` (our clock jumps ahead:
        past REKEY_AFTER_TIME the next send rekeys by the timer rule, past REJECT_AFTER_TIME
        the session is expired and packets wait for a new handshake)."""
        ident = random.randrange(1, 0xFFFF)
        pending: dict[int, tuple[float, bytes]] = {}
        lost: list[int] = []
        bad: list[int] = []
        rtts: list[float] = []
        hooks = hooks or {}
        t_start = time.monotonic()

        def collect() -> None:
            t = time.monotonic()
            for seq in list(pending):
                sent_at, payload = pending[seq]
                got = self.replies.pop((ident, seq), None)
                if got is not None:
                    if got != payload:
                        bad.append(seq)
                    rtts.append(t - sent_at)
                    del pending[seq]
                elif t - sent_at > timeout:
                    lost.append(seq)
                    del pending[seq]

        for i, size in enumerate(sizes):
            action, amount = hooks.get(i, ("", 0.0))
            if action:
                # wireguard-go refuses initiations < 20 ms apart (real time), whatever our clock
                if self.handshakes:
                    last = self.started + self.handshakes[-1]["t"]
                    while time.monotonic() - last < 0.05:
                        self.step(0.01)
                        collect()
                if action == "clock":  # nothing in flight across the jump
                    while pending:
                        self.step(0.01)
                        collect()
            if action == "rekey":
                self.device.initiate_handshake(self.peer, self.now(), force=True)
                self.flush()
            elif action == "clock":
                self.offset += amount
            while len(pending) >= window:
                self.step(0.01)
                collect()
            seq = i & 0xFFFF
            payload = payload_for(size, seq)
            pending[seq] = (time.monotonic(), payload)
            self.send_ip(echo_request(src, dst, ident, seq, payload))
            if window > 1:
                self.step(0.0)
            collect()
        while pending:
            self.step(0.01)
            collect()
        elapsed = time.monotonic() - t_start
        return {
            "sent": len(sizes),
            "lost": len(lost),
            "lost_seqs": lost[:50],
            "bad": len(bad),
            "bad_seqs": bad[:50],
            "rtt_ms_median": round(statistics.median(rtts) * 1000, 3) if rtts else None,
            "rtt_ms_max": round(max(rtts) * 1000, 3) if rtts else None,
            "elapsed_s": round(elapsed, 3),
        }

    def report(self, **extra: Any) -> dict[str, Any]:
        peer = self.device.peer(self.peer)
        return {
            "handshakes": self.handshakes,
            "stats": self.stats,
            "counters": dict(self.device.counters),
            "rejected": dict(self.device.rejected),
            "endpoint": list(peer.endpoint) if peer is not None and peer.endpoint else None,
            **extra,
        }


class Flooder:
    """Puts wireguard-go "under load" (its handshake queue >= 128): bursts of initiations
    with a valid mac1 for its key but garbage inside (each costs it a DH until it is under
    load), from a second socket, so its cookie replies to them are counted apart from ours."""

    def __init__(self, driver: Driver, far_public: bytes, burst: int, interval: float) -> None:
        host = driver.sock.getsockname()[0]
        self.sock = socket.socket(driver.sock.family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        peer = driver.device.peer(driver.peer)
        assert peer is not None and peer.endpoint is not None
        self.dest = peer.endpoint
        key = hashlib.blake2s(b"mac1----" + far_public).digest()
        rng = random.Random(1)
        self.packets = []
        for _ in range(burst):
            body = b"\x01\x00\x00\x00" + rng.randbytes(112)
            mac1 = hashlib.blake2s(body, key=key, digest_size=16).digest()
            self.packets.append(body + mac1 + bytes(16))
        self.interval = interval
        self.next_at = 0.0
        self.sent = 0
        self.bursts = 0
        self.cookie_times: list[float] = []

    def poll(self, quiet_around: float | None = None) -> None:
        """Send a burst when one is due, except within 0.3 s of ``quiet_around`` (when our
        own initiation goes out: wireguard-go's handshake queue must have room for it, and its
        under-load state lasts 1 s after the last full queue, so it spans the lull)."""
        t = time.monotonic()
        quiet = quiet_around is not None and abs(t - quiet_around) < 0.3
        if t >= self.next_at and not quiet:
            self.next_at = t + self.interval
            self.bursts += 1
            for packet in self.packets:
                try:
                    self.sock.sendto(packet, self.dest)
                    self.sent += 1
                except OSError:
                    break
        while True:
            try:
                data = self.sock.recv(2048)
            except OSError:
                break
            if len(data) == 64 and data[0] == 3:
                self.cookie_times.append(time.monotonic())

    def close(self) -> None:
        self.sock.close()


def parse_sizes(text: str) -> list[int]:
    """``"28-1420"`` or ``"64,100,1420"`` (IP packet sizes)."""
    sizes: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            sizes.extend(range(int(lo), int(hi) + 1))
        elif part:
            sizes.append(int(part))
    return sizes


def cmd_ping(driver: Driver, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    flooder = None
    if args.flood:
        flooder = Flooder(driver, bytes.fromhex(args.flood), args.flood_burst, 0.25)
        # under load (it answers the garbage with cookies) before our initiation goes out,
        # after a short lull
        until = time.monotonic() + 5.0
        while not flooder.cookie_times and time.monotonic() < until:
            flooder.poll()
            time.sleep(0.02)
        first = time.monotonic() + 0.3
        peer = driver.device.peer(driver.peer)
        assert peer is not None
        driver.wait_for(lambda: time.monotonic() >= first, 1.0)
        driver.on_step = lambda: flooder.poll(
            peer.retransmit_at if peer.retransmit_at is not None else first
        )
    duration = driver.handshake(args.handshake_timeout)
    results["handshake_s"] = round(duration, 4) if duration is not None else None
    if flooder is not None:
        done = time.monotonic()
        driver.wait_for(lambda: False, 1.0)  # keep flooding: was it still under load?
        driver.on_step = None
        flooder.close()
        results["flood"] = {
            "bursts": flooder.bursts,
            "sent": flooder.sent,
            "cookie_replies": len(flooder.cookie_times),
            "cookie_replies_after_handshake": sum(t > done for t in flooder.cookie_times),
            "cookie_replies_in_the_second_before": sum(
                done - 1.0 < t <= done for t in flooder.cookie_times
            ),
        }
    if duration is None:
        return driver.report(**results)
    for src, dst in zip(args.src, args.dst, strict=True):
        header = 48 if ":" in src else 28
        if args.sizes:
            sizes = [s - header for s in parse_sizes(args.sizes) if s >= header]
            results[f"sweep {dst}"] = driver.ping(src, dst, sizes, window=1)
    if args.count:
        hooks: dict[int, tuple[str, float]] = {}
        for at in args.rekey_at:
            hooks[at] = ("rekey", 0.0)
        for spec in args.clock_jump_at:
            at, _, seconds = spec.partition(":")
            hooks[int(at)] = ("clock", float(seconds or REKEY_AFTER_TIME + 1.0))
        src, dst = args.src[0], args.dst[0]
        size = args.count_size - (48 if ":" in src else 28)
        results["count"] = driver.ping(
            src, dst, [size] * args.count, window=args.window, hooks=hooks
        )
    # let the last keepalive / confirmations go out
    driver.wait_for(lambda: False, 0.2)
    return driver.report(**results)


def cmd_serve(driver: Driver, args: argparse.Namespace) -> dict[str, Any]:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.under_load:
        driver.device.set_under_load(True)
    print("READY", flush=True)
    end = time.monotonic() + args.duration
    rekeyed = False
    while not stop and time.monotonic() < end:
        driver.step(0.1)
        if (
            args.rekey_after
            and not rekeyed
            and driver.stats["echo_requests_answered"] >= args.rekey_after
        ):
            rekeyed = True
            driver.device.initiate_handshake(driver.peer, driver.now(), force=True)
            driver.flush()
    return driver.report(stopped_by_signal=stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="JSON config file")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ping", help="initiate, then ping the far side")
    p.add_argument("--src", action="append", required=True, help="our tunnel address")
    p.add_argument("--dst", action="append", required=True, help="far tunnel address")
    p.add_argument("--sizes", default="", help="IP packet sizes, e.g. 28-1420")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--count-size", type=int, default=84, help="IP packet size of counted pings")
    p.add_argument("--window", type=int, default=1, help="echo requests in flight")
    p.add_argument("--rekey-at", type=int, action="append", default=[])
    p.add_argument(
        "--clock-jump-at",
        action="append",
        default=[],
        metavar="N[:SECONDS]",
        help="our clock jumps SECONDS (default REKEY_AFTER_TIME + 1) before ping N",
    )
    p.add_argument("--handshake-timeout", type=float, default=10.0)
    p.add_argument("--flood", metavar="FAR_PUBLIC_KEY_HEX", help="keep the far side under load")
    p.add_argument("--flood-burst", type=int, default=1500)
    s = sub.add_parser("serve", help="answer echo requests until SIGTERM")
    s.add_argument("--under-load", action="store_true", help="demand cookies (mac2)")
    s.add_argument("--rekey-after", type=int, default=0, help="force a rekey after N replies")
    s.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    driver = Driver(cfg)
    try:
        result = cmd_ping(driver, args) if args.command == "ping" else cmd_serve(driver, args)
    finally:
        driver.sock.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
