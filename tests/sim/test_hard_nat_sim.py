"""Hard NATs in virtual time: each uplink's NAT mapping learned from the map's secondary port
(as ``tailscale netcheck``), shown in the status snapshot; birthday probing between a
port-restricted cone and a symmetric NAT with random ports (:mod:`tests.sim.birthday`)."""

from __future__ import annotations

import math
import random

import pytest

from tests.sim.birthday import birthday_run
from tests.sim.gateways import MAP, Fleet, Peer
from tests.sim.hosts import map_config
from tests.sim.simnet import NatKind
from tests.sim.test_gateways_sim import assert_intact
from warp.core.gateway import MAX_EXTRA_SOCKETS
from warp.core.snapshot import snapshot
from warp.map_client.messages import Register, Registered, decode, encode
from warp.paths.prober import PathProber
from warp.paths.punch import (
    BirthdayPlan,
    BirthdayProbe,
    BirthdaySettings,
    encode_nat_info,
    parse_nat_info,
    plan_birthday,
)
from warp.wireguard import Device, generate_private_key, public_key_of
from warp_map_server.core import MapCore

SECONDARY_PORT = 13117
CONE: NatKind = "port-restricted-cone"


def test_status_tells_a_cone_uplink_from_a_symmetric_one() -> None:
    fleet = Fleet(7, map_secondary_port=SECONDARY_PORT)
    config = fleet.config("a", [Peer("b", "t")])
    host = fleet.gateway("a", config, ["port-restricted-cone", "symmetric"])
    fleet.net.run_until(3.0)
    status = snapshot(host.core, 3.0, uptime=3.0, uplink_rows=[], gates={})["map"]
    assert status is not None
    assert status["nat_mapping"] == {
        "wan0": "endpoint-independent",
        "wan1": "address-dependent",
    }


def test_without_a_secondary_port_the_mapping_stays_unknown() -> None:
    fleet = Fleet(7)
    config = fleet.config("a", [Peer("b", "t")])
    host = fleet.gateway("a", config, ["port-restricted-cone", "symmetric"])
    fleet.net.run_until(3.0)
    status = snapshot(host.core, 3.0, uptime=3.0, uplink_rows=[], gates={})["map"]
    assert status is not None
    assert status["nat_mapping"] == {"wan0": "unknown", "wan1": "unknown"}


def test_an_unreachable_secondary_port_is_tried_three_times_then_unknown() -> None:
    """The map names a secondary port that a firewall blocks: each uplink tries it three
    times, 1 s apart, and then says ``unknown`` (no endless retries)."""
    fleet = Fleet(7, map_secondary_port=SECONDARY_PORT)
    fleet.net.remove_uplink(fleet.net.hosts["map"].uplinks["secondary"])
    host = fleet.gateway("a", fleet.config("a", [Peer("b", "t")]), [CONE, "symmetric"])
    fleet.net.run_until(30.0)
    status = snapshot(host.core, 30.0, uptime=30.0, uplink_rows=[], gates={})["map"]
    assert status is not None
    assert status["nat_mapping"] == {"wan0": "unknown", "wan1": "unknown"}
    assert fleet.net.stats["unroutable"] == 6  # 3 tries x 2 uplinks


def test_secondary_port_answers_only_a_sessions_register_and_registers_nothing() -> None:
    """Hostile or stray input on the secondary port: garbage and handshakes get no answer
    (counted); a Register over an established session is answered with the address seen
    there and leaves the registry as it was."""
    rng = random.Random(1)
    map_key, client_key = generate_private_key(rng.randbytes), generate_private_key(rng.randbytes)
    core = MapCore(
        map_config(map_key, MAP, secondary_port=SECONDARY_PORT), now=0.0, rng=rng.randbytes
    )
    client = Device(client_key, rng=rng.randbytes)
    client.add_peer(public_key_of(map_key), endpoint=MAP)
    source = ("203.0.113.5", 40000)
    client.initiate_handshake(public_key_of(map_key), 0.0)
    initiation = client.drain_outgoing()[0].data

    core.datagram_received(source, b"\x04" + bytes(40), 0.0, secondary=True)
    core.datagram_received(source, initiation, 0.0, secondary=True)
    assert core.secondary_datagrams_to_send() == [] and core.datagrams_to_send() == []
    assert core.counters["secondary.dropped"] == 2

    core.datagram_received(source, initiation, 0.0)  # the session, on the map's port
    for out in core.datagrams_to_send():
        client.receive(out[1], MAP, 0.01)
    client.drain_outgoing()
    register = encode(Register(5, 1, public_key_of(client_key), 9))
    sealed = client.seal(public_key_of(map_key), register, 0.02)
    assert sealed is not None
    seen_there = ("203.0.113.5", 40001)
    core.datagram_received(seen_there, sealed, 0.02, secondary=True)
    [(destination, answer)] = core.secondary_datagrams_to_send()
    assert destination == seen_there
    received = client.receive(answer, (MAP[0], SECONDARY_PORT), 0.03)
    assert received is not None
    message = decode(received.plaintext)
    assert isinstance(message, Registered) and message.reflexive == seen_there
    assert core.registry.registration_count == 0


# ------------------------------------------------------------------------ birthday probing


def test_birthday_probing_takes_port_restricted_cone_by_symmetric_direct() -> None:
    """Port-restricted cone × symmetric (random ports): 20 attempts, nearly every one direct
    within 10 s, each bounded (256 hard-side ports, the easy side's budget) and silent once
    it worked."""
    settings = BirthdaySettings()
    runs = [birthday_run(seed, CONE, "symmetric", settings=settings) for seed in range(20)]
    assert runs[0].plan_a == BirthdayPlan("easy") and runs[0].plan_b == BirthdayPlan("hard")
    direct = [r for r in runs if r.direct_at <= 10.0]
    assert len(direct) >= 18
    for run in runs:
        assert run.probes_a <= settings.budget and run.probes_b <= settings.ports
        assert run.probes_after == 0


def test_symmetric_by_symmetric_stays_relayed_and_says_why() -> None:
    run = birthday_run(3, "symmetric", "symmetric")
    assert run.plan_a == run.plan_b == BirthdayPlan(None, "both_symmetric")
    assert run.direct_at == math.inf and run.probes_a == run.probes_b == 0


def test_birthday_probing_switched_off_sends_nothing() -> None:
    run = birthday_run(3, CONE, "symmetric", enabled=False)
    assert run.plan_a == run.plan_b == BirthdayPlan(None, "disabled")
    assert run.direct_at == math.inf and run.probes_a == run.probes_b == 0


def test_birthday_probes_are_rate_limited_and_end_with_the_attempt() -> None:
    settings = BirthdaySettings(rate=100.0, duration=5.0, budget=10_000, easy_delay=0.0)
    easy = BirthdayProbe("easy", ("100.64.2.1", 40000), 0.0, random.Random(1), settings)
    hard = BirthdayProbe("hard", ("100.64.1.1", 51820), 0.0, random.Random(1), settings)
    now, sent = 0.0, {"easy": 0, "hard": 0}
    ports: set[int] = set()
    while (deadline := easy.next_deadline()) is not None:
        now = deadline
        probes = easy.tick(now)
        ports.update(p.remote[1] for p in probes)
        sent["easy"] += len(probes)
        assert sent["easy"] <= 100.0 * now + 1 + 1e-6  # never ahead of the rate
        sent["hard"] += len(hard.tick(now))
    assert easy.state == "exhausted" and now == 5.0
    assert sent["easy"] == len(ports) == 500  # rate × duration, each probe a new port
    assert 40000 not in ports
    assert sent["hard"] == 256  # one per hard-side socket


def test_plan_needs_both_mappings() -> None:
    assert plan_birthday("unknown", "address-dependent", enabled=True).reason == "mapping_unknown"
    assert plan_birthday("endpoint-independent", "endpoint-independent", enabled=True) == (
        BirthdayPlan(None, "not_needed")
    )


# ------------------------------------------------------------------------ low-TTL punches


def test_first_punches_die_before_the_far_nat_and_the_pair_still_goes_direct() -> None:
    """Two port-restricted cones: each side's first punch towards the other's map-given
    address crosses its own NAT (which maps it) and dies before the far one (so a far router
    without a firewall could not pin its port on it); the pair connects directly anyway."""
    fleet = Fleet(5)
    for name, other in (("a", "b"), ("b", "a")):
        fleet.gateway(name, fleet.config(name, [Peer(other, "t")]), [CONE, CONE])
    ab = fleet.stream("a", "t", "b", rate=100, start=0.5, stop=2.0)
    fleet.net.run_until(2.5)
    assert fleet.net.stats["ttl_expired"] >= 8  # 2 x 2 uplinks x 2 far addresses, at least
    assert 0.5 < ab.first_delivery() < 1.0
    for name in ("a", "b"):
        assert not fleet.gateways[name].core.sessions[{"a": "b", "b": "a"}[name]].relay_in_use


def test_static_endpoints_and_addresses_heard_from_get_full_ttl_punches() -> None:
    """A far gate's configured endpoint (a public or forwarded address) is punched at full TTL
    at once; so is a map-given address once something came from it."""
    prober = PathProber(1.0, 3.0, random.Random(1), low_ttl_window=0.04)
    static = prober.add_candidate("wan0", ("198.51.100.7", 51820), "static", 0.0)
    mapped = prober.add_candidate("wan0", ("100.64.2.1", 40000), "map", 0.0)
    assert static is not None and mapped is not None
    assert not static.low_ttl(0.0)
    assert mapped.low_ttl(0.0) and mapped.low_ttl(0.039) and not mapped.low_ttl(0.04)
    prober.add_candidate("wan0", ("100.64.2.1", 40000), "map", 5.0)  # a fresh burst
    assert mapped.low_ttl(5.0)
    prober.on_authenticated("wan0", ("100.64.2.1", 40000), 5.01)
    assert not mapped.low_ttl(5.02)


# ------------------------------------------------------------------------ why relayed


def test_symmetric_pair_stays_relayed_and_says_why() -> None:
    """Two symmetric NATs: relayed, both gateways tell each other their uplinks' NAT mappings
    (NAT_INFO over the relayed session) and both say why there is no direct path (status
    ``relay_reason``); no birthday probing is tried (nothing to find). (A cone and a symmetric
    NAT with birthday probing off: `test_birthday_probing_switched_off_stays_relayed`.)"""
    fleet = Fleet(11, map_secondary_port=SECONDARY_PORT)
    for name, other in (("a", "b"), ("b", "a")):
        fleet.gateway(name, fleet.config(name, [Peer(other, "t")]), ["symmetric", "symmetric"])
    ab = fleet.stream("a", "t", "b", rate=100, start=0.5, stop=6.0)
    fleet.net.run_until(6.5)
    assert ab.delivered > 0
    for name in ("a", "b"):
        core = fleet.gateways[name].core
        row = snapshot(core, 6.5, uptime=6.5, uplink_rows=[], gates={})["far_gates"]
        (far,) = row.values()
        assert far["relay"] is True and far["relay_reason"] == "both_symmetric"
        assert not core.extra_sockets


def test_hostile_nat_info_frames_are_refused() -> None:
    good = encode_nat_info([(("100.64.1.1", 4000), "address-dependent")])
    assert parse_nat_info(good + bytes(14)) == {("100.64.1.1", 4000): "address-dependent"}
    for bad in (
        good[:-1],  # truncated
        good[:2] + b"\x07" + good[3:],  # unknown mapping code
        good[:3] + b"\x05" + good[4:],  # address length
        good[:-2] + b"\x00\x00",  # port 0
        bytes((good[0], 17)) + good[2:],  # more entries than allowed
        b"\x04",
    ):
        assert parse_nat_info(bad) is None


# ------------------------------------------------------------------- birthday probing, gateways


def _direct_paths(host: object) -> list[object]:
    core = host.core  # type: ignore[attr-defined]
    (session,) = core.sessions.values()
    return [p for p in session.prober.active_paths() if p.uplink != "relay"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cone_and_symmetric_gateways_leave_the_relay_for_a_birthday_path_without_loss(
    seed: int,
) -> None:
    """Port-restricted cone × symmetric NAT (random ports), two uplinks each, the map with a
    secondary port, 200 datagrams/s each way: relayed at first (no direct path can be
    punched), then birthday probing finds one; traffic moves onto it and nothing is lost on
    the way. The hard side keeps one extra socket (the winner's)."""
    fleet = Fleet(seed, map_secondary_port=SECONDARY_PORT)
    for name, other, kind in (("a", "b", CONE), ("b", "a", "symmetric")):
        fleet.gateway(name, fleet.config(name, [Peer(other, "t")]), [kind, kind])
    ab = fleet.stream("a", "t", "b", rate=200, start=0.5, stop=20.0)
    ba = fleet.stream("b", "t", "a", rate=200, start=0.5, stop=20.0)
    direct_at = fleet.net.run_while(
        lambda: not (_direct_paths(fleet.gateways["a"]) and _direct_paths(fleet.gateways["b"])),
        limit=20.0,
    )
    assert direct_at < 2.5 + 3.0 + 10.0  # relay fallback, NAT info, one bounded attempt
    fleet.net.run_until(21.0)
    for name in ("a", "b"):
        core = fleet.gateways[name].core
        (session,) = core.sessions.values()
        assert not session.relay_in_use and session.birthday is None
    assert len(fleet.gateways["b"].core.extra_sockets) == 1
    assert not fleet.gateways["a"].core.extra_sockets
    for stream in (ab, ba):
        first = stream.first_delivery()
        assert stream.lost_between(first, 20.0) == []
    assert_intact(ab, ba)


def test_birthday_probing_switched_off_stays_relayed() -> None:
    fleet = Fleet(1, map_secondary_port=SECONDARY_PORT)
    off = ["birthday_probing = false"]
    for name, other, kind in (("a", "b", CONE), ("b", "a", "symmetric")):
        config = fleet.config(name, [Peer(other, "t")], interfaces=off)
        fleet.gateway(name, config, [kind, kind])
    fleet.net.run_until(15.0)
    for name in ("a", "b"):
        (session,) = fleet.gateways[name].core.sessions.values()
        assert session.relay_in_use and session.relay_reason == "birthday_needed"
        assert not fleet.gateways[name].core.extra_sockets


def test_extra_sockets_are_bounded_across_far_gates() -> None:
    fleet = Fleet(1)
    core = fleet.gateway("a", fleet.config("a", [Peer("b", "t")]), [CONE]).core
    first = core.open_extra_sockets("wan0", 256)
    assert len(first) == 256
    assert len(core.open_extra_sockets("wan0", 400)) == MAX_EXTRA_SOCKETS - 256
    assert core.open_extra_sockets("wan0", 1) == []
    core.close_extra_sockets(first)
    assert len(core.extra_sockets) == MAX_EXTRA_SOCKETS - 256
    assert len(set(core.open_extra_sockets("wan0", 256)) | set(core.extra_sockets)) == 512
