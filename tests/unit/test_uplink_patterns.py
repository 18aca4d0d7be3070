"""Interface selection by inclusion/exclusion patterns (re.search on names, SPEC §3)."""

from __future__ import annotations

import re

import pytest

from warp.paths.uplinks import select_interfaces

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
