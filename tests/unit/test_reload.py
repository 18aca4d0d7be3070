"""Live reload in the sans-I/O core: `GatewayCore.reconfigure` on cores driven against each
other in memory, in virtual time (the `Net` of test_core). What the new config leaves alone
keeps its session (no new handshake) and loses no datagram while the rest changes."""

from __future__ import annotations

import pytest

from tests.unit.test_core import ADDRESS, Net, Node, _config, _pub, _truck, _unix
from warp.config import GatewayConfig
from warp.core.reload import ReloadRefused, plan_reload
from warp.keys import generate_private_key


def _far(truck: str) -> str:
    host, port = ADDRESS[truck]
    return f'[far_gates.{truck}]\npublic_key = "{_pub(truck)}"\nendpoints = ["{host}:{port}"]\n'


def _tunnel(name: str, truck: str, extra: str = "") -> str:
    return f'[tunnels.{name}]\nfar_gate = "{truck}"\ngate = {_unix(name)}\n{extra}'


def _op(body: str, *, head: str = "") -> GatewayConfig:
    return _config("op", head + body)


def _stream(net: Net, node: Node, tunnel: str, count: int, tag: bytes) -> list[bytes]:
    """``count`` datagrams at 1 000/s (one per virtual millisecond)."""
    sent = []
    for i in range(count):
        payload = tag + b" %d" % i
        assert net.send(node, tunnel, payload)
        sent.append(payload)
        net.run(0.001)
    return sent


def _two_trucks() -> tuple[Net, Node, Node, Node]:
    """op with one far gate (truck1: tunnels video and logs); truck2 is up but not yet one
    of op's far gates."""
    net = Net()
    op = net.add(
        "op",
        _op(_far("truck1") + _tunnel("video", "truck1") + _tunnel("logs", "truck1")),
        {"up1": ADDRESS["op"]},
    )
    host, port = ADDRESS["op"]
    truck1 = net.add(
        "truck1",
        _config(
            "truck1",
            f'[far_gate]\npublic_key = "{_pub("op")}"\nendpoints = ["{host}:{port}"]\n'
            f"[tunnels.video]\ngate = {_unix('t1v')}\n[tunnels.logs]\ngate = {_unix('t1l')}\n",
        ),
        {"up1": ADDRESS["truck1"]},
    )
    truck2 = net.add("truck2", _truck("truck2", "cam", _unix("t2")), {"up1": ADDRESS["truck2"]})
    net.run(1.0)
    assert op.core.sessions["truck1"].handshake_state == "established"
    return net, op, truck1, truck2


def test_reload_adds_a_far_gate_and_removes_a_tunnel_while_another_streams() -> None:
    net, op, truck1, truck2 = _two_trucks()
    session = op.core.sessions["truck1"]
    handshakes = (session.handshakes, truck1.core.sessions["default"].handshakes)
    sent = _stream(net, op, "video", 500, b"video")
    plan = op.core.reconfigure(
        _op(
            _far("truck1") + _far("truck2") + _tunnel("video", "truck1") + _tunnel("cam", "truck2")
        ),
        net.now,
    )
    net._drain(op)
    assert plan.far_gates_added == ("truck2",) and plan.far_gates_removed == ()
    assert plan.tunnels_removed == ("logs",) and plan.tunnels_added == ("cam",)
    assert plan.gates_closed == ("logs",) and plan.gates_opened == ("cam",)
    sent += _stream(net, op, "video", 500, b"video after")
    net.run(1.0)

    # the untouched tunnel: every datagram, exactly once, over the same session
    assert sorted(truck1.delivered["video"]) == sorted(sent)
    assert op.core.sessions["truck1"] is session
    assert (session.handshakes, truck1.core.sessions["default"].handshakes) == handshakes
    # the new far gate is reached and carries its tunnel
    assert op.core.sessions["truck2"].handshake_state == "established"
    _stream(net, op, "cam", 10, b"cam")
    net.run(0.2)
    assert len(truck2.delivered["cam"]) == 10
    # the removed tunnel carries nothing any more
    assert "logs" not in session.tunnels
    net.send(op, "logs", b"late")
    net.run(0.2)
    assert b"late" not in truck1.delivered.get("logs", [])


def test_redundancy_and_priority_change_in_place_without_loss() -> None:
    net, op, truck1, _ = _two_trucks()
    session = op.core.sessions["truck1"]
    video = session.tunnels["video"]
    epoch = video.encoder.epoch
    sent = _stream(net, op, "video", 300, b"before")
    op.core.reconfigure(
        _op(
            _far("truck1")
            + _tunnel(
                "video",
                "truck1",
                "transport = { priority = 7, redundancy = "
                "{ required_shards = 2, num_shards = 4 } }\n",
            )
            + _tunnel("logs", "truck1")
        ),
        net.now,
    )
    sent += _stream(net, op, "video", 300, b"after")
    net.run(0.5)
    assert sorted(truck1.delivered["video"]) == sorted(sent)
    assert session.tunnels["video"] is video  # the same tunnel, reconfigured
    assert (video.encoder.k, video.encoder.n) == (2, 4)
    assert video.encoder.epoch == epoch  # the far gate's decoder sees one stream
    assert video.config.transport.priority == 7
    assert op.core.sessions["truck1"] is session


def test_a_removed_far_gate_is_forgotten() -> None:
    net, op, _, truck2 = _two_trucks()
    both = _far("truck1") + _far("truck2") + _tunnel("video", "truck1")
    op.core.reconfigure(_op(both + _tunnel("cam", "truck2")), net.now)
    net.run(1.0)
    truck2_key = op.core.sessions["truck2"].key
    assert op.core.sessions["truck2"].handshake_state == "established"

    plan = op.core.reconfigure(_op(_far("truck1") + _tunnel("video", "truck1")), net.now)
    assert plan.far_gates_removed == ("truck2",) and plan.tunnels_removed == ("cam",)
    assert "truck2" not in op.core.sessions
    assert op.core.device.peer(truck2_key) is None
    # what truck2 still sends is not delivered (an unknown peer now)
    _stream(net, truck2, "cam", 20, b"from truck2")
    net.run(0.5)
    assert "cam" not in op.delivered


def test_restart_only_changes_are_refused_and_the_running_config_stays() -> None:
    net, op, _, _ = _two_trucks()
    running = op.core.config
    body = _far("truck1") + _tunnel("video", "truck1") + _tunnel("logs", "truck1")
    other_key = _op(body).model_copy(update={"private_key": generate_private_key()})
    with pytest.raises(ReloadRefused) as refused:
        op.core.reconfigure(other_key, net.now)
    assert [path for path, _ in refused.value.problems] == ["private_key"]
    assert "restart" in refused.value.problems[0][1]
    with pytest.raises(ReloadRefused) as refused:
        op.core.reconfigure(
            _op(body + '[control]\nsocket = "/tmp/other.sock"\n'),
            net.now,
            control_socket_changed=True,
        )
    assert [path for path, _ in refused.value.problems] == ["control.socket"]
    with pytest.raises(ReloadRefused) as refused:
        op.core.reconfigure(_op(body).model_copy(update={"listen_port": 4001}), net.now)
    assert [path for path, _ in refused.value.problems] == ["listen_port"]
    assert op.core.config is running
    assert set(op.core.sessions) == {"truck1"}


def test_interface_patterns_are_applied_live_and_tunnel_moves_are_new_tunnels() -> None:
    body = _far("truck1") + _far("truck2") + _tunnel("video", "truck1")
    old = _op(body)
    new = _op(body, head="").model_copy(
        update={
            "interfaces": old.interfaces.model_copy(
                update={"inclusion_patterns": old.interfaces.exclusion_patterns}
            )
        }
    )
    plan = plan_reload(old, new)
    assert plan.patterns_changed and not plan.tunnels_added and not plan.far_gates_added
    # the same tunnel name towards another far gate: a new tunnel, its gate kept open
    moved = plan_reload(old, _op(_far("truck1") + _far("truck2") + _tunnel("video", "truck2")))
    assert moved.tunnels_removed == ("video",) and moved.tunnels_added == ("video",)
    assert moved.gates_opened == () and moved.gates_closed == ()


def test_datagrams_queued_for_a_removed_tunnel_are_dropped_and_counted() -> None:
    """truck1 unreachable: op queues logs datagrams (long send_deadline); a reload removes
    logs; once truck1 is back they are dropped (counter tunnel_removed), never sent."""
    net = Net()
    slow = 'transport = { send_deadline = "30s" }\n'
    op = net.add(
        "op",
        _op(_far("truck1") + _tunnel("video", "truck1") + _tunnel("logs", "truck1", slow)),
        {"up1": ADDRESS["op"]},
    )
    host, port = ADDRESS["op"]
    truck1 = net.add(
        "truck1",
        _config(
            "truck1",
            f'[far_gate]\npublic_key = "{_pub("op")}"\nendpoints = ["{host}:{port}"]\n'
            f"[tunnels.video]\ngate = {_unix('t1v')}\n[tunnels.logs]\ngate = {_unix('t1l')}\n",
        ),
        {"up1": ADDRESS["truck1"]},
    )
    net.run(1.0)
    net.down.add("truck1")
    net.run(3.0)  # its paths are dead: what op's gates give is queued
    for i in range(20):
        net.send(op, "logs", b"log %d" % i)
    assert len(op.core.sessions["truck1"].send_queue) == 20
    op.core.reconfigure(_op(_far("truck1") + _tunnel("video", "truck1")), net.now)
    net.down.clear()
    net.run(3.0)
    assert op.core.counters["tunnel_removed"] == 20
    assert "logs" not in truck1.delivered
    video = _stream(net, op, "video", 20, b"video")
    net.run(0.5)
    assert sorted(truck1.delivered["video"]) == sorted(video)


def test_a_plain_wireguard_peer_whose_tun_routes_change_is_a_new_peer() -> None:
    """A plain WireGuard far gate routes its tun gate's allowed_ips: new ones need the peer
    set up again (a new far gate session), not just a new gate."""

    def plain(allowed: str) -> GatewayConfig:
        host, port = ADDRESS["truck1"]
        return _op(
            f'[far_gate]\npublic_key = "{_pub("truck1")}"\nendpoints = ["{host}:{port}"]\n'
            'kind = "wireguard"\n[tunnels.wg]\n'
            f'gate = {{ type = "tun", name = "wg9", allowed_ips = ["{allowed}"] }}\n'
        )

    plan = plan_reload(plain("10.1.0.0/24"), plain("10.2.0.0/24"))
    assert plan.far_gates_removed == plan.far_gates_added == ("default",)
    assert plan.gates_closed == plan.gates_opened == ("wg",)
    assert plan_reload(plain("10.1.0.0/24"), plain("10.1.0.0/24")).empty
