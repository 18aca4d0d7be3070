"""`GatewayCore`s driven against each other in memory, in virtual time (no sockets, no loop):
handshake and data both ways, a fleet where one far gate never answers, a tun gate shared by
two far gates routing by allowed_ips."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from warp.config import GatewayConfig, parse_gateway_config
from warp.core import GatePaused, GateResumed, GatewayCore
from warp.core.session import SEND_QUEUE_PAUSE
from warp.core.snapshot import snapshot
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.paths.path import Address

LATENCY = 0.005


@dataclass
class Node:
    """One gateway on the simulated network: its core and its uplinks' addresses."""

    core: GatewayCore
    uplinks: dict[str, Address]
    delivered: dict[str, list[bytes]] = field(default_factory=dict)
    delivered_at: dict[bytes, float] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)


class Net:
    """Every uplink address reaches every other one after LATENCY; a node that is down
    receives nothing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.nodes: dict[str, Node] = {}
        self._at: dict[Address, tuple[Node, str]] = {}
        self._flight: list[tuple[float, int, Node, str, Address, bytes]] = []
        self._seq = itertools.count()
        self.down: set[str] = set()

    def add(self, name: str, config: GatewayConfig, uplinks: dict[str, Address]) -> Node:
        core = GatewayCore(config, rng=random.Random(len(self.nodes)), now=self.now)
        node = Node(core, uplinks)
        self.nodes[name] = node
        for uplink, address in uplinks.items():
            self._at[address] = (node, uplink)
        for far_name, far in config.far_gates.items():
            core.set_static_endpoints(far_name, [(e.host, e.port) for e in far.endpoints])
        core.start(self.now)
        for uplink in uplinks:
            core.uplink_added(uplink, self.now)
        self._drain(node)
        return node

    def send(self, node: Node, tunnel: str, payload: bytes) -> bool:
        go_on = node.core.gate_datagram(tunnel, payload, self.now)
        if not go_on:
            node.paused.add(tunnel)
        self._drain(node)
        return go_on

    def _drain(self, node: Node) -> None:
        core = node.core
        for uplink, remote, data in core.datagrams_to_send():
            target = self._at.get(remote)
            if target is None:
                continue
            heapq.heappush(
                self._flight,
                (
                    self.now + LATENCY,
                    next(self._seq),
                    target[0],
                    target[1],
                    node.uplinks[uplink],
                    data,
                ),
            )
        for tunnel, datagram in core.gate_deliveries():
            node.delivered.setdefault(tunnel, []).append(datagram)
            node.delivered_at[datagram] = self.now
        for event in core.events():
            if isinstance(event, GatePaused):
                node.paused.add(event.tunnel)
            elif isinstance(event, GateResumed):
                node.paused.discard(event.tunnel)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [d for n in self.nodes.values() if (d := n.core.next_deadline()) is not None]
            if self._flight:
                due.append(self._flight[0][0])
            t = min(due, default=end)
            if t > end:
                self.now = end
                return
            self.now = max(self.now, t)
            while self._flight and self._flight[0][0] <= self.now:
                _, _, node, uplink, source, data = heapq.heappop(self._flight)
                if self._name(node) not in self.down:
                    node.core.datagram_received(uplink, source, data, self.now)
                    self._drain(node)
            for node in self.nodes.values():
                deadline = node.core.next_deadline()
                if deadline is not None and deadline <= self.now:
                    node.core.handle_timer(self.now)
                    self._drain(node)

    def _name(self, node: Node) -> str:
        return next(name for name, n in self.nodes.items() if n is node)


KEYS = {name: generate_private_key() for name in ("op", "truck1", "truck2")}
ADDRESS = {"op": ("10.0.0.1", 4000), "truck1": ("10.0.1.1", 4000), "truck2": ("10.0.2.1", 4000)}


def _pub(name: str) -> str:
    return encode_key(public_key_of(KEYS[name]))


def _config(me: str, body: str) -> GatewayConfig:
    return parse_gateway_config(
        f'private_key = "{encode_key(KEYS[me])}"\nlisten_port = 4000\n'
        '[interfaces]\nholepunch_keep_alive_interval = "200ms"\npath_timeout = "1s"\n' + body
    )


def _truck(me: str, tunnel: str, gate: str) -> GatewayConfig:
    host, port = ADDRESS["op"]
    return _config(
        me,
        f'[far_gate]\npublic_key = "{_pub("op")}"\nendpoints = ["{host}:{port}"]\n'
        f"[tunnels.{tunnel}]\ngate = {gate}\n",
    )


def _operator(tunnels: str, allowed: dict[str, str] | None = None) -> GatewayConfig:
    far = ""
    for truck in ("truck1", "truck2"):
        host, port = ADDRESS[truck]
        far += f'[far_gates.{truck}]\npublic_key = "{_pub(truck)}"\nendpoints = ["{host}:{port}"]\n'
        if allowed:
            far += f'allowed_ips = ["{allowed[truck]}"]\n'
    return _config("op", far + tunnels)


def _unix(path: str) -> str:
    return f'{{ type = "unix", path = "/tmp/warp-core-test/{path}.sock" }}'


def test_handshake_and_data_both_ways() -> None:
    net = Net()
    host, port = ADDRESS["truck1"]
    op = net.add(
        "op",
        _config(
            "op",
            f'[far_gate]\npublic_key = "{_pub("truck1")}"\nendpoints = ["{host}:{port}"]\n'
            f"[tunnels.video]\ngate = {_unix('op')}\n",
        ),
        {"up1": ADDRESS["op"]},
    )
    truck = net.add("truck1", _truck("truck1", "video", _unix("t1")), {"up1": ADDRESS["truck1"]})
    net.run(1.0)
    assert op.core.sessions["default"].handshake_state == "established"
    assert truck.core.sessions["default"].handshake_state == "established"
    out = [b"op->truck %d" % i for i in range(100)]
    back = [b"truck->op %d" % i for i in range(100)]
    for a, b in zip(out, back, strict=True):
        net.send(op, "video", a)
        net.send(truck, "video", b)
        net.run(0.001)
    net.run(0.5)
    assert sorted(truck.delivered["video"]) == sorted(out)
    assert sorted(op.delivered["video"]) == sorted(back)


def test_a_far_gate_that_never_answers_does_not_stall_the_other() -> None:
    """truck2 is down: its tunnel's queue fills and only its gate pauses; truck1 gets every
    datagram, on time, and its gate is never paused."""
    net = Net()
    net.down.add("truck2")
    op = net.add(
        "op",
        _operator(
            f'[tunnels.video1]\nfar_gate = "truck1"\ngate = {_unix("v1")}\n'
            f'[tunnels.video2]\nfar_gate = "truck2"\ngate = {_unix("v2")}\n'
            # long enough for truck2's queue to fill rather than expire
            'transport = { send_deadline = "10s" }\n'
        ),
        {"up1": ADDRESS["op"]},
    )
    truck1 = net.add("truck1", _truck("truck1", "video1", _unix("t1")), {"up1": ADDRESS["truck1"]})
    net.add("truck2", _truck("truck2", "video2", _unix("t2")), {"up1": ADDRESS["truck2"]})
    net.run(1.0)
    assert op.core.sessions["truck1"].handshake_state == "established"
    assert op.core.sessions["truck2"].handshake_state != "established"
    sent = {}
    for i in range(3 * SEND_QUEUE_PAUSE):
        payload = b"to truck1 %d" % i
        assert net.send(op, "video1", payload), "truck1's gate was paused"
        sent[payload] = net.now
        if "video2" not in op.paused:
            net.send(op, "video2", b"to truck2 %d" % i)
        net.run(0.001)
    net.run(0.5)
    assert "video2" in op.paused  # back-pressure on the dead far gate's gate only
    assert "video1" not in op.paused
    assert sorted(truck1.delivered["video1"]) == sorted(sent)  # every one, exactly once
    # none waited: one-way latency plus at most a millisecond of sending turns
    assert max(truck1.delivered_at[p] - t for p, t in sent.items()) <= LATENCY + 0.001
    assert len(op.core.sessions["truck1"].send_queue) == 0
    assert len(op.core.sessions["truck2"].send_queue) >= SEND_QUEUE_PAUSE


def _ipv4(destination: str, payload: bytes, source: str = "10.9.0.1") -> bytes:
    body = payload
    total = 20 + len(body)
    header = bytes([0x45, 0, total >> 8, total & 0xFF, 0, 0, 0, 0, 64, 17, 0, 0])
    header += bytes(int(x) for x in source.split("."))
    header += bytes(int(x) for x in destination.split("."))
    return header + body


def test_shared_tun_gate_routes_by_allowed_ips() -> None:
    net = Net()
    tun = '{ type = "tun", name = "warp0", address = "10.9.0.1/24" }'
    op = net.add(
        "op",
        _operator(
            f"[tunnels.tun]\ngate = {tun}\n",
            allowed={"truck1": "10.9.0.11/32", "truck2": "10.9.0.12/32"},
        ),
        {"up1": ADDRESS["op"]},
    )
    assert op.core.config.tunnels["tun"].far_gate is None  # shared
    trucks = {
        name: net.add(name, _truck(name, "tun", tun), {"up1": ADDRESS[name]})
        for name in ("truck1", "truck2")
    }
    net.run(1.0)
    to = {"truck1": "10.9.0.11", "truck2": "10.9.0.12"}
    for i in range(20):
        for name, address in to.items():
            net.send(op, "tun", _ipv4(address, b"%s %d" % (name.encode(), i)))
        net.send(op, "tun", _ipv4("10.9.0.99", b"nowhere"))
        net.run(0.002)
    net.run(0.5)
    for name, address in to.items():
        got = trucks[name].delivered["tun"]
        assert len(got) == 20
        assert all(packet[16:20] == bytes(int(x) for x in address.split(".")) for packet in got)
    assert op.core.counters["no_route"] == 20
    # and back: each truck's packets arrive at the shared gate
    for name, truck in trucks.items():
        net.send(truck, "tun", _ipv4("10.9.0.1", name.encode(), source=to[name]))
    net.run(0.5)
    assert sorted(p[20:] for p in op.delivered["tun"]) == [b"truck1", b"truck2"]
    # cryptokey routing on receive: truck1 speaking with truck2's address gets nothing in
    net.send(trucks["truck1"], "tun", _ipv4("10.9.0.1", b"spoofed", source=to["truck2"]))
    net.send(trucks["truck1"], "tun", _ipv4("10.9.0.1", b"outsider", source="10.9.0.99"))
    net.run(0.5)
    assert sorted(p[20:] for p in op.delivered["tun"]) == [b"truck1", b"truck2"]
    status = snapshot(op.core, net.now, uptime=1.0, uplink_rows=[], gates={})
    (tunnel,) = [t for t in status["tunnels"] if t["far_gate"] == "truck1"]
    assert tunnel["drops"].get("source_not_allowed") == 2, tunnel
