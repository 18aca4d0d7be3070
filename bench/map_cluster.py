"""warp-map request rates with and without Valkey, and push latency across map instances.

Real `warp-map` processes on loopback, a real `redis-server` (no persistence, temp dir), real
WireGuard sessions. The load generator seals every request before the clock starts, so what is
timed is the map: receive, decrypt, registry, Valkey writes, seal, send. It keeps at most
``--window`` requests outstanding and counts one reply per request.

Rates (requests/s, median of ``--repeat`` runs, ``--clients`` sessions):

* ``refresh``: Register of an uplink already registered (the steady state of a fleet; with
  Valkey, written at most every quarter TTL per client);
* ``change``: Register and Deregister in turn, so that every request changes the client's
  endpoint set (with Valkey: one SET/DEL + PUBLISH each);
* ``lookup``: Lookup of a registered key.

Push latency: client A watches B; B registers and deregisters in turn; the time from B's
request leaving to A's Push arriving, with A and B on one instance, and on two instances
sharing Valkey (median, p99).

    .venv/bin/python bench/map_cluster.py [--clients 64] [--requests 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from warp.keys import encode_key, generate_private_key, public_key_of  # noqa: E402
from warp.map_client.messages import (  # noqa: E402
    Deregister,
    Lookup,
    Register,
    decode,
    encode,
)
from warp.wireguard import Device  # noqa: E402

Address = tuple[str, int]


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Valkey:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("valkey-server") or shutil.which("redis-server")
        if binary is None:
            raise SystemExit("needs valkey-server or redis-server")
        self.port = free_port(socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    @property
    def url(self) -> str:
        return f"valkey://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class MapProc:
    def __init__(self, workdir: Path, key: bytes, name: str, cluster_url: str | None) -> None:
        self.port = free_port(socket.SOCK_DGRAM)
        self.address: Address = ("127.0.0.1", self.port)
        config = workdir / f"{name}.toml"
        text = (
            f'bind = "127.0.0.1:{self.port}"\nprivate_key = "{encode_key(key)}"\n'
            'lookup_policy = "any"\n'
            "[limits]\nrequests_per_second = 1000000\nmax_clients = 100000\n"
            '[log]\nlevel = "warning"\n'
        )
        if cluster_url is not None:
            text += f'[cluster]\nurl = "{cluster_url}"\n'
        config.write_text(text)
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "warp_map_server.cli",
                "--config",
                str(config),
                "--log-level",
                "info",
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        ready = "map.cluster.up" if cluster_url is not None else "map.listening"
        deadline = time.monotonic() + 15
        while ready not in self.log.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"warp-map did not start: {self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Client:
    """One gateway key with one socket and a WireGuard session with one map instance."""

    def __init__(self, map_key: bytes, map_address: Address, far: bytes | None = None) -> None:
        self.key = generate_private_key()
        self.public = public_key_of(self.key)
        self.far = far if far is not None else public_key_of(generate_private_key())
        self.map_key = map_key
        self.map_address = map_address
        self.device = Device(self.key)
        self.device.add_peer(map_key, endpoint=map_address)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.next_id = 1

    def handshake(self) -> None:
        now = time.monotonic()
        self.device.initiate_handshake(self.map_key, now)
        for out in self.device.drain_outgoing():
            self.sock.sendto(out.data, self.map_address)
        self.sock.settimeout(5)
        data, source = self.sock.recvfrom(4096)
        self.device.receive(data, source, time.monotonic())
        self.device.drain_outgoing()
        self.device.drain_events()

    def seal(self, frame: bytes) -> bytes:
        sealed = self.device.seal(self.map_key, frame, time.monotonic())
        assert sealed is not None
        self.device.drain_outgoing()
        return sealed

    def request_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def register(self) -> bytes:
        return encode(Register(self.request_id(), 1, self.far, 7))

    def deregister(self) -> bytes:
        return encode(Deregister(self.request_id(), 1))

    def call(self, frame: bytes) -> None:
        self.sock.sendto(self.seal(frame), self.map_address)
        self.sock.settimeout(5)
        data, source = self.sock.recvfrom(4096)
        self.device.receive(data, source, time.monotonic())

    def open_frame(self, data: bytes, source: Address) -> bytes | None:
        received = self.device.receive(data, source, time.monotonic())
        self.device.drain_outgoing()
        return None if received is None else received.plaintext


def blast(clients: list[Client], sealed: list[list[bytes]], window: int) -> tuple[float, int]:
    """Send every client's sealed requests, at most ``window`` outstanding; (seconds, lost)."""
    by_fd = {c.sock.fileno(): c for c in clients}
    for c in clients:
        c.sock.setblocking(False)
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    queues = [list(reversed(s)) for s in sealed]
    total = sum(len(q) for q in queues)
    sent = received = lost = 0
    turn = 0
    start = time.perf_counter()
    while received + lost < total:
        while sent < total and sent - received - lost < window:
            for _ in range(len(clients)):
                turn = (turn + 1) % len(clients)
                if queues[turn]:
                    break
            clients[turn].sock.sendto(queues[turn].pop(), clients[turn].map_address)
            sent += 1
        ready = poller.poll(500)
        if not ready:
            lost += sent - received - lost  # gave up on what is outstanding
            continue
        for fd, _ in ready:
            sock = by_fd[fd].sock
            while True:
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
                received += 1
    elapsed = time.perf_counter() - start
    for c in clients:
        c.sock.setblocking(True)
    return elapsed, lost


def rates(
    map_key: bytes, address: Address, args: argparse.Namespace
) -> dict[str, tuple[float, int]]:
    clients = [Client(map_key, address) for _ in range(args.clients)]
    for c in clients:
        c.handshake()
        c.call(c.register())
    out: dict[str, tuple[float, int]] = {}
    targets = [c.public for c in clients]
    for kind in ("refresh", "change", "lookup"):
        figures = []
        lost_total = 0
        for _ in range(args.repeat):
            sealed = []
            for i, c in enumerate(clients):
                frames = []
                for j in range(args.requests):
                    if kind == "refresh":
                        frame = c.register()
                    elif kind == "change":
                        frame = c.deregister() if j % 2 == 0 else c.register()
                    else:
                        frame = encode(Lookup(c.request_id(), targets[(i + j) % len(targets)]))
                    frames.append(c.seal(frame))
                sealed.append(frames)
            elapsed, lost = blast(clients, sealed, args.window)
            figures.append((args.clients * args.requests - lost) / elapsed)
            lost_total += lost
        out[kind] = (statistics.median(figures), lost_total)
    for c in clients:
        c.sock.close()
    return out


def push_latency(map_key: bytes, a_map: Address, b_map: Address, rounds: int) -> list[float]:
    """B on ``b_map`` registers/deregisters; A on ``a_map`` watches B: request → push."""
    b_key = generate_private_key()
    a = Client(map_key, a_map, far=public_key_of(b_key))
    b = Client(map_key, b_map)
    b.key, b.public = b_key, public_key_of(b_key)
    b.device = Device(b_key)
    b.device.add_peer(map_key, endpoint=b_map)
    b.far = a.public
    for c in (a, b):
        c.handshake()
    a.call(a.register())
    time.sleep(0.2)
    latencies = []
    a.sock.settimeout(2)
    for i in range(rounds):
        frame = b.register() if i % 2 == 0 else b.deregister()
        sealed = b.seal(frame)
        t0 = time.perf_counter()
        b.sock.sendto(sealed, b.map_address)
        while True:
            data, source = a.sock.recvfrom(4096)
            plaintext = a.open_frame(data, source)
            if plaintext and decode(plaintext).__class__.__name__ == "Push":
                latencies.append(time.perf_counter() - t0)
                break
        b.sock.settimeout(2)
        b.sock.recvfrom(4096)  # B's own answer
        time.sleep(0.005)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200, help="per client per run")
    parser.add_argument("--window", type=int, default=128, help="requests outstanding")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=200, help="push latency samples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warp-map-bench-") as tmp:
        workdir = Path(tmp)
        valkey = Valkey(workdir)
        map_key = generate_private_key()
        results: dict[str, dict[str, tuple[float, int]]] = {}
        try:
            for label, url in (("in-memory", None), ("valkey", valkey.url)):
                proc = MapProc(workdir, map_key, f"map-{label}", url)
                try:
                    results[label] = rates(public_key_of(map_key), proc.address, args)
                finally:
                    proc.stop()
            print(f"\none warp-map instance, {args.clients} clients, window {args.window}, "
                  f"median of {args.repeat} x {args.clients * args.requests} requests")  # fmt: skip
            print(f"{'requests/s':<12}{'in-memory':>12}{'valkey':>12}{'ratio':>8}")
            for kind in ("refresh", "change", "lookup"):
                mem, val = results["in-memory"][kind][0], results["valkey"][kind][0]
                lost = results["in-memory"][kind][1] + results["valkey"][kind][1]
                note = f"  (lost {lost})" if lost else ""
                print(f"{kind:<12}{mem:>12.0f}{val:>12.0f}{val / mem:>8.2f}{note}")

            map1 = MapProc(workdir, map_key, "map1", valkey.url)
            map2 = MapProc(workdir, map_key, "map2", valkey.url)
            try:
                key = public_key_of(map_key)
                same = push_latency(key, map1.address, map1.address, args.rounds)
                across = push_latency(key, map1.address, map2.address, args.rounds)
            finally:
                map1.stop()
                map2.stop()
            print("\npush latency (B's request sent -> A's push received), ms")
            for label, samples in (("same instance", same), ("across instances", across)):
                ms = sorted(1000 * s for s in samples)
                p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
                print(f"{label:<18} median {statistics.median(ms):6.2f}  p99 {p99:6.2f}  "
                      f"(n={len(ms)})")  # fmt: skip
        finally:
            valkey.stop()


if __name__ == "__main__":
    main()
