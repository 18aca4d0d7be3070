"""PathProber with virtual time: burst and periodic probes, RTT, loss, liveness, table cap."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warp.frames import FrameType
from warp.paths.path import Address, PathState
from warp.paths.prober import (
    PROBE_SIZE,
    PathAdded,
    PathProber,
    PathRemoved,
    PathStateChanged,
    encode_probe,
    make_probe_reply,
    parse_probe,
)

A: Address = ("198.51.100.7", 4000)
B: Address = ("203.0.113.9", 5000)

# reply(uplink, remote, probe frame, send time) -> reply arrival time, or None to drop it.
ReplyFn = Callable[[str, Address, bytes, float], float | None]


class Harness:
    """Drives a prober the way the asyncio shell does: one timer at next_deadline()."""

    def __init__(self, prober: PathProber) -> None:
        self.prober = prober
        self.now = 0.0
        self.sent: list[tuple[float, str, Address, bytes]] = []
        self.pending: list[tuple[float, str, Address, bytes]] = []  # replies in flight
        self.events: list[object] = []

    def run_until(self, end: float, reply: ReplyFn | None = None, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            deadline = self.prober.next_deadline()
            nxt = min([t for t, *_ in self.pending] + ([deadline] if deadline is not None else []))
            if nxt > end:
                break
            self.now = max(self.now, nxt)
            # deliver due replies first (they were on the wire before the timer fired)
            due = [r for r in self.pending if r[0] <= self.now]
            self.pending = [r for r in self.pending if r[0] > self.now]
            for _t, uplink, remote, frame in due:
                self.prober.on_authenticated(uplink, remote, self.now, len(frame))
                self.prober.on_probe_reply(frame, uplink, remote, self.now)
            for uplink, remote, frame in self.prober.tick(self.now):
                self.sent.append((self.now, uplink, remote, frame))
                if reply is not None:
                    at = reply(uplink, remote, frame, self.now)
                    if at is not None:
                        answer = make_probe_reply(frame)
                        assert answer is not None
                        self.pending.append((at, uplink, remote, answer))
            self.events.extend(self.prober.pop_events())
        else:  # pragma: no cover
            raise AssertionError("virtual time did not advance")
        self.now = end

    def state_changes(self) -> list[tuple[float, PathState, PathState]]:
        return [(e.at, e.old, e.new) for e in self.events if isinstance(e, PathStateChanged)]


def rtt(delay: float) -> ReplyFn:
    return lambda _u, _r, _f, t: t + delay


def test_probe_frame_layout() -> None:
    frame = encode_probe(0xDEADBEEF, 12.5)
    assert len(frame) == PROBE_SIZE == 13
    assert frame[0] == FrameType.PROBE
    assert parse_probe(frame) == (FrameType.PROBE, 0xDEADBEEF, 12.5)
    reply = make_probe_reply(frame + bytes(3))  # WireGuard zero padding is ignored
    assert reply is not None and reply[0] == FrameType.PROBE_REPLY and reply[1:] == frame[1:]
    assert make_probe_reply(reply) is None  # never answer a reply
    assert parse_probe(reply + bytes(16)) == (FrameType.PROBE_REPLY, 0xDEADBEEF, 12.5)


def test_new_candidate_gets_burst_then_periodic_probes() -> None:
    h = Harness(PathProber(1.0, 3.0, random.Random(1)))
    assert h.prober.add_candidate("wan0", A, "map", 0.0) is not None
    h.run_until(3.5)
    times = [round(t, 3) for t, *_ in h.sent]
    assert times == [0.0, 0.05, 0.1, 0.2, 0.4, 1.0, 2.0, 3.0]
    assert {(u, r) for _, u, r, _ in h.sent} == {("wan0", A)}
    ids = [parse_probe(f) for *_, f in h.sent]
    assert all(p is not None and p[0] == FrameType.PROBE for p in ids)
    assert len({p[1] for p in ids if p is not None}) == len(ids)  # distinct probe ids
    # Nobody answered: probing → dead exactly at path_timeout.
    assert h.state_changes() == [(3.0, PathState.PROBING, PathState.DEAD)]
    # A dead path keeps being probed (at the keepalive rate) so it can come back.
    h.run_until(6.0)
    assert [round(t, 3) for t, *_ in h.sent][-3:] == [4.0, 5.0, 6.0]


def test_replies_make_path_active_and_give_rtt() -> None:
    h = Harness(PathProber(1.0, 3.0, random.Random(2)))
    h.prober.add_candidate("wan0", A, "static", 0.0)
    h.run_until(0.04, rtt(0.03))
    path = h.prober.get("wan0", A)
    assert path is not None
    assert path.state is PathState.ACTIVE
    assert path.rtt == pytest.approx(0.03) and path.rtt_last == pytest.approx(0.03)
    ((at, old, new),) = h.state_changes()
    assert at == pytest.approx(0.03) and (old, new) == (PathState.PROBING, PathState.ACTIVE)
    assert [e.name for e in h.events] == ["path.added", "path.active"]  # type: ignore[attr-defined]
    h.run_until(10.0, rtt(0.08))
    assert path.rtt_last == pytest.approx(0.08)
    assert path.rtt is not None and 0.03 < path.rtt < 0.08  # EWMA converging, not jumping
    assert path.loss == 0.0
    assert h.prober.active_paths() == [path]
    assert path.rx_packets == path.probe_replies > 0


def test_silent_path_dies_within_timeout_and_comes_back() -> None:
    h = Harness(PathProber(1.0, 3.0, random.Random(3)))
    h.prober.add_candidate("wan0", A, "map", 0.0)
    h.run_until(5.0, rtt(0.02))
    path = h.prober.get("wan0", A)
    assert path is not None and path.state is PathState.ACTIVE
    last = path.last_authenticated
    assert last is not None and last == pytest.approx(5.02 - 1.0)  # reply to the 4.0 probe
    h.events.clear()
    h.pending.clear()  # black hole, also for replies in flight
    h.run_until(20.0, reply=None)
    changes = h.state_changes()
    assert [(o, n) for _, o, n in changes] == [(PathState.ACTIVE, PathState.DEAD)]
    dead_at = changes[0][0]
    assert last + 3.0 <= dead_at <= last + 3.0 + 1e-9  # exactly at the deadline (≤ + one tick)
    assert h.prober.active_paths() == []
    # Any authenticated packet on it → active again at once.
    h.events.clear()
    h.prober.on_authenticated("wan0", A, 20.5, 100)
    h.events.extend(h.prober.pop_events())
    assert h.state_changes() == [(20.5, PathState.DEAD, PathState.ACTIVE)]
    assert path.rx_bytes >= 100


def test_loss_from_unanswered_probes() -> None:
    prober = PathProber(1.0, 3.0, random.Random(4), probe_timeout=0.5)
    h = Harness(prober)
    prober.add_candidate("wan0", A, "map", 0.0)
    counter = {"n": 0}

    def drop_one_in_four(_u: str, _r: Address, _f: bytes, t: float) -> float | None:
        if t < 1.0:
            return t + 0.01  # burst: all answered (and not counted anyway)
        counter["n"] += 1
        return None if counter["n"] % 4 == 0 else t + 0.01

    h.run_until(60.6, drop_one_in_four)
    # Loss settles lazily, on the next tick (at most one keepalive late); force it here.
    assert prober.tick(60.6) == []
    path = prober.get("wan0", A)
    assert path is not None
    assert path.loss == pytest.approx(0.25)
    assert path.state is PathState.ACTIVE  # 25 % loss is not death


def test_late_reply_is_not_loss() -> None:
    prober = PathProber(1.0, 3.0, random.Random(5), probe_timeout=0.5, burst=())
    prober.add_candidate("wan0", A, "map", 0.0)
    ((_, _, first),) = prober.tick(0.0)  # the single initial probe: not counted as loss
    ((_, _, second),) = prober.tick(1.0)  # periodic: counted
    assert prober.tick(1.6) == []  # both unanswered past probe_timeout
    path = prober.get("wan0", A)
    assert path is not None
    assert path.loss == 1.0
    late = make_probe_reply(second)
    assert late is not None
    prober.on_probe_reply(late, "wan0", A, 1.7)
    assert path.loss == 0.0
    assert path.rtt_last == pytest.approx(0.7)
    prober.on_probe_reply(late, "wan0", A, 1.8)
    assert path.probe_replies == 1  # a duplicate reply counts once
    assert path.rtt_last == pytest.approx(0.7)
    early = make_probe_reply(first)
    assert early is not None
    prober.on_probe_reply(early, "wan0", A, 1.9)
    assert path.probe_replies == 2 and path.loss == 0.0


def test_learned_path_from_authenticated_source() -> None:
    prober = PathProber(1.0, 3.0, random.Random(6))
    prober.add_candidate("wan0", A, "map", 0.0)
    prober.pop_events()
    # The peer sits behind a symmetric NAT: its packets come from a mapping nobody told us.
    path = prober.on_authenticated("wan0", B, 1.0, 148)
    assert path is not None and path.source == "learned" and path.state is PathState.ACTIVE
    events = prober.pop_events()
    assert [e.name for e in events] == ["path.learned", "path.active"]
    assert isinstance(events[0], PathAdded)
    # It is probed at once (RTT), then periodically — no burst needed, it is already open.
    probes = prober.tick(1.0)
    assert ("wan0", B) in [(u, r) for u, r, _ in probes]
    assert prober.next_deadline() is not None
    # Same remote on another uplink is another path.
    assert prober.on_authenticated("wan1", B, 1.1) is not None
    assert len(prober) == 3
    # A dead learned path is eventually forgotten; a map path stays.
    for t in range(2, 40):
        prober.tick(float(t))
    assert prober.get("wan0", B) is None and prober.get("wan1", B) is None
    assert prober.get("wan0", A) is not None
    assert any(isinstance(e, PathRemoved) for e in prober.pop_events())


def test_ipv6_sockaddr_is_normalised() -> None:
    prober = PathProber(1.0, 3.0, random.Random(7))
    remote6 = ("2001:db8::1", 4000, 0, 0)
    prober.on_authenticated("wan0", remote6, 0.0)  # type: ignore[arg-type]
    assert prober.get("wan0", ("2001:db8::1", 4000)) is not None


def test_table_is_capped() -> None:
    prober = PathProber(1.0, 3.0, random.Random(8), max_paths=4)
    for port in range(4):
        assert prober.on_authenticated("wan0", ("192.0.2.1", port), 0.0) is not None
    # Table full of active paths: a flood of new sources is refused, not stored.
    for port in range(100, 200):
        assert prober.on_authenticated("wan0", ("192.0.2.1", port), 0.5) is None
        assert prober.add_candidate("wan0", ("192.0.2.2", port), "map", 0.5) is None
    assert len(prober) == 4 and prober.rejected_paths == 200
    # Once some are dead they can be evicted (stalest first) for new ones.
    prober.tick(3.0)
    assert all(p.state is PathState.DEAD for p in prober.paths)
    assert prober.add_candidate("wan0", A, "static", 3.1) is not None
    assert len(prober) == 4 and prober.get("wan0", A) is not None


def test_remove_uplink_and_remote() -> None:
    prober = PathProber(1.0, 3.0, random.Random(9))
    for uplink in ("wan0", "wan1"):
        for remote in (A, B):
            prober.add_candidate(uplink, remote, "map", 0.0)
    gone = prober.remove_uplink("wan1")
    assert {p.remote for p in gone} == {A, B}
    assert {p.uplink for p in prober.paths} == {"wan0"}
    assert len(prober.remove_remote(B)) == 1
    assert [p.key for p in prober.paths] == [("wan0", A)]
    assert all(u == "wan0" for u, _, _ in prober.tick(0.0))
    assert prober.remove_path("wan0", A) and not prober.remove_path("wan0", A)
    assert prober.next_deadline() is None


def test_candidate_again_restarts_burst_on_dead_path() -> None:
    h = Harness(PathProber(1.0, 3.0, random.Random(10)))
    h.prober.add_candidate("wan0", A, "learned", 0.0)
    h.run_until(3.0)
    path = h.prober.get("wan0", A)
    assert path is not None and path.state is PathState.DEAD
    h.sent.clear()
    h.prober.add_candidate("wan0", A, "map", 10.0)  # the map pushes the peer again
    assert path.source == "map"
    h.events.extend(h.prober.pop_events())
    assert h.state_changes()[-1][1:] == (PathState.DEAD, PathState.PROBING)
    h.run_until(10.5)
    assert [round(t - 10.0, 3) for t, *_ in h.sent] == [0.0, 0.05, 0.1, 0.2, 0.4]


def test_record_tx_counts() -> None:
    prober = PathProber(1.0, 3.0, random.Random(11))
    prober.add_candidate("wan0", A, "static", 0.0)
    prober.record_tx("wan0", A, 500)
    prober.record_tx("wan0", B, 500)  # unknown path: ignored
    path = prober.get("wan0", A)
    assert path is not None and (path.tx_packets, path.tx_bytes) == (1, 500)
    assert path.snapshot()["state"] == "probing"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PathProber(0, 3.0)
    prober = PathProber(1.0, 3.0)
    with pytest.raises(ValueError):
        prober.add_candidate("wan0", A, "bogus", 0.0)  # type: ignore[arg-type]


GARBAGE = [
    b"",
    b"\x03",
    bytes([FrameType.PROBE_REPLY]) + bytes(11),
    bytes([FrameType.PROBE]) + bytes(12),  # a probe, not a reply
    bytes([FrameType.SHARD]) + bytes(40),
    b"\x45" + bytes(19),
    bytes([FrameType.PROBE_REPLY]) + b"\xff" * 12,  # NaN timestamp
    bytes([FrameType.PROBE_REPLY]) + bytes(4) + b"\x7f\xf0" + bytes(6),  # +inf
]


@pytest.mark.parametrize("frame", GARBAGE)
def test_garbage_frames_never_raise(frame: bytes) -> None:
    prober = PathProber(1.0, 3.0, random.Random(12))
    prober.add_candidate("wan0", A, "map", 0.0)
    prober.tick(0.0)
    prober.on_probe_reply(frame, "wan0", A, 0.01)
    prober.on_probe_reply(memoryview(frame), "wan0", A, 0.01)  # type: ignore[arg-type]
    assert prober.bad_frames + prober.unmatched_replies == 2
    reply = make_probe_reply(frame)
    assert reply is None or len(reply) == PROBE_SIZE
    path = prober.get("wan0", A)
    assert path is not None and path.rtt is None


@given(st.binary(max_size=64), st.floats(allow_nan=False, min_value=0, max_value=1e6))
def test_random_frames_never_raise(frame: bytes, now: float) -> None:
    prober = PathProber(1.0, 3.0, random.Random(13), max_paths=2)
    prober.add_candidate("wan0", A, "map", 0.0)
    prober.on_probe_reply(frame, "wan0", A, now)
    prober.on_probe_reply(frame, "wan0", B, now)
    prober.on_probe_reply(frame, "wan1", ("10.0.0.1", 1), now)
    make_probe_reply(frame)
    parse_probe(frame)
    prober.tick(now)
    assert len(prober) <= 2


def _uncached_deadline(prober: PathProber) -> float | None:
    prober._deadline_valid = False
    return prober.next_deadline()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["auth", "auth", "auth", "candidate", "reply", "tick", "remove"]),
            st.sampled_from(["up1", "up2"]),
            st.sampled_from([A, B, ("192.0.2.5", 6000)]),
            st.floats(min_value=0.0, max_value=2.0),
        ),
        max_size=60,
    )
)
def test_cached_next_deadline_matches_a_full_recompute(
    ops: list[tuple[str, str, Address, float]],
) -> None:
    """The O(1) per-packet `next_deadline` is always what a full pass over the paths gives."""
    prober = PathProber(1.0, 3.0, random.Random(7), max_paths=4)
    now = 0.0
    probes: list[tuple[str, Address, bytes]] = []
    for op, uplink, remote, dt in ops:
        now += dt
        if op == "auth":
            prober.on_authenticated(uplink, remote, now, 100)
        elif op == "candidate":
            prober.add_candidate(uplink, remote, "map", now)
        elif op == "reply" and probes:
            up, rem, frame = probes.pop()
            reply = make_probe_reply(frame)
            assert reply is not None
            prober.on_probe_reply(reply, up, rem, now)
        elif op == "tick":
            probes.extend(prober.tick(now))
        elif op == "remove":
            prober.remove_path(uplink, remote)
        cached = prober.next_deadline()
        assert cached == _uncached_deadline(prober)


# --- NAT rebinding vs two uplinks behind one public IP -----------------------------------

P1: Address = ("198.51.100.7", 40001)
P2: Address = ("198.51.100.7", 40002)  # same public IP (one NAT), another port


def _two_ports_one_ip(stop_p1_at: float | None = None) -> tuple[Harness, list[list[Address]]]:
    """Two paths from one uplink to one public IP, probed half a second apart (idle traffic:
    each is heard only through its own probes, every second). Returns the harness and, every
    50 ms from t = 5 to 15, the remotes `drop_superseded` keeps for sending."""
    prober = PathProber(1.0, 3.0, random.Random(1))
    h = Harness(prober)

    def reply(_uplink: str, remote: Address, _frame: bytes, t: float) -> float | None:
        if stop_p1_at is not None and remote == P1 and t >= stop_p1_at:
            return None  # the peer's NAT rebound: P1's mapping is gone
        return t + 0.02

    prober.add_candidate("up1", P1, "map", 0.0)
    h.run_until(0.5, reply)
    prober.add_candidate("up1", P2, "map", 0.5)
    kept: list[list[Address]] = []
    t = 5.0
    while t < 15.0:
        h.run_until(t, reply)
        kept.append([p.remote for p in prober.drop_superseded(prober.active_paths(), t)])
        t = round(t + 0.05, 3)
    return h, kept


def test_two_live_paths_behind_one_ip_are_both_kept() -> None:
    h, kept = _two_ports_one_ip()
    assert {p.state for p in h.prober.paths} == {PathState.ACTIVE}
    # At some of these instants P1 was last heard > 0.3 s before P2 (the old rule dropped it).
    assert all(sorted(remotes) == [P1, P2] for remotes in kept), kept


def test_path_replaced_by_nat_rebinding_is_left_out_within_a_probe_interval() -> None:
    _, kept = _two_ports_one_ip(stop_p1_at=8.0)
    instants = [round(5.0 + 0.05 * i, 3) for i in range(len(kept))]
    by_time = dict(zip(instants, kept, strict=True))
    assert all(sorted(r) == [P1, P2] for t, r in by_time.items() if t < 8.0)
    # Idle: P1's next probe after 8.0 goes unanswered: left out within a probe interval plus
    # a probe round trip, for good (until P1 dies at path_timeout, or answers again).
    left_out = [t for t, r in by_time.items() if r == [P2]]
    assert left_out and left_out[0] <= 8.0 + 1.0 + 0.2
    assert all(by_time[t] == [P2] for t in instants if left_out[0] <= t < 11.0)


def test_rebound_path_under_traffic_is_left_out_within_half_a_second() -> None:
    """Traffic flows: the peer's packets arrive every 10 ms. Its NAT rebinds at t = 5.0: they
    come from a new port (a learned path) and the old path falls silent. The old path is
    probed at once when it looks stale and left out when that probe is overdue, about 0.4 s
    after the rebinding (the periodic probe alone would take up to a probe interval)."""
    prober = PathProber(1.0, 3.0, random.Random(4))
    prober.add_candidate("up1", P1, "map", 0.0)
    now, rebound_at, left_out_at = 0.0, 5.0, None
    probes_on_p1 = 0
    while now < 7.0:
        source = P1 if now < rebound_at else P2
        prober.on_authenticated("up1", source, now, 1400)  # the peer's data
        for uplink, remote, frame in prober.tick(now):
            probes_on_p1 += now >= rebound_at and remote == P1
            if remote == source:
                reply = make_probe_reply(frame)
                assert reply is not None
                prober.on_probe_reply(reply, uplink, remote, now + 0.01)
        kept = [p.remote for p in prober.drop_superseded(prober.active_paths(), now)]
        if now >= rebound_at and kept == [P2] and left_out_at is None:
            left_out_at = now
        if left_out_at is not None:
            assert kept == [P2], now  # for good (P1 dies at path_timeout)
        now = round(now + 0.01, 3)
    assert left_out_at is not None and left_out_at - rebound_at <= 0.5, left_out_at
    assert probes_on_p1 <= 3  # the early probe, then the periodic ones


def test_loss_window_and_rtt_restart_when_a_dead_path_returns() -> None:
    """Dead for 20 s (20 probes unanswered), then back with another RTT: right after it
    returns it shows no loss figure yet (not the outage's 87.5 %) and the new RTT (not the old
    one); then the loss of what it does now."""
    prober = PathProber(1.0, 3.0, random.Random(2))
    h = Harness(prober)

    def reply(_u: str, _r: Address, _f: bytes, t: float) -> float | None:
        if 10.0 <= t < 30.0:
            return None
        return t + (0.02 if t < 10.0 else 0.2)

    prober.add_candidate("up1", A, "map", 0.0)
    h.run_until(29.9, reply)
    path = prober.get("up1", A)
    assert path is not None
    assert path.snapshot()["state"] == "dead"
    assert path.snapshot()["loss"] is None and path.snapshot()["rtt_ms"] is None
    h.run_until(30.5, reply)
    assert path.snapshot()["state"] == "active"
    assert path.loss is None  # a fresh window: nothing settled since it came back
    assert path.rtt == pytest.approx(0.2)
    h.run_until(40.0, reply)
    assert path.loss == 0.0


def test_remote_the_map_withdrew_is_forgotten_only_once_dead() -> None:
    """The map stops listing a remote: its path stays while it answers (traffic may still
    flow there), and is forgotten `forget_after` after it died; static ones never are."""
    prober = PathProber(1.0, 3.0, random.Random(5), forget_after=10.0)
    h = Harness(prober)
    answering = {A, B}

    def reply(_u: str, remote: Address, _f: bytes, t: float) -> float | None:
        return t + 0.01 if remote in answering else None

    prober.add_candidate("up1", A, "map", 0.0)
    prober.add_candidate("up1", B, "static", 0.0)
    h.run_until(5.0, reply)
    prober.map_endpoints_changed([])  # the map lists nothing any more
    h.run_until(30.0, reply)
    assert {p.remote for p in prober.paths} == {A, B}  # A still answers
    answering.clear()
    h.run_until(30.0 + 3.0 + 10.0 - 1.0, reply)
    assert {p.remote for p in prober.paths} == {A, B}  # dead, not yet forgotten
    h.run_until(30.0 + 3.0 + 10.0 + 1.0, reply)
    assert [p.remote for p in prober.paths] == [B]  # static: still probed
    removed = [e for e in h.events if isinstance(e, PathRemoved)]
    assert [(e.path.remote, e.reason) for e in removed] == [(A, "forgotten")]
