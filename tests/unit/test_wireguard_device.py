"""Two (or more) sans-I/O devices talking over virtual links in virtual time."""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest

from warp.wireguard import (
    Device,
    HandshakeComplete,
    HandshakeFailed,
    KeysZeroed,
    MessageKind,
    Outgoing,
    PeerRoamed,
    Received,
    SessionExpired,
    UnknownPeerAccepted,
)
from warp.wireguard.constants import (
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
)
from warp.wireguard.testing import Link, Side, WallClock, make_device

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("198.51.100.2", 51820)
A_TUN = "10.77.0.1"
B_TUN = "10.77.0.2"


def ipv4(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6(src: str, dst: str, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">IHBB", 0x60000000, len(payload), 17, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def make_link(
    *,
    psk_a: bytes | None = None,
    psk_b: bytes | None = None,
    mtu: int | None = None,
    b_kwargs: dict[str, object] | None = None,
    seed: int = 1,
) -> Link:
    a = make_device(seed, mtu=mtu)
    b = make_device(seed + 1000, mtu=mtu, **(b_kwargs or {}))
    a.add_peer(
        b.public_key,
        preshared_key=psk_a,
        endpoint=B_ADDR,
        allowed_ips=[f"{B_TUN}/32", "fd00::2/128"],
    )
    b.add_peer(a.public_key, preshared_key=psk_b, allowed_ips=[f"{A_TUN}/32", "fd00::1/128"])
    return Link(a, b, A_ADDR, B_ADDR)


def established(**kwargs: object) -> Link:
    link = make_link(**kwargs)  # type: ignore[arg-type]
    link.a.device.initiate_handshake(link.b.key, 0.0)
    link.pump(0.0)
    assert link.a.device.peer(link.b.key).has_session  # type: ignore[union-attr]
    assert link.b.device.peer(link.a.key).has_session  # type: ignore[union-attr]
    for side in (link.a, link.b):
        side.events.clear()
        side.received.clear()
        side.sent.clear()
    return link


def kinds(outs: list[Outgoing]) -> list[MessageKind]:
    return [o.kind for o in outs]


def send(link: Link, side: Side, plaintext: bytes, now: float) -> Received | None:
    """Seal on ``side`` and deliver to the other side directly."""
    other = link.other(side)
    msg = side.device.seal(other.key, plaintext, now)
    assert msg is not None
    return other.device.receive(msg, side.address, now)


# --------------------------------------------------------------------------- handshake and data


def test_full_handshake_then_data_both_ways() -> None:
    link = make_link()
    a, b = link.a, link.b
    pkt = ipv4(A_TUN, B_TUN, b"hello")
    assert a.device.seal(b.key, pkt, 0.0) is None  # no session: staged, handshake started
    out = a.device.drain_outgoing()
    assert kinds(out) == [MessageKind.INITIATION]
    assert len(out[0].data) == 148 and out[0].destination == B_ADDR and out[0].peer == b.key
    assert b.device.receive(out[0].data, A_ADDR, 0.0) is None
    resp = b.device.drain_outgoing()
    assert kinds(resp) == [MessageKind.RESPONSE] and len(resp[0].data) == 92
    assert resp[0].destination == A_ADDR
    assert a.device.receive(resp[0].data, B_ADDR, 0.01) is None
    (ev,) = a.device.drain_events()
    assert ev == HandshakeComplete(b.key, True, B_ADDR)
    flushed = a.device.drain_outgoing()
    assert kinds(flushed) == [MessageKind.TRANSPORT]  # the staged packet, no extra keepalive
    r = b.device.receive(flushed[0].data, A_ADDR, 0.02)
    assert r == Received(a.key, pkt, A_ADDR)  # trimmed to its IP length
    events = b.device.drain_events()
    assert HandshakeComplete(a.key, False, A_ADDR) in events
    # and back
    reply = ipv4(B_TUN, A_TUN, b"world")
    msg = b.device.seal(a.key, reply, 0.03)
    assert msg is not None and msg[0] == 4
    assert a.device.receive(msg, B_ADDR, 0.03) == Received(b.key, reply, B_ADDR)
    pa, pb = a.device.peer(b.key), b.device.peer(a.key)
    assert pa is not None and pb is not None
    assert pa.has_session and pb.has_session
    assert pa.last_handshake_time == 0.01 and pb.last_handshake_time == 0.02
    assert pa.tx_packets == 1 and pa.rx_packets == 1 and pb.rx_packets == 1
    assert pa.rx_bytes == len(msg) and pb.tx_bytes == len(msg)
    assert a.device.rejected == {} and b.device.rejected == {}


def test_initiator_with_no_staged_packets_sends_keepalive_for_confirmation() -> None:
    link = make_link()
    link.a.device.initiate_handshake(link.b.key, 0.0)
    link.pump(0.0)
    assert [o.kind for o in link.a.sent] == [MessageKind.INITIATION, MessageKind.KEEPALIVE]
    assert len(link.a.sent[1].data) == 32
    assert link.b.received == [Received(link.a.key, b"", A_ADDR)]
    assert link.b.device.peer(link.a.key).has_session  # type: ignore[union-attr]


def test_responder_does_not_send_on_unconfirmed_session() -> None:
    link = make_link()
    a, b = link.a, link.b
    a.device.initiate_handshake(b.key, 0.0)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.0)
    b.device.drain_outgoing()  # the response is lost
    pb = b.device.peer(a.key)
    assert pb is not None and not pb.has_session and pb.next is not None
    assert b.device.seal(a.key, b"\x01frame", 0.1) is None  # staged until confirmation
    # no new initiation right after our response (rate limited by REKEY_TIMEOUT)
    assert b.device.drain_outgoing() == []
    assert list(pb.staged) == [b"\x01frame"]


def test_many_peers_on_one_device() -> None:
    hub = make_device(7)
    spokes = [make_device(100 + i) for i in range(5)]
    for i, s in enumerate(spokes):
        hub.add_peer(s.public_key, allowed_ips=[f"10.0.0.{i + 1}/32"])
        s.add_peer(hub.public_key, endpoint=("203.0.113.1", 1))
    for i, s in enumerate(spokes):
        link = Link(s, hub, (f"192.0.2.{i + 1}", 1000 + i), ("203.0.113.1", 1))
        s.seal(hub.public_key, ipv4(f"10.0.0.{i + 1}", "10.0.0.254", bytes([i])), 0.0)
        link.pump(0.0)
        assert link.b.received[-1].peer == s.public_key
        assert link.b.received[-1].plaintext[-1] == i
    for i, s in enumerate(spokes):
        assert hub.route(ipaddress.IPv4Address(f"10.0.0.{i + 1}").packed) == s.public_key
        p = hub.peer(s.public_key)
        assert p is not None and p.endpoint == (f"192.0.2.{i + 1}", 1000 + i)
    assert hub.route(ipaddress.IPv4Address("10.0.1.1").packed) is None


def test_ipv6_socket_addresses_are_normalised() -> None:
    link = established()
    msg = link.a.device.seal(link.b.key, b"\x01x", 1.0)
    assert msg is not None
    r = link.b.device.receive(msg, ("2001:db8::1", 5555, 0, 0), 1.0)  # type: ignore[arg-type]
    assert r is not None and r.source == ("2001:db8::1", 5555)
    assert link.b.device.peer(link.a.key).endpoint == ("2001:db8::1", 5555)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- padding and IP


@pytest.mark.parametrize(
    ("inner", "wire"),
    [
        (0, 32),
        (84, 128),
        (1028, 1072),
        (1419, 1452),
        (1420, 1452),
        (1500, 1532),
        (1505, 1548),
        (1, 48),
        (16, 48),
    ],
)
def test_padding_capped_at_mtu(inner: int, wire: int) -> None:
    link = established(mtu=1420)
    pkt = ipv4(A_TUN, B_TUN, bytes(inner - 20)) if inner >= 20 else b"\x01" * inner
    msg = link.a.device.seal(link.b.key, pkt, 1.0)
    assert msg is not None and len(msg) == wire
    r = link.b.device.receive(msg, A_ADDR, 1.0)
    assert r is not None
    if inner >= 20:
        assert r.plaintext == pkt
    else:
        assert r.plaintext[:inner] == pkt and not any(r.plaintext[inner:])


def test_padding_without_mtu_rounds_to_16() -> None:
    link = established()
    msg = link.a.device.seal(link.b.key, ipv4(A_TUN, B_TUN, bytes(1400)), 1.0)
    assert msg is not None and len(msg) == 32 + 1424


def test_allowed_ips_filter_only_ip_packets() -> None:
    link = established()
    a, b = link.a, link.b
    good = ipv4(A_TUN, B_TUN, b"ok")
    assert send(link, a, good, 1.0) == Received(a.key, good, A_ADDR)
    assert send(link, a, ipv4("10.99.0.1", B_TUN, b"spoof"), 1.0) is None
    assert b.device.rejected["not_allowed_ip"] == 1
    v6 = ipv6("fd00::1", "fd00::2", b"six")
    assert send(link, a, v6, 1.0) == Received(a.key, v6, A_ADDR)
    assert send(link, a, ipv6("fd00::99", "fd00::2", b"x"), 1.0) is None
    assert b.device.rejected["not_allowed_ip"] == 2
    # truncated IP packets are dropped
    short = bytearray(good)
    short[2:4] = (10).to_bytes(2, "big")  # shorter than an IPv4 header
    assert send(link, a, bytes(short), 1.0) is None
    lying = bytearray(good)
    lying[2:4] = (100).to_bytes(2, "big")  # claims more than the plaintext holds
    assert send(link, a, bytes(lying), 1.0) is None
    assert b.device.rejected["bad_ip_packet"] == 2
    # warp frames pass through untouched, padding included
    frame = b"\x01" + b"shard-bytes"
    r = send(link, a, frame, 1.0)
    assert r is not None and r.plaintext == frame + bytes(4)


def test_allowed_ips_longest_prefix_and_reassignment() -> None:
    d = make_device(3)
    p1, p2 = make_device(4).public_key, make_device(5).public_key
    d.add_peer(p1, allowed_ips=["10.0.0.0/8", "0.0.0.0/0"])
    d.add_peer(p2, allowed_ips=["10.1.0.0/16", "::/0"])
    route = d.route
    assert route(ipaddress.ip_address("10.1.2.3").packed) == p2
    assert route(ipaddress.ip_address("10.2.2.3").packed) == p1
    assert route(ipaddress.ip_address("8.8.8.8").packed) == p1
    assert route(ipaddress.ip_address("2001:db8::1").packed) == p2
    assert route(b"\x01\x02") is None
    d.add_peer(p2, allowed_ips=["10.0.0.0/8"])  # moves to p2, as WireGuard does
    assert route(ipaddress.ip_address("10.2.2.3").packed) == p2
    peer1 = d.peer(p1)
    assert peer1 is not None
    assert [str(n) for n in peer1.allowed_ips] == ["0.0.0.0/0"]
    d.remove_peer(p2)
    assert route(ipaddress.ip_address("10.1.2.3").packed) == p1
    assert route(ipaddress.ip_address("2001:db8::1").packed) is None


# --------------------------------------------------------------------------- rekey and expiry


def test_initiator_rekeys_after_120s_and_old_session_still_decrypts() -> None:
    link = established()
    a, b = link.a, link.b
    pa = a.device.peer(b.key)
    assert pa is not None
    first = pa.current
    assert first is not None
    msg = a.device.seal(b.key, b"\x01before", 119.0)
    assert msg is not None and a.device.drain_outgoing() == []
    in_flight = b.device.seal(a.key, b"\x01in-flight", 119.5)
    assert in_flight is not None
    msg = a.device.seal(b.key, b"\x01after", 120.0)
    assert msg is not None  # still sent on the old session ...
    out = a.device.drain_outgoing()
    assert kinds(out) == [MessageKind.INITIATION]  # ... while a new handshake starts
    b.device.receive(out[0].data, A_ADDR, 120.0)
    a.device.receive(b.device.drain_outgoing()[0].data, B_ADDR, 120.0)
    assert pa.current is not first and pa.previous is first
    # a packet sealed under the old keys still decrypts (previous keypair)
    assert a.device.receive(in_flight, B_ADDR, 120.1) is not None
    link.pump(120.1)  # A's confirmation keepalive promotes B's new session
    pb = b.device.peer(a.key)
    assert pb is not None and pb.current is not None and pa.current is not None
    assert pb.current.remote_index == pa.current.local_index
    assert pb.current.local_index == pa.current.remote_index
    assert a.device.counters["handshakes_completed"] == 2


def test_responder_does_not_rekey_on_send_after_120s() -> None:
    link = established()
    msg = link.b.device.seal(link.a.key, b"\x01x", 150.0)
    assert msg is not None
    assert link.b.device.drain_outgoing() == []


def test_packets_refused_after_180s_without_rekey() -> None:
    link = established()
    a, b = link.a, link.b
    late = b.device.seal(a.key, b"\x01late", 179.0)
    assert late is not None
    assert a.device.receive(late, B_ADDR, 180.0) is None
    assert a.device.rejected["expired_keypair"] == 1
    a.device.tick(180.0)
    assert SessionExpired(b.key) in a.device.drain_events()
    pa = a.device.peer(b.key)
    assert pa is not None and not pa.has_session
    assert a.device.seal(b.key, b"\x01new", 181.0) is None  # refused: staged, handshake
    assert kinds(a.device.drain_outgoing()) == [MessageKind.INITIATION]
    assert list(pa.staged) == [b"\x01new"]


def test_rekey_after_messages_and_reject_after_messages() -> None:
    link = established()
    pb = link.b.device.peer(link.a.key)
    assert pb is not None and pb.current is not None
    pb.current.send_counter = REKEY_AFTER_MESSAGES
    assert link.b.device.seal(link.a.key, b"\x01x", 6.0) is not None
    # even the responder rekeys on message count
    assert kinds(link.b.device.drain_outgoing()) == [MessageKind.INITIATION]
    pb.current.send_counter = REJECT_AFTER_MESSAGES
    assert link.b.device.seal(link.a.key, b"\x01y", 12.0) is None
    assert list(pb.staged) == [b"\x01y"]


def test_last_minute_rekey_on_receive_at_165s() -> None:
    link = established()
    a, b = link.a, link.b
    m1 = b.device.seal(a.key, b"\x01a", 164.0)
    assert m1 is not None
    assert a.device.receive(m1, B_ADDR, 164.0) is not None
    assert a.device.drain_outgoing() == []
    m2 = b.device.seal(a.key, b"\x01b", 165.5)
    m3 = b.device.seal(a.key, b"\x01c", 166.0)
    assert m2 is not None and m3 is not None
    assert a.device.receive(m2, B_ADDR, 165.5) is not None
    assert kinds(a.device.drain_outgoing()) == [MessageKind.INITIATION]
    assert a.device.receive(m3, B_ADDR, 171.0) is not None
    assert a.device.drain_outgoing() == []  # only one last-minute handshake
    # the responder never does it
    m4 = a.device.seal(b.key, b"\x01d", 170.0)
    assert m4 is not None and b.device.receive(m4, A_ADDR, 170.0) is not None
    assert b.device.drain_outgoing() == []


def test_keys_zeroed_after_540s() -> None:
    link = established()
    a = link.a
    now = 0.0
    events = []
    while now < 600:
        d = a.device.next_deadline()
        assert d is not None
        now = max(now, d)
        a.device.tick(now)
        events.extend(a.device.drain_events())
        a.device.drain_outgoing()
        if any(isinstance(e, KeysZeroed) for e in events):
            break
    assert events == [SessionExpired(link.b.key), KeysZeroed(link.b.key)]
    assert now == pytest.approx(540.0, abs=0.01)
    pa = a.device.peer(link.b.key)
    assert pa is not None and pa.current is None and pa.previous is None and pa.next is None
    assert a.device._keypairs == {} and a.device._handshakes == {}
    assert a.device.next_deadline() is None


# --------------------------------------------------------------------------- retries and timers


def test_handshake_retried_every_5s_with_jitter_then_given_up() -> None:
    link = make_link()
    a, b = link.a, link.b
    link.deliver = lambda side, out: False  # the peer is unreachable
    a.device.seal(b.key, b"\x01lost-1", 0.0)
    a.device.seal(b.key, b"\x01lost-2", 0.0)
    assert kinds(a.device.drain_outgoing()) == [MessageKind.INITIATION]
    now = 0.0
    times = [0.0]
    failed_at = None
    while now < 200:
        d = a.device.next_deadline()
        if d is None:
            break
        now = d
        a.device.tick(now)
        out = a.device.drain_outgoing()
        times.extend(now for o in out if o.kind is MessageKind.INITIATION)
        for e in a.device.drain_events():
            if isinstance(e, HandshakeFailed):
                failed_at = now
                assert e.dropped_packets == 2
        if failed_at is not None:
            break
    gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times)]
    assert len(times) == 20  # the first initiation and 19 retries, as the kernel
    assert all(5.0 <= g < 5.334 for g in gaps), gaps
    assert len(set(gaps)) > 1  # jittered
    assert failed_at is not None and 90.0 < failed_at < 107.0
    assert a.device.counters["staged_dropped"] == 2
    pa = a.device.peer(b.key)
    assert pa is not None and not pa.staged and pa.zero_at is not None
    # no more initiations afterwards, until new data restarts the cycle
    a.device.tick(150.0)
    assert a.device.drain_outgoing() == []
    a.device.seal(b.key, b"\x01again", 150.0)
    assert kinds(a.device.drain_outgoing()) == [MessageKind.INITIATION]


def test_lost_response_is_retried_and_completes() -> None:
    link = make_link()
    drops = {"n": 0}

    def deliver(side: Side, out: Outgoing) -> bool:
        if out.kind is MessageKind.RESPONSE and drops["n"] == 0:
            drops["n"] += 1
            return False
        return True

    link.deliver = deliver
    link.a.device.seal(link.b.key, b"\x01data", 0.0)
    link.pump(0.0)
    assert link.b.received == []
    link.run_until(6.0, 0.0)
    assert [r.plaintext[:5] for r in link.b.received] == [b"\x01data"]
    assert link.a.device.counters["initiations_sent"] == 2


def test_passive_keepalive_after_10s_of_receive_only() -> None:
    link = established()
    a, b = link.a, link.b
    assert send(link, a, b"\x01data", 1.0) is not None
    assert b.device.next_deadline() is not None and b.device.next_deadline() <= 11.0  # type: ignore[operator]
    b.device.tick(10.9)
    assert b.device.drain_outgoing() == []
    b.device.tick(11.0)
    out = b.device.drain_outgoing()
    assert kinds(out) == [MessageKind.KEEPALIVE]
    assert len(out[0].data) == 32 and out[0].destination == A_ADDR
    assert a.device.receive(out[0].data, B_ADDR, 11.0) == Received(b.key, b"", B_ADDR)
    # A heard back: its dead-peer timer is cancelled, no handshake at 16 s
    a.device.tick(30.0)
    assert kinds(a.device.drain_outgoing()) == []
    # a keepalive does not ask for a keepalive
    b.device.tick(30.0)
    assert b.device.drain_outgoing() == []


def test_sending_cancels_passive_keepalive() -> None:
    link = established()
    assert send(link, link.a, b"\x01ping", 1.0) is not None
    assert send(link, link.b, b"\x01pong", 2.0) is not None
    link.b.device.tick(11.0)
    assert kinds(link.b.device.drain_outgoing()) == []


def test_dead_peer_triggers_new_handshake_after_15s() -> None:
    link = established()
    a, b = link.a, link.b
    msg = a.device.seal(b.key, b"\x01anyone?", 1.0)
    assert msg is not None
    a.device.tick(15.9)
    assert a.device.drain_outgoing() == []
    a.device.tick(16.4)
    assert kinds(a.device.drain_outgoing()) == [MessageKind.INITIATION]


def test_persistent_keepalive() -> None:
    link = make_link()
    a, b = link.a, link.b
    a.device.add_peer(b.key, persistent_keepalive=25)
    assert a.device.next_deadline() is not None
    link.tick(0.0)  # configured keepalive: no session yet, so a handshake
    assert [o.kind for o in a.sent] == [MessageKind.INITIATION, MessageKind.KEEPALIVE]
    a.sent.clear()
    link.run_until(80.0, 0.0)
    keepalives = [o for o in a.sent if o.kind is MessageKind.KEEPALIVE]
    assert len(keepalives) == 3  # at 25, 50, 75
    a.device.set_persistent_keepalive(b.key, None)
    a.sent.clear()
    link.run_until(200.0, 80.0)
    assert not [o for o in a.sent if o.kind is MessageKind.KEEPALIVE]


def test_staged_packets_flushed_in_order_and_bounded() -> None:
    link = make_link()
    a, b = link.a, link.b
    for i in range(1500):
        assert a.device.seal(b.key, b"\x01" + i.to_bytes(2, "big"), 0.0) is None
    assert kinds(a.device.drain_outgoing()) == [MessageKind.INITIATION]  # only one
    assert a.device.counters["staged_dropped"] == 476
    a.device.initiate_handshake(b.key, 0.0, force=True)
    link.pump(0.0)
    got = [int.from_bytes(r.plaintext[1:3], "big") for r in b.received]
    assert got == list(range(476, 1500))


def test_next_deadline_is_never_late() -> None:
    link = established()
    a = link.a.device
    rnd = __import__("random").Random(5)
    now = 0.0
    for _ in range(2000):
        now += rnd.random() * 3
        op = rnd.randrange(4)
        if op == 0:
            a.seal(link.b.key, b"\x01x", now)
        elif op == 1:
            m = link.b.device.seal(link.a.key, b"\x01y", now)
            if m is not None:
                a.receive(m, B_ADDR, now)
        else:
            d = a.next_deadline()
            if d is not None and d <= now:
                a.tick(now)
                after = a.next_deadline()
                assert after is None or after > now  # no timer is left due
        link.pump(now)
        d = a.next_deadline()
        for p in a.peers:
            pd = p.deadline()
            if pd is not None:
                assert d is not None and d <= pd


# --------------------------------------------------------------------------- cookies and load


def test_cookie_reply_under_load_then_retry_with_mac2_accepted() -> None:
    link = make_link()
    a, b = link.a, link.b
    b.device.set_under_load(True)
    a.device.seal(b.key, b"\x01data", 0.0)
    init = a.device.drain_outgoing()
    assert init[0].data[-16:] == bytes(16)  # no cookie yet: zero mac2
    assert b.device.receive(init[0].data, A_ADDR, 0.0) is None
    out = b.device.drain_outgoing()
    assert kinds(out) == [MessageKind.COOKIE_REPLY]
    assert len(out[0].data) == 64 and out[0].destination == A_ADDR
    assert out[0].data[4:8] == init[0].data[4:8]  # receiver = the refused sender index
    assert b.device.counters["cookie_replies_sent"] == 1
    assert a.device.receive(out[0].data, B_ADDR, 0.1) is None
    assert a.device.counters["cookie_replies_received"] == 1
    assert a.device.drain_outgoing() == []  # not retransmitted at once
    # the scheduled retry carries mac2 and is accepted
    link.run_until(6.0, 0.1)
    retry = [o for o in a.sent if o.kind is MessageKind.INITIATION]
    assert len(retry) == 1 and retry[0].data[-16:] != bytes(16)
    assert [r.plaintext[:5] for r in b.received] == [b"\x01data"]
    assert b.device.counters["cookie_replies_sent"] == 1
    # a mac2 bound to another source address does not count
    b2 = link.b.device
    stolen = retry[0].data
    b2.receive(stolen, ("203.0.113.66", 4444), 6.1)
    assert kinds(b2.drain_outgoing()) == [MessageKind.COOKIE_REPLY]


def test_cookie_reply_to_a_response() -> None:
    link = make_link()
    a, b = link.a, link.b
    a.device.set_under_load(True)
    a.device.initiate_handshake(b.key, 0.0)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.0)
    resp = b.device.drain_outgoing()[0]
    a.device.receive(resp.data, B_ADDR, 0.0)
    cookie = a.device.drain_outgoing()
    assert kinds(cookie) == [MessageKind.COOKIE_REPLY]
    # the reply names the responder's index, which belongs to its (next) keypair
    assert b.device.receive(cookie[0].data, A_ADDR, 0.1) is None
    assert b.device.counters["cookie_replies_received"] == 1


def test_bad_cookie_reply_rejected() -> None:
    link = make_link()
    a, b = link.a, link.b
    b.device.set_under_load(True)
    a.device.initiate_handshake(b.key, 0.0)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.0)
    reply = bytearray(b.device.drain_outgoing()[0].data)
    reply[40] ^= 1
    a.device.receive(bytes(reply), B_ADDR, 0.0)
    assert a.device.rejected["bad_cookie"] == 1


def test_automatic_under_load_from_handshake_rate() -> None:
    link = make_link(b_kwargs={"handshake_load_threshold": 5})
    a, b = link.a, link.b
    # a burst of junk initiations (bad mac1) still counts as handshake load
    for i in range(6):
        b.device.receive(b"\x01\x00\x00\x00" + bytes(144), ("203.0.113.9", i), 0.1 * i)
    assert b.device.rejected["bad_mac1"] == 6
    assert b.device.under_load(0.6)
    a.device.initiate_handshake(b.key, 0.7)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.7)
    assert kinds(b.device.drain_outgoing()) == [MessageKind.COOKIE_REPLY]
    assert not b.device.under_load(5.0)
    b.device.set_under_load(False)
    assert not b.device.under_load(0.7)
    b.device.set_under_load(None)
    assert b.device.under_load(0.7)


def test_rate_limit_per_source_under_load() -> None:
    link = make_link()
    a, b = link.a, link.b
    b.device.set_under_load(True)
    a.device.initiate_handshake(b.key, 0.0)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.0)
    a.device.receive(b.device.drain_outgoing()[0].data, B_ADDR, 0.0)
    accepted = 0
    for i in range(10):
        now = 1.0 + i * 0.021
        a.device.initiate_handshake(b.key, now, force=True)
        b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, now)
        accepted += sum(o.kind is MessageKind.RESPONSE for o in b.device.drain_outgoing())
    assert 5 <= accepted < 10
    assert b.device.rejected["rate_limited"] == 10 - accepted


# --------------------------------------------------------------------------- replay


def test_replayed_transport_packet_rejected() -> None:
    link = established()
    msg = link.a.device.seal(link.b.key, b"\x01once", 1.0)
    assert msg is not None
    assert link.b.device.receive(msg, A_ADDR, 1.0) is not None
    assert link.b.device.receive(msg, A_ADDR, 1.1) is None
    assert link.b.device.rejected["replay"] == 1


def test_replayed_initiation_rejected() -> None:
    link = make_link()
    a, b = link.a, link.b
    a.device.initiate_handshake(b.key, 0.0)
    init = a.device.drain_outgoing()[0].data
    b.device.receive(init, A_ADDR, 0.0)
    assert kinds(b.device.drain_outgoing()) == [MessageKind.RESPONSE]
    b.device.receive(init, A_ADDR, 10.0)
    assert b.device.drain_outgoing() == []
    assert b.device.rejected["stale_timestamp"] == 1


def test_initiations_less_than_20ms_apart_rejected() -> None:
    link = make_link()
    a, b = link.a, link.b
    a.device.initiate_handshake(b.key, 0.0)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.0)
    a.device.initiate_handshake(b.key, 0.01, force=True)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.01)
    assert b.device.rejected["handshake_flood"] == 1
    a.device.initiate_handshake(b.key, 0.05, force=True)
    b.device.receive(a.device.drain_outgoing()[0].data, A_ADDR, 0.05)
    assert kinds(b.device.drain_outgoing()) == [MessageKind.RESPONSE, MessageKind.RESPONSE]


def test_wall_clock_stepping_back_keeps_timestamps_increasing() -> None:
    clock = WallClock(1_800_000_000.0)
    a = make_device(1, wallclock=clock)
    b = make_device(2)
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key)
    a.initiate_handshake(b.public_key, 0.0)
    b.receive(a.drain_outgoing()[0].data, A_ADDR, 0.0)
    clock.now -= 3600  # NTP steps the clock back an hour
    a.initiate_handshake(b.public_key, 6.0)
    b.receive(a.drain_outgoing()[0].data, A_ADDR, 6.0)
    assert kinds(b.drain_outgoing()) == [MessageKind.RESPONSE, MessageKind.RESPONSE]
    assert b.rejected == {}


def test_counter_outside_window_rejected_and_far_reordering_accepted_once() -> None:
    link = established()
    a, b = link.a, link.b
    msgs = [a.device.seal(b.key, b"\x01" + i.to_bytes(4, "big"), 1.0) for i in range(9001)]
    assert all(m is not None for m in msgs)
    newest = msgs[-1]
    assert newest is not None and b.device.receive(newest, A_ADDR, 1.0) is not None
    back_8000 = msgs[-1 - 8000]
    assert back_8000 is not None
    r = b.device.receive(back_8000, A_ADDR, 1.0)
    assert r is not None and r.plaintext[1:5] == (9000 - 8000).to_bytes(4, "big")
    assert b.device.receive(back_8000, A_ADDR, 1.0) is None  # only once
    too_old = msgs[0]
    assert too_old is not None and b.device.receive(too_old, A_ADDR, 1.0) is None
    assert b.device.rejected["replay"] == 2


def test_forged_and_unknown_index_transport_rejected() -> None:
    link = established()
    msg = bytearray(link.a.device.seal(link.b.key, b"\x01x", 1.0) or b"")
    msg[-1] ^= 0x80
    assert link.b.device.receive(bytes(msg), A_ADDR, 1.0) is None
    assert link.b.device.rejected["decrypt_failed"] == 1
    msg[4:8] = b"\xff\xff\xff\xff"
    assert link.b.device.receive(bytes(msg), A_ADDR, 1.0) is None
    assert link.b.device.rejected["unknown_index"] == 1
    msg[1] = 1
    assert link.b.device.receive(bytes(msg), A_ADDR, 1.0) is None
    assert link.b.device.rejected["bad_reserved"] == 1
    # a forged packet never moves the endpoint
    assert link.b.device.peer(link.a.key).endpoint == A_ADDR  # type: ignore[union-attr]


# --------------------------------------------------------------------------- PSK, roaming, policy


def test_preshared_key_on_both_sides() -> None:
    psk = bytes(range(32))
    link = established(psk_a=psk, psk_b=psk)
    assert send(link, link.a, b"\x01secret", 1.0) is not None


def test_preshared_key_mismatch_fails() -> None:
    link = make_link(psk_a=bytes(range(32)), psk_b=None)
    link.a.device.seal(link.b.key, b"\x01x", 0.0)
    link.pump(0.0)
    assert link.a.device.rejected["decrypt_failed"] == 1
    assert not link.a.device.peer(link.b.key).has_session  # type: ignore[union-attr]
    assert not any(isinstance(e, HandshakeComplete) for e in link.a.events)
    assert link.b.received == []


def test_roaming_follows_latest_authenticated_source() -> None:
    link = established()
    a, b = link.a, link.b
    new_addr = ("203.0.113.50", 40000)
    msg = a.device.seal(b.key, b"\x01moved", 1.0)
    assert msg is not None
    r = b.device.receive(msg, new_addr, 1.0)
    assert r is not None and r.source == new_addr
    pb = b.device.peer(a.key)
    assert pb is not None and pb.endpoint == new_addr
    assert b.device.drain_events() == [PeerRoamed(a.key, A_ADDR, new_addr)]
    # replies follow the new endpoint
    b.device.tick(11.0)
    (ka,) = b.device.drain_outgoing()
    assert ka.destination == new_addr
    # garbage from elsewhere does not move it
    b.device.receive(b"\x04\x00\x00\x00" + bytes(40), ("198.18.0.1", 1), 12.0)
    assert pb.endpoint == new_addr
    # a silenced roaming report
    b.device.roaming_events = False
    msg = a.device.seal(b.key, b"\x01back", 13.0)
    assert msg is not None and b.device.receive(msg, A_ADDR, 13.0) is not None
    assert pb.endpoint == A_ADDR and b.device.drain_events() == []


def test_unknown_initiator_policy_accepts() -> None:
    seen: list[bytes] = []

    def policy(key: bytes) -> bool:
        seen.append(key)
        return True

    server = make_device(50, accept_unknown_peer=policy)
    client = make_device(51)
    client.add_peer(server.public_key, endpoint=("203.0.113.1", 13116))
    link = Link(client, server, ("198.51.100.7", 6000), ("203.0.113.1", 13116))
    client.seal(server.public_key, b"\x10register", 0.0)
    link.pump(0.0)
    assert seen == [client.public_key]
    assert UnknownPeerAccepted(client.public_key, ("198.51.100.7", 6000)) in link.b.events
    assert [r.plaintext[:9] for r in link.b.received] == [b"\x10register"]
    p = server.peer(client.public_key)
    assert p is not None and p.endpoint == ("198.51.100.7", 6000) and p.has_session
    reply = server.seal(client.public_key, b"\x11registered", 0.1)
    assert reply is not None and client.receive(reply, ("203.0.113.1", 13116), 0.1) is not None


def test_unknown_initiator_policy_refuses_and_without_policy() -> None:
    refusing = make_device(60, accept_unknown_peer=lambda key: False)
    closed = make_device(61)
    client = make_device(62)
    for server in (refusing, closed):
        client.add_peer(server.public_key, endpoint=("203.0.113.1", 1))
        client.initiate_handshake(server.public_key, 0.0)
        server.receive(client.drain_outgoing()[0].data, A_ADDR, 0.0)
        assert server.drain_outgoing() == []
        assert server.peer(client.public_key) is None
    assert refusing.rejected["peer_refused"] == 1
    assert closed.rejected["unknown_peer"] == 1


def test_unknown_initiator_policy_errors_count_as_refusal() -> None:
    def broken(key: bytes) -> bool:
        raise RuntimeError("policy bug")

    server = make_device(63, accept_unknown_peer=broken)
    client = make_device(64)
    client.add_peer(server.public_key, endpoint=("203.0.113.1", 1))
    client.initiate_handshake(server.public_key, 0.0)
    server.receive(client.drain_outgoing()[0].data, A_ADDR, 0.0)
    assert server.rejected["peer_refused"] == 1


def test_unknown_peer_cap() -> None:
    server = make_device(70, accept_unknown_peer=lambda key: True, max_peers=3)
    for i in range(5):
        client = make_device(71 + i)
        client.add_peer(server.public_key, endpoint=("203.0.113.1", 1))
        client.initiate_handshake(server.public_key, 0.0)
        server.receive(client.drain_outgoing()[0].data, (f"192.0.2.{i}", 1), 0.0)
    assert len(server.peers) == 3
    assert server.rejected["too_many_peers"] == 2


def test_remove_peer_forgets_sessions() -> None:
    link = established()
    msg = link.a.device.seal(link.b.key, b"\x01x", 1.0)
    link.b.device.remove_peer(link.a.key)
    assert link.b.device.peer(link.a.key) is None
    assert msg is not None and link.b.device.receive(msg, A_ADDR, 1.0) is None
    assert link.b.device.rejected["unknown_index"] == 1
    assert link.b.device.seal(link.a.key, b"\x01x", 1.0) is None
    assert link.b.device.counters["seal_unknown_peer"] == 1


def test_simultaneous_initiation_converges() -> None:
    link = make_link()
    a, b = link.a, link.b
    a.device.seal(b.key, b"\x01from-a", 0.0)
    b.device.add_peer(a.key, endpoint=A_ADDR)
    b.device.seal(a.key, b"\x01from-b", 0.0)
    link.pump(0.0)
    link.run_until(12.0, 0.0)
    assert [r.plaintext[:7] for r in b.received] == [b"\x01from-a"]
    assert [r.plaintext[:7] for r in a.received if r.plaintext] == [b"\x01from-b"]


def test_add_peer_validation() -> None:
    d = make_device(80)
    with pytest.raises(ValueError):
        d.add_peer(b"short")
    with pytest.raises(ValueError):
        d.add_peer(bytes(32))  # low-order point
    with pytest.raises(ValueError):
        d.add_peer(d.public_key)
    with pytest.raises(ValueError):
        d.add_peer(make_device(81).public_key, preshared_key=b"x")
    with pytest.raises(ValueError):
        Device(bytes(32), mtu=0)


def test_received_and_events_are_frozen() -> None:
    r = Received(b"k", b"p", ("h", 1))
    with pytest.raises(AttributeError):
        r.plaintext = b"x"  # type: ignore[misc]
    assert not hasattr(r, "__dict__")


def test_multipath_duplicates_first_wins() -> None:
    """WARP sends an initiation on every candidate path: the first copy wins, the others are
    counted and dropped; transport duplicates are replays (the FEC layer dedups above us)."""
    link = make_link()
    a, b = link.a, link.b
    a.device.initiate_handshake(b.key, 0.0)
    (init,) = a.device.drain_outgoing()
    path1, path2 = ("192.0.2.1", 1111), ("192.0.2.77", 2222)
    b.device.receive(init.data, path1, 0.0)
    b.device.receive(init.data, path2, 0.001)
    responses = b.device.drain_outgoing()
    assert kinds(responses) == [MessageKind.RESPONSE] and responses[0].destination == path1
    assert b.device.rejected["stale_timestamp"] == 1
    a.device.receive(responses[0].data, B_ADDR, 0.002)
    a.device.receive(responses[0].data, ("198.51.100.99", 3), 0.002)
    assert a.device.rejected["unknown_index"] == 1
    assert a.device.has_outgoing and not b.device.has_outgoing
    (keepalive,) = a.device.drain_outgoing()
    assert b.device.receive(keepalive.data, path2, 0.003) == Received(a.key, b"", path2)
    assert b.device.receive(keepalive.data, path1, 0.003) is None
    assert b.device.rejected["replay"] == 1
    assert b.device.has_events
    events = b.device.drain_events()
    assert PeerRoamed(a.key, path1, path2) in events
    assert not b.device.has_events


def _sealing_pair(keepalive: float | None) -> tuple[Device, Device]:
    a, b = make_device(11, mtu=1420), make_device(12, mtu=1420)
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key)
    if keepalive is not None:
        a.set_persistent_keepalive(b.public_key, keepalive)
    a.initiate_handshake(b.public_key, 0.0)
    Link(a, b, A_ADDR, B_ADDR).pump(0.0)
    return a, b


@pytest.mark.parametrize("keepalive", [None, 25.0])
@pytest.mark.parametrize(
    "sizes", [[1400] * 5, [0, 1, 15, 16, 1419, 1420, 1421, 3000], [], [b for b in range(40)]]
)
def test_seal_many_is_seal_in_a_loop(keepalive: float | None, sizes: list[int]) -> None:
    """Same wire bytes, counters and timers as one `seal` per plaintext, and the peer opens
    all of them."""
    a1, b1 = _sealing_pair(keepalive)
    a2, _ = _sealing_pair(keepalive)
    key = b1.public_key
    plaintexts = [b"\x01" * n for n in sizes]
    for now in (1.0, 2.5):
        one_by_one = [a1.seal(key, p, now) for p in plaintexts]
        batched = a2.seal_many(key, plaintexts, now)
        assert batched == one_by_one
        for msg in batched:
            assert msg is not None
            assert b1.receive(msg, A_ADDR, now) is not None
    p1, p2 = a1.peer(key), a2.peer(key)
    assert p1 is not None and p2 is not None
    for field in ("tx_bytes", "tx_packets", "persistent_at", "keepalive_at", "new_handshake_at"):
        assert getattr(p1, field) == getattr(p2, field), field
    assert a1.next_deadline() == a2.next_deadline()
    assert a1.drain_outgoing() == a2.drain_outgoing()


def test_seal_many_without_a_session_stages_like_seal() -> None:
    a, b = make_device(13), make_device(14)
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key)
    assert a.seal_many(b.public_key, [b"\x01x", b"\x01y"], 0.0) == [None, None]
    assert [o.kind.name for o in a.drain_outgoing()] == ["INITIATION"]
    peer = a.peer(b.public_key)
    assert peer is not None and list(peer.staged) == [b"\x01x", b"\x01y"]
    assert a.seal_many(b"\x00" * 32, [b"\x01"], 0.0) == [None]
