"""An operator's `GatewayCore` with 1 vs N vehicles, in memory and in virtual time (no sockets):
the operator core's CPU per datagram carried and its first-datagram time per vehicle.

Every gateway has one uplink; links have a fixed one-way latency (5 ms), no loss; vehicles
reach the operator through `far_gate.endpoints` and the operator reaches them through
`far_gates.<v>.endpoints` (no map). Each vehicle exchanges ``--rate`` datagrams/s of
``--size`` B each way with the operator for ``--seconds`` of virtual time, (k, n) = (2, 4).
The operator core's own calls are timed (CPU of the decisions, sealing and FEC; no socket).

Run: ``python bench/core_fleet.py [--vehicles 1 3] [--rate 1000] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warp.config import GatewayConfig, parse_gateway_config
from warp.core import GatewayCore
from warp.keys import encode_key, generate_private_key, public_key_of

LATENCY = 0.005
PORT = 4000


def _config(key: bytes, body: str) -> GatewayConfig:
    return parse_gateway_config(f'private_key = "{encode_key(key)}"\nlisten_port = {PORT}\n' + body)


def _tunnel(name: str, far_gate: str | None, port: int) -> str:
    """A loopback tunnel with (k, n) = (2, 4); id 7 on every side (one per far gate)."""
    far = f'far_gate = "{far_gate}"\n' if far_gate else ""
    return (
        f"[tunnels.{name}]\n{far}tunnel_id = 7\ngate = {{ application_to_gate = {port} }}\n"
        f"transport = {{ redundancy = {{ required_shards = 2, num_shards = 4 }} }}\n"
    )


def run(vehicles: int, rate: float, seconds: float, size: int) -> tuple[float, list[float]]:
    """(operator µs per datagram carried, first-datagram time per vehicle in s)."""
    keys = {f"v{i}": generate_private_key() for i in range(vehicles)}
    op_key = generate_private_key()
    address = {name: (f"10.0.{i + 1}.1", PORT) for i, name in enumerate(keys)}
    address["op"] = ("10.0.0.1", PORT)
    body = ""
    for name, key in keys.items():
        host, port = address[name]
        body += f'[far_gates.{name}]\npublic_key = "{encode_key(public_key_of(key))}"\n'
        body += f'endpoints = ["{host}:{port}"]\n'
    for i, name in enumerate(keys):
        body += _tunnel(f"video_{name}", name, 59401 + i)
    op_config = _config(op_key, body)
    cores: dict[str, GatewayCore] = {"op": GatewayCore(op_config, rng=random.Random(0), now=0.0)}
    host, port = address["op"]
    for i, (name, key) in enumerate(keys.items()):
        config = _config(
            key,
            f'[far_gate]\npublic_key = "{encode_key(public_key_of(op_key))}"\n'
            f'endpoints = ["{host}:{port}"]\n' + _tunnel("video", None, 59401),
        )
        cores[name] = GatewayCore(config, rng=random.Random(i + 1), now=0.0)
    at = {addr: name for name, addr in address.items()}
    flight: list[tuple[float, int, str, tuple[str, int], bytes]] = []
    seq = itertools.count()
    first: dict[str, float] = {}
    carried = 0
    spent = 0.0
    now = 0.0

    def drain(name: str) -> None:
        nonlocal carried
        core = cores[name]
        for _uplink, remote, data in core.datagrams_to_send():
            target = at.get(remote)
            if target is not None:
                heapq.heappush(flight, (now + LATENCY, next(seq), target, address[name], data))
        for _tunnel, _datagram in core.gate_deliveries():
            carried += 1
            if name != "op":
                first.setdefault(name, now)
        core.events()

    def timed(name: str, call: object, *args: object) -> None:
        nonlocal spent
        started = time.perf_counter()
        call(*args)  # type: ignore[operator]
        drain(name)
        if name == "op":
            spent += time.perf_counter() - started

    for name, core in cores.items():
        config = core.config
        for far_name, far in config.far_gates.items():
            core.set_static_endpoints(far_name, [(e.host, e.port) for e in far.endpoints])
        timed(name, core.start, now)
        timed(name, core.uplink_added, "up1", now)
    interval = 1.0 / rate
    next_send = 0.0
    end = seconds
    payload = bytes(size)
    while now < end:
        due = [d for c in cores.values() if (d := c.next_deadline()) is not None]
        if flight:
            due.append(flight[0][0])
        due.append(next_send)
        now = max(now, min(due))
        while flight and flight[0][0] <= now:
            _, _, target, source, data = heapq.heappop(flight)
            timed(target, cores[target].datagram_received, "up1", source, data, now)
        for name, core in cores.items():
            deadline = core.next_deadline()
            if deadline is not None and deadline <= now:
                timed(name, core.handle_timer, now)
        if next_send <= now:
            for name in keys:
                timed("op", cores["op"].gate_datagram, f"video_{name}", payload, now)
                timed(name, cores[name].gate_datagram, "video", payload, now)
            next_send += interval
    return spent / max(carried, 1) * 1e6, [first.get(name, float("nan")) for name in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=200)
    args = parser.parse_args()
    print("vehicles  operator µs/datagram  first datagram per vehicle (virtual s)")
    for vehicles in args.vehicles:
        per, firsts = run(vehicles, args.rate, args.seconds, args.size)
        print(f"{vehicles:>8}  {per:>20.1f}  " + " ".join(f"{t:.3f}" for t in firsts))


if __name__ == "__main__":
    main()
