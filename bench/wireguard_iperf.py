"""TCP throughput of WARP as a plain userspace WireGuard, next to wireguard-go itself.

    sudo .venv/bin/python bench/wireguard_iperf.py [--repeat 3] [--seconds 5] [--with-tun-peer]

Two network namespaces joined by a veth pair (tests/interop/wglab.py); wireguard-go runs in
namespace B in every case. In namespace A runs, in turn:

* ``warp``: ``warp run CONFIG.toml`` with one tun gate and ``far_gate.kind = "wireguard"``;
* ``wireguard-go``: a second wireguard-go (the reference);
* ``tun-peer`` (with ``--with-tun-peer``): tests/interop/tun_peer.py, the TUN gate and the
  WireGuard core on one UDP socket without the rest of the node (where the node's cost lies).

For each, iperf3 TCP runs ``--repeat`` times ``--seconds`` s in each direction (A→B: A sends;
B→A: ``-R``), the cases interleaved run by run so that drifting background load hits them
alike. Printed: receiver-side Mbit/s per run, the medians, and warp / wireguard-go. Both ends
share the machine's CPUs, as in the notes' wireguard-go measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.interop.wglab import (  # noqa: E402
    PYTHON,
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    UNDERLAY_A,
    UNDERLAY_B,
    WG_PORT,
    KeyPair,
    WgLab,
    WgPeer,
    cleanup_stale,
    iperf3,
    prerequisites_missing,
    start_warp_run,
    warp_run_config,
)

DIRECTIONS = ("A->B", "B->A")


def far_side(lab: WgLab, ours: KeyPair, psk: bytes) -> KeyPair:
    theirs = KeyPair.generate()
    lab.wireguard_go(
        "b",
        keys=theirs,
        peers=[
            WgPeer(
                ours.public,
                allowed_ips=[f"{TUNNEL_A}/32", f"{TUNNEL6_A}/128"],
                endpoint=f"{UNDERLAY_A}:{WG_PORT}",
                preshared_key=psk,
            )
        ],
        addresses=[f"{TUNNEL_B}/24", f"{TUNNEL6_B}/64"],
    )
    return theirs


def warm_up(lab: WgLab) -> None:
    """One answered echo first: the handshake is not part of the measurement."""
    lab.exec("a", ["ping", "-c", "1", "-w", "15", TUNNEL_B], timeout=30)


def measure_once(lab: WgLab, seconds: float) -> dict[str, float]:
    result = {}
    for direction in DIRECTIONS:
        run = iperf3(lab, TUNNEL_B, seconds=seconds, reverse=direction == "B->A")
        result[direction] = round(run["received_mbps"], 1)
        time.sleep(0.5)
    return result


def with_warp(lab: WgLab) -> None:
    ours, psk = KeyPair.generate(), os.urandom(32)
    theirs = far_side(lab, ours, psk)
    config = warp_run_config(lab, ours=ours, theirs=theirs, psk=psk)
    start_warp_run(lab, config)  # stopped by the lab's teardown


def with_wireguard_go(lab: WgLab) -> None:
    ours, psk = KeyPair.generate(), os.urandom(32)
    theirs = far_side(lab, ours, psk)
    lab.wireguard_go(
        "a",
        keys=ours,
        peers=[
            WgPeer(
                theirs.public,
                allowed_ips=[f"{TUNNEL_B}/32", f"{TUNNEL6_B}/128"],
                endpoint=f"{UNDERLAY_B}:{WG_PORT}",
                preshared_key=psk,
            )
        ],
        addresses=[f"{TUNNEL_A}/24", f"{TUNNEL6_A}/64"],
    )


def with_tun_peer(lab: WgLab) -> None:
    ours, psk = KeyPair.generate(), os.urandom(32)
    theirs = far_side(lab, ours, psk)
    cfg = {
        "private_key": ours.private.hex(),
        "peer_public_key": theirs.public.hex(),
        "preshared_key": psk.hex(),
        "bind": ["0.0.0.0", WG_PORT],
        "endpoint": [UNDERLAY_B, WG_PORT],
        "tun": {
            "name": "warp0",
            "addresses": [f"{TUNNEL_A}/24", f"{TUNNEL6_A}/64"],
            "mtu": 1420,
            "allowed_ips": [f"{TUNNEL_B}/32", f"{TUNNEL6_B}/128"],
        },
    }
    path = lab.workdir / "tun_peer.json"
    path.write_text(json.dumps(cfg))
    proc = lab.spawn("a", [PYTHON, str(REPO / "tests" / "interop" / "tun_peer.py"), str(path)])
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"READY":
        raise RuntimeError("tun_peer.py did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per direction (3-5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one iperf3 run")
    parser.add_argument("--with-tun-peer", action="store_true", help="also measure tun_peer.py")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()
    missing = prerequisites_missing((*("ip", "wireguard-go", "wg", "timeout"), "iperf3", "ss"))
    if missing:
        print(f"wireguard_iperf: cannot run: {missing}", file=sys.stderr)
        return 1
    cleanup_stale()
    cases: list[tuple[str, Callable[[WgLab], None]]] = [
        ("warp", with_warp),
        ("wireguard-go", with_wireguard_go),
    ]
    if args.with_tun_peer:
        cases.append(("tun-peer", with_tun_peer))
    samples: dict[str, dict[str, list[float]]] = {n: {d: [] for d in DIRECTIONS} for n, _ in cases}
    with contextlib.ExitStack() as stack:
        labs = {}
        for name, setup in cases:  # all labs up at once; idle ones cost nothing
            lab = stack.enter_context(WgLab())
            setup(lab)
            warm_up(lab)
            labs[name] = lab
        for rep in range(args.repeat):  # interleaved, so drifting load hits every case alike
            for name, lab in labs.items():
                for d, mbps in measure_once(lab, args.seconds).items():
                    samples[name][d].append(mbps)
                if not args.json:
                    line = "  ".join(f"{d} {samples[name][d][-1]:7.1f}" for d in DIRECTIONS)
                    print(f"run {rep + 1} {name:>13}: {line} Mbit/s", flush=True)
    results: dict[str, Any] = {
        name: {d: {"samples": s, "median": round(statistics.median(s), 1)} for d, s in per.items()}
        for name, per in samples.items()
    }
    ratios = {
        d: round(results["warp"][d]["median"] / results["wireguard-go"][d]["median"], 3)
        for d in DIRECTIONS
    }
    if args.json:
        print(json.dumps({"results": results, "warp/wireguard-go": ratios}))
        return 0
    print()
    print(f"iperf3 TCP, {args.seconds:g} s x {args.repeat} per direction, medians (Mbit/s)")
    header = f"{'':>13} " + " ".join(f"{d:>9}" for d in DIRECTIONS)
    print(header)
    for name in results:
        print(f"{name:>13} " + " ".join(f"{results[name][d]['median']:>9.1f}" for d in DIRECTIONS))
    print(f"{'warp/wg-go':>13} " + " ".join(f"{ratios[d]:>9.3f}" for d in DIRECTIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
