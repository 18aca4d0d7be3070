"""Path probing and health, sans-I/O.

`PathProber` keeps the table of paths (local uplink × remote address), decides when each
needs a probe, turns probe replies into RTT and loss figures, and moves paths through
`probing → active → dead`. It never touches a socket or a clock: the caller passes `now`
(seconds, monotonic), sends the frames `tick()` returns (sealed in WireGuard transport
messages, on the given uplink to the given remote), and re-arms one timer at
`next_deadline()`.

Contract with the caller (the gateway):

- every authenticated packet received on a path → `on_authenticated(uplink, remote, now, n)`
  (this is also how paths are learned: WireGuard roaming, symmetric-NAT peers);
- a `PROBE` frame received → send `make_probe_reply(frame)` back on the same path;
- a `PROBE_REPLY` frame received → `on_probe_reply(frame, uplink, remote, now)`;
- candidates from the map / `far_gate.endpoints` → `add_candidate(..., source, now)`;
- an uplink gone → `remove_uplink(name)`;
- after any of these, drain `pop_events()` for logs (`path.active`, `path.dead`, ...).

Probe frame layout (after WireGuard decryption; trailing bytes such as WireGuard's zero
padding are ignored):

    offset 0  u8   FrameType.PROBE (0x02) or FrameType.PROBE_REPLY (0x03)
    offset 1  u32  probe id (big endian)
    offset 5  f64  sender timestamp, seconds (big endian IEEE 754), echoed unchanged
    total 13 bytes

A reply copies id and timestamp from the probe, so RTT = now − timestamp on the sender.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from warp.frames import FrameType
from warp.paths.path import (
    PATH_SOURCES,
    Address,
    Path,
    PathKey,
    PathSource,
    PathState,
    ProbeRecord,
)

PROBE_STRUCT = struct.Struct("!BId")
PROBE_SIZE = PROBE_STRUCT.size  # 13

DEFAULT_BURST: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4)
"""Offsets (s) of the initial probe burst of a new candidate, so both NATs open at once."""

DEFAULT_MAX_PATHS = 64

_PROBE = int(FrameType.PROBE)
_PROBE_REPLY = int(FrameType.PROBE_REPLY)
_U32 = 0xFFFFFFFF


def encode_probe(probe_id: int, timestamp: float) -> bytes:
    return PROBE_STRUCT.pack(_PROBE, probe_id & _U32, timestamp)


def parse_probe(frame: bytes) -> tuple[int, int, float] | None:
    """(frame type, probe id, timestamp) of a PROBE or PROBE_REPLY frame, or None."""
    if len(frame) < PROBE_SIZE:
        return None
    kind, probe_id, timestamp = PROBE_STRUCT.unpack_from(frame)
    if kind != _PROBE and kind != _PROBE_REPLY:
        return None
    return kind, probe_id, timestamp


def make_probe_reply(frame: bytes) -> bytes | None:
    """The reply to a received PROBE frame (same id and timestamp), or None if not a probe."""
    if len(frame) < PROBE_SIZE or frame[0] != _PROBE:
        return None
    return bytes((_PROBE_REPLY,)) + bytes(frame[1:PROBE_SIZE])


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathAdded:
    path: Path
    at: float

    @property
    def name(self) -> str:
        return "path.learned" if self.path.source == "learned" else "path.added"


@dataclass(frozen=True, slots=True)
class PathStateChanged:
    path: Path
    old: PathState
    new: PathState
    at: float

    @property
    def name(self) -> str:
        return f"path.{self.new}"


@dataclass(frozen=True, slots=True)
class PathRemoved:
    path: Path
    reason: str
    """One log word: `uplink_removed`, `remote_removed`, `forgotten` (dead and no longer
    offered, `PathProber.forget_after`), `table_full` (evicted for a new path)."""
    at: float | None

    @property
    def name(self) -> str:
        return "path.removed"


PathEvent = PathAdded | PathStateChanged | PathRemoved

ProbeToSend = tuple[str, Address, bytes]
"""(uplink name, remote address, plaintext probe frame)."""

_SOURCE_RANK = {"learned": 0, "map": 1, "static": 2, "relay": 3}


class PathProber:
    """Table of paths with their probing schedule and health (sans-I/O)."""

    def __init__(
        self,
        keepalive_interval: float,
        path_timeout: float,
        rng: random.Random | None = None,
        *,
        max_paths: int = DEFAULT_MAX_PATHS,
        burst: Iterable[float] = DEFAULT_BURST,
        probe_timeout: float | None = None,
        forget_after: float | None = None,
    ) -> None:
        if keepalive_interval <= 0 or path_timeout <= 0:
            raise ValueError("keepalive_interval and path_timeout must be positive")
        if max_paths < 1:
            raise ValueError("max_paths must be at least 1")
        self.keepalive_interval = float(keepalive_interval)
        self.path_timeout = float(path_timeout)
        self.max_paths = max_paths
        # Burst probes later than the first periodic probe would only duplicate it.
        self.burst = tuple(sorted(o for o in burst if 0 <= o < keepalive_interval)) or (0.0,)
        self.probe_timeout = (
            float(probe_timeout) if probe_timeout is not None else min(self.path_timeout, 2.0)
        )
        """A probe unanswered for this long counts as lost (a late reply still un-counts it)."""
        self.forget_after = (
            float(forget_after) if forget_after is not None else 10 * self.path_timeout
        )
        """A dead path that nothing offers any more is dropped after this long: a *learned*
        one (heard from, or listed by the map earlier, `map_endpoints_changed`). Paths the map
        lists now, `far_gate.endpoints` (static) and the relay stay. So a path no longer
        offered is gone at most `path_timeout + forget_after` after its last authenticated
        packet (33 s with the defaults), and the table holds, per uplink, the offered remotes
        plus those heard within that time (never more than `max_paths`)."""
        self._rng = rng if rng is not None else random.Random()
        self._next_id = self._rng.getrandbits(32)
        self._paths: dict[PathKey, Path] = {}
        self._events: list[PathEvent] = []
        # `next_deadline()` is asked after every authenticated packet: it is cached, and only
        # recomputed (O(paths)) after a change that may move it earlier or that touched the
        # path defining it. `_deadline_valid` False means "recompute on the next ask".
        self._deadline: float | None = None
        self._deadline_valid = False
        # Counters (peers cannot raise into us: bad input becomes a number).
        self.bad_frames = 0
        self.unmatched_replies = 0
        self.rejected_paths = 0

    # --- queries ------------------------------------------------------------------------

    def get(self, uplink: str, remote: Address) -> Path | None:
        return self._paths.get((uplink, remote))

    @property
    def paths(self) -> list[Path]:
        return list(self._paths.values())

    def __len__(self) -> int:
        return len(self._paths)

    def active_paths(self) -> list[Path]:
        return [p for p in self._paths.values() if p.state is PathState.ACTIVE]

    def pop_events(self) -> list[PathEvent]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (a probe, a timeout), or None if no paths.
        O(1) while only `on_authenticated` traffic on active paths happened since the last
        call (the per-packet case); otherwise one pass over the paths."""
        if self._deadline_valid:
            return self._deadline
        deadline: float | None = None
        for path in self._paths.values():
            d = path.next_probe_at
            if path.state is not PathState.DEAD:
                d = min(d, self._liveness_ref(path) + self.path_timeout)
            elif path.source == "learned":
                d = min(d, path.state_since + self.forget_after)
            if deadline is None or d < deadline:
                deadline = d
        self._deadline = deadline
        self._deadline_valid = True
        return deadline

    # --- inputs -------------------------------------------------------------------------

    def add_candidate(
        self, uplink: str, remote: Address, source: PathSource, now: float
    ) -> Path | None:
        """A path worth trying. New → probing with an initial burst; a known path that is not
        active gets a fresh burst (the peer likely just (re)appeared, e.g. a map push).
        Returns None when the table is full of paths that cannot be evicted."""
        if source not in PATH_SOURCES:
            raise ValueError(f"unknown path source {source!r}")
        remote = _norm(remote)
        path = self._paths.get((uplink, remote))
        if path is not None:
            if _SOURCE_RANK[source] > _SOURCE_RANK[path.source]:
                path.source = source
            if path.state is not PathState.ACTIVE:
                self._start_burst(path, now)
            return path
        path = self._insert(uplink, remote, source, now)
        if path is not None:
            self._start_burst(path, now)
        return path

    def on_authenticated(
        self, uplink: str, remote: Address, now: float, nbytes: int = 0
    ) -> Path | None:
        """An authenticated packet arrived on (uplink, remote): the path is alive. An unknown
        remote is learned (roaming / symmetric NAT). Returns the path (None if table full)."""
        if len(remote) != 2:
            remote = (remote[0], remote[1])
        path = self._paths.get((uplink, remote))
        if path is None:
            path = self._learn(uplink, remote, now)
            if path is None:
                return None
        path.rx_packets += 1
        path.rx_bytes += nbytes
        # Inlined `_touch` for the per-packet case: an active path heard from again.
        if path.state is PathState.ACTIVE:
            last = path.last_authenticated
            if last is None or now > last:
                path.last_authenticated = now
                deadline = self._deadline
                if self._deadline_valid and deadline is not None:
                    # This path's liveness deadline moves later; the cached minimum stays
                    # exact unless that deadline was (or tied with) the minimum.
                    since = path.state_since
                    ref = since if last is None or last < since else last
                    if ref + self.path_timeout <= deadline:
                        self._deadline_valid = False
                else:
                    self._deadline_valid = False
            return path
        self._touch(path, now)
        return path

    def on_probe_reply(self, frame: bytes, uplink: str, remote: Address, now: float) -> None:
        """A PROBE_REPLY frame (already authenticated) arrived on (uplink, remote)."""
        try:
            parsed = parse_probe(frame)
        except Exception:  # pragma: no cover - parse_probe does not raise; belt and braces
            parsed = None
        if parsed is None or parsed[0] != _PROBE_REPLY:
            self.bad_frames += 1
            return
        _, probe_id, timestamp = parsed
        remote = _norm(remote)
        path = self._paths.get((uplink, remote))
        if path is None:
            path = self._learn(uplink, remote, now)
            if path is None:
                return
        self._touch(path, now)
        for record in path.probes:
            if record.probe_id == probe_id and record.sent_at == timestamp:
                break
        else:
            self.unmatched_replies += 1
            return
        if record.answered:
            return  # duplicate
        record.answered = True
        path.probe_replies += 1
        sample = now - record.sent_at
        if sample >= 0:
            path.add_rtt_sample(sample)

    def record_tx(self, uplink: str, remote: Address, nbytes: int) -> None:
        """Count a datagram the caller put on the wire on this path."""
        path = self._paths.get((uplink, _norm(remote)))
        if path is not None:
            path.tx_packets += 1
            path.tx_bytes += nbytes

    def remove_path(self, uplink: str, remote: Address, reason: str = "removed") -> bool:
        path = self._paths.pop((uplink, _norm(remote)), None)
        if path is None:
            return False
        self._deadline_valid = False
        self._events.append(PathRemoved(path, reason, None))
        return True

    def remove_uplink(self, uplink: str) -> list[Path]:
        """Forget every path on an uplink that is gone."""
        gone = [p for p in self._paths.values() if p.uplink == uplink]
        self._deadline_valid = False
        for path in gone:
            del self._paths[path.key]
            self._events.append(PathRemoved(path, "uplink_removed", None))
        return gone

    def map_endpoints_changed(self, endpoints: Iterable[Address]) -> None:
        """The far gate's endpoints as the map lists them now. A path to a remote the map
        no longer lists (a restarted peer's old NAT port) counts as learned from then on:
        still used while it is alive, forgotten `forget_after` after it died (see
        `forget_after`)."""
        offered = {_norm(endpoint) for endpoint in endpoints}
        for path in self._paths.values():
            if path.source == "map" and path.remote not in offered:
                path.source = "learned"
                self._deadline_valid = False

    def remove_remote(self, remote: Address) -> list[Path]:
        """Forget every path to a remote address (e.g. the map no longer lists it)."""
        remote = _norm(remote)
        gone = [p for p in self._paths.values() if p.remote == remote]
        self._deadline_valid = False
        for path in gone:
            del self._paths[path.key]
            self._events.append(PathRemoved(path, "remote_removed", None))
        return gone

    def drop_superseded(self, paths: list[Path], now: float) -> list[Path]:
        """The paths minus those a NAT rebinding replaced, for sending (they stay in the
        table, probed, and are used again as soon as they answer).

        After a rebinding the peer speaks from a new port at once (a learned path) while the
        old path stays `active` until `path_timeout`: shards sent there are lost. A path is
        *suspect* when another path from the same uplink to the same remote host (another
        port) was heard more than SUPERSEDED_AFTER after it; a suspect path is probed at once
        (at most once per probe interval) rather than at its next periodic probe, and left
        out while that probe (or any sent since its last packet) is overdue: unanswered for
        2 RTT + 4 RTT variation + 50 ms. So a rebound path is left out about SUPERSEDED_AFTER
        plus one probe round trip after the rebinding while traffic flows (within one probe
        interval when idle). Two live paths behind one public IP (the peer's two uplinks
        behind one NAT) both answer their probes: neither is left out, however their probe
        phases differ (with idle traffic each is heard only through its own probes; the one
        extra probe aligns their phases)."""
        freshest: dict[tuple[str, str], float] = {}
        for path in paths:
            key = (path.uplink, path.remote[0])
            heard = path.last_authenticated
            if heard is not None and heard > freshest.get(key, -1.0):
                freshest[key] = heard
        kept = []
        for path in paths:
            heard = path.last_authenticated
            fresher = freshest.get((path.uplink, path.remote[0]))
            if heard is not None and fresher is not None and fresher - heard > SUPERSEDED_AFTER:
                silent = _silent_for(path, heard, now)
                if silent is None:
                    self._probe_early(path, now)
                elif silent > _overdue_after(path):
                    continue
            kept.append(path)
        return kept or paths

    def _probe_early(self, path: Path, now: float) -> None:
        """Probe a suspect path now, at most once per probe interval (bounded extra probes)."""
        if path.next_probe_at <= now or now - path.early_probe_at < self.keepalive_interval:
            return
        path.early_probe_at = now
        path.next_probe_at = now
        self._deadline_valid = False

    # --- time ---------------------------------------------------------------------------

    def tick(self, now: float) -> list[ProbeToSend]:
        """Advance to `now`: time out silent paths, settle lost probes, emit due probes."""
        self._deadline_valid = False
        out: list[ProbeToSend] = []
        for path in list(self._paths.values()):
            if path.state is not PathState.DEAD:
                # The sum, as `next_deadline` computes it: (a + b) - a < b in floating point.
                if now >= self._liveness_ref(path) + self.path_timeout:
                    self._set_state(path, PathState.DEAD, now)
            elif path.source == "learned" and now - path.state_since >= self.forget_after:
                del self._paths[path.key]
                self._events.append(PathRemoved(path, "forgotten", now))
                continue
            for record in path.probes:
                if (
                    not record.answered
                    and not record.expired
                    and now - record.sent_at >= self.probe_timeout
                ):
                    record.expired = True
            if now >= path.next_probe_at:
                out.append((path.uplink, path.remote, self._send_probe(path, now)))
        return out

    # --- internals ----------------------------------------------------------------------

    def _liveness_ref(self, path: Path) -> float:
        last = path.last_authenticated
        if last is None or last < path.state_since:
            # A probing path (or one re-armed by add_candidate) gets path_timeout from then.
            return path.state_since
        return last

    def _touch(self, path: Path, now: float) -> None:
        if path.last_authenticated is None or now > path.last_authenticated:
            path.last_authenticated = now
            self._deadline_valid = False
        if path.state is not PathState.ACTIVE:
            self._set_state(path, PathState.ACTIVE, now)

    def _set_state(self, path: Path, new: PathState, now: float) -> None:
        old = path.state
        if old is new:
            return
        if old is PathState.DEAD:
            path.restart_measurements()
        path.state = new
        path.state_since = now
        self._deadline_valid = False
        self._events.append(PathStateChanged(path, old, new, now))

    def _learn(self, uplink: str, remote: Address, now: float) -> Path | None:
        path = self._insert(uplink, remote, "learned", now)
        if path is not None:
            path.burst_index = len(self.burst)
            path.next_probe_at = now  # one probe at once for a first RTT, then periodic
        return path

    def _insert(self, uplink: str, remote: Address, source: PathSource, now: float) -> Path | None:
        if len(self._paths) >= self.max_paths and not self._evict_one(now):
            self.rejected_paths += 1
            return None
        path = Path(uplink=uplink, remote=remote, source=source, created_at=now, state_since=now)
        self._paths[path.key] = path
        self._deadline_valid = False
        self._events.append(PathAdded(path, now))
        return path

    def _evict_one(self, now: float) -> bool:
        """Make room by dropping the stalest non-active path, learned ones first."""
        victims = [p for p in self._paths.values() if p.state is not PathState.ACTIVE]
        if not victims:
            return False
        victim = min(
            victims,
            key=lambda p: (
                _SOURCE_RANK[p.source],
                p.state is not PathState.DEAD,
                p.last_authenticated if p.last_authenticated is not None else p.created_at,
            ),
        )
        del self._paths[victim.key]
        self._deadline_valid = False
        self._events.append(PathRemoved(victim, "table_full", now))
        return True

    def _start_burst(self, path: Path, now: float) -> None:
        self._deadline_valid = False
        path.burst_anchor = now
        path.burst_index = 0
        path.next_probe_at = now + self.burst[0]
        if path.state is PathState.DEAD:
            self._set_state(path, PathState.PROBING, now)
        else:
            path.state_since = now

    def _send_probe(self, path: Path, now: float) -> bytes:
        probe_id = self._next_id
        self._next_id = (self._next_id + 1) & _U32
        in_burst = path.burst_index < len(self.burst)
        path.probes.append(ProbeRecord(probe_id, now, counted=not in_burst))
        path.probes_sent += 1
        if in_burst:
            path.burst_index += 1
        if path.burst_index < len(self.burst):
            path.next_probe_at = path.burst_anchor + self.burst[path.burst_index]
        else:
            nxt = (
                path.burst_anchor + self.keepalive_interval
                if in_burst
                else path.next_probe_at + self.keepalive_interval
            )
            path.next_probe_at = nxt if nxt > now else now + self.keepalive_interval
        return encode_probe(probe_id, now)


SUPERSEDED_AFTER = 0.3
"""A path heard this much less recently than another path from the same uplink to the same
remote host is suspect of having been replaced by a NAT rebinding (`drop_superseded`)."""

PROBE_OVERDUE_MARGIN = 0.05
"""A probe unanswered for 2 × RTT + 4 × RTT variation + this is overdue (no RTT yet:
SUPERSEDED_AFTER)."""


def _silent_for(path: Path, heard: float, now: float) -> float | None:
    """How long the oldest probe sent after the path's last authenticated packet has gone
    unanswered (any reply would have moved `last_authenticated` past it); None if no probe
    went out since."""
    oldest: float | None = None
    for record in reversed(path.probes):
        if record.sent_at <= heard:
            break
        oldest = record.sent_at
    return None if oldest is None else now - oldest


def _overdue_after(path: Path) -> float:
    if path.rtt is None:
        return SUPERSEDED_AFTER
    return 2 * path.rtt + 4 * (path.rtt_var or 0.0) + PROBE_OVERDUE_MARGIN


def _norm(remote: Address) -> Address:
    if len(remote) != 2:  # an IPv6 sockaddr (host, port, flowinfo, scope_id)
        return (remote[0], remote[1])
    return remote
