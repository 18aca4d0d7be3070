"""Unix gates both ways through two `warp run` gateways behind cone NAT (see test_gateway.py),
and back-pressure: a saturated uplink slows a blocking sender down to the link rate.

(k, n) = (1, 2): with both uplinks up each block has one shard per uplink (either uplink alone
delivers everything); with one uplink down the scheduler puts both shards of every block on
the live one (one path: everything goes on it), so the wire carries 2x the payload.
"""

from __future__ import annotations

import time
from typing import Any

from tests.lab.test_gateway import Net, app_result, net, paths_of

__all__ = ["net"]  # the fixture

RATE_KBIT = 2000
#: tbf queue limit (bytes): above what an uplink socket can have queued (2 x its 128 KiB
#: SO_SNDBUF, counted in truesize >= length), so the socket fills up before tbf drops.
TBF_LIMIT = 1 << 20
L2_L3_L4 = 14 + 20 + 8  # Ethernet + IPv4 + UDP header bytes tbf counts per UDP payload


def unix_gate(net: Net, name: str) -> str:
    w = net.lab.workdir
    return f'type = "unix"\npath = "{w / (name + "-gate.sock")}"\n' + (
        f'application_path = "{w / (name + "-app.sock")}"'
    )


def unix_app_args(net: Net, name: str, tag: int, count: int, rate: float, expect: int,
                  *more: str) -> list[str]:  # fmt: skip
    w = net.lab.workdir
    return [
        "--bind", str(w / f"{name}-app.sock"), "--to", str(w / f"{name}-gate.sock"),
        "--tag", str(tag), "--peer-tag", str(3 - tag),
        "--count", str(count), "--rate", str(rate), "--expect", str(expect), *more,
    ]  # fmt: skip


def check_exact(result: dict[str, Any], count: int) -> None:
    assert result["sent"] == count and result["send_errors"] == 0, result
    assert result["unique"] == count, result
    assert result["duplicates"] == 0 and result["corrupt"] == 0 and result["foreign"] == 0


def test_unix_gates_large_datagrams_and_back_pressure_to_link_rate(net: Net) -> None:
    for site in (net.a, net.b):
        # Receivers' unix queues: room for a burst of rebuilt datagrams (default 10).
        net.lab.run(site.host_ns, ["sysctl", "-q", "-w", "net.unix.max_dgram_qlen=512"])
    a = net.write_config("a", unix_gate(net, "a"), k=1, n=2)
    b = net.write_config("b", unix_gate(net, "b"), k=1, n=2)
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    net.wait_paths("b", 4)

    # 8 KiB and 60 KiB datagrams, both ways at once, byte-exact.
    count = 200
    start_at = f"{time.time() + 1.0:.3f}"
    sizes = ("--sizes", "8192,61440")
    pa = net.app("a", unix_app_args(net, "a", 1, count, 50, count, "--start-at", start_at,
                                    *sizes), lifetime_s=40)  # fmt: skip
    pb = net.app("b", unix_app_args(net, "b", 2, count, 50, count, "--start-at", start_at,
                                    *sizes), lifetime_s=40)  # fmt: skip
    ra, rb = app_result(pa, 60), app_result(pb, 60)
    for side, result in (("a", ra), ("b", rb)):
        print(f"\n{side}: 8/60 KiB: sent {result['sent']}, received {result['unique']} unique, "
              f"latency p50 {result['latency_ms_p50']} ms")  # fmt: skip
        check_exact(result, count)

    # Back-pressure: a's up1 shaped to 2 Mbit/s (host egress, big tbf queue), up2 down.
    site = net.a
    net.lab.run(site.host_ns, ["tc", "qdisc", "replace", "dev", "up1", "root", "tbf",
                               "rate", f"{RATE_KBIT}kbit", "burst", "5000",
                               "limit", str(TBF_LIMIT)])  # fmt: skip
    site.uplink("up2").set_down()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        snap = a.status()
        if all(p["state"] == "dead" for p in paths_of(snap, "up2")):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"up2 paths not dead: {snap['paths']}")
    before = a.status()
    tx0 = sum(p["tx_bytes"] for p in paths_of(before, "up1"))
    pk0 = sum(p["tx_packets"] for p in paths_of(before, "up1"))

    n_datagrams = 1200
    size = 1024
    sink = net.app("b", unix_app_args(net, "b", 2, 0, 0, n_datagrams, "--grace", "30"), 60)
    assert sink.stdout is not None and '"ready"' in sink.stdout.readline()  # socket bound
    source = net.app("a", unix_app_args(net, "a", 1, n_datagrams, 0, 0, "--size", str(size),
                                        "--grace", "0"), 60)  # fmt: skip
    rs = app_result(source, 70)
    rr = app_result(sink, 70)
    after = a.status_cli()
    tx1 = sum(p["tx_bytes"] for p in paths_of(after, "up1"))
    pk1 = sum(p["tx_packets"] for p in paths_of(after, "up1"))
    packets, wire = pk1 - pk0, tx1 - tx0
    wire_per_datagram = (wire + packets * L2_L3_L4) / n_datagrams
    link_datagrams_per_s = RATE_KBIT * 1000 / 8 / wire_per_datagram
    sender_rate = n_datagrams / rs["send_seconds"]
    link_seconds = n_datagrams / link_datagrams_per_s
    print(f"blocking sender: {n_datagrams} x {size} B in {rs['send_seconds']} s = "
          f"{sender_rate:.1f} datagrams/s; link {RATE_KBIT} kbit/s carries "
          f"{link_datagrams_per_s:.1f}/s ({wire_per_datagram:.0f} wire bytes per datagram, "
          f"{packets} packets); ratio {sender_rate / link_datagrams_per_s:.3f}; "
          f"last delivery {rr['last_rx'] - rs['send_started']:.2f} s after the first send "
          f"(link time {link_seconds:.2f} s); latency p50 {rr['latency_ms_p50']} ms "
          f"p99 {rr['latency_ms_p99']} ms")  # fmt: skip
    qdisc = net.lab.run(site.host_ns, ["tc", "-s", "qdisc", "show", "dev", "up1"]).stdout
    assert "dropped 0," in qdisc, qdisc  # the socket filled up before tbf's queue did
    assert rs["sent"] == n_datagrams and rs["send_errors"] == 0, rs
    assert rr["unique"] == n_datagrams, rr
    assert rr["duplicates"] == 0 and rr["corrupt"] == 0, rr
    # Slowed to about the link rate: what the sender got ahead by is what the kernel holds
    # (the gate's queue and up1's send buffer), about a second at this rate.
    assert 0.8 * link_datagrams_per_s <= sender_rate <= 1.25 * link_datagrams_per_s
    assert rr["last_rx"] - rs["send_started"] >= 0.9 * link_seconds
    # warp dropped nothing, on either side.
    (tunnel,) = after["tunnels"]
    # (with k = 1 every second shard of a block is surplus: counted, not a loss)
    assert {r: c for r, c in tunnel["drops"].items() if r != "duplicate_shards"} == {}, tunnel
    assert tunnel["datagrams_in"] >= count + n_datagrams, tunnel
    assert all(u["tx_dropped"] == 0 for u in after["uplinks"]), after["uplinks"]
    assert after["counters"]["send_failed"] == 0, after["counters"]
    (tunnel_b,) = b.status()["tunnels"]
    assert {r: c for r, c in tunnel_b["drops"].items() if r != "duplicate_shards"} == {}
    assert tunnel_b["datagrams_lost"] == 0, tunnel_b
