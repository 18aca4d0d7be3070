"""Loud misconfiguration: a handshake or lookup that keeps getting no answer is a WARNING
naming the likely cause, once per episode; a refusal at start (far gate not up yet) is not."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.unit.test_node import UPLINKS, _config, _free_port, tmp
from warp.config import parse_map_config
from warp.core import session as node
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.node import Gateway
from warp.unanswered import Unanswered
from warp_map_server.server import MapServer

__all__ = ["tmp"]  # the fixture


def test_due_once_per_episode_after_enough_old_tries() -> None:
    watch = Unanswered(3, 10.0)
    watch.tried(0.0)
    watch.tried(0.1)
    watch.tried(0.2)  # three forced retries in a burst: not yet a dead peer
    assert not watch.due(0.2)
    assert watch.due(10.0)
    watch.tried(15.0)
    assert not watch.due(15.0)  # once per episode
    assert watch.answered() is True
    watch.tried(20.0)
    assert not watch.due(40.0)  # one slow try is not enough
    watch.tried(25.0)
    watch.tried(30.0)
    assert watch.due(30.0) and watch.count == 3 and watch.since == 20.0
    assert watch.answered() is True and watch.answered() is False
    with pytest.raises(ValueError):
        Unanswered(0, 1.0)


def _warnings(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(event)
    ]


async def _run_alone(gateway: Gateway, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 10)


def test_wrong_map_key_warns_map_unreachable(
    tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running map, configured with the wrong public key: our initiations are never
    answered. (One try is enough here; WireGuard retries only every 5 s.)"""
    monkeypatch.setattr(node, "UNANSWERED_TRIES", 1)
    monkeypatch.setattr(node, "UNANSWERED_AFTER", 0.0)
    caplog.set_level(logging.INFO, logger="warp")
    map_port = _free_port()
    map_toml = (
        f'bind = "127.0.0.1:{map_port}"\nprivate_key = "{encode_key(generate_private_key())}"\n'
    )
    wrong = public_key_of(generate_private_key())
    section = f'[warp_map]\naddress = "127.0.0.1:{map_port}"\npublic_key = "{encode_key(wrong)}"\n'
    keys = {"a": generate_private_key(), "b": generate_private_key()}

    async def main() -> None:
        server = MapServer(parse_map_config(map_toml))
        await server.start()
        try:
            config = _config(tmp, "a", keys, _free_port(), 2, 4, False, section)
            await _run_alone(Gateway(config, static_uplinks=UPLINKS["a"]), 1.0)
        finally:
            server.close()

    asyncio.run(main())
    (line,) = _warnings(caplog, "map.unreachable")
    assert f"address=127.0.0.1:{map_port}" in line
    assert "likely: map down, wrong map address or wrong warp_map.public_key" in line


def test_unanswered_far_gate_warns(
    tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Static endpoints where no far gate answers (not running, or another key)."""
    monkeypatch.setattr(node, "UNANSWERED_TRIES", 1)
    monkeypatch.setattr(node, "UNANSWERED_AFTER", 0.0)
    caplog.set_level(logging.INFO, logger="warp")
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    config = _config(tmp, "a", keys, _free_port(), 2, 4, True)
    asyncio.run(_run_alone(Gateway(config, static_uplinks=UPLINKS["a"]), 0.5))
    (line,) = _warnings(caplog, "far_gate.unanswered")
    assert "handshakes=1 " in line and " paths=" in line
    assert "likely: far gate not running/not registered, or wrong far_gate.public_key" in line


def test_lookup_refused_for_long_warns_but_not_at_start(
    tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map refuses the lookup of a far gate that never registers (wrong far_gate key):
    `map.lookup_refused` (INFO, as at every normal start), then, since it lasts, a WARNING."""
    monkeypatch.setattr(node, "LOOKUP_REFUSED_WARN_AFTER", 1.0)
    caplog.set_level(logging.INFO, logger="warp")
    map_key = generate_private_key()
    map_port = _free_port()
    map_toml = f'bind = "127.0.0.1:{map_port}"\nprivate_key = "{encode_key(map_key)}"\n'
    section = (
        f'[warp_map]\naddress = "127.0.0.1:{map_port}"\n'
        f'public_key = "{encode_key(public_key_of(map_key))}"\n'
    )
    keys = {"a": generate_private_key(), "b": generate_private_key()}

    async def main() -> None:
        server = MapServer(parse_map_config(map_toml))
        await server.start()
        try:
            config = _config(tmp, "a", keys, _free_port(), 2, 4, False, section)
            gateway = Gateway(config, static_uplinks=UPLINKS["a"])
            stop = asyncio.Event()
            task = asyncio.create_task(gateway.run(stop))
            await asyncio.sleep(0.5)
            assert any("map.lookup_refused" in r.getMessage() for r in caplog.records)
            assert not _warnings(caplog, "far_gate.unanswered")  # normal at start
            await asyncio.sleep(2.3)  # the next lookup (every 2 s here) is refused too
            stop.set()
            await asyncio.wait_for(task, 10)
        finally:
            server.close()

    asyncio.run(main())
    (line,) = _warnings(caplog, "far_gate.unanswered")
    assert "map_lookup=refused" in line
    assert "likely: far gate not running/not registered, or wrong far_gate.public_key" in line
