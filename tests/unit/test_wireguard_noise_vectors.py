"""Cross-check the handshake against an independent Noise implementation (``noiseprotocol``).

WireGuard's handshake is Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s with the identifier as prologue,
so with the same ephemeral keys both implementations must produce the same bytes and keys.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from noise.connection import Keypair as NoiseKeypair
from noise.connection import NoiseConnection

from warp.wireguard import Device, HandshakeComplete, MessageKind, crypto, messages, noise, tai64n
from warp.wireguard import constants as C
from warp.wireguard.cookie import CookieGenerator
from warp.wireguard.testing import SeededRng

pytestmark = pytest.mark.filterwarnings("ignore:One of ephemeral keypairs:UserWarning")

NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
A_PRIV = bytes.fromhex("a8" * 31 + "40")
B_PRIV = bytes.fromhex("b0" * 31 + "41")
EPH_I = bytes.fromhex("c8" * 31 + "42")
EPH_R = bytes.fromhex("d0" * 31 + "43")
WALL = 1_700_000_000.25


def _conn(initiator: bool, static: bytes, remote: bytes | None, eph: bytes, psk: bytes) -> object:
    c = NoiseConnection.from_name(NAME)
    if initiator:
        c.set_as_initiator()
    else:
        c.set_as_responder()
    c.set_psks(psk=psk)
    c.set_prologue(C.IDENTIFIER)
    c.set_keypair_from_private_bytes(NoiseKeypair.STATIC, static)
    if remote is not None:
        c.set_keypair_from_public_bytes(NoiseKeypair.REMOTE_STATIC, remote)
    c.set_keypair_from_private_bytes(NoiseKeypair.EPHEMERAL, eph)
    c.start_handshake()
    return c


def _scripted_rng(ephemeral: bytes, seed: int) -> Callable[[int], bytes]:
    """Hands out ``ephemeral`` for the first 32-byte request, seeded bytes otherwise."""
    rest = SeededRng(seed)
    state = {"done": False}

    def rng(n: int) -> bytes:
        if n == 32 and not state["done"]:
            state["done"] = True
            return ephemeral
        return rest(n)

    return rng


def pub(priv: bytes) -> bytes:
    return crypto.public_key(crypto.private_key_from_bytes(priv))


@pytest.mark.parametrize("psk", [bytes(32), bytes(range(32))], ids=["no-psk", "psk"])
def test_initiation_body_matches_noiseprotocol_and_keys_agree(psk: bytes) -> None:
    a = Device(A_PRIV, rng=_scripted_rng(EPH_I, 1), wallclock=lambda: WALL)
    a.add_peer(pub(B_PRIV), preshared_key=psk, endpoint=("192.0.2.2", 51820))
    a.initiate_handshake(pub(B_PRIV), 0.0)
    (init,) = a.drain_outgoing()
    assert init.kind is MessageKind.INITIATION and len(init.data) == 148

    ref = _conn(True, A_PRIV, pub(B_PRIV), EPH_I, psk)
    body = bytes(ref.write_message(tai64n.timestamp(WALL)))
    assert len(body) == 32 + 48 + 28
    assert init.data[8:116] == body  # ephemeral, static, timestamp: byte for byte

    # noiseprotocol as the responder accepts our initiation ...
    resp_ref = _conn(False, B_PRIV, None, EPH_R, psk)
    payload = resp_ref.read_message(init.data[8:116])
    assert bytes(payload) == tai64n.timestamp(WALL)
    reply = bytes(resp_ref.write_message(b""))
    assert len(reply) == 48 and resp_ref.handshake_finished

    # ... and we accept its response, wrapped in WireGuard's header and MACs
    sender = 0x11223344
    receiver = int.from_bytes(init.data[4:8], "little")
    prefix = messages.build_response_prefix(sender, receiver, reply[:32], reply[32:])
    response = CookieGenerator(a.public_key).add_macs(prefix, 0.0)
    assert a.receive(response, ("192.0.2.2", 51820), 0.0) is None
    events = a.drain_events()
    assert any(isinstance(e, HandshakeComplete) and e.initiator for e in events)
    assert a.rejected == {}

    # transport keys agree: our confirmation keepalive decrypts with noiseprotocol's keys ...
    (keepalive,) = a.drain_outgoing()
    assert keepalive.kind is MessageKind.KEEPALIVE and len(keepalive.data) == 32
    assert keepalive.data[4:8] == sender.to_bytes(4, "little")
    assert resp_ref.decrypt(keepalive.data[16:]) == b""  # counter 0
    msg = a.seal(pub(B_PRIV), b"\x01payload", 1.0)
    assert msg is not None
    assert resp_ref.decrypt(msg[16:]) == b"\x01payload" + bytes(8)  # counter 1, padded to 16
    # ... and the reverse direction (counter 0 of the responder's sending key)
    ct = resp_ref.encrypt(b"\x02from noiseprotocol")
    wire = messages.build_transport_header(receiver, 0) + ct
    r = a.receive(wire, ("192.0.2.2", 51820), 1.0)
    assert r is not None and r.plaintext == b"\x02from noiseprotocol"


@pytest.mark.parametrize("psk", [bytes(32), bytes(range(32))], ids=["no-psk", "psk"])
def test_we_respond_to_noiseprotocol_initiator(psk: bytes) -> None:
    b = Device(B_PRIV, rng=_scripted_rng(EPH_R, 2), wallclock=lambda: WALL)
    b.add_peer(pub(A_PRIV), preshared_key=psk)
    ref = _conn(True, A_PRIV, pub(B_PRIV), EPH_I, psk)
    body = bytes(ref.write_message(tai64n.timestamp(WALL)))
    prefix = messages.INITIATION.pack(1, 0x55667788, body[:32], body[32:80], body[80:108], b"", b"")
    init = CookieGenerator(b.public_key).add_macs(prefix[:116], 0.0)
    assert b.receive(init, ("192.0.2.1", 40000), 0.0) is None
    assert b.rejected == {}
    (resp,) = b.drain_outgoing()
    assert resp.kind is MessageKind.RESPONSE and len(resp.data) == 92
    assert resp.destination == ("192.0.2.1", 40000)
    assert resp.data[8:12] == (0x55667788).to_bytes(4, "little")
    ref.read_message(resp.data[12:60])
    assert ref.handshake_finished
    # the responder's ephemeral is the one we injected: the response body is deterministic too
    assert resp.data[12:44] == pub(EPH_R)

    # key confirmation: the initiator's first transport message promotes the session
    our_index = int.from_bytes(resp.data[4:8], "little")
    wire = messages.build_transport_header(our_index, 0) + ref.encrypt(b"")
    r = b.receive(wire, ("192.0.2.1", 40000), 0.1)
    assert r is not None and r.plaintext == b""
    assert b.peer(pub(A_PRIV)) is not None and b.peer(pub(A_PRIV)).has_session  # type: ignore[union-attr]
    msg = b.seal(pub(A_PRIV), b"\x03reply", 0.2)
    assert msg is not None
    assert ref.decrypt(msg[16:]) == b"\x03reply" + bytes(10)


def test_noise_functions_derive_the_same_transport_keys_as_noiseprotocol() -> None:
    psk = bytes(range(32, 64))
    a_priv, b_priv = crypto.private_key_from_bytes(A_PRIV), crypto.private_key_from_bytes(B_PRIV)
    ss = crypto.dh(a_priv, pub(B_PRIV))
    hs_i = noise.Handshake(pub(B_PRIV), ss, psk)
    stamp = tai64n.timestamp(WALL)
    prefix = noise.create_initiation(
        hs_i, a_priv, pub(A_PRIV), crypto.private_key_from_bytes(EPH_I), 7, stamp
    )
    ref_i = _conn(True, A_PRIV, pub(B_PRIV), EPH_I, psk)
    assert prefix[8:] == bytes(ref_i.write_message(stamp))

    # our responder functions on the same message
    msg = messages.parse_initiation(prefix + bytes(32))
    assert msg is not None
    partial = noise.consume_initiation_static(b_priv, pub(B_PRIV), msg)
    assert partial.static == pub(A_PRIV)
    got_stamp, h, ck = noise.consume_initiation_timestamp(
        partial, crypto.dh(b_priv, pub(A_PRIV)), msg
    )
    assert got_stamp == stamp
    hs_r = noise.Handshake(pub(A_PRIV), crypto.dh(b_priv, pub(A_PRIV)), psk)
    noise.accept_initiation(hs_r, msg, h, ck, got_stamp, 0.0)
    assert hs_r.hash == hs_i.hash and hs_r.chaining_key == hs_i.chaining_key
    rprefix = noise.create_response(hs_r, crypto.private_key_from_bytes(EPH_R), 9)
    ref_i.read_message(rprefix[12:60])
    resp = messages.parse_response(rprefix + bytes(32))
    assert resp is not None
    h2, ck2 = noise.consume_response(hs_i, a_priv, resp)
    assert (h2, ck2) == (hs_r.hash, hs_r.chaining_key)
    assert h2 == ref_i.get_handshake_hash()
    send_i, recv_i = noise.derive_transport_keys(ck2, True)
    send_r, recv_r = noise.derive_transport_keys(hs_r.chaining_key, False)
    assert (send_i, recv_i) == (recv_r, send_r)
    assert ref_i.noise_protocol.cipher_state_encrypt.k == send_i
    assert ref_i.noise_protocol.cipher_state_decrypt.k == recv_i
