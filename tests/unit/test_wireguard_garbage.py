"""Peers cannot raise into us: any input to ``Device.receive`` is counted, never raised."""

from __future__ import annotations

import random

from warp.wireguard import MessageKind
from warp.wireguard.testing import Link, make_device

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("198.51.100.2", 51820)


def _established() -> Link:
    a, b = make_device(1), make_device(2, accept_unknown_peer=lambda k: True)
    a.add_peer(b.public_key, endpoint=B_ADDR)
    b.add_peer(a.public_key, allowed_ips=["10.0.0.1/32"])
    link = Link(a, b, A_ADDR, B_ADDR)
    a.initiate_handshake(b.public_key, 0.0)
    link.pump(0.0)
    assert b.peer(a.public_key).has_session  # type: ignore[union-attr]
    return link


def test_random_garbage_of_every_length_never_raises() -> None:
    link = _established()
    b = link.b.device
    rnd = random.Random(1234)
    index = b.peer(link.a.key).current.local_index  # type: ignore[union-attr]
    before = sum(b.rejected.values())
    for n in range(2001):
        blobs = [rnd.randbytes(n)]
        if n >= 4:
            for typ in (1, 2, 3, 4):
                blob = bytearray(rnd.randbytes(n))
                blob[0:4] = bytes([typ, 0, 0, 0])
                if n >= 8:
                    blob[4:8] = index.to_bytes(4, "little")  # a live receiver index
                blobs.append(bytes(blob))
        for blob in blobs:
            assert b.receive(blob, ("203.0.113.5", n), 1.0) is None
    assert b.rejected["internal_error"] == 0
    total = sum(b.rejected.values()) - before
    assert total == 2001 + 4 * 1997
    assert b.rejected["decrypt_failed"] > 0 and b.rejected["bad_size"] > 0
    assert b.rejected["bad_mac1"] == 2  # the 148-byte type 1 and the 92-byte type 2
    assert b.rejected["bad_type"] > 0 and b.rejected["bad_reserved"] > 0
    # the session still works and nothing moved the endpoint
    assert b.peer(link.a.key).endpoint == A_ADDR  # type: ignore[union-attr]
    msg = link.a.device.seal(b.public_key, b"\x01still-ok", 2.0)
    assert msg is not None and b.receive(msg, A_ADDR, 2.0) is not None
    # no outgoing traffic was provoked by garbage (not under load: no cookie replies)
    assert [o.kind for o in b.drain_outgoing()] == []


def test_odd_inputs_never_raise() -> None:
    link = _established()
    b = link.b.device
    for data in (b"", b"\x04", bytearray(b"\x04\x00\x00\x00" + bytes(28)), memoryview(bytes(40))):
        assert b.receive(data, A_ADDR, 1.0) is None  # type: ignore[arg-type]
    # malformed sources are the caller's bug but still do not raise
    assert b.receive(b"\x04" + bytes(40), ("x",), 1.0) is None  # type: ignore[arg-type]
    assert b.receive(b"\x04" + bytes(40), None, 1.0) is None  # type: ignore[arg-type]


def test_garbage_under_load_gets_cookie_replies_only_with_valid_mac1() -> None:
    link = _established()
    b = link.b.device
    b.set_under_load(True)
    rnd = random.Random(9)
    for _ in range(200):
        blob = bytearray(rnd.randbytes(148))
        blob[0:4] = b"\x01\x00\x00\x00"
        b.receive(bytes(blob), ("203.0.113.5", 1), 1.0)
    assert b.drain_outgoing() == []
    assert b.rejected["bad_mac1"] == 200
    # an attacker who knows our public key can compute mac1, and gets only a cookie reply
    from warp.wireguard.cookie import CookieGenerator

    gen = CookieGenerator(b.public_key)
    for _ in range(50):
        msg = gen.add_macs(b"\x01\x00\x00\x00" + rnd.randbytes(112), 1.0)
        b.receive(msg, ("203.0.113.5", 1), 1.0)
    assert {o.kind for o in b.drain_outgoing()} == {MessageKind.COOKIE_REPLY}
