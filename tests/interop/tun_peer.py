"""A minimal userspace WireGuard made of WARP's parts: `warp.gate.tun.TunGate` + the sans-I/O
`warp.wireguard.Device` + one UDP socket on an asyncio loop (uvloop when available).

It is what ``warp run`` does for ``far_gate.kind = "wireguard"`` minus everything else (paths,
map, status), and it exists to prove the TUN gate against wireguard-go independently of the
node. Run inside a namespace::

    ip netns exec A .venv/bin/python tests/interop/tun_peer.py CONFIG.json

CONFIG.json: ``private_key``, ``peer_public_key``, ``preshared_key`` (hex or null), ``bind``
([host, port]), ``endpoint`` ([host, port] or null), ``tun`` ({name, addresses, mtu,
allowed_ips}). Prints ``READY`` once the interface is up; SIGUSR1 forces a rekey; on SIGTERM
prints one JSON object (gate counters, device counters and rejections, handshakes), exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from warp.gate.tun import TunGate  # noqa: E402
from warp.wireguard import Device, HandshakeComplete  # noqa: E402

READ_BATCH = 64


class TunPeer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        tun = cfg["tun"]
        self.device = Device(bytes.fromhex(cfg["private_key"]), mtu=int(tun.get("mtu", 1420)))
        self.peer_key = bytes.fromhex(cfg["peer_public_key"])
        psk = cfg.get("preshared_key")
        endpoint = cfg.get("endpoint")
        self.device.add_peer(
            self.peer_key,
            preshared_key=bytes.fromhex(psk) if psk else None,
            endpoint=(endpoint[0], int(endpoint[1])) if endpoint else None,
            allowed_ips=tun["allowed_ips"],
        )
        host, port = cfg["bind"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self.sock.bind((host, int(port)))
        self.sock.setblocking(False)
        self.gate = TunGate(
            self.on_packet,
            name=tun.get("name", "warp0"),
            addresses=tun.get("addresses", ()),
            mtu=int(tun.get("mtu", 1420)),
            allowed_ips=tun["allowed_ips"],
        )
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.handshakes: list[bool] = []
        self.stats = {"no_route": 0, "send_errors": 0, "unsent_no_endpoint": 0}

    # -- tunnel → wire --------------------------------------------------------------------------

    def on_packet(self, gate: object, packet: bytes) -> None:
        version = packet[0] >> 4
        dst = packet[16:20] if version == 4 else packet[24:40] if version == 6 else b""
        peer = self.device.route(dst) if dst else None
        if peer is None:
            self.stats["no_route"] += 1
            return
        msg = self.device.seal(peer, packet, self.loop.time())
        if self.device.has_outgoing:
            self.flush()
        if msg is not None:
            p = self.device.peer(peer)
            self.send(msg, p.endpoint if p is not None else None)
        self.rearm()

    def send(self, data: bytes, dest: tuple[str, int] | None) -> None:
        if dest is None:
            self.stats["unsent_no_endpoint"] += 1
            return
        try:
            self.sock.sendto(data, dest)
        except OSError:
            self.stats["send_errors"] += 1

    def flush(self) -> None:
        for out in self.device.drain_outgoing():
            self.send(out.data, out.destination)
        for event in self.device.drain_events():
            if isinstance(event, HandshakeComplete):
                self.handshakes.append(event.initiator)

    # -- wire → tunnel --------------------------------------------------------------------------

    def on_readable(self) -> None:
        recvfrom = self.sock.recvfrom
        receive = self.device.receive
        deliver = self.gate.deliver
        now = self.loop.time()
        for _ in range(READ_BATCH):
            try:
                data, source = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            rec = receive(data, source, now)
            if rec is not None and rec.plaintext:
                deliver(rec.plaintext)
        if self.device.has_outgoing or self.device.has_events:
            self.flush()
        self.rearm()

    def force_rekey(self) -> None:
        """SIGUSR1: start a new handshake now (the old session keeps carrying traffic)."""
        self.device.initiate_handshake(self.peer_key, self.loop.time(), force=True)
        self.flush()
        self.rearm()

    # -- timers ---------------------------------------------------------------------------------

    def rearm(self) -> None:
        deadline = self.device.next_deadline()
        if deadline == self.timer_at:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_at = deadline
        if deadline is not None:
            self.timer = self.loop.call_at(max(deadline, self.loop.time()), self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        self.device.tick(self.loop.time())
        self.flush()
        self.rearm()

    async def run(self) -> dict[str, Any]:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        self.loop.add_signal_handler(signal.SIGUSR1, self.force_rekey)
        await self.gate.start()
        self.loop.add_reader(self.sock.fileno(), self.on_readable)
        print("READY", flush=True)
        try:
            await stop.wait()
        finally:
            self.loop.remove_reader(self.sock.fileno())
            if self.timer is not None:
                self.timer.cancel()
            await self.gate.close()
            self.sock.close()
        return {
            "gate": self.gate.counters.as_dict(),
            "counters": dict(self.device.counters),
            "rejected": dict(self.device.rejected),
            "handshakes": self.handshakes,
            "stats": self.stats,
        }


async def amain(cfg: dict[str, Any]) -> dict[str, Any]:
    return await TunPeer(cfg).run()


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    result = runner(amain(cfg))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
