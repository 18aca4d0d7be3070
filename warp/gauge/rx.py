"""``warp gauge rx``: receive probes and write one CSV row per arrival.

Columns (header line first; docs/gauge.md):

    counter          arrivals so far, 1-based (duplicates and reordered probes included)
    seq              the probe's sequence number
    send_ns          sender's wall clock at send (ns since the epoch)
    arrival_ns       receiver's wall clock at arrival (ns since the epoch)
    latency_ms       arrival_ns − send_ns in ms (one-way; includes any clock offset)
    target_rate      the sender's target rate at send (datagrams/s)
    achieved_rate    arrivals per second over the last ``window`` seconds (shorter at the start)
    size             datagram size in bytes

Datagrams that are not probes (wrong magic, too short) are counted and skipped.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from warp.gauge import MAX_SIZE, Endpoint, GaugeError, unpack_probe

__all__ = ["CSV_COLUMNS", "RxResult", "run_rx"]

CSV_COLUMNS = (
    "counter",
    "seq",
    "send_ns",
    "arrival_ns",
    "latency_ms",
    "target_rate",
    "achieved_rate",
    "size",
)
#: how often the receive loop wakes up to check the deadline / stop flag
POLL = 0.1


@dataclass
class RxResult:
    bind: str
    out: str
    received: int = 0
    ignored: int = 0
    elapsed: float = 0.0
    stopped_by: str = ""

    def summary(self) -> str:
        line = (
            f"received {self.received} probes on {self.bind} in {self.elapsed:.2f} s → {self.out}"
        )
        if self.ignored:
            line += f" ({self.ignored} datagrams that were not probes ignored)"
        return line + (f"; stopped by {self.stopped_by}" if self.stopped_by else "")


@contextlib.contextmanager
def _bound(bind: Endpoint) -> Iterator[socket.socket]:
    from warp.gate.base import GateError, claim_socket_path, remove_socket_path

    sock = socket.socket(bind.family, socket.SOCK_DGRAM)
    inode: tuple[int, int] | None = None
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            if bind.kind == "unix":
                claim_socket_path(bind.path, socket.SOCK_DGRAM)
            sock.bind(bind.address)
            if bind.kind == "unix":
                st = os.lstat(bind.path)
                inode = (st.st_dev, st.st_ino)
        except GateError as exc:
            raise GaugeError(str(exc)) from None
        except OSError as exc:
            raise GaugeError(f"cannot bind {bind}: {exc.strerror or exc}") from None
        sock.settimeout(POLL)
        yield sock
    finally:
        sock.close()
        if bind.kind == "unix":
            remove_socket_path(bind.path, inode)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (and SIGINT) set ``stop`` instead of killing the run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_rx(
    bind: Endpoint,
    out: str,
    *,
    duration: float | None = None,
    idle: float | None = None,
    window: float = 1.0,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    handle_signals: bool = False,
    clock: Callable[[], float] = time.monotonic,
    wall_ns: Callable[[], int] = time.time_ns,
) -> RxResult:
    """Record probes arriving on ``bind`` into the CSV ``out`` until ``duration`` has passed,
    ``idle`` seconds went by without a probe (after the first), or ``stop`` is set.

    ``ready`` is set once the socket is bound (for callers that start a sender next).
    """
    stop = stop or threading.Event()
    result = RxResult(str(bind), out)
    try:
        csv_file: TextIO = open(out, "w", encoding="ascii", newline="")  # noqa: SIM115
    except OSError as exc:
        raise GaugeError(f"cannot write {out}: {exc.strerror or exc}") from None
    signals = _stop_on_signals(stop) if handle_signals else contextlib.nullcontext()
    with csv_file, _bound(bind) as sock, signals:
        if ready is not None:
            ready.set()
        csv_file.write(",".join(CSV_COLUMNS) + "\n")
        write = csv_file.write
        buffer = bytearray(MAX_SIZE + 1)
        recent: collections.deque[float] = collections.deque()
        start = clock()
        deadline = start + duration if duration is not None else None
        last_arrival: float | None = None
        counter = 0
        first: float | None = None
        while True:
            if stop.is_set():
                result.stopped_by = "signal" if handle_signals else "stop"
                break
            now = clock()
            if deadline is not None and now >= deadline:
                result.stopped_by = "duration"
                break
            if idle is not None and last_arrival is not None and now - last_arrival >= idle:
                result.stopped_by = "idle"
                break
            try:
                size = sock.recv_into(buffer)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            arrival_ns = wall_ns()
            arrival = clock()
            probe = unpack_probe(memoryview(buffer)[:size])
            if probe is None:
                result.ignored += 1
                continue
            counter += 1
            last_arrival = arrival
            if first is None:
                first = arrival
            recent.append(arrival)
            while recent and recent[0] <= arrival - window:
                recent.popleft()
            since_first = arrival - first
            if since_first >= window:
                achieved = f"{len(recent) / window:.3f}"
            elif since_first > 0:  # the first window: arrivals after the first one / time
                achieved = f"{(len(recent) - 1) / since_first:.3f}"
            else:
                achieved = ""
            latency_ms = (arrival_ns - probe.send_ns) / 1e6
            write(
                f"{counter},{probe.seq},{probe.send_ns},{arrival_ns},{latency_ms:.6f},"
                f"{probe.target_rate:.3f},{achieved},{size}\n"
            )
        result.elapsed = clock() - start
        result.received = counter
    return result
