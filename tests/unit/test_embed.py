"""The in-process API (`warp.open`): two embedded gateways over loopback "uplinks", the
in-memory gate's flow control, and the core giving embedded tunnels back-pressure."""

from __future__ import annotations

import asyncio
import importlib.util
import random
from pathlib import Path

import pytest

import warp
from tests.unit.test_node import UPLINKS, _config, _free_port
from warp.config import ConfigError
from warp.core import GatewayCore
from warp.core.session import SEND_QUEUE_PAUSE
from warp.embed import EmbeddedGateway, GateClosed
from warp.gate.memory import MemoryGate
from warp.keys import generate_private_key


def _pair(tmp: Path, **kw: int) -> tuple[EmbeddedGateway, EmbeddedGateway]:
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    port = _free_port()
    return (
        warp.open(_config(tmp, "a", keys, port, 2, 4, True), static_uplinks=UPLINKS["a"], **kw),
        warp.open(_config(tmp, "b", keys, port, 2, 4, False), static_uplinks=UPLINKS["b"], **kw),
    )


def test_two_embedded_gateways_exchange_datagrams_exactly_once(tmp_path: Path) -> None:
    """Each side sends 500 distinct datagrams; each arrives once, byte-exact; no gate socket
    is created (the config's unix gate is ignored); status shows the embedded gates."""
    count = 500

    async def main() -> None:
        a, b = _pair(tmp_path)
        async with a, b:
            ta, tb = a.tunnel("t"), b.tunnel("t")
            # (Datagrams sent before the handshake wait at most send_deadline, 2 s.)
            for _ in range(1000):
                if all(g.status()["session"]["handshake_state"] == "established" for g in (a, b)):
                    break
                await asyncio.sleep(0.01)

            async def stream(tunnel: MemoryGate, tag: bytes) -> None:
                for seq in range(count):
                    await tunnel.send(tag + seq.to_bytes(4, "big") * (1 + seq % 50))
                    if seq % 50 == 49:
                        await asyncio.sleep(0.01)

            async def collect(tunnel: MemoryGate) -> list[bytes]:
                return [await asyncio.wait_for(tunnel.recv(), 10) for _ in range(count)]

            got_b, got_a, _, _ = await asyncio.gather(
                collect(tb), collect(ta), stream(ta, b"A"), stream(tb, b"B")
            )
            for got, tag in ((got_b, b"A"), (got_a, b"B")):
                expected = {tag + seq.to_bytes(4, "big") * (1 + seq % 50) for seq in range(count)}
                assert len(got) == count and set(got) == expected
            status = a.status()
            (tunnel,) = status["tunnels"]
            assert tunnel["gate"]["kind"] == "embedded"
            assert tunnel["datagrams_in"] == count and tunnel["datagrams_out"] == count
            assert tunnel["drops"] == {}
            assert status["session"]["handshake_state"] == "established"
        assert not (tmp_path / "a.gate").exists() and not (tmp_path / "a.ctl").exists()
        with pytest.raises(GateClosed):
            await ta.recv()
        with pytest.raises(GateClosed):
            await ta.send(b"late")

    asyncio.run(main())


def test_embedded_core_pauses_tunnels_whatever_their_gate(tmp_path: Path) -> None:
    """A loopback-gate tunnel has no back-pressure under `warp run` (its sender cannot
    wait); embedded, the same tunnel is paused once SEND_QUEUE_PAUSE datagrams wait."""
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    gate = "[tunnels.t.gate]\napplication_to_gate = 59401\n"
    config = _config(tmp_path, "a", keys, 51820, 2, 4, True, gate_section=gate)
    verdicts = {}
    for embedded in (False, True):
        core = GatewayCore(config, rng=random.Random(1), now=0.0, embedded=embedded)
        core.start(0.0)
        verdicts[embedded] = [core.gate_datagram("t", b"x", 0.0) for _ in range(SEND_QUEUE_PAUSE)]
    assert all(verdicts[False])
    assert verdicts[True][-1] is False and all(verdicts[True][:-1])


def test_send_waits_while_paused_and_recv_queue_is_bounded() -> None:
    async def main() -> None:
        taken: list[bytes] = []
        gate = MemoryGate(lambda _g, data: taken.append(data) is None, tunnel="t", receive_queue=2)
        await gate.start()
        await gate.send(b"1")
        gate.pause_reading()
        sending = asyncio.ensure_future(gate.send(b"2"))
        await asyncio.sleep(0.05)
        assert not sending.done() and taken == [b"1"]  # waits, does not drop
        gate.resume_reading()
        await asyncio.wait_for(sending, 1)
        assert taken == [b"1", b"2"] and gate.send_wait_seconds >= 0.04
        for data in (b"a", b"b", b"c"):
            gate.deliver(data)
        assert gate.counters.drops == {"application_busy": 1}
        assert [await gate.recv(), gate.recv_nowait(), gate.recv_nowait()] == [b"a", b"b", None]
        waiting = asyncio.ensure_future(gate.recv())
        await asyncio.sleep(0)
        await gate.close()
        with pytest.raises(GateClosed):
            await asyncio.wait_for(waiting, 1)
        with pytest.raises(ValueError):
            await gate.send(b"")

    asyncio.run(main())


def test_open_refuses_bad_configs_and_names_unknown_tunnels(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("x = 1\n")
    with pytest.raises(ConfigError):
        warp.open(tmp_path / "bad.toml")  # a path
    with pytest.raises(ConfigError):
        warp.open("[far_gate]\npublic_key = 1\n")  # TOML text
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    gw = warp.open(_config(tmp_path, "a", keys, 51820, 2, 4, True))
    with pytest.raises(KeyError, match="tunnels: t"):
        gw.tunnel("video")
    with pytest.raises(RuntimeError, match="async with"):
        gw.tunnel("t")  # not started yet


def test_example_echo_program_echoes_what_an_embedded_peer_sends(tmp_path: Path) -> None:
    """examples/embedded_echo.py's `echo` on b sends back each of a's 200 datagrams."""
    spec = importlib.util.spec_from_file_location(
        "embedded_echo", Path(__file__).parents[2] / "examples" / "embedded_echo.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    async def main() -> None:
        a, b = _pair(tmp_path)
        async with a, b:
            echo = asyncio.ensure_future(example.echo(b, "t"))
            sent = [b"ping %d" % i for i in range(200)]
            tunnel = a.tunnel("t")
            for _ in range(1000):
                if a.status()["session"]["handshake_state"] == "established":
                    break
                await asyncio.sleep(0.01)
            for data in sent:
                await tunnel.send(data)
            got = [await asyncio.wait_for(tunnel.recv(), 10) for _ in sent]
            echo.cancel()
        assert sorted(got) == sorted(sent)

    asyncio.run(main())
