"""Bonding uneven uplinks (issue 18), whole gateways in virtual time: gateway a's two uplinks
are shaped (a rate-limited upload with a 30 ms queue, as ``tc tbf`` or a modem) to 3 and 1
Mbit/s (the issue's 30 + 10 at a tenth, to keep the CPU small: only the ratio matters);
gateway b has two public, unshaped uplinks. a sends 1200-byte datagrams to b.

Capacity here is what the two uplinks carry in application bytes: their rates times the
application bytes per wire byte the run measured (WireGuard, the shard header and the
parity are the rest). Figures are taken once the capacity estimates have settled (from
8 s on; the stream starts at 1 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.sim.gateways import Fleet, GatewayHost, Peer, Stream
from tests.sim.simnet import NatKind, Uplink
from warp.core.session import FarGateSession
from warp.core.snapshot import snapshot
from warp.metrics import snapshot_metrics
from warp.status import render_plain

MBIT = 1e6 / 8
FAST, SLOW = 3.0 * MBIT, 1.0 * MBIT
SIZE = 1200
CONE: NatKind = "port-restricted-cone"
SETTLED = 8.0
#: the default 1 ms window, at the tenth of the issue's rates
WINDOW = "10ms"


@dataclass
class Run:
    fleet: Fleet
    a: GatewayHost
    stream: Stream
    session: FarGateSession
    #: (datagrams handed to the wire, sender drops, wire bytes per uplink, modem drops
    #: per uplink) when the measured window opened and closed
    marks: dict[str, tuple[int, int, list[int], list[int]]]


def bonded(
    spread: str,
    k: int,
    n: int,
    *,
    rate: float,
    stop: float = 20.0,
    seed: int = 1,
    unix_gates: bool = False,
) -> Run:
    """The world of the module docstring; a offers ``rate`` datagrams/s from 1 s to
    ``stop`` (into a Unix gate: the application waits while it is paused). The window
    [SETTLED, stop) is marked for `figures`."""
    fleet = Fleet(seed)
    transport = [f'spread = "{spread}"']
    # Time runs ten times slower than at 30 + 10 Mbit/s: the FEC block window (1 ms by
    # default) too, so a block gathers as many datagrams as it would there.
    redundancy = [f'window = "{WINDOW}"']
    config_a = fleet.config(
        "a",
        [Peer("b", "t")],
        k=k,
        n=n,
        transport=transport,
        redundancy=redundancy,
        unix_gates=unix_gates,
    )
    config_b = fleet.config(
        "b", [Peer("a", "t")], k=k, n=n, transport=transport, redundancy=redundancy
    )
    a = fleet.gateway("a", config_a, [CONE, CONE], egress_rates=[FAST, SLOW])
    fleet.gateway("b", config_b, [None, None])
    session = a.core.sessions["b"]
    stream = fleet.stream("a", "t", "b", rate=rate, start=1.0, stop=stop, size=SIZE)
    run = Run(fleet, a, stream, session, {})

    def mark(name: str) -> None:
        stats = session.send_queue.stats
        uplinks = [fleet.uplink("a", i).egress.stats for i in (0, 1)]
        run.marks[name] = (
            stats.sent,
            stats.dropped_stale + stats.dropped_overflow,
            [u.sent_bytes for u in uplinks],
            [u.queue_dropped for u in uplinks],
        )

    fleet.net.at(SETTLED, lambda now: mark("start"))
    fleet.net.at(stop, lambda now: mark("stop"))
    return run


@dataclass
class Figures:
    capacity: float  # application bytes/s the two uplinks carry
    delivered: float  # fraction of the capacity delivered
    lost: float  # fraction of the datagrams sent in the window that never arrived
    sender_drops: float  # ... of which dropped by the sender before the wire
    modem_drops: int  # packets dropped at a full modem queue in the window


def figures(run: Run, stop: float = 20.0) -> Figures:
    sent_a, drops_a, bytes_a, modem_a = run.marks["start"]
    sent_b, drops_b, bytes_b, modem_b = run.marks["stop"]
    app_per_wire = (sent_b - sent_a) * SIZE / (sum(bytes_b) - sum(bytes_a))
    capacity = (FAST + SLOW) * app_per_wire
    sent = sum(1 for at in run.stream.sent_at if SETTLED <= at < stop)
    lost = len(run.stream.lost_between(SETTLED, stop))
    delivered = (sent - lost) * SIZE / (stop - SETTLED)
    return Figures(
        capacity=capacity,
        delivered=delivered / capacity,
        lost=lost / sent,
        sender_drops=(drops_b - drops_a) / sent,
        modem_drops=sum(modem_b) - sum(modem_a),
    )


def app_rate(fraction: float, k: int, n: int) -> float:
    """Datagrams/s for about `fraction` of the capacity (a guess of the overhead: the
    figures measure the real capacity)."""
    return fraction * (FAST + SLOW) * k / n * SIZE / (SIZE + 64) / SIZE


def test_aggregate_uses_the_sum_of_uneven_uplinks_without_loss() -> None:
    """30 + 10 (scaled), spread = aggregate: at 88 % of the summed capacity nothing is lost,
    with no FEC (1, 1) and with (3, 5): the slow uplink gets a quarter of the shards, not
    half (an even spread loses a third of what goes to it at this rate)."""
    for k, n in ((1, 1), (3, 5)):
        run = bonded("aggregate", k, n, rate=app_rate(0.88, k, n))
        run.fleet.net.run_until(20.5)
        got = figures(run)
        print(f"({k}, {n}): {got}")
        assert got.delivered >= 0.85
        assert got.lost < 0.01
        capacities = run.session.prober.capacities
        assert capacities["wan1"].capacity is not None
        assert 0.85 * SLOW < capacities["wan1"].capacity < 1.1 * SLOW


def test_overload_is_dropped_by_the_sender_not_in_the_modem_queue() -> None:
    """Offered 120 % of the capacity at (3, 5): at least 95 % of the capacity arrives, and
    what does not is dropped by the sender (deadline, priority) before the wire, counted;
    the modems' queues drop next to nothing."""
    run = bonded("aggregate", 3, 5, rate=app_rate(1.2, 3, 5))
    run.fleet.net.run_until(20.5)
    got = figures(run)
    print(got)
    assert got.delivered >= 0.95
    assert got.sender_drops > 0.1
    assert got.lost - got.sender_drops < 0.005  # lost on the wire
    wire_packets = sum(run.fleet.uplink("a", i).egress.stats.sent for i in (0, 1)) * 12 / 20
    assert got.modem_drops < 0.005 * wire_packets
    drops = run.session.send_queue.stats
    assert drops.dropped_stale + drops.dropped_overflow > 0
    # The sender is backlogged: its blocks go out full (k data shards to n - k parity), not
    # cut short by the FEC window while the pacers hold the rest of a block back.
    tunnel = run.session.tunnels["t"]
    print("data shards", tunnel.data_shards, "of", tunnel.shards)
    assert tunnel.data_shards / tunnel.shards > 0.58


def test_overload_pauses_a_unix_gate_instead_of_dropping() -> None:
    """The same overload into a Unix gate: the gate is paused (its application waits in
    send()) before a datagram waits long enough to miss its deadline; the uplinks stay full
    and what the application sent arrives."""
    run = bonded("aggregate", 3, 5, rate=app_rate(1.2, 3, 5), unix_gates=True)
    run.fleet.net.run_until(20.5)
    got = figures(run)
    print(got, "refused", run.stream.refused, "pauses", run.a.pauses["t"])
    assert run.a.pauses["t"] > 0 and run.stream.refused > 0
    assert got.delivered >= 0.95
    assert got.lost < 0.002  # nothing dropped by deadline: the application waited


def test_survive_uplink_loss_loses_nothing_when_either_uplink_is_cut_at_the_protected_rate() -> (
    None
):
    """spread = survive_uplink_loss, (3, 5): an overload first (the capacities get
    measured), then the rate status calls protected; cutting either uplink (black
    holed: its paths die only after path_timeout) loses nothing."""
    for cut in (0, 1):
        fleet_run = bonded("survive_uplink_loss", 3, 5, rate=app_rate(0.6, 3, 5), stop=6.0)
        fleet = fleet_run.fleet
        fleet.net.run_until(6.0)
        scheduler = fleet_run.session.tunnels["t"].scheduler
        assert scheduler.protected
        # As `warp status` shows it, in application bytes/s.
        shot = snapshot(fleet_run.a.core, 6.0, uptime=6.0, uplink_rows=[], gates={})
        app_protected = shot["tunnels"][0]["redundancy"]["protected_rate"]
        assert app_protected is not None
        # The slow uplink (what the protected rate rests on) was measured, not only a lower
        # bound: it saturated during the overload. (The fast one never fills: the slow one
        # carries as many shards and limits the rate.)
        assert fleet_run.session.prober.capacities["wan1"].saturated_at is not None
        rate = app_protected / SIZE
        stream = fleet.stream("a", "t", "b", rate=rate, start=7.0, stop=16.0, size=SIZE)
        uplink = fleet.uplink("a", cut)

        def cut_uplink(now: float, uplink: Uplink = uplink) -> None:
            uplink.black_holed = True

        fleet.net.at(10.0, cut_uplink)
        fleet.net.run_until(16.5)
        print(f"cut wan{cut}: protected {app_protected * 8 / 1e6:.3f} Mbit/s, "
              f"sent {stream.sent}, lost {len(stream.lost_between(8.0, 16.0))}")  # fmt: skip
        assert stream.lost_between(8.0, 16.0) == []


def tiered(interfaces: list[str], *, stop: float = 14.0) -> tuple[Fleet, Stream, GatewayHost]:
    """Gateway a with three uplinks (wan0, wan1, wan2) and the `[interfaces]` lines given;
    b with two public uplinks; 500 datagrams/s of 200 bytes from a to b, (2, 4)."""
    fleet = Fleet(3)
    config_a = fleet.config("a", [Peer("b", "t")], interfaces=interfaces)
    config_b = fleet.config("b", [Peer("a", "t")])
    a = fleet.gateway("a", config_a, [CONE, CONE, CONE])
    fleet.gateway("b", config_b, [None, None])
    stream = fleet.stream("a", "t", "b", rate=500, start=1.0, stop=stop)
    return fleet, stream, a


def egress_bytes(fleet: Fleet, index: int) -> int:
    return fleet.uplink("a", index).egress.stats.sent_bytes


def test_backup_carries_only_probes_and_takes_over_within_a_second() -> None:
    """Two primaries and a backup: while a primary works the backup carries under 1 % of the
    bytes; both primaries cut (black holed) at 8 s: data flows on the backup within 1 s."""
    fleet, stream, _ = tiered(["[[interfaces.uplinks]]", 'match = "^wan2$"', 'tier = "backup"'])
    marks: dict[str, list[int]] = {}
    fleet.net.at(3.0, lambda now: marks.setdefault("3", [egress_bytes(fleet, i) for i in range(3)]))
    fleet.net.at(8.0, lambda now: marks.setdefault("8", [egress_bytes(fleet, i) for i in range(3)]))

    def cut(now: float) -> None:
        fleet.uplink("a", 0).black_holed = True
        fleet.uplink("a", 1).black_holed = True

    fleet.net.at(8.0, cut)
    fleet.net.run_until(14.5)
    sent = [b - a for a, b in zip(marks["3"], marks["8"], strict=True)]
    print(f"3 s to 8 s: bytes sent per uplink {sent}")
    assert sent[2] < 0.01 * sum(sent)
    # Nothing sent later than 1 s after the cut is lost; the stream keeps flowing.
    lost = stream.lost_between(3.0, 14.0)
    print(f"lost {len(lost)}: sent from {min(stream.sent_at[s] for s in lost) if lost else '-'}"
          f" to {max(stream.sent_at[s] for s in lost) if lost else '-'}")  # fmt: skip
    assert all(8.0 <= stream.sent_at[seq] < 9.0 for seq in lost)
    assert stream.max_gap(8.0, 14.0) < 1.0


def test_a_data_budget_that_runs_out_moves_traffic_off_the_uplink_and_says_so() -> None:
    """wan1 has a budget of 250 kB: once used up it carries only probes, the traffic goes
    on over wan0 and wan2 without loss, and status says which uplink ran out."""
    # (500 datagrams/s, 2 ms apart, with the 1 ms FEC window: each is a block of its own,
    # 1 data + 2 parity shards, of which wan1 carries about a fifth, ~57 kB/s: 250 kB run
    # out at about 4.5 s. 400 kB assumed two shards per datagram spread evenly.)
    fleet, stream, a = tiered(
        ["[[interfaces.uplinks]]", 'match = "^wan1$"', "data_budget = 250_000"]
    )
    fleet.net.run_until(6.0)
    assert "wan1" in a.core.usage.exhausted
    at_six = egress_bytes(fleet, 1)
    fleet.net.run_until(14.5)
    assert egress_bytes(fleet, 1) - at_six < 8.5 * 2_000  # probes and their replies only
    assert stream.lost_between(6.0, 14.0) == []
    usage = a.core.usage.status()["wan1"]
    assert usage["budget_exhausted"] is True
    assert usage["used_bytes"] >= 250_000 and usage["data_budget"] == 250_000


def test_status_and_metrics_show_capacity_rates_tiers_and_usage() -> None:
    """What an operator reads: per uplink its capacity (measured or a lower bound), pacing,
    tier and bytes used against its budget; per tunnel its spread and usable rate."""
    run = bonded("aggregate", 1, 1, rate=app_rate(1.2, 1, 1), stop=8.0)
    run.fleet.net.run_until(8.0)
    uplinks = [
        {"name": f"wan{i}", "local_address": f"192.168.{i}.2:51820", "state": "up",
         "send_errors": 0}
        for i in (0, 1)
    ]  # fmt: skip
    shot = snapshot(run.a.core, 8.0, uptime=8.0, uplink_rows=uplinks, gates={})
    capacity = shot["far_gates"]["b"]["uplink_capacity"]["wan1"]
    assert capacity["measured"] is True
    assert 0.85 * SLOW < capacity["capacity"] < 1.1 * SLOW
    assert capacity["pacing_rate"] < capacity["capacity"] * 1.05
    redundancy = shot["tunnels"][0]["redundancy"]
    assert redundancy["spread"] == "aggregate" and redundancy["protected_rate"] is None
    assert redundancy["usable_rate"] > 0.8 * (FAST + SLOW) * SIZE / (SIZE + 64)
    assert shot["uplink_usage"]["wan1"]["used_bytes"] > 0
    text = render_plain(shot)
    (wan1,) = [line for line in text.splitlines() if line.startswith("uplink wan1 ")]
    assert " tier=primary " in wan1 and " capacity_measured=yes " in wan1
    assert f" capacity={capacity['capacity']} " in wan1
    metrics = {
        (m.name, tuple(sorted(s.labels.items()))): s.value
        for m in snapshot_metrics(shot)
        for s in m.samples
    }
    key = (("far_gate", "b"), ("measured", "1"), ("uplink", "wan1"))
    assert metrics[("warp_uplink_capacity_bytes_per_second", key)] == capacity["capacity"]
    assert ("warp_uplink_usage_bytes", (("period", shot["uplink_usage"]["wan1"]["period"]),
            ("tier", "primary"), ("uplink", "wan1"))) in metrics  # fmt: skip
