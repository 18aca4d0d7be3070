"""Known-answer tests of the WireGuard primitives, layouts, TAI64N and the replay window."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from warp.wireguard import constants as C
from warp.wireguard import crypto, messages, tai64n
from warp.wireguard.replay import ReplayWindow

# KDF vectors from wireguard-go device/kdf_test.go (MIT, Copyright (C) 2017-2019 WireGuard LLC).
# wireguard-go calls the outputs t0, t1, t2; they are T1, T2, T3 in the whitepaper's notation.
KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


def test_initial_chain_key_and_hash() -> None:
    assert C.INITIAL_CHAIN_KEY.hex() == (
        "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    )
    assert C.INITIAL_HASH.hex() == (
        "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"
    )
    assert len(C.CONSTRUCTION) == 37 and len(C.IDENTIFIER) == 34


@pytest.mark.parametrize(("key", "data", "t1", "t2", "t3"), KDF_VECTORS)
def test_kdf_vectors(key: str, data: str, t1: str, t2: str, t3: str) -> None:
    k, d = bytes.fromhex(key), bytes.fromhex(data)
    assert crypto.kdf1(k, d).hex() == t1
    assert [x.hex() for x in crypto.kdf2(k, d)] == [t1, t2]
    assert [x.hex() for x in crypto.kdf3(k, d)] == [t1, t2, t3]


def _manual_hmac(key: bytes, data: bytes) -> bytes:
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in key) + data).digest()
    return hashlib.blake2s(bytes(b ^ 0x5C for b in key) + inner).digest()


@pytest.mark.parametrize("n", [0, 1, 32, 64, 65, 200])
def test_hmac_blake2s_matches_manual_construction(n: int) -> None:
    key, data = bytes(range(n)), b"payload" * n
    assert crypto.hmac_(key, data) == _manual_hmac(key, data)
    assert crypto.hmac_(key, data) == hmac.new(key, data, hashlib.blake2s).digest()


def test_mac_is_keyed_blake2s_128() -> None:
    key = bytes(32)
    assert crypto.mac(key, b"x") == hashlib.blake2s(b"x", key=key, digest_size=16).digest()
    assert len(crypto.mac(bytes(16), b"x")) == 16


def test_aead_nonce_layout_and_roundtrip() -> None:
    key = bytes(range(32))
    assert crypto.NONCE.pack(1) == b"\0\0\0\0" + (1).to_bytes(8, "little")
    ct = crypto.aead_encrypt(key, 7, b"hello", b"ad")
    assert len(ct) == 5 + 16
    assert crypto.aead_decrypt(key, 7, ct, b"ad") == b"hello"
    with pytest.raises(crypto.CryptoFailure):
        crypto.aead_decrypt(key, 8, ct, b"ad")


def test_xaead_roundtrip_and_failure() -> None:
    key, nonce = bytes(range(32)), bytes(range(24))
    ct = crypto.xaead_encrypt(key, nonce, b"cookie-cookie-16", b"mac1")
    assert len(ct) == 32
    assert crypto.xaead_decrypt(key, nonce, ct, b"mac1") == b"cookie-cookie-16"
    with pytest.raises(crypto.CryptoFailure):
        crypto.xaead_decrypt(key, nonce, ct, b"other")


def test_dh_rejects_low_order_points() -> None:
    priv = crypto.private_key_from_bytes(bytes(range(32)))
    with pytest.raises(crypto.CryptoFailure):
        crypto.dh(priv, bytes(32))
    with pytest.raises(crypto.CryptoFailure):
        crypto.dh(priv, b"\x01" + bytes(31))


def test_message_sizes_and_reserved_bytes() -> None:
    assert messages.INITIATION.size == 148
    assert messages.RESPONSE.size == 92
    assert messages.COOKIE_REPLY.size == 64
    assert messages.TRANSPORT_HEADER.size == 16
    prefix = messages.build_initiation_prefix(0x01020304, b"e" * 32, b"s" * 48, b"t" * 28)
    assert prefix[:8] == b"\x01\0\0\0\x04\x03\x02\x01"
    init = prefix + b"m" * 16 + b"n" * 16
    parsed = messages.parse_initiation(init)
    assert parsed is not None and parsed.sender == 0x01020304 and parsed.mac2 == b"n" * 16
    assert messages.message_type(init) == 1
    assert messages.parse_initiation(init[:-1]) is None
    assert messages.parse_initiation(b"\x01\x00\x01\x00" + init[4:]) is None
    assert messages.message_type(b"\x01\x00\x01\x00" + init[4:]) is None
    resp = messages.build_response_prefix(5, 6, b"e" * 32, b"x" * 16) + bytes(32)
    r = messages.parse_response(resp)
    assert r is not None and (r.sender, r.receiver) == (5, 6)
    assert messages.parse_response(resp + b"\0") is None
    cookie = messages.build_cookie_reply(9, b"n" * 24, b"c" * 32)
    c = messages.parse_cookie_reply(cookie)
    assert c is not None and c.receiver == 9
    t = messages.build_transport_header(3, 2**64 - 1) + bytes(16)
    h = messages.parse_transport_header(t)
    assert h == messages.TransportHeader(3, 2**64 - 1)
    assert messages.parse_transport_header(t[:31]) is None
    assert messages.message_type(t + b"x") == 4  # any length above 32
    assert messages.message_type(b"\x05\0\0\0" + bytes(60)) is None


def test_tai64n_layout_and_monotonicity() -> None:
    stamp = tai64n.timestamp(1.5)
    secs, nanos = tai64n.TAI64N.unpack(stamp)
    assert secs == 0x400000000000000A + 1
    assert nanos % (1 << 24) == 0 and nanos <= 500_000_000
    later = tai64n.timestamp(100.0)
    assert later > stamp
    # the clock steps back: last + 1
    step_back = tai64n.next_timestamp(50.0, later)
    assert step_back > later
    assert int.from_bytes(step_back, "big") == int.from_bytes(later, "big") + 1
    # within the same 16.8 ms whitening step: still strictly increasing
    a = tai64n.next_timestamp(1000.0, None)
    b = tai64n.next_timestamp(1000.001, a)
    assert b > a
    assert tai64n.next_timestamp(2000.0, b) == tai64n.timestamp(2000.0)


def test_replay_window_basic() -> None:
    w = ReplayWindow()
    assert w.window >= 8192
    for c in (0, 1, 2, 5):
        assert w.check(c)
        w.mark(c)
    assert not w.check(2)
    assert w.check(3) and w.check(4)
    w.mark(4)
    assert not w.check(4)
    assert not w.check(C.REJECT_AFTER_MESSAGES)
    assert not w.check(-1)


def test_replay_window_large_jump_and_window_edge() -> None:
    w = ReplayWindow()
    w.mark(0)
    top = 100_000
    w.mark(top)
    assert not w.check(0)
    assert w.check(top - 8000)  # far reordering, well inside the window
    w.mark(top - 8000)
    assert not w.check(top - 8000)
    assert w.check(top - w.window + 1)
    assert not w.check(top - w.window)
    assert not w.check(top)


def test_replay_window_every_counter_once_under_reordering() -> None:
    import random

    rnd = random.Random(1)
    w = ReplayWindow()
    counters = list(range(50_000))
    # reorder within blocks of 4000 (all within the window)
    for i in range(0, len(counters), 4000):
        block = counters[i : i + 4000]
        rnd.shuffle(block)
        counters[i : i + 4000] = block
    for c in counters:
        assert w.check(c), c
        w.mark(c)
        assert not w.check(c)
    for c in range(49_000, 50_000):
        assert not w.check(c)


def test_replay_window_wraps_ring_many_times() -> None:
    w = ReplayWindow()
    seen = set()
    c = 0
    import random

    rnd = random.Random(2)
    for _ in range(20_000):
        c += rnd.choice([1, 1, 2, 7, 64, 300, 9000])
        assert w.check(c)
        w.mark(c)
        seen.add(c)
        probe = c - rnd.randrange(0, 9000)
        expected = probe not in seen and c - probe < w.window and probe >= 0
        assert w.check(probe) == expected
