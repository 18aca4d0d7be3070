"""Hard NATs in the lab (issue 17): two `warp run` gateways, each behind one of three router
kinds (warp/netlab.py), 9 pairs: which connect directly and which through the map's relay,
and each pair's time to the first datagram (printed, `pytest -s`).

- ``port-restricted``: endpoint-independent mapping, address- and port-dependent filtering,
  a firewall dropping unsolicited inbound (most home routers, carrier NATs);
- ``cone-no-firewall``: the same without the firewall: an unsolicited packet (an early punch
  of the peer) creates a conntrack entry that pins the port, unless the first punches die
  before the peer's router (low TTL);
- ``symmetric``: a new random port per destination.
"""

from __future__ import annotations

import pytest

from tests.lab.netlab import Lab
from tests.lab.test_nat_traversal import connect, make_net, nets, process_start, relayed

__all__ = ["nets"]  # the fixture

KINDS = ("port-restricted", "cone-no-firewall", "symmetric")
MATRIX = [(a, b) for a in KINDS for b in KINDS]
#: pairs with a direct path: neither side symmetric (birthday probing is not in the gateway)
DIRECT = {(a, b) for a, b in MATRIX if "symmetric" not in (a, b)}


@pytest.mark.parametrize(("nat_a", "nat_b"), MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_hard_nat_matrix(lab: Lab, nets: list, nat_a: str, nat_b: str) -> None:
    net = make_net(lab, nat_a, nat_b)
    nets.append(net)
    a, b, ttfd = connect(net)
    start = process_start(b)
    mode = "relayed" if relayed(a) or relayed(b) else "direct"
    print(
        f"\nHARD-NAT a={nat_a:<16} b={nat_b:<16} {mode:<8} first datagram {ttfd:6.3f} s "
        f"(b's process start {start:.3f} s, then {ttfd - start:.3f} s)"
    )
    assert mode == ("direct" if (nat_a, nat_b) in DIRECT else "relayed")
