"""What an uplink carries (delivery rate from the far side's receive reports) and pacing.

Sans-I/O: times are passed in. The far gate answers each probe with the bytes and packets it
has received on that path so far (the receive report of PROBE_REPLY, `warp.paths.prober`).
Two reports give what was delivered between the two probes' send times, and our own sent
counter at those times what was offered (`PathRateMeter`). An uplink's sample is the sum
over its live paths (they share its bottleneck: the modem's upload); from those
(`CapacityEstimator`):

* *saturated*: delivered short of offered while the closing probe's round trip shows a
  queue (or delivered far below what the random probe loss explains): the bottleneck's
  queue filled, so the delivered rate is the capacity and replaces the estimate (it may
  have fallen). Random loss alone builds no queue: it never lowers the estimate;
* otherwise the delivered rate is a lower bound: the estimate is the max of those since the
  last saturated sample (BBR's max filter, restarted by saturation).

`share_rate` is what the scheduler counts on (shards go in proportion): before any
saturation the estimate times STARTUP_GAIN (its share grows towards the capacity); after
one, DRAIN_GAIN below the capacity (the queue it filled drains and stays short), except for
a PROBE_UP_FOR slot every PROBE_UP_EVERY seconds at PROBE_UP_GAIN, small enough for a queue
of a few tens of ms to absorb, so a capacity that grew is found; and an uplink held at its
pacing rate with no queue, PROBE_UP_EVERY after its last saturation, creeps up by CREEP_GAIN
a sample (a saturation misread from a late probe under random loss, where probing upwards
never gets past the loss, does not throttle it for good). `pacing_rate` is the same
once the uplink saturated; before, the uplink is not paced (its capacity is only a lower
bound: an uplink left alone after another died may take everything at once).

`TokenBucket` paces an uplink at a rate with a small burst.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Reports closer together than this (the initial probe burst) give no rate sample.
MIN_INTERVAL = 0.25
#: A sample offering less than this per PROBE_INTERVAL_GUESS says nothing of the capacity.
MIN_OFFERED_BYTES = 16_000
PROBE_INTERVAL_GUESS = 1.0
#: A path's last sample counts towards its uplink's for this long.
SAMPLE_FRESH = 2.5
#: Saturated: delivered below this fraction of the offered, and the closing probe's round
#: trip shows a queue of at least QUEUED seconds (random loss alone builds no queue) ...
SATURATED_RATIO = 0.97
QUEUED = 0.010
#: ... or delivered below this fraction of what the random (probe) loss leaves of the
#: offered: a bottleneck dropping with hardly any queue in front.
OVERFLOW_RATIO = 0.85
#: A sample offering at least this fraction of the pacing rate with no queue, PROBE_UP_EVERY
#: after the last saturation: held by the pacer, the capacity creeps up by CREEP_GAIN.
HELD_RATIO = 0.98
CREEP_GAIN = 1.01
STARTUP_GAIN = 1.25
DRAIN_GAIN = 0.97
PROBE_UP_GAIN = 1.03
PROBE_UP_EVERY = 5.0
PROBE_UP_FOR = 1.0
#: Never paced below this (bytes/s): probes and a trickle of data always get through.
MIN_RATE = 16_000.0
#: Token bucket depth: this long at the rate, at least BURST_MIN_BYTES.
BURST_TIME = 0.010
BURST_MIN_BYTES = 16_000.0


@dataclass(slots=True)
class RateSample:
    """Delivered and offered rates (bytes/s) over an interval between two receive reports."""

    at: float
    delivered: float
    offered: float
    queue_delay: float = 0.0
    """How much longer than the path's shortest the round trip of the closing probe took."""


class PathRateMeter:
    """One path's rates from its receive reports (the difference of two)."""

    __slots__ = ("_base", "last", "min_rtt")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # The previous report: (our probe's send time, our sent bytes then, their received).
        self._base: tuple[float, int, int] | None = None
        self.last: RateSample | None = None
        #: the shortest probe round trip seen: the path without a queue
        self.min_rtt: float | None = None

    def on_report(
        self, sent_at: float, sent_bytes: int, received_bytes: int, now: float
    ) -> RateSample | None:
        """A receive report: the far side had received `received_bytes` on this path when
        our probe sent at `sent_at` reached it (and its reply came back `now`); we had sent
        `sent_bytes` by then."""
        rtt = now - sent_at
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
        base = self._base
        if base is None or received_bytes < base[2] or sent_bytes < base[1] or sent_at < base[0]:
            # First report, a restarted peer (its counters went back) or a reply overtaken.
            self._base = (sent_at, sent_bytes, received_bytes)
            return None
        interval = sent_at - base[0]
        if interval < MIN_INTERVAL:
            return None
        self._base = (sent_at, sent_bytes, received_bytes)
        offered = sent_bytes - base[1]
        delivered = min(received_bytes - base[2], offered)
        self.last = RateSample(now, delivered / interval, offered / interval, rtt - self.min_rtt)
        return self.last


class CapacityEstimator:
    """Capacity of one uplink from its paths' rate samples (see the module docstring)."""

    __slots__ = ("capacity", "last_sample", "samples", "saturated_at", "saturations")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (the uplink's paths all died: what it carried says nothing)."""
        #: bytes/s the uplink is known to carry; None until a sample with traffic
        self.capacity: float | None = None
        #: when the last saturated sample came (None: never, still starting up)
        self.saturated_at: float | None = None
        self.saturations = 0
        self.samples = 0
        self.last_sample: RateSample | None = None

    def on_sample(self, sample: RateSample, loss: float) -> bool | None:
        """The uplink's delivered and offered rates (summed over its paths); `loss`: its
        random (probe) loss. Returns whether it was saturated (None: idle, no news)."""
        interval_bytes = sample.offered * PROBE_INTERVAL_GUESS
        if interval_bytes < MIN_OFFERED_BYTES:
            return None
        survives = 1.0 - min(max(loss, 0.0), 0.5)
        # Short of what the random loss leaves: under random loss alone delivered is always
        # below offered, and a late probe (a loaded host) must not ratchet the capacity down.
        short = sample.delivered < sample.offered * survives * SATURATED_RATIO
        saturated = short and (
            sample.queue_delay >= QUEUED
            or sample.delivered < sample.offered * survives * OVERFLOW_RATIO
        )
        self.samples += 1
        self.last_sample = sample
        if saturated:
            # What the bottleneck let through (any random loss after it included: low
            # rather than high, so the queue drains).
            self.capacity = max(sample.delivered, MIN_RATE)
            self.saturated_at = sample.at
            self.saturations += 1
        elif self.capacity is None or sample.delivered > self.capacity:
            # A lower bound (what was lost, was lost at random): the max filter keeps the
            # highest.
            self.capacity = sample.delivered
        elif (
            self.saturated_at is not None
            and sample.at - self.saturated_at >= PROBE_UP_EVERY
            and sample.queue_delay < QUEUED / 2
            and sample.offered >= self.capacity * DRAIN_GAIN * HELD_RATIO
        ):
            # Held at the pacing rate and no queue in front of the bottleneck: the
            # saturation that set the capacity may have been a fluke (a loaded host's late
            # probe) or the capacity grew. Creep up; a real bottleneck soon says so again.
            self.capacity *= CREEP_GAIN
        return saturated

    def gain(self, now: float) -> float:
        """The factor on the capacity the uplink is paced at now."""
        if self.saturated_at is None:
            return STARTUP_GAIN
        since = now - self.saturated_at
        if since >= PROBE_UP_EVERY and since % PROBE_UP_EVERY < PROBE_UP_FOR:
            return PROBE_UP_GAIN
        return DRAIN_GAIN

    def known_rate(self) -> float | None:
        """Bytes/s the uplink can be counted on for (status's usable and protected rates):
        what it is paced at once measured, else the lower bound it carried."""
        if self.capacity is None:
            return None
        return self.capacity * DRAIN_GAIN if self.saturated_at is not None else self.capacity

    def share_rate(self, now: float) -> float | None:
        """Bytes/s the scheduler counts on for this uplink (its shards' weight); None while
        nothing is known."""
        if self.capacity is None:
            return None
        return max(self.capacity * self.gain(now), MIN_RATE)

    def pacing_rate(self, now: float) -> float | None:
        """Bytes/s the sender may put on this uplink now; None: unpaced, as long as it never
        saturated (its capacity is only known to be at least what it carried: an uplink
        left alone after another died may take everything at once)."""
        if self.saturated_at is None:
            return None
        return self.share_rate(now)


class TokenBucket:
    """Paces one uplink: `rate` bytes/s, at most `burst` bytes at once. Sending may overdraw
    it by one packet (the bucket goes negative and the next send waits)."""

    __slots__ = ("_at", "burst", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(rate * BURST_TIME, BURST_MIN_BYTES)
        self.tokens = self.burst
        self._at = now

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = rate
        self.burst = max(rate * BURST_TIME, BURST_MIN_BYTES)
        self.tokens = min(self.tokens, self.burst)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.tokens = min(self.tokens + (now - self._at) * self.rate, self.burst)
            self._at = now

    def ready_at(self, now: float) -> float:
        """When the bucket is no longer overdrawn (now if it is not)."""
        self._refill(now)
        if self.tokens >= 0:
            return now
        return now + -self.tokens / self.rate

    def consume(self, nbytes: int, now: float) -> None:
        self._refill(now)
        self.tokens -= nbytes
