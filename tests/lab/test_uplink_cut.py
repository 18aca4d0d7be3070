"""One uplink cut mid-stream loses nothing, at the sending site and at the receiving site.

Two sites behind cone NAT with two uplinks each (the `net` fixture of test_gateway.py: a map
in the public namespace, `warp run` on each site, tests/lab/gw_app.py as the application).
Both sites stream at 500 datagrams/s to each other at once; about 2 s in, site a's uplink
up1 is black-holed on its router. For the a → b stream that is the *sending* site's uplink,
for the b → a stream the *receiving* site's: b keeps addressing shards to a's up1 reflexive
address until its paths there are dead (path_timeout, 3 s), so every block must already
put at most n − k shards on each of the peer's addresses, not only on each own uplink.

(3, 5), the code `warp print-example-config` writes, cannot do that on two uplinks a side:
the sender adds a parity shard per block (3 of 6 per uplink) for as long as that lasts.
"""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import pytest

from tests.lab.test_gateway import (
    GATE_PORT,
    MAP_PORT,
    WARP,
    Gw,
    Net,
    app_args,
    app_result,
    loopback_gate,
    net,
    paths_of,
)
from warp.keys import encode_key, public_key_of

__all__ = ["net"]  # the fixture

RATE = 500
SECONDS = 6
COUNT = RATE * SECONDS
CUT_AFTER = 2.0


def example_config(net: Net, name: str, code: tuple[int, int] | None = None) -> Gw:
    """`warp print-example-config` with this lab's keys, map, gate ports and control socket
    filled in (and JSON logs, to read events); everything else as printed, except the
    redundancy code (k, n) when ``code`` is given."""
    text = subprocess.run(
        [*WARP, "print-example-config"], check=True, capture_output=True, text=True
    ).stdout
    other = "b" if name == "a" else "a"
    workdir = net.lab.workdir
    section = ""
    lines = []
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        key = line.split("=")[0].strip()
        if section == "" and key == "private_key":
            line = f'private_key = "{encode_key(net.keys[name])}"'
        elif section == "[warp_map]" and key == "address":
            line = f'address = "{net.lab.public_address}:{MAP_PORT}"'
        elif section == "[warp_map]" and key == "public_key":
            line = f'public_key = "{encode_key(public_key_of(net.map_key))}"'
        elif section == "[far_gates.truck1]" and key == "public_key":
            # (The example is an operator with two vehicles: here the other gateway is
            # truck1; truck2 keeps its stand-in key and never answers.)
            line = f'public_key = "{encode_key(public_key_of(net.keys[other]))}"'
        elif key == "# gate_to_application":
            line = "gate_to_application = 59500"
        elif section == "[control]" and key == "socket":
            line = f'socket = "{workdir / (name + ".sock")}"'
        elif section == "[log]" and key == "format":
            line = 'format = "json"'
        elif code is not None and key == "required_shards":
            line = f"required_shards = {code[0]}"
        elif code is not None and key == "num_shards":
            line = f"num_shards = {code[1]}"
        lines.append(line)
    config = "\n".join(lines) + "\n"
    assert re.search(r"^num_shards = \d+\nrequired_shards = \d+$", config, re.M), config
    assert f"application_to_gate = {GATE_PORT}" in config
    path = workdir / f"{name}.toml"
    path.write_text(config)
    gw = Gw(
        net.a if name == "a" else net.b, path, workdir / f"{name}.sock", workdir / f"{name}.log"
    )
    net.gws[name] = gw
    return gw


def example_tunnel(status: dict[str, Any]) -> dict[str, Any]:
    """The example's tunnel to truck1 (the other gateway here)."""
    (tunnel,) = [t for t in status["tunnels"] if t["name"] == "wireguard"]
    return tunnel


def start_both(net: Net) -> tuple[Gw, Gw]:
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    net.wait_paths("b", 4)
    return net.gws["a"], net.gws["b"]


def stream_and_cut(net: Net, a: Gw, b: Gw) -> list[dict[str, Any]]:
    """Both ways at RATE for SECONDS; a's up1 black-holed CUT_AFTER s in. Returns each
    side's application summary (a's, then b's)."""
    start_at = time.time() + 0.5
    more = ("--start-at", f"{start_at:.3f}", "--sizes", "200,1400,3000", "--grace", "2")
    pa = net.app("a", app_args(1, COUNT, RATE, COUNT, *more), lifetime_s=SECONDS + 10)
    pb = net.app("b", app_args(2, COUNT, RATE, COUNT, *more), lifetime_s=SECONDS + 10)
    time.sleep(max(0.0, start_at + CUT_AFTER - time.time()))
    carried = sum(p["tx_packets"] for p in paths_of(a.status(), "up1"))
    assert carried > RATE, a.status()["paths"]  # up1 was in use when it was cut
    net.a.uplink("up1").blackhole()
    return [app_result(pa, SECONDS + 20), app_result(pb, SECONDS + 20)]


def assert_nothing_lost(results: list[dict[str, Any]]) -> None:
    # a received b's stream (a's uplink cut: the receiving site), b received a's (the
    # sending site's uplink cut).
    for where, result in zip(("receiving site cut", "sending site cut"), results, strict=True):
        print(f"\n{where}: sent {result['sent']}, received {result['unique']} unique, "
              f"{result['duplicates']} dup, {result['corrupt']} corrupt")  # fmt: skip
        assert result["sent"] == COUNT, (where, result)
        assert result["unique"] == COUNT, (where, result)
        assert result["duplicates"] == 0 and result["corrupt"] == 0, (where, result)


@pytest.mark.parametrize(("k", "n"), [(2, 4), (3, 6)])
def test_uplink_cut_at_either_site_loses_nothing(net: Net, k: int, n: int) -> None:
    net.write_config("a", loopback_gate(), k=k, n=n)
    net.write_config("b", loopback_gate(), k=k, n=n)
    a, b = start_both(net)
    for gw in (a, b):
        (tunnel,) = gw.status()["tunnels"]
        redundancy = tunnel.get("redundancy", {})
        assert (redundancy.get("effective_n"), redundancy.get("protected")) == (n, True), tunnel
    assert_nothing_lost(stream_and_cut(net, a, b))


def test_example_config_as_printed_loses_nothing(net: Net) -> None:
    """The printed example as it is ((2, 4) on two uplinks a side: protected without added
    parity): either site's uplink cut loses nothing."""
    example_config(net, "a")
    example_config(net, "b")
    a, b = start_both(net)
    for gw in (a, b):
        tunnel = example_tunnel(gw.status())
        assert tunnel["redundancy"]["protected"] is True, tunnel
        assert tunnel["redundancy"]["effective_n"] == tunnel["redundancy"]["n"], tunnel
    assert_nothing_lost(stream_and_cut(net, a, b))


def test_default_three_of_five_adds_parity_and_loses_nothing(net: Net) -> None:
    """The schema default (3, 5) in the printed example, on two uplinks a side: parity is
    added (3 + 3 of 6 per block) and either site's uplink cut loses nothing. Needs the
    receiver to decode the (3, 6) blocks its headers announce."""
    example_config(net, "a", code=(3, 5))
    example_config(net, "b", code=(3, 5))
    a, b = start_both(net)
    for gw in (a, b):
        tunnel = example_tunnel(gw.status())
        assert tunnel["redundancy"]["effective_n"] == 6, tunnel
        assert tunnel["redundancy"]["protected"] is True, tunnel
        added = gw.events("tunnel.parity_added")
        assert added and added[0]["effective_n"] == "6", added
    assert_nothing_lost(stream_and_cut(net, a, b))
    # Down to one uplink at a: nothing to protect with, back to the configured n.
    restored = a.events("tunnel.parity_restored")
    assert restored and restored[-1]["effective_n"] == "5", restored
    tunnel = example_tunnel(a.status())
    assert tunnel["redundancy"]["protection"] == "not protected: one uplink here"
