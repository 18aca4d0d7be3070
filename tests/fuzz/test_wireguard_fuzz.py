"""Hypothesis: mutated valid WireGuard messages never raise out of ``Device.receive`` and never
hit the internal-error path (which would mean a parser bug swallowed by the safety net)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warp.wireguard import Device, MessageKind
from warp.wireguard.testing import Link, make_device

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("198.51.100.2", 51820)


def _link() -> tuple[Link, dict[str, list[bytes]]]:
    a = make_device(1, mtu=1420)
    b = make_device(2, accept_unknown_peer=lambda k: True)
    a.add_peer(b.public_key, endpoint=B_ADDR, allowed_ips=["10.0.0.2/32"])
    b.add_peer(a.public_key, allowed_ips=["10.0.0.1/32"])
    link = Link(a, b, A_ADDR, B_ADDR)
    a.seal(b.public_key, b"\x45" + bytes(40), 0.0)
    link.pump(0.0)
    b.set_under_load(True)
    a.initiate_handshake(b.public_key, 6.0)
    link.pump(6.0)  # provokes a cookie reply
    samples: dict[str, list[bytes]] = {k.value: [] for k in MessageKind}
    for side in (link.a, link.b):
        for o in side.sent:
            samples[o.kind.value].append(o.data)
    for i in range(4):
        m = a.seal(b.public_key, b"\x01" + bytes([i]) * (i * 50), 7.0)
        assert m is not None
        samples["transport"].append(m)
    keepalive = a.seal(b.public_key, b"", 7.0)
    assert keepalive is not None and len(keepalive) == 32
    samples["keepalive"].append(keepalive)
    b.set_under_load(None)
    return link, samples


LINK, SAMPLES = _link()
ALL = [m for ms in SAMPLES.values() for m in ms]
assert {k for k, v in SAMPLES.items() if v} == {
    "initiation",
    "response",
    "cookie_reply",
    "transport",
    "keepalive",
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(ALL)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 5))
        if op == 0 and data:  # flip a bit
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:  # overwrite a byte
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == 2:  # truncate
            data = data[: draw(st.integers(0, len(data)))]
        elif op == 3:  # extend
            data += draw(st.binary(max_size=64))
        elif op == 4 and len(data) >= 8:  # swap in another message's header
            other = draw(st.sampled_from(ALL))
            data[:8] = other[:8]
        elif op == 5 and data:  # set the type byte
            data[0] = draw(st.integers(0, 5))
    return bytes(data)


def _check(device: Device) -> None:
    assert device.rejected["internal_error"] == 0


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=mutated(),
    port=st.integers(0, 65535),
    dt=st.floats(0, 700, allow_nan=False),
    to_a=st.booleans(),
    load=st.sampled_from([None, True, False]),
)
def test_mutated_messages_never_raise(
    data: bytes, port: int, dt: float, to_a: bool, load: bool | None
) -> None:
    device = LINK.a.device if to_a else LINK.b.device
    device.set_under_load(load)
    now = 7.0 + dt
    device.receive(data, ("203.0.113.9", port), now)
    device.tick(now)
    device.drain_outgoing()
    device.drain_events()
    _check(device)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2100), host=st.sampled_from(["203.0.113.9", "2001:db8::1", "x"]))
def test_random_bytes_never_raise(data: bytes, host: str) -> None:
    for device in (LINK.a.device, LINK.b.device):
        assert device.receive(data, (host, 1), 8.0) is None
        _check(device)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(ALL) - 1), st.floats(0, 5)), max_size=40))
def test_valid_messages_replayed_in_any_order_never_raise(steps: list[tuple[int, float]]) -> None:
    link, samples = _link()
    msgs = [m for ms in samples.values() for m in ms]
    now = 7.0
    for index, dt in steps:
        now += dt
        for device in (link.a.device, link.b.device):
            device.receive(msgs[index % len(msgs)], A_ADDR, now)
            device.tick(now)
            _check(device)
