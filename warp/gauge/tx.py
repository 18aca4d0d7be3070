"""``warp gauge tx``: send probes at a steady rate or in a sawtooth.

The sender keeps to the schedule by counting: at time ``t`` after the start it has sent
``floor(N(t))`` probes, where ``N`` is the integral of the rate. It sleeps until the next
probe is due (so at high rates it sends small bursts, one per wake-up of the OS timer);
it never tries to "catch up" beyond what is due.
"""

from __future__ import annotations

import contextlib
import errno
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from warp.gauge import PROBE, Endpoint, GaugeError, pack_probe

__all__ = ["Schedule", "TxResult", "run_tx"]

#: longest single sleep, so a stop or the end of the run is noticed promptly
MAX_SLEEP = 0.05
#: a blocked Unix socket send (receiver not reading) gives up after this long
SEND_TIMEOUT = 0.5


@dataclass(frozen=True)
class Schedule:
    """The target rate over time: steady, or a sawtooth ``base → peak`` over each ``period``."""

    base: float
    peak: float
    period: float | None  # None: steady at ``peak``

    @classmethod
    def steady(cls, rate: float) -> Schedule:
        return cls(rate, rate, None)

    @classmethod
    def sawtooth(cls, base: float, peak: float, period: float) -> Schedule:
        return cls(base, peak, period)

    def rate(self, t: float) -> float:
        """Target datagrams/s at ``t`` seconds after the start."""
        if self.period is None:
            return self.peak
        phase = (t / self.period) % 1.0
        return self.base + (self.peak - self.base) * phase

    def count(self, t: float) -> float:
        """Probes due by ``t``: the integral of `rate` from 0 to ``t``."""
        if t <= 0:
            return 0.0
        if self.period is None:
            return self.peak * t
        cycles, phase = divmod(t / self.period, 1.0)
        ramp = (self.peak - self.base) * self.period
        return self.base * t + ramp * (cycles * 0.5 + phase * phase * 0.5)

    def describe(self) -> str:
        if self.period is None:
            return f"steady {self.peak:g}/s"
        return f"sawtooth {self.base:g}→{self.peak:g}/s every {self.period:g} s"


@dataclass
class TxResult:
    dest: str
    schedule: Schedule
    sent: int = 0
    errors: int = 0
    first_error: str = ""
    elapsed: float = 0.0
    size: int = 0

    def summary(self) -> str:
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        line = (
            f"sent {self.sent} probes of {self.size} B to {self.dest} in {self.elapsed:.2f} s "
            f"({rate:.1f}/s, {self.schedule.describe()})"
        )
        if self.errors:
            line += f"; {self.errors} send errors (first: {self.first_error})"
        return line


def _open(dest: Endpoint) -> socket.socket:
    sock = socket.socket(dest.family, socket.SOCK_DGRAM)
    if dest.kind == "unix":
        sock.settimeout(SEND_TIMEOUT)
    else:
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock


def run_tx(
    dest: Endpoint,
    schedule: Schedule,
    *,
    duration: float,
    size: int = 1200,
    clock: Callable[[], float] = time.perf_counter,
    wall_ns: Callable[[], int] = time.time_ns,
    sleep: Callable[[float], None] = time.sleep,
) -> TxResult:
    """Send probes to ``dest`` for ``duration`` seconds. Send errors are counted, not raised.

    A Unix socket path that does not exist raises `GaugeError` at once (nobody is receiving).
    """
    if size < PROBE.size:
        raise GaugeError(f"a probe is at least {PROBE.size} bytes, got {size}")
    result = TxResult(str(dest), schedule, size=size)
    try:
        sock = _open(dest)
    except OSError as exc:
        raise GaugeError(f"cannot open a socket for {dest}: {exc.strerror or exc}") from None
    buffer = bytearray(pack_probe(0, 0, 0.0, size))
    pack_into = PROBE.pack_into
    magic = buffer[:4]
    address = dest.address
    sent = 0
    attempts = 0
    try:
        start = clock()
        end = start + duration
        while True:
            now = clock()
            if now >= end:
                break
            t = now - start
            due = math.floor(schedule.count(t))
            while attempts < due:
                target = schedule.rate(t)
                pack_into(buffer, 0, magic, attempts, wall_ns(), target)
                attempts += 1
                try:
                    sock.sendto(buffer, address)
                    sent += 1
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    if dest.kind == "unix" and sent == 0:
                        raise GaugeError(
                            f"nobody is receiving on {dest} ({exc.strerror}); start "
                            "`warp gauge rx` first"
                        ) from None
                    result.errors += 1
                    result.first_error = result.first_error or (exc.strerror or str(exc))
                except TimeoutError:
                    result.errors += 1
                    result.first_error = result.first_error or "receiver not reading (timeout)"
                except OSError as exc:
                    result.errors += 1
                    if exc.errno in (errno.EMSGSIZE,):
                        raise GaugeError(f"{size} B is too large for {dest}") from None
                    result.first_error = result.first_error or (exc.strerror or str(exc))
            rate = schedule.rate(t)
            # time until the next probe is due, estimated from the current rate
            wait = (attempts + 1 - schedule.count(t)) / rate if rate > 0 else MAX_SLEEP
            sleep(min(max(wait, 0.0), MAX_SLEEP, max(end - clock(), 0.0)))
        result.elapsed = clock() - start
    finally:
        sock.close()
    result.sent = sent
    return result
