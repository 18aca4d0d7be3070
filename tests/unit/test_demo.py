"""`warp demo`'s pieces (no root, no network); the runs are in tests/integration and tests/lab."""

from __future__ import annotations

from pathlib import Path

import pytest

from warp.cli import main
from warp.config import parse_gateway_config
from warp.demo import TUNNEL, K, N, _gateway_toml, _per_remote, _per_uplink, _ranges
from warp.keys import encode_key, generate_private_key, public_key_of


def _key() -> str:
    return encode_key(generate_private_key())


def test_demo_config_is_valid_with_k2_n4(tmp_path: Path) -> None:
    text = _gateway_toml(
        private_key=_key(),
        far_key=encode_key(public_key_of(generate_private_key())),
        socket_path=tmp_path / "a.sock",
        gate_port=59401,
        app_port=59500,
        map_address="198.51.100.1:13116",
        map_key=encode_key(public_key_of(generate_private_key())),
    )
    config = parse_gateway_config(text)
    redundancy = config.tunnels[TUNNEL].transport.redundancy
    assert (redundancy.required_shards, redundancy.num_shards) == (K, N) == (2, 4)
    assert config.control.socket == str(tmp_path / "a.sock")
    assert config.warp_map.address is not None


def test_ranges_and_per_uplink_deltas() -> None:
    assert _ranges([0, 1, 2, 5, 6, 9]) == [[0, 2], [5, 6], [9, 9]]
    old = {"paths": [{"uplink": "up1", "tx_packets": 10}, {"uplink": "up2", "tx_packets": 4}]}
    new = {"paths": [{"uplink": "up1", "tx_packets": 30}, {"uplink": "up2", "tx_packets": 4}]}
    assert _per_uplink(old, new, "tx") == {"up1": 20, "up2": 0}
    b_old = {"paths": [{"remote_address": "203.0.113.11:5", "rx_packets": 1}]}
    b_new = {
        "paths": [
            {"remote_address": "203.0.113.11:5", "rx_packets": 3},
            {"remote_address": "203.0.113.12:6", "rx_packets": 7},
        ]
    }
    ips = {"up1": "203.0.113.11", "up2": "203.0.113.12"}
    assert _per_remote(b_old, b_new, ips) == {"up1": 2, "up2": 7}


def test_demo_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--duration" in capsys.readouterr().out
    assert main(["demo", "--duration", "1"]) == 1
