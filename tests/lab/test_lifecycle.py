"""A second `warp run` next to a running gateway (see test_gateway.py for the topology): the
same key with another control socket (a double start, a typo'd `--socket`), then another key
with the same control socket. Each exits 1 with one line before it sends anything, and the
running gateways' stream, 500 datagrams/s each way, sees no silence longer than 100 ms.
"""

from __future__ import annotations

import time

from tests.lab.test_gateway import (
    MAP_PORT,
    WARP,
    Net,
    app_args,
    app_result,
    establish,
    loopback_gate,
    net,
)
from warp.keys import encode_key, generate_private_key, public_key_of

__all__ = ["net"]  # the fixture

RATE = 500
SECONDS = 8


def test_second_instance_is_refused_and_the_stream_sees_no_gap(net: Net) -> None:
    a, b = establish(net, loopback_gate(), k=2, n=4)
    a.config.chmod(0o600)  # no key-file warning: stderr is the one error line
    handshakes = [gw.status()["session"]["handshakes"] for gw in (a, b)]
    count = RATE * SECONDS
    start_at = time.time() + 1.0
    stream = [
        net.app(side, app_args(tag, count, RATE, count, "--start-at", f"{start_at:.3f}",
                               "--gap", "0.1"), lifetime_s=30)
        for side, tag in (("a", 1), ("b", 2))
    ]  # fmt: skip
    time.sleep(max(0.0, start_at + 2.0 - time.time()))
    lab, w = net.lab, net.lab.workdir

    # a's own config, another control socket
    same_key = lab.run(
        net.a.host_ns, [*WARP, "run", str(a.config), "--socket", str(w / "typo.sock")],
        timeout=20, check=False,
    )  # fmt: skip
    # another key, another gate, a's control socket
    other = generate_private_key()
    config_c = w / "c.toml"
    config_c.write_text(
        f'private_key = "{encode_key(other)}"\n'
        '[interfaces]\ninclusion_patterns = ["^up"]\nexclusion_patterns = []\n'
        f'[warp_map]\naddress = "{lab.public_address}:{MAP_PORT}"\n'
        f'public_key = "{encode_key(public_key_of(net.map_key))}"\n'
        f'[far_gate]\npublic_key = "{encode_key(public_key_of(net.keys["b"]))}"\n'
        "[tunnels.app.gate]\napplication_to_gate = 59411\n"
        f'[control]\nsocket = "{a.socket}"\n'
    )
    config_c.chmod(0o600)
    same_socket = lab.run(net.a.host_ns, [*WARP, "run", str(config_c)], timeout=20, check=False)

    results = [app_result(proc, 60) for proc in stream]
    print(f"\nsame key: exit {same_key.returncode}: {same_key.stderr.strip()}")
    print(f"same control socket: exit {same_socket.returncode}: {same_socket.stderr.strip()}")
    for side, result in zip("ab", results, strict=True):
        print(f"{side} received {result['unique']}/{count}, silences > 100 ms: {result['gaps']}")

    assert same_key.returncode == 1 and same_key.stderr.count("\n") == 1, same_key.stderr
    assert same_key.stderr.startswith("warp: error: another warp is running with this key ")
    assert same_socket.returncode == 1 and same_socket.stderr.count("\n") == 1, same_socket
    assert same_socket.stderr.startswith(f"warp: error: control socket {a.socket} is in use ")
    for result in results:
        assert result["unique"] == count and result["duplicates"] == 0, result
        assert result["gaps"] == [], result["gaps"]
    # nothing was sent: no new handshake with either gateway, nothing (de)registered
    assert [gw.status()["session"]["handshakes"] for gw in (a, b)] == handshakes
    map_log = net.map_log.read_text()
    assert "map.deregistered" not in map_log
    assert encode_key(public_key_of(other))[:12] not in map_log
    assert a.proc is not None and a.proc.poll() is None and a.socket.exists()
