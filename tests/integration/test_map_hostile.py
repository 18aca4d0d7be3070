"""Hostile input against a running warp-map, while a legitimate client keeps being served.

* 100 000 random datagrams of random sizes (a quarter of them shaped like WireGuard messages);
* every truncation of a real handshake initiation, and the real one replayed from 1 000 ports;
* 10 000 valid-looking initiations (correct mac1, random content) from 10 000 source ports;
* 200 real handshakes from fresh keys, four times ``limits.max_clients``;
* authenticated clients forging their source address (a raw socket) to make the map send to a
  bystander: registering it, having it pushed to and relayed to, spoofed lookups.

Throughout: the legitimate client's requests are answered, no unauthenticated source receives
more bytes than it sent (checked per reply and per socket), and the map's memory stays bounded
(RSS before and after is printed).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import random
import select
import socket
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from warp.keys import generate_private_key, public_key_of
from warp.map_client.client import UplinkExpired, UplinkRegistered
from warp.map_client.driver import MapClientDriver
from warp.map_client.messages import Deregister, Lookup, Register, Relay, encode
from warp.wireguard import Device

from .map_process import MapProcess

MAX_CLIENTS = 50
INITIATION_SIZE = 148


class Ledger:
    """Bytes sent to and received from the map, per local socket; every reply's size."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.largest_sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.replies: list[tuple[int, int]] = []  # (local port, size)
        self.datagrams = 0

    def note_sent(self, port: int, size: int) -> None:
        self.datagrams += 1
        self.sent[port] = self.sent.get(port, 0) + size
        self.largest_sent[port] = max(self.largest_sent.get(port, 0), size)

    def collect(self, sockets: list[socket.socket], wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select(sockets, [], [], min(remaining, 0.05))
            for s in readable:
                while True:
                    try:
                        data = s.recv(65535)
                    except BlockingIOError:
                        break
                    port = s.getsockname()[1]
                    self.received[port] = self.received.get(port, 0) + len(data)
                    self.replies.append((port, len(data)))

    def check_amplification(self) -> None:
        for port, size in self.replies:
            assert size <= self.largest_sent[port], (port, size)
        for port, total in self.received.items():
            assert total <= self.sent[port], (port, total, self.sent[port])


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def send(s: socket.socket, data: bytes, to: tuple[str, int], ledger: Ledger) -> None:
    try:
        s.sendto(data, to)
    except BlockingIOError:
        return
    ledger.note_sent(s.getsockname()[1], len(data))


def mac1(server_public: bytes, message: bytes) -> bytes:
    key = hashlib.blake2s(b"mac1----" + server_public).digest()
    return hashlib.blake2s(message, digest_size=16, key=key).digest()


def valid_looking_initiation(server_public: bytes, rng: random.Random) -> bytes:
    body = b"\x01\x00\x00\x00" + rng.randbytes(112)
    return body + mac1(server_public, body) + bytes(16)


def random_datagram(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.25:  # shaped like a WireGuard message: right type, reserved zero, right size
        typ = rng.choice([1, 2, 3, 4])
        size = {1: 148, 2: 92, 3: 64}.get(typ, rng.randint(32, 1500))
        return bytes([typ, 0, 0, 0]) + rng.randbytes(size - 4)
    return rng.randbytes(rng.randint(0, 1500))


def real_initiation(map_public: bytes, map_address: tuple[str, int]) -> bytes:
    device = Device(generate_private_key())
    device.add_peer(map_public, endpoint=map_address)
    device.initiate_handshake(map_public, time.monotonic())
    (out,) = device.drain_outgoing()
    assert len(out.data) == INITIATION_SIZE
    return out.data


def flood(
    map_process: MapProcess,
    ledger: Ledger,
    report: dict[str, float],
    caught_up: Callable[[], None],
) -> None:
    """Everything hostile, from blocking loops in a worker thread. ``caught_up()`` returns once
    the map has worked through its socket backlog (a legitimate request sent after it has been
    answered)."""
    rng = random.Random(1234)
    target = map_process.address

    # 1) 100 000 random datagrams from 8 sockets
    sockets = [udp_socket() for _ in range(8)]
    for s in sockets:
        s.setblocking(True)
    t0 = time.monotonic()
    for i in range(100_000):
        s = sockets[i % 8]
        data = random_datagram(rng)
        s.sendto(data, target)
        ledger.note_sent(s.getsockname()[1], len(data))
        if i % 1000 == 999:
            # short breaths so that most of it reaches the parser instead of overflowing the
            # map's socket buffer (the kernel drops the rest, which is fine but tests nothing)
            time.sleep(0.015)
    report["random_seconds"] = time.monotonic() - t0
    for s in sockets:
        s.setblocking(False)
    ledger.collect(sockets, 0.2)
    for s in sockets:
        s.close()
    caught_up()

    # 2) every truncation of a real initiation, then the real one and 1 000 replays of it
    initiation = real_initiation(map_process.public_key, target)
    s = udp_socket()
    for cut in range(len(initiation)):
        send(s, initiation[:cut], target, ledger)
    send(s, initiation + b"\x00", target, ledger)
    ledger.collect([s], 0.1)
    time.sleep(1.1)  # let "under load" lapse (else the genuine one rightly gets a cookie reply)
    caught_up()
    first = udp_socket()
    send(first, initiation, target, ledger)
    ledger.collect([first], 0.2)
    report["first_response"] = ledger.received.get(first.getsockname()[1], 0)
    replay_responses = 0
    for _ in range(4):
        batch = [udp_socket() for _ in range(250)]
        for r in batch:
            send(r, initiation, target, ledger)
        before = len(ledger.replies)
        ledger.collect(batch, 0.05)
        replay_responses += sum(1 for _, size in ledger.replies[before:] if size == 92)
        for r in batch:
            r.close()
    report["replay_responses"] = replay_responses
    s.close()
    first.close()

    # 3) 10 000 valid-looking initiations, each from its own source port
    cookie_replies = 0
    t0 = time.monotonic()
    for _ in range(20):
        batch = [udp_socket() for _ in range(500)]
        for b in batch:
            send(b, valid_looking_initiation(map_process.public_key, rng), target, ledger)
        before = len(ledger.replies)
        ledger.collect(batch, 0.05)
        cookie_replies += sum(1 for _, size in ledger.replies[before:] if size == 64)
        for b in batch:
            b.close()
    report["initiation_seconds"] = time.monotonic() - t0
    report["cookie_replies"] = cookie_replies

    # 4) real handshakes from 200 fresh keys (4x max_clients), paced under the load threshold
    caught_up()
    time.sleep(1.1)  # let "under load" lapse
    responses = 0
    for i in range(200):
        h = udp_socket()
        send(h, real_initiation(map_process.public_key, target), target, ledger)
        before = len(ledger.replies)
        ledger.collect([h], 0.005)
        responses += sum(1 for _, size in ledger.replies[before:] if size == 92)
        h.close()
        if i % 40 == 39:
            time.sleep(0.5)
    report["fresh_key_responses"] = responses


def test_hostile_input_keeps_serving_bounds_memory_and_never_amplifies(tmp_path: Path) -> None:
    map_process = MapProcess(
        tmp_path,
        extra_config=(
            "[limits]\n"
            f"max_clients = {MAX_CLIENTS}\n"
            "requests_per_second = 200\n"
            "handshake_load_threshold = 100\n"
        ),
    )
    map_process.start()
    key, far = generate_private_key(), generate_private_key()
    ledger = Ledger()
    report: dict[str, float] = {}
    probe_latencies: list[float] = []

    async def scenario() -> None:
        client = MapClientDriver(
            key,
            map_process.public_key,
            map_process.address,
            public_key_of(far),
            refresh_interval=1.0,
            response_timeout=0.2,
        )
        await client.add_uplink("u1", ("127.0.0.1", 0))
        await client.add_uplink("u2", ("127.0.0.1", 0))
        await client.wait_for(client.registered, 5.0)
        await asyncio.sleep(0.5)
        report["rss_before"] = map_process.rss_kib()

        def answered_twice(since: float) -> bool:
            answers = [at for at, e in client.events if isinstance(e, UplinkRegistered)]
            return sum(1 for at in answers if at >= since) >= 2

        async def probe() -> None:
            """Re-register every 100 ms; each must be answered (retries allowed) within 2 s."""
            while True:
                t = client.now()
                client.refresh()
                await client.wait_for(functools.partial(answered_twice, t), 2.0)
                probe_latencies.append(client.now() - t)
                await asyncio.sleep(0.1)

        def caught_up() -> None:
            """(In the flood thread) wait until two probes sent from now on are answered."""
            seen = len(probe_latencies)
            deadline = time.monotonic() + 20
            while len(probe_latencies) < seen + 2 and time.monotonic() < deadline:
                time.sleep(0.01)

        prober = asyncio.create_task(probe())
        t0 = time.monotonic()
        await asyncio.to_thread(flood, map_process, ledger, report, caught_up)
        report["flood_seconds"] = time.monotonic() - t0
        await asyncio.sleep(0.5)
        assert not prober.done(), prober.exception()
        prober.cancel()
        assert client.registered()
        assert not any(isinstance(e, UplinkExpired) for _, e in client.events)
        await client.stop()

    try:
        asyncio.run(scenario())
        report["rss_after"] = map_process.rss_kib()
        stats = map_process.stats()
    finally:
        map_process.kill()

    sent_total = sum(ledger.sent.values())
    report["datagrams_sent"] = ledger.datagrams
    received_total = sum(ledger.received.values())
    largest = max((size for _, size in ledger.replies), default=0)
    rejected = ", ".join(
        f"{k.removeprefix('wireguard_rejected_')}={v}"
        for k, v in sorted(stats.items())
        if k.startswith("wireguard_rejected_")
    )
    rss_before, rss_after = report["rss_before"] / 1024, report["rss_after"] / 1024
    print(
        f"\nhostile: flood {report['flood_seconds']:.1f} s (100k random datagrams sent in "
        f"{report['random_seconds']:.1f} s, 10k initiations in "
        f"{report['initiation_seconds']:.1f} s); sent {sent_total} B from {len(ledger.sent)} "
        f"ports, got back {received_total} B in {len(ledger.replies)} replies "
        f"(largest {largest} B)"
        f"\nhostile: cookie replies {report['cookie_replies']:.0f}, responses to replays "
        f"{report['replay_responses']:.0f}, fresh-key handshakes answered "
        f"{report['fresh_key_responses']:.0f}/200, sessions at the end {stats['sessions']} "
        f"(max_clients {MAX_CLIENTS}), evicted {stats.get('sessions_evicted', 0)}"
        f"\nhostile: legit client probes {len(probe_latencies)}, median "
        f"{1000 * statistics.median(probe_latencies):.1f} ms, "
        f"max {1000 * max(probe_latencies):.0f} ms"
        f"\nhostile: map RSS before {rss_before:.1f} MiB, after {rss_after:.1f} MiB "
        f"(+{rss_after - rss_before:.1f} MiB)"
        f"\nhostile: the map received {stats['datagrams_in']} datagrams (hostile: "
        f"{report['datagrams_sent']:.0f}, the rest from the legitimate client); "
        f"rejected by reason {rejected}"
    )
    ledger.check_amplification()
    assert received_total <= sent_total
    assert report["first_response"] == 92  # the one genuine initiation is answered…
    assert report["replay_responses"] == 0  # …its replays never are
    assert report["cookie_replies"] > 0  # under load, mac2 is required: cookies went out
    assert report["fresh_key_responses"] >= 120  # (a late response is not waited for)
    assert stats["sessions"] <= MAX_CLIENTS
    assert stats["sessions_evicted"] >= 100
    assert stats["registry_clients"] == 0  # the legit client deregistered; nobody else could
    assert len(probe_latencies) >= 10
    assert report["rss_after"] - report["rss_before"] < 32 * 1024


# ------------------------------------------------------------------ reflection (spoofed sources)


class Attacker:
    """An authenticated client of the map (its own key, a real session from a real socket)
    that can also send its sealed requests with a forged UDP source port (raw socket)."""

    def __init__(self, map_process: MapProcess) -> None:
        self.map_public = map_process.public_key
        self.map_address = map_process.address
        self.private = generate_private_key()
        self.public = public_key_of(self.private)
        self.device = Device(self.private)
        self.device.add_peer(self.map_public, endpoint=self.map_address)
        self.socket = udp_socket()
        self.socket.setblocking(True)
        self.socket.settimeout(2.0)
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read
        self.request_id = 0
        self.device.initiate_handshake(self.map_public, time.monotonic())
        self._flush()
        response, _ = self.socket.recvfrom(2048)
        assert self.device.receive(response, self.map_address, time.monotonic()) is None
        self.send(b"")  # key confirmation, from the real socket

    def _flush(self) -> None:
        for out in self.device.drain_outgoing():
            self.socket.sendto(out.data, self.map_address)

    def sealed(self, frame: bytes) -> bytes:
        data = self.device.seal(self.map_public, frame, time.monotonic())
        assert data is not None
        return data

    def send(self, frame: bytes) -> None:
        self.socket.sendto(self.sealed(frame), self.map_address)

    def spoof(self, frame: bytes, source_port: int) -> int:
        """Send ``frame`` sealed, as if from 127.0.0.1:``source_port``; return its size."""
        data = self.sealed(frame)
        header = struct.pack("!HHHH", source_port, self.map_address[1], 8 + len(data), 0)
        self.raw.sendto(header + data, (self.map_address[0], 0))
        return len(data)

    def next_id(self) -> int:
        self.request_id += 1
        return self.request_id

    def close(self) -> None:
        self.socket.close()
        self.raw.close()


def received_bytes(s: socket.socket, wait: float) -> int:
    total = 0
    deadline = time.monotonic() + wait
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s], [], [], remaining)
        if readable:
            total += len(s.recv(65535))
    return total


# Skipped without root locally; under CI it runs (and fails) whatever the user.
needs_raw_socket = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="forging source ports takes a raw socket (root)",
)


@needs_raw_socket
def test_spoofed_endpoints_get_nothing_but_bounded_answers(tmp_path: Path) -> None:
    """Two colluding authenticated clients try to make the map send to bystanders: one
    registers a bystander's address as its endpoint (spoofed source), the other then makes the
    map push to it (its own endpoint set changing) and relay to it; a spoofed lookup asks for a
    long answer to be sent to another bystander. The bystanders never sent anything."""
    map_process = MapProcess(tmp_path, extra_config="[limits]\nrequests_per_second = 1000\n")
    map_process.start()
    victim_of_register, victim_of_lookup = udp_socket(), udp_socket()
    register_port = victim_of_register.getsockname()[1]
    lookup_port = victim_of_lookup.getsockname()[1]
    one, two = Attacker(map_process), Attacker(map_process)
    uplinks = [udp_socket() for _ in range(8)]
    try:
        # 1) `one` registers the bystander as its endpoint (far gate: `two`, so `two` may see it)
        spoofed = one.spoof(
            encode(Register(one.next_id(), 1, two.public, 7)), source_port=register_port
        )
        answered = received_bytes(victim_of_register, 0.3)
        assert answered <= spoofed  # at most an answer no larger than the request

        # 2) `two` registers from 8 real sockets, then leaves and comes back 10 times: every
        # change of its endpoint set is pushed to whoever names it as far gate (`one`)...
        for i, s in enumerate(uplinks):
            s.sendto(two.sealed(encode(Register(two.next_id(), i, one.public, 9))), one.map_address)
        for _ in range(10):
            two.send(encode(Deregister(two.next_id(), 0)))
            time.sleep(0.01)
            uplinks[0].sendto(
                two.sealed(encode(Register(two.next_id(), 0, one.public, 9))), one.map_address
            )
        # ...and `two` relays 50 payloads of 1 000 bytes to `one`
        for _ in range(50):
            two.send(encode(Relay(one.public, bytes(1000))))
        pushed_and_relayed = received_bytes(victim_of_register, 0.5)
        print(
            f"\nreflection: spoofed register {spoofed} B, answered {answered} B; then pushes "
            f"and 50 relays of 1000 B towards it delivered {pushed_and_relayed} B"
        )
        assert pushed_and_relayed == 0

        # 3) `one` looks `two` up (8 endpoints: a long answer) with the other bystander as source
        spoofed_lookups = sum(
            one.spoof(encode(Lookup(one.next_id(), two.public)), source_port=lookup_port)
            for _ in range(20)
        )
        assert spoofed_lookups < 20 * 100
        assert received_bytes(victim_of_lookup, 0.3) == 0

        # the map did all it was asked on the real addresses and counted what it refused
        stats = map_process.stats()
        assert stats["registry_relay_forwarded"] == 50
        assert (
            stats["validation_unvalidated_dropped"] >= 80
        )  # 50 relays, the pushes, 20 lookup answers
    finally:
        map_process.kill()
        one.close()
        two.close()
        for s in (victim_of_register, victim_of_lookup, *uplinks):
            s.close()


@needs_raw_socket
def test_map_sends_an_unvalidated_address_no_more_than_it_received(tmp_path: Path) -> None:
    """Every kind of request, spoofed from one bystander address 300 times (lookups of a client
    with 8 endpoints among them: answers longer than the question): the bytes that reach the
    bystander never exceed the bytes sent in its name (measured on its socket)."""
    map_process = MapProcess(tmp_path, extra_config="[limits]\nrequests_per_second = 1000\n")
    map_process.start()
    bystander = udp_socket()
    port = bystander.getsockname()[1]
    attacker, far = Attacker(map_process), Attacker(map_process)
    far_uplinks = [udp_socket() for _ in range(8)]
    try:
        for i, s in enumerate(far_uplinks):
            s.sendto(
                far.sealed(encode(Register(far.next_id(), i, attacker.public, 1))), far.map_address
            )
        rng = random.Random(7)
        spoofed = 0
        for i in range(300):
            frame = rng.choice(
                [
                    encode(Register(attacker.next_id(), i % 4, far.public, 3)),
                    encode(Lookup(attacker.next_id(), far.public)),
                    encode(Lookup(attacker.next_id(), attacker.public)),
                    encode(Deregister(attacker.next_id(), None)),
                    encode(Relay(far.public, bytes(64))),
                    bytes([0x10, 0, 1, 0xC0]),  # invalid: answered with an error
                ]
            )
            spoofed += attacker.spoof(frame, source_port=port)
            if i % 50 == 49:
                time.sleep(0.02)
        received = received_bytes(bystander, 0.5)
        print(f"\nreflection: spoofed {spoofed} B from one address, it received {received} B")
        assert 0 < received <= spoofed
    finally:
        map_process.kill()
        attacker.close()
        far.close()
        for s in (bystander, *far_uplinks):
            s.close()
