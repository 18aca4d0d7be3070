"""Two `Gateway`s in one asyncio loop on loopback (no root, no network beyond 127.0.0.x).

Each gateway has two static uplinks (127.0.0.2/3 for "a", 127.0.0.4/5 for "b") on one fixed
port, the other side's uplinks as `far_gate.endpoints`, and a unix gate; the test is the
application on both unix sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from warp.config import GatewayConfig, parse_gateway_config, parse_map_config
from warp.keys import encode_key, generate_private_key, public_key_of
from warp.node import Gateway
from warp.paths.path import Path as PathRecord
from warp.paths.prober import PathProber, make_probe_reply
from warp.paths.scheduler import ShardScheduler
from warp.redundancy import Emission, ShardEncoder
from warp.redundancy.shard import parse_parity_header
from warp_map_server.server import MapServer

UPLINKS = {"a": [("up1", "127.0.0.2"), ("up2", "127.0.0.3")],
           "b": [("up1", "127.0.0.4"), ("up2", "127.0.0.5")]}  # fmt: skip


def _free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.2", 0))
            port = int(probe.getsockname()[1])
        ok = True
        for addresses in UPLINKS.values():
            for _, address in addresses:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as check:
                    try:
                        check.bind((address, port))
                    except OSError:
                        ok = False
        if ok:
            return port
    raise RuntimeError("no free port on 127.0.0.2-5")


def _config(
    tmp: Path,
    side: str,
    keys: dict[str, bytes],
    port: int,
    k: int,
    n: int,
    static: bool,
    map_section: str = "",
    gate_section: str = "",
    send_deadline: float = 2.0,
) -> GatewayConfig:
    other = "b" if side == "a" else "a"
    endpoints = ", ".join(f'"{address}:{port}"' for _, address in UPLINKS[other] if static)
    text = f"""
private_key = "{encode_key(keys[side])}"
listen_port = {port}
{map_section}
[interfaces]
interface_scan_interval = 2
holepunch_keep_alive_interval = 0.5
path_timeout = 1.5
[far_gate]
public_key = "{encode_key(public_key_of(keys[other]))}"
endpoints = [{endpoints}]
{gate_section or _unix_gate(tmp, side)}
[tunnels.t.transport]
send_deadline = "{send_deadline}s"
[tunnels.t.transport.redundancy]
num_shards = {n}
required_shards = {k}
[control]
socket = "{tmp / f"{side}.ctl"}"
"""
    return parse_gateway_config(text)


def _unix_gate(tmp: Path, side: str) -> str:
    return f"""[tunnels.t.gate]
path = "{tmp / f"{side}.gate"}"
application_path = "{tmp / f"{side}.app"}"
"""


@dataclass
class Pair:
    tmp: Path
    a: Gateway
    b: Gateway
    apps: dict[str, socket.socket]

    def send(self, side: str, payload: bytes) -> None:
        self.apps[side].send(payload)

    async def receive(self, side: str, count: int, timeout: float = 5.0) -> list[bytes]:
        loop = asyncio.get_running_loop()
        sock = self.apps[side]
        got: list[bytes] = []
        deadline = loop.time() + timeout
        while len(got) < count and loop.time() < deadline:
            try:
                got.append(sock.recv(1 << 17))
            except BlockingIOError:
                await asyncio.sleep(0.005)
        return got

    async def connected(self, timeout: float = 5.0) -> float:
        """Seconds until both gateways have a session with each other."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < timeout:
            peers = [g.core.device.peer(g.session.key) for g in (self.a, self.b)]
            if all(p is not None and p.has_session for p in peers):
                return loop.time() - start
            await asyncio.sleep(0.005)
        raise AssertionError(f"no session within {timeout} s")


@contextlib.asynccontextmanager
async def gateway_pair(
    tmp: Path,
    k: int = 2,
    n: int = 4,
    *,
    before_start: Callable[[Gateway, Gateway], None] | None = None,
    initiators: tuple[str, ...] = ("a", "b"),
    map_section: str = "",
    gate_sections: dict[str, str] | None = None,
    send_deadline: float = 2.0,
) -> AsyncIterator[Pair]:
    """``initiators``: the sides that get the other's addresses (static endpoints);
    ``gate_sections``: a side's `[tunnels.t.gate]` instead of the unix gate (then no app
    socket for that side)."""
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    port = _free_port()
    gateways = {
        side: Gateway(
            _config(
                tmp,
                side,
                keys,
                port,
                k,
                n,
                side in initiators,
                map_section,
                (gate_sections or {}).get(side, ""),
                send_deadline,
            ),
            static_uplinks=UPLINKS[side],
        )
        for side in ("a", "b")
    }
    if before_start is not None:
        before_start(gateways["a"], gateways["b"])
    stops = {side: asyncio.Event() for side in gateways}
    tasks = [asyncio.create_task(g.run(stops[s])) for s, g in gateways.items()]
    apps: dict[str, socket.socket] = {}
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        unix_sides = [s for s in gateways if s not in (gate_sections or {})]
        while not all(
            (tmp / f"{s}.gate").exists() if s in unix_sides else gateways[s].gates["t"]
            for s in gateways
        ):
            assert loop.time() < deadline, "gates did not start"
            await asyncio.sleep(0.005)
        for side in unix_sides:
            app = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            app.bind(str(tmp / f"{side}.app"))
            app.connect(str(tmp / f"{side}.gate"))
            app.setblocking(False)
            apps[side] = app
        yield Pair(tmp, gateways["a"], gateways["b"], apps)
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        for app in apps.values():
            app.close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="warp-node-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _payload(side: str, i: int, size: int = 200) -> bytes:
    head = f"{side}:{i}:".encode()
    return head + bytes((i + j) % 251 for j in range(size - len(head)))


def test_handshake_complete_logs_source_as_host_port(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warp")
    asyncio.run(_connect_only(tmp))
    lines = [r.getMessage() for r in caplog.records if "handshake.complete" in r.getMessage()]
    assert lines
    for line in lines:
        assert re.search(r" source=127\.0\.0\.[2-5]:\d+( |$)", line), line


async def _connect_only(tmp_path: Path) -> None:
    async with gateway_pair(tmp_path, initiators=("a",)) as pair:
        await pair.connected()


def test_datagrams_both_ways_exactly_once(tmp: Path) -> None:
    asyncio.run(_datagrams_both_ways(tmp))


async def _datagrams_both_ways(tmp_path: Path) -> None:
    async with gateway_pair(tmp_path, initiators=("a",)) as pair:
        await pair.connected()
        for i in range(50):
            pair.send("a", _payload("a", i))
            pair.send("b", _payload("b", i))
            await asyncio.sleep(0.002)
        got_b = await pair.receive("b", 50)
        got_a = await pair.receive("a", 50)
        await asyncio.sleep(0.2)
        got_b += await pair.receive("b", 1, timeout=0.05)
        got_a += await pair.receive("a", 1, timeout=0.05)
        assert sorted(got_b) == sorted(_payload("a", i) for i in range(50))
        assert sorted(got_a) == sorted(_payload("b", i) for i in range(50))
        for gateway in (pair.a, pair.b):
            # Traffic arrives from 2 addresses on 2 uplinks: no roaming event per flip.
            assert gateway.core.device.roaming_events is False
            assert not gateway.core.device.has_events


def test_real_scheduler_balances_both_ends(tmp: Path) -> None:
    asyncio.run(_real_scheduler(tmp))


async def _real_scheduler(tmp_path: Path) -> None:
    """(3, 6) over 2 uplinks x 2 peer addresses: every block puts at most n - k = 3 shards on
    each of our uplinks *and* on each of the peer's addresses (a cut uplink at either end
    loses nothing); the gateway sends each shard on the path the scheduler chose."""
    async with gateway_pair(tmp_path, k=3, n=6, initiators=("a",)) as pair:
        await pair.connected()
        tunnel = pair.a.session.tunnels["t"]
        scheduler = tunnel.scheduler
        assert isinstance(scheduler, ShardScheduler)
        assert (scheduler.k, scheduler.n, scheduler.effective_n) == (3, 6, 6)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(pair.a.session.prober.active_paths()) < 4:
            assert loop.time() < deadline, "paths did not all become active"
            await asyncio.sleep(0.02)
        blocks: list[tuple[PathRecord, ...]] = []
        original = scheduler.assign

        def recording() -> tuple[PathRecord, ...]:
            assignment = original()
            blocks.append(assignment)
            return assignment

        scheduler.assign = recording  # type: ignore[method-assign]
        before = {p.key: p.tx_packets for p in pair.a.session.prober.paths}
        for i in range(40):
            pair.send("a", _payload("a", i))
            await asyncio.sleep(0.002)
        got = await pair.receive("b", 40)
        assert len(got) == 40
        assert len(blocks) >= 40 / 3  # datagrams close together share a block
        sent_by_path: Counter[tuple[str, tuple[str, int]]] = Counter()
        for assignment in blocks:
            assert len(assignment) == 6
            uplinks = Counter(path.uplink for path in assignment)
            remotes = Counter(path.remote for path in assignment)
            assert max(uplinks.values()) <= 3 and len(uplinks) == 2
            assert max(remotes.values()) <= 3 and len(remotes) == 2
            # Slots surely used: data slot 0 and the parity slots (a block closed by its
            # window leaves later data slots unused).
            sent_by_path.update(assignment[slot].key for slot in (0, 3, 4, 5))
        sent = {p.key: p.tx_packets - before[p.key] for p in pair.a.session.prober.paths}
        # (tx counts the probes too)
        assert all(sent[key] >= count > 0 for key, count in sent_by_path.items())
        assert set(sent_by_path) <= set(sent)
        redundancy = pair.a.snapshot()["tunnels"][0]["redundancy"]
        assert redundancy == {
            "k": 3,
            "n": 6,
            "effective_n": 6,
            "spread": "survive_uplink_loss",
            "protected": True,
            "protection": "protected against one uplink loss",
            # no capacity measured yet (a few hundred bytes sent): no rate to promise
            "usable_rate": None,
            "protected_rate": None,
        }


def test_three_of_five_on_two_uplinks_sends_six_shards_and_says_so(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="warp")
    asyncio.run(_added_parity(tmp))
    lines = [r.getMessage() for r in caplog.records if "tunnel.parity_added" in r.getMessage()]
    assert "tunnel.parity_added tunnel=t k=3 n=5 effective_n=6 uplinks=2 peer_addresses=2" in lines


async def _added_parity(tmp_path: Path) -> None:
    """(3, 5) on two uplinks a side cannot keep n - k = 2 per uplink: the sender adds a
    parity shard per block (3 parity shards; datagrams 2 ms apart close each block by its
    1 ms window, over one data shard), at most 3 shards of a block per uplink."""
    async with gateway_pair(tmp_path, k=3, n=5, initiators=("a",)) as pair:
        await pair.connected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(pair.a.session.prober.active_paths()) < 4:
            assert loop.time() < deadline, "paths did not all become active"
            await asyncio.sleep(0.02)
        tunnel = pair.a.session.tunnels["t"]
        encoded: list[Emission] = []
        tunnel.encoder = _RecordingEncoder(tunnel.encoder, encoded)  # type: ignore[assignment]
        before = {p.key: p.tx_packets for p in pair.a.session.prober.paths}
        for i in range(20):
            pair.send("a", _payload("a", i))
            await asyncio.sleep(0.002)

        def count(slots: range) -> int:
            return sum(1 for slot, _ in encoded if slot in slots)

        # Every datagram in a data shard, every block's parity out.
        while count(range(3)) < 20 or count(range(5, 6)) < count(range(1)):
            assert loop.time() < deadline + 5, "datagrams were not sent"
            await asyncio.sleep(0.01)
        parity = [parse_parity_header(frame) for slot, frame in encoded if slot >= 3]
        assert all(h is not None and h.parity_shards == 3 for h in parity)
        blocks = sum(1 for slot, _ in encoded if slot == 0)
        sent = {p.key: p.tx_packets - before[p.key] for p in pair.a.session.prober.paths}
        # every shard on the wire, plus a probe or two per path
        assert len(encoded) <= sum(sent.values()) <= len(encoded) + 10
        for uplink in ("up1", "up2"):
            assert sum(c for (u, _), c in sent.items() if u == uplink) <= 3 * blocks + 5
        redundancy = pair.a.snapshot()["tunnels"][0]["redundancy"]
        assert (redundancy["k"], redundancy["n"], redundancy["effective_n"]) == (3, 5, 6)
        assert redundancy["protected"] is True


class _RecordingEncoder:
    """Wraps a tunnel's encoder: keeps every frame it produced, with its slot."""

    def __init__(self, inner: ShardEncoder, frames: list[Emission]) -> None:
        self._inner = inner
        self._frames = frames

    def push(self, datagram: bytes, now: float, n: int | None = None) -> list[Emission]:
        return self._record(self._inner.push(datagram, now, n))

    def flush(self, now: float) -> list[Emission]:
        return self._record(self._inner.flush(now))

    def close_due(self, now: float) -> list[Emission]:
        return self._record(self._inner.close_due(now))

    def next_deadline(self) -> float | None:
        return self._inner.next_deadline()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # k, block_open ...: the encoder's own

    def _record(self, frames: list[Emission]) -> list[Emission]:
        self._frames.extend(frames)
        return frames


class _BlackHole:
    """Stands in for an uplink's transport: every datagram sent is silently lost."""

    def sendto(self, data: bytes, addr: object = None) -> None:
        pass

    def abort(self) -> None:
        pass


def test_uplink_loss_loses_nothing_with_2_4(tmp: Path) -> None:
    asyncio.run(_uplink_loss(tmp))


async def _uplink_loss(tmp_path: Path) -> None:
    """(2, 4): every block puts at most 2 shards on an uplink, so with a's uplink "up1"
    silently dropping everything it sends, every datagram still arrives (exactly once)."""
    async with gateway_pair(tmp_path, k=2, n=4, initiators=("a",)) as pair:
        await pair.connected()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(pair.a.session.prober.active_paths()) < 4:
            assert loop.time() < deadline, "paths did not all become active"
            await asyncio.sleep(0.02)
        assert pair.a.uplinks is not None
        dead = pair.a.uplinks.uplinks["up1"]
        dead._transport = _BlackHole()  # type: ignore[assignment]  # sends vanish
        sent = [_payload("a", i, 1000) for i in range(300)]
        for i, payload in enumerate(sent):
            pair.send("a", payload)
            if i % 10 == 0:
                await asyncio.sleep(0.002)
        got = await pair.receive("b", len(sent))
        await asyncio.sleep(0.1)
        got += await pair.receive("b", 1, timeout=0.05)
        assert sorted(got) == sorted(sent)


def test_simultaneous_initiation_connects_fast(tmp: Path) -> None:
    asyncio.run(_simultaneous_initiation(tmp))


async def _simultaneous_initiation(tmp_path: Path) -> None:
    """Both sides know the other's endpoints and initiate at start: their initiations cross.
    Without a tie-break both responses are dropped and nothing completes before the 5 s
    retransmission; the target is the first datagram within 1 s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with gateway_pair(tmp_path) as pair:
        elapsed = await pair.connected(timeout=3.0)
        assert elapsed < 1.0, elapsed
        pair.send("a", _payload("a", 0))
        assert await pair.receive("b", 1, timeout=1.0) == [_payload("a", 0)]
        assert loop.time() - start < 1.5
        assert pair.a.session.collisions + pair.b.session.collisions >= 1


def test_map_restart_rehandshake_then_reregister(tmp: Path) -> None:
    asyncio.run(_map_restart(tmp))


async def _map_restart(tmp_path: Path) -> None:
    """The map restarts (its sessions are gone): after two unanswered requests the gateway
    starts a fresh handshake and holds its map frames until it completes, so the retries are
    not sealed under the dead session; every uplink is registered again within ~1.5 s."""
    map_key = generate_private_key()
    map_port = _free_port()
    map_toml = f'bind = "127.0.0.1:{map_port}"\nprivate_key = "{encode_key(map_key)}"\n'
    server = MapServer(parse_map_config(map_toml))
    await server.start()
    section = (
        f'[warp_map]\naddress = "127.0.0.1:{map_port}"\n'
        f'public_key = "{encode_key(public_key_of(map_key))}"\n'
    )
    try:
        async with gateway_pair(tmp_path, initiators=(), map_section=section) as pair:
            await pair.connected()
            loop = asyncio.get_running_loop()
            server.close()
            await asyncio.sleep(0.05)  # the old socket closes on the next loop iterations
            server = MapServer(parse_map_config(map_toml))
            await server.start()
            restarted = loop.time()
            key_a = public_key_of(pair.a.config.private_key)
            map_peer = pair.a.core.device.peer(public_key_of(map_key))
            assert map_peer is not None
            first_handshake = map_peer.last_handshake_time
            rehandshake_at: float | None = None
            while True:
                if rehandshake_at is None and map_peer.last_handshake_time != first_handshake:
                    rehandshake_at = loop.time()
                client = server.registry.clients.get(key_a)
                if client is not None and len(client.registrations) == 2:
                    break
                assert loop.time() - restarted < 6.0, "not registered again"
                await asyncio.sleep(0.005)
            registered_at = loop.time()
            assert rehandshake_at is not None
            # Next refresh <= 2 s, then 0.3 + 0.6 s unanswered, then the handshake; the held
            # registrations go out at once (timed in virtual time in tests/sim: here a loaded
            # box adds scheduling delays of its own).
            assert registered_at - restarted < 4.0
            pair.send("a", _payload("a", 1))
            assert await pair.receive("b", 1, timeout=2.0) == [_payload("a", 1)]
    finally:
        server.close()


def test_logs_say_each_uplink_once_and_never_none(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`uplink.added` once per uplink (the manager logs it; the gateway used to repeat it),
    and no log field prints `None` (a path without RTT yet says `rtt_ms=-`)."""
    caplog.set_level(logging.INFO, logger="warp")
    asyncio.run(_connect_only(tmp))
    messages = [r.getMessage() for r in caplog.records]
    added = [m for m in messages if m.startswith("uplink.added")]
    # Two gateways with two uplinks each.
    assert len(added) == 4, added
    assert not [m for m in messages if "None" in m]
    assert any(re.search(r"^path\.\w+ .*rtt_ms=(-|[\d.]+)$", m) for m in messages)


def test_responder_counts_each_received_packet_once(tmp: Path) -> None:
    asyncio.run(_responder_rx_count(tmp))


async def _responder_rx_count(tmp_path: Path) -> None:
    """b only answers (a initiates): its paths' rx_packets add up to exactly the transport
    packets its WireGuard core received from a, the session's first one included."""
    async with gateway_pair(tmp_path, initiators=("a",)) as pair:
        await pair.connected()
        for i in range(5):
            pair.send("a", _payload("a", i))
        assert len(await pair.receive("b", 5)) == 5
        peer = pair.b.core.device.peer(pair.b.session.key)
        assert peer is not None
        assert sum(p.rx_packets for p in pair.b.session.prober.paths) == peer.rx_packets


def _silence(gateway: Gateway) -> Callable[[], None]:
    """Everything `gateway` sends vanishes (its peer's paths die) until the returned function
    gives its uplinks their transports back."""
    assert gateway.uplinks is not None
    saved = {}
    for uplink in gateway.uplinks.uplinks.values():
        saved[uplink] = uplink._transport
        uplink._transport = _BlackHole()  # type: ignore[assignment]

    def restore() -> None:
        for uplink, transport in saved.items():
            uplink._transport = transport

    return restore


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


def _stamped(i: int, at: float, size: int = 120) -> bytes:
    head = f"{i}:{at!r}:".encode()
    return head + bytes(size - len(head))


def _stamp(payload: bytes) -> tuple[int, float]:
    index, at, _ = payload.split(b":", 2)
    return int(index), float(at)


def test_paused_unix_gate_resumes_when_a_path_returns(tmp: Path) -> None:
    asyncio.run(_paused_unix_gate(tmp))


async def _paused_unix_gate(tmp_path: Path) -> None:
    """No path (b's replies vanish): the application fills warp's queue and the unix gate
    pauses (the application's `send()` would block). Datagrams past `send_deadline` are
    dropped and never sent; once a path is back, the application can send again and its new
    datagrams arrive. (The gate used to stay paused for good: only a successful flush
    resumed it.)"""
    deadline = 0.5
    async with gateway_pair(tmp_path, initiators=("a",), send_deadline=deadline) as pair:
        await pair.connected()
        await _until(lambda: len(pair.a.session.prober.active_paths()) == 4, 5, "paths not active")
        restore = _silence(pair.b)
        await _until(lambda: not pair.a.session.prober.active_paths(), 5, "a's paths did not die")
        loop = asyncio.get_running_loop()
        stalled = 0
        blocked_since: float | None = None
        while stalled < 5000:
            try:
                pair.send("a", _stamped(stalled, loop.time()))
            except BlockingIOError:
                # The socket is full: the gate reads it, unless paused.
                now = loop.time()
                blocked_since = blocked_since or now
                if now - blocked_since > 0.2:
                    break
                await asyncio.sleep(0.001)
                continue
            blocked_since = None
            stalled += 1
        assert stalled < 5000, "the gate never pushed back"
        assert pair.a.session.paused, "the gate did not pause"
        # Twice the deadline: what warp took, and what waited in the socket, is stale by now.
        await asyncio.sleep(2 * deadline + 0.3)
        restore()
        await _until(lambda: bool(pair.a.session.prober.active_paths()), 3, "no path came back")
        fresh = []
        for i in range(stalled, stalled + 50):
            payload = _stamped(i, loop.time())
            pair.send("a", payload)  # raises BlockingIOError if the gate never resumed
            fresh.append(payload)
            await asyncio.sleep(0.002)
        got = await pair.receive("b", 50, timeout=3.0)
        await asyncio.sleep(0.2)
        got += await pair.receive("b", 10_000, timeout=0.1)
        assert set(fresh) <= set(got)
        # Nothing that waited past send_deadline went on the wire.
        stale = [i for i, _ in map(_stamp, got) if i < stalled]
        assert not stale, f"{len(stale)} stale datagrams delivered"
        assert pair.a.core.counters["no_path"] > 0


def test_loopback_gate_never_sends_what_waited_past_send_deadline(tmp: Path) -> None:
    asyncio.run(_loopback_gate(tmp))


async def _loopback_gate(tmp_path: Path) -> None:
    """A loopback (UDP) gate: its application never waits, so the gate is never paused (its
    datagrams would wait in the kernel and be read later with a fresh deadline). While there
    is no path the datagrams expire in warp's queue; after the path returns every datagram
    delivered is younger than `send_deadline`, and the new ones arrive."""
    deadline = 0.5
    ports = {side: _free_port() for side in ("in", "out")}
    gates = {
        "a": f'[tunnels.t.gate]\ntype = "loopback"\napplication_to_gate = {ports["in"]}\n',
        "b": f'[tunnels.t.gate]\ntype = "loopback"\napplication_to_gate = {_free_port()}\n'
        f"gate_to_application = {ports['out']}\n",
    }
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", ports["out"]))
    sink.setblocking(False)
    source = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    source.setblocking(False)
    loop = asyncio.get_running_loop()

    def receive_all() -> list[tuple[float, bytes]]:
        out = []
        while True:
            try:
                out.append((loop.time(), sink.recv(2048)))
            except BlockingIOError:
                return out

    try:
        async with gateway_pair(
            tmp_path, initiators=("a",), gate_sections=gates, send_deadline=deadline
        ) as pair:
            source.connect(("127.0.0.1", ports["in"]))
            source.send(b"hello")  # starts the handshake
            await pair.connected()
            await _until(
                lambda: len(pair.a.session.prober.active_paths()) == 4, 5, "paths not active"
            )
            restore = _silence(pair.b)
            await _until(
                lambda: not pair.a.session.prober.active_paths(), 5, "a's paths did not die"
            )
            stalled = 0
            for i in range(3000):
                with contextlib.suppress(BlockingIOError):
                    source.send(_stamped(i, loop.time()))
                    stalled += 1
                if i % 100 == 0:
                    await asyncio.sleep(0.001)
            await asyncio.sleep(deadline)
            restore()
            await _until(lambda: bool(pair.a.session.prober.active_paths()), 3, "no path came back")
            received: list[tuple[float, bytes]] = []
            for i in range(3000, 3050):
                source.send(_stamped(i, loop.time()))
                await asyncio.sleep(0.002)
                received += receive_all()
            await asyncio.sleep(0.3)
            received += receive_all()
        got = {
            _stamp(payload)[0]: at - _stamp(payload)[1]
            for at, payload in received
            if payload != b"hello"
        }
        assert set(range(3000, 3050)) <= set(got), "new datagrams did not arrive"
        ages = sorted(got.values())
        # (Measured at the receiving application: the send deadline plus delivery and the
        # test's own polling; what waited in the kernel would be over 1 s old.)
        assert ages[-1] <= deadline + 0.2, ages[-5:]
        assert not pair.a.session.paused
    finally:
        sink.close()
        source.close()


def test_two_live_paths_behind_one_public_ip_both_carry_shards(tmp: Path) -> None:
    """The far gate's two uplinks behind one NAT: two paths from our uplink to one public IP,
    idle (each heard only by its own probes, half a second apart). Both are sending paths
    (the old rule left out whichever was heard > 0.3 s before the other)."""
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    gateway = Gateway(_config(tmp, "a", keys, 51820, 2, 4, False), static_uplinks=UPLINKS["a"])
    # The defaults (probe every 1 s, path_timeout 3 s), so the probe phases can differ by 0.5 s.
    prober = gateway.session.prober = PathProber(1.0, 3.0)
    remotes = [("198.51.100.7", 40001), ("198.51.100.7", 40002)]
    for offset, remote in zip((0.0, 0.5), remotes, strict=True):
        prober.add_candidate("up1", remote, "map", offset)
    now = 0.0
    seen: set[tuple[str, int]] = set()
    while now < 6.0:
        for uplink, remote, frame in prober.tick(now):
            reply = make_probe_reply(frame)
            assert reply is not None
            prober.on_authenticated(uplink, remote, now + 0.01)
            prober.on_probe_reply(reply, uplink, remote, now + 0.01)
        sending = gateway.session.sending_paths(now)
        if now > 2.0:
            assert sorted(p.remote for p in sending) == remotes, now
        seen.update(p.remote for p in sending)
        now = round(now + 0.05, 3)
    assert seen == set(remotes)


def test_status_of_a_dead_path_shows_no_stale_figures(tmp: Path) -> None:
    """`warp status` / metrics rows: a dead path has its state and how long since it was
    last heard, no loss or RTT figure (it used to show 3-10 % and its old RTT)."""
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    gateway = Gateway(_config(tmp, "a", keys, 51820, 2, 4, False), static_uplinks=UPLINKS["a"])
    prober = gateway.session.prober  # probe every 0.5 s, path_timeout 1.5 s
    start = time.monotonic() - 20.0  # the snapshot's clock (no running loop): monotonic
    remote = ("198.51.100.7", 40001)
    prober.add_candidate("up1", remote, "map", start)
    t = start
    while t < start + 10.0:
        for uplink, where, frame in prober.tick(t):
            if t < start + 5.0:  # answered for 5 s, then silence
                reply = make_probe_reply(frame)
                assert reply is not None
                prober.on_authenticated(uplink, where, t + 0.02)
                prober.on_probe_reply(reply, uplink, where, t + 0.02)
        t += 0.1
    (row,) = gateway.snapshot()["paths"]
    assert row["state"] == "dead"
    assert row["loss_pct"] is None
    assert row["rtt_ms"] is None
    assert row["last_rx_age_s"] == pytest.approx(15.5, abs=0.6)


def test_no_session_costs_no_queue_scan_per_datagram(tmp: Path) -> None:
    asyncio.run(_no_session_queue_work(tmp))


async def _no_session_queue_work(tmp_path: Path) -> None:
    """No session (the far gate never answers): each datagram from the gate used to make the
    flush scan the whole queue twice (drop_expired, next_expiry). Now the queue is swept at
    its next expiry, at most every 0.1 s: the items scanned per datagram stay a small
    constant, not the queue's length."""
    keys = {"a": generate_private_key(), "b": generate_private_key()}
    config = _config(tmp_path, "a", keys, _free_port(), 2, 4, True, send_deadline=0.5)
    gateway = Gateway(config, static_uplinks=UPLINKS["a"])
    queue = gateway.session.send_queue
    scanned = 0

    def counted(method: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object) -> object:
            nonlocal scanned
            scanned += len(queue)
            return method(*args)

        return wrapper

    queue.drop_expired = counted(queue.drop_expired)  # type: ignore[method-assign]
    queue.next_expiry = counted(queue.next_expiry)  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        loop = asyncio.get_running_loop()
        await _until(lambda: (tmp_path / "a.gate").exists(), 5, "gate did not start")
        app = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        app.bind(str(tmp_path / "a.app"))
        app.connect(str(tmp_path / "a.gate"))
        sent = 0
        start = loop.time()
        while loop.time() - start < 1.5:  # 3 x send_deadline, ~600 datagrams in the queue
            app.send(_payload("a", sent))
            sent += 1
            await asyncio.sleep(0.001)
        app.close()
        peer = gateway.core.device.peer(gateway.session.key)
        assert peer is not None and not peer.has_session
        assert gateway.core.counters["no_session"] > 0  # expired datagrams were swept
        assert scanned / sent < 20, (scanned, sent)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
