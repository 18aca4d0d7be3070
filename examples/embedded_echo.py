"""An application with warp inside it: every datagram the far gate sends on a tunnel comes
back to it, with no gate socket and no `warp run` on this side (docs/api.md).

    python examples/embedded_echo.py warp.toml            # the first tunnel of the config
    python examples/embedded_echo.py warp.toml --tunnel video

The far side is any warp gateway with this one as its far gate: `warp run` with a loopback gate
and e.g. `socat - UDP:127.0.0.1:<application_to_gate>`, or another embedded program. Ctrl-C
stops it (the gateway deregisters from the map on the way out). Every 10 s it prints one line
from `gw.status()` (the same data as `warp status --json`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

import warp
from warp.embed import EmbeddedGateway


async def echo(gw: EmbeddedGateway, tunnel_name: str) -> None:
    """Send every datagram of the tunnel back; `send` waits while the uplinks are full."""
    tunnel = gw.tunnel(tunnel_name)
    while True:
        data = await tunnel.recv()
        await tunnel.send(data)


async def report(gw: EmbeddedGateway, every: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every)
        for row in gw.status()["tunnels"]:
            print(f"tunnel {row['name']}: in {row['datagrams_in']} out {row['datagrams_out']} "
                  f"drops {row['drops'] or '-'}", flush=True)  # fmt: skip


async def main(config: str, tunnel: str | None) -> None:
    async with warp.open(config) as gw:
        name = tunnel or next(iter(gw.config.tunnels))
        print(f"echoing tunnel {name!r}; Ctrl-C stops", flush=True)
        await asyncio.gather(echo(gw, name), report(gw))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a warp gateway config (TOML)")
    parser.add_argument("--tunnel", help="the tunnel to echo (default: the first)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.config, args.tunnel))
