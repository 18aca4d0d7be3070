"""The in-process API: a warp gateway inside an application's own asyncio loop (docs/api.md).

    async with warp.open("warp.toml") as gw:
        tunnel = gw.tunnel("video")
        await tunnel.send(frame)      # waits while the far gate's uplinks are saturated
        reply = await tunnel.recv()
        print(gw.status())            # the same data as `warp status --json`

It is `warp run`'s own shell (`warp.node.Gateway`: uplink sockets, the map, timers, the
core) with in-memory gates (`warp.gate.memory.MemoryGate`) instead of gate sockets: the same
wire protocol, so an embedded gateway talks to a `warp run` peer. Every tunnel's configured
``gate`` table is ignored (the same file works for `warp check`/`warp run`); no control
socket is served and no signal handler installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from warp.config import GatewayConfig, TunnelConfig, load_gateway_config, parse_gateway_config
from warp.gate.base import Gate, OnDatagram
from warp.gate.memory import MAX_DATAGRAM, RECEIVE_QUEUE, GateClosed, MemoryGate
from warp.node import Gateway

__all__ = ["MAX_DATAGRAM", "EmbeddedGateway", "GateClosed", "Tunnel", "open"]

Tunnel = MemoryGate
"""One tunnel's in-process end: ``await send(data)``, ``await recv()``, ``recv_nowait()``,
``counters``, ``send_wait_seconds``."""


def _load(config: GatewayConfig | str | os.PathLike[str]) -> GatewayConfig:
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, str) and "\n" in config:
        return parse_gateway_config(config)  # TOML text: a config always has several lines
    return load_gateway_config(Path(config))


class EmbeddedGateway:
    """A gateway running in the caller's event loop; use `open` (``async with``)."""

    def __init__(
        self,
        config: GatewayConfig | str | os.PathLike[str],
        *,
        receive_queue: int = RECEIVE_QUEUE,
        static_uplinks: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.config = _load(config)
        if receive_queue < 1:
            raise ValueError("receive_queue must be at least 1")
        self._receive_queue = receive_queue
        self._tunnels: dict[str, MemoryGate] = {}
        self.gateway = Gateway(
            self.config,
            static_uplinks=static_uplinks,
            rekey_signal=False,
            gate_factory=self._make_gate,
            embedded=True,
            control=False,
        )

    def _make_gate(self, name: str, _config: TunnelConfig, on_datagram: OnDatagram) -> Gate:
        gate = MemoryGate(on_datagram, tunnel=name, receive_queue=self._receive_queue)
        self._tunnels[name] = gate
        return gate

    async def __aenter__(self) -> EmbeddedGateway:
        try:
            await self.gateway.start()
        except BaseException:
            await self.gateway.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Deregister from the map, close the uplinks; pending `send`/`recv` raise GateClosed."""
        await self.gateway.close()

    def tunnel(self, name: str) -> MemoryGate:
        """The tunnel ``[tunnels.<name>]`` of the config (KeyError naming the known ones)."""
        if name not in self.config.tunnels:
            known = ", ".join(self.config.tunnels) or "none"
            raise KeyError(f"no tunnel {name!r} (tunnels: {known})")
        tunnel = self._tunnels.get(name)
        if tunnel is None:
            raise RuntimeError("the gateway is not started: use `async with warp.open(...)`")
        return tunnel

    def status(self) -> dict[str, Any]:
        """The same data as `warp status --json` (JSON types: lists, not tuples)."""
        loaded: dict[str, Any] = json.loads(json.dumps(self.gateway.snapshot(), default=str))
        return loaded


def open(  # `warp.open`, as the issue names it
    config: GatewayConfig | str | os.PathLike[str],
    *,
    receive_queue: int = RECEIVE_QUEUE,
    static_uplinks: Sequence[tuple[str, str]] | None = None,
) -> EmbeddedGateway:
    """A gateway for ``async with``: ``config`` is a `GatewayConfig`, a path to a TOML file,
    or TOML text (a ``str`` with a newline). ``receive_queue``: datagrams each tunnel holds
    for `recv` (when full, newer ones are dropped and counted as ``application_busy``).
    ``static_uplinks``: ``[(name, local address)]`` instead of interface discovery. Raises
    ConfigError (every problem with its TOML path) before anything starts."""
    return EmbeddedGateway(config, receive_queue=receive_queue, static_uplinks=static_uplinks)
