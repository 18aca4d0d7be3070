"""Uplink data budgets: usage per period, kept across restarts in a state file."""

from __future__ import annotations

import calendar
import json
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warp.paths.budget import UplinkPolicy, UsageLedger
from warp.usage_file import load_usage, save_usage

DEC_6 = calendar.timegm((2026, 12, 6, 12, 0, 0))
DEC_7 = calendar.timegm((2026, 12, 7, 0, 0, 1))
JAN_1 = calendar.timegm((2027, 1, 1, 0, 0, 1))


def ledger() -> UsageLedger:
    policies = {
        "wwan0": UplinkPolicy("primary", 1000, "day"),
        "wwan1": UplinkPolicy("backup", 5000, "month"),
    }
    return UsageLedger(lambda name: policies.get(name, UplinkPolicy()))


def test_a_budget_runs_out_and_comes_back_with_the_next_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = ledger()
    usage.roll(DEC_6)
    usage.add("wwan0", 600)
    usage.add("eth0", 10**9)  # no budget: counted, never exhausted
    assert usage.exhausted == set()
    with caplog.at_level(logging.WARNING, "warp.core"):
        usage.add("wwan0", 400)
    assert usage.exhausted == {"wwan0"}
    assert "uplink.budget_exhausted uplink=wwan0 used=1000 budget=1000" in caplog.text
    status = usage.status()["wwan0"]
    assert status == {"tier": "primary", "period": "2026-12-06", "used_bytes": 1000,
                      "data_budget": 1000, "budget_exhausted": True}  # fmt: skip
    usage.roll(DEC_7)  # a daily budget: the next UTC day starts over
    assert usage.exhausted == set() and usage.status()["wwan0"]["used_bytes"] == 0
    assert usage.status()["eth0"]["used_bytes"] == 10**9  # a month: still December


def test_usage_is_kept_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    first = ledger()
    first.roll(DEC_6)
    first.add("wwan1", 4000)
    first.add("wwan0", 1000)
    save_usage(first, path)
    assert [p.name for p in tmp_path.iterdir()] == ["usage.json"]  # no temporary left
    second = ledger()
    assert second.load(path.read_bytes(), DEC_6) is None
    assert second.status()["wwan1"]["used_bytes"] == 4000
    assert second.exhausted == {"wwan0"}  # still out after the restart
    second.add("wwan1", 1000)
    assert second.exhausted == {"wwan0", "wwan1"}
    third = ledger()
    assert third.load(path.read_bytes(), JAN_1) is None  # a new month (and day)
    assert third.exhausted == set()
    assert all(row["used_bytes"] == 0 for row in third.status().values())


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "uplinks": {}}',
        b'{"version": 1, "uplinks": {"wwan0": {"period": "week", "key": "x", "used": 1}}}',
        b'{"version": 1, "uplinks": {"wwan0": {"period": "day", "key": "2026", "used": -5}}}',
        b'{"version": 1, "uplinks": {"wwan0": {"period": "day", "key": "2026", "used": true}}}',
        json.dumps({"version": 1, "uplinks": {f"u{i}": {} for i in range(300)}}).encode(),
        b"\xff\xfe",
        b" " * 70_000,
    ],
)
def test_a_corrupt_usage_file_is_a_warning_and_a_fresh_start(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.json"
    path.write_bytes(content)
    usage = ledger()
    with caplog.at_level(logging.WARNING):
        load_usage(usage, path)
    assert "uplink.usage_file_ignored" in caplog.text
    assert usage.usage == {} and usage.exhausted == set()


def test_a_missing_usage_file_starts_from_zero_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    usage = ledger()
    with caplog.at_level(logging.WARNING):
        load_usage(usage, tmp_path / "absent.json")
    assert caplog.text == "" and usage.usage == {}


@given(st.binary(max_size=300))
def test_any_bytes_load_or_give_a_warning(data: bytes) -> None:
    usage = ledger()
    problem = usage.load(data, DEC_6)
    assert problem is None or isinstance(problem, str)


def _config_with(uplinks: str) -> str:
    from warp.config import example_gateway_config

    return example_gateway_config().replace("[warp_map]", uplinks + "\n[warp_map]", 1)


def test_uplink_policies_by_interface_name_first_match_wins() -> None:
    from warp.config import parse_gateway_config

    config = parse_gateway_config(
        _config_with(
            '[[interfaces.uplinks]]\nmatch = "^wwan2$"\ntier = "backup"\n'
            'data_budget = 2_000_000_000\nbudget_period = "day"\n'
            '[[interfaces.uplinks]]\nmatch = "^wwan"\ndata_budget = 5_000_000_000\n'
        )
    )
    policy = config.interfaces.uplink_policy
    assert policy("wwan2") == UplinkPolicy("backup", 2_000_000_000, "day")
    assert policy("wwan0") == UplinkPolicy("primary", 5_000_000_000, "month")
    assert policy("eth0") == UplinkPolicy()


@pytest.mark.parametrize(
    ("uplinks", "message"),
    [
        ('match = "(("', "interfaces.uplinks[0].match: invalid regex"),
        ('match = "x"\ntier = "spare"', "interfaces.uplinks[0].tier: expected 'primary'"),
        ('match = "x"\ndata_budget = 0', "interfaces.uplinks[0].data_budget: must be ≥ 1"),
        ('tier = "backup"', "interfaces.uplinks[0].match: required key is missing"),
    ],
)
def test_bad_uplink_policies_are_config_errors_naming_the_key(uplinks: str, message: str) -> None:
    from warp.config import ConfigError, parse_gateway_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_gateway_config(_config_with(f"[[interfaces.uplinks]]\n{uplinks}\n"))
