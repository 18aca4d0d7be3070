"""Hard NATs in the lab (issue 17): two `warp run` gateways, each behind one of three router
kinds (warp/netlab.py), 9 pairs: which connect directly and which through the map's relay,
each pair's time to the first datagram (printed, `pytest -s`), the NAT mapping each
gateway learned for its uplinks from warp-map's secondary port (`warp status --json`).

- ``port-restricted``: endpoint-independent mapping, address- and port-dependent filtering,
  a firewall dropping unsolicited inbound (most home routers, carrier NATs);
- ``cone-no-firewall``: the same without the firewall: an unsolicited packet (an early punch
  of the peer) creates a conntrack entry that pins the port, unless the first punches die
  before the peer's router (low TTL, `interfaces.punch_ttl`);
- ``symmetric``: a new random port per destination: with a cone on the other side, birthday
  probing (`warp/paths/punch.py`) finds a direct path after the relay fallback.
"""

from __future__ import annotations

import time

import pytest

from tests.lab.netlab import Lab
from tests.lab.test_gateway import Gw, Net
from tests.lab.test_nat_traversal import connect, make_net, nets, process_start, relayed

__all__ = ["nets"]  # the fixture

SECONDARY_PORT = 13117
KINDS = ("port-restricted", "cone-no-firewall", "symmetric")
MATRIX = [(a, b) for a in KINDS for b in KINDS]
MAPPING = {
    "port-restricted": "endpoint-independent",
    "cone-no-firewall": "endpoint-independent",
    "symmetric": "address-dependent",
}


def relay_reason(gw: Gw, timeout: float = 5.0) -> str | None:
    """Why the gateway's one far gate is relayed, once it says."""
    deadline = time.monotonic() + timeout
    while True:
        (far,) = gw.status()["far_gates"].values()
        reason: str | None = far.get("relay_reason")
        if reason is not None or time.monotonic() > deadline:
            return reason
        time.sleep(0.05)


def direct_again(gw: Gw, timeout: float) -> float | None:
    """Seconds until the gateway's one far gate is no longer relayed (None: it still is)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        (far,) = gw.status()["far_gates"].values()
        if far["relay"] is False:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def nat_mapping(gw: Gw, timeout: float = 5.0) -> dict[str, str]:
    """The gateway's NAT mapping per uplink, once known for every uplink."""
    deadline = time.monotonic() + timeout
    while True:
        mapping: dict[str, str] = gw.status()["map"]["nat_mapping"]
        if ("unknown" not in mapping.values() and mapping) or time.monotonic() > deadline:
            return mapping
        time.sleep(0.05)


@pytest.mark.parametrize(("nat_a", "nat_b"), MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_hard_nat_matrix(lab: Lab, nets: list[Net], nat_a: str, nat_b: str) -> None:
    """No symmetric side: direct from the start. One: relayed first, then direct through
    birthday probing (once per relay episode, 10 s at most). Both: relayed, and says why."""
    net = make_net(lab, nat_a, nat_b, secondary_port=SECONDARY_PORT)
    nets.append(net)
    a, b, ttfd = connect(net)
    start = process_start(b)
    mode = "relayed" if relayed(a) or relayed(b) else "direct"
    symmetric = [nat_a, nat_b].count("symmetric")
    later = ""
    if symmetric == 1:
        assert direct_again(a, 20.0) is not None, b.log.read_text()[-3000:]
        won = [*a.events("punch.birthday_succeeded"), *b.events("punch.birthday_succeeded")]
        assert won, (a.events("punch.birthday_started"), b.events("punch.birthday_started"))
        probes = {e["role"]: int(e["probes"]) for e in won}
        after = max(float(e["after_s"]) for e in won)
        later = f"; birthday: direct {after:.2f} s after it started, probes {probes}"
    print(
        f"\nHARD-NAT a={nat_a:<16} b={nat_b:<16} {mode:<8} first datagram {ttfd:6.3f} s "
        f"(b's process start {start:.3f} s, then {ttfd - start:.3f} s){later}"
    )
    assert mode == ("direct" if symmetric == 0 else "relayed")
    for gw, kind in ((a, nat_a), (b, nat_b)):
        assert nat_mapping(gw) == {"up1": MAPPING[kind], "up2": MAPPING[kind]}
    if symmetric == 2:  # stays relayed, and both say why
        assert relay_reason(a) == relay_reason(b) == "both_symmetric"
