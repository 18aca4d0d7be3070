"""Interface selection by inclusion/exclusion patterns (re.search on names, SPEC §3)."""

from __future__ import annotations

import ipaddress
import logging
import re

import pytest

from warp.config import InterfacesConfig
from warp.paths.netlink import InterfaceInfo
from warp.paths.uplinks import UplinkManager, select_interfaces, tunnel_exclusion

NAMES = [
    "lo",
    "eth0",
    "enp3s0",
    "wlp2s0",
    "wlo1",
    "wwan0",
    "wwp0s20u4",
    "usb0",
    "ppp0",
    "docker0",
    "wg0",
    "wt0",
    "veth1a2b",
    "br-lan",
]

SPEC_EXCLUSION = ["lo", "wg.*", "wt.*", "wlp.*", "enp.*", "docker.*"]  # SPEC §3 example


def test_defaults_use_everything_but_lo() -> None:
    selected = select_interfaces(NAMES, [".*"], ["^lo$"])
    assert selected == [n for n in NAMES if n != "lo"]
    assert "wlo1" in selected  # anchored: only exactly "lo" is excluded


def test_spec_example_exclusion_list() -> None:
    selected = select_interfaces(NAMES, [".*"], SPEC_EXCLUSION)
    assert selected == ["eth0", "wwan0", "wwp0s20u4", "usb0", "ppp0", "veth1a2b", "br-lan"]
    # re.search is unanchored: "lo" also excludes anything containing "lo" (wlo1)...
    assert "wlo1" not in selected
    # ...and "wt.*" anything containing "wt" — anchor patterns to avoid surprises.
    assert select_interfaces(["newt0"], [".*"], ["wt.*"]) == []
    assert select_interfaces(["newt0"], [".*"], ["^wt.*"]) == ["newt0"]


def test_inclusion_needs_one_match_and_no_exclusion() -> None:
    inclusion = ["^wwan", "^usb", "^eth"]
    assert select_interfaces(NAMES, inclusion, []) == ["eth0", "wwan0", "usb0"]
    assert select_interfaces(NAMES, inclusion, ["0$"]) == []
    assert select_interfaces(NAMES, inclusion, ["^usb"]) == ["eth0", "wwan0"]


def test_empty_inclusion_selects_nothing() -> None:
    assert select_interfaces(NAMES, [], []) == []


def test_order_is_kept_and_precompiled_patterns_work() -> None:
    names = ["wwan1", "eth0", "wwan0"]
    assert select_interfaces(names, [re.compile(r"^(wwan|eth)\d+$")], [re.compile("^eth")]) == [
        "wwan1",
        "wwan0",
    ]


def test_search_not_match_semantics() -> None:
    # re.search: a pattern may match anywhere in the name.
    assert select_interfaces(["enp0s31f6"], ["s31"], []) == ["enp0s31f6"]
    assert select_interfaces(["enp0s31f6"], ["^s31"], []) == []


def test_invalid_pattern_is_an_error() -> None:
    with pytest.raises(re.error):
        select_interfaces(NAMES, ["("], [])


# --- the tunnel is never its own uplink ----------------------------------------------------


def _info(name: str, ipv4: str, kind: str | None = None, index: int = 1) -> InterfaceInfo:
    return InterfaceInfo(name=name, index=index, up=True, ipv4=(ipv4,), ipv6=(), kind=kind)


INTERFACES = [
    _info("eth0", "192.168.1.2", "veth", 2),
    _info("vpn0", "10.99.0.2", "wireguard", 3),  # a kernel WireGuard interface, any name
    _info("corp", "10.98.0.2", "tun", 4),  # wireguard-go / OpenVPN / tailscale: a TUN device
    _info("warp0", "10.7.0.1", "tun", 5),  # WARP's own TUN gate
    _info("usb0", "10.7.0.9", None, 6),  # addressed inside the tun gate's allowed_ips
    _info("wwan0", "100.64.3.4", None, 7),
]


def _manager(exclusion: list[str]) -> UplinkManager:
    return UplinkManager(
        exclusion_patterns=exclusion,
        own_tuns=["warp0"],
        tunnel_networks=["10.7.0.0/24", "0.0.0.0/0"],  # a default route says nothing: ignored
        on_datagram=lambda *_: None,
    )


def test_tunnel_interfaces_are_never_uplinks_whatever_the_patterns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="warp.paths.uplinks")
    manager = _manager(["^lo$"])  # the old default: nothing about tunnels
    wanted, why_not = manager.select(INTERFACES)
    assert sorted(wanted) == ["eth0", "wwan0"]
    assert manager.excluded == {
        "vpn0": "link_kind:wireguard",
        "corp": "link_kind:tun",
        "warp0": "warp_tun_gate",
        "usb0": "address_in_allowed_ips:10.7.0.0/24",
    }
    assert why_not["vpn0"] == "carries a tunnel (link_kind:wireguard)"
    lines = [r.getMessage() for r in caplog.records]
    assert sorted(lines) == sorted(
        f"uplink.excluded name={name} reason={reason}" for name, reason in manager.excluded.items()
    )
    manager.select(INTERFACES)  # every rescan: no new log line
    assert len(caplog.records) == len(lines)


def test_tunnel_exclusion_on_its_own() -> None:
    networks = [ipaddress.ip_network("fd00:7::/64"), ipaddress.ip_network("10.7.0.0/24")]
    v6 = InterfaceInfo("eth1", 1, True, (), ("fd00:7::5",), None)
    assert tunnel_exclusion(v6, [], networks) == "address_in_allowed_ips:fd00:7::/64"
    assert tunnel_exclusion(_info("eth2", "10.8.0.1"), [], networks) is None
    assert tunnel_exclusion(_info("eth3", "10.8.0.1", "vlan"), [], networks) is None


def test_default_exclusions_cover_loopback_and_tunnel_names() -> None:
    names = ["lo", "wg0", "wg-home", "tun0", "tailscale0", "eth0", "wlo1", "wwan0"]
    default = [p.pattern for p in InterfacesConfig().exclusion_patterns]
    assert select_interfaces(names, [".*"], default) == ["eth0", "wlo1", "wwan0"]
