"""``warp gauge report``: figures and plots from a ``warp gauge rx`` CSV.

Definitions (docs/gauge.md has the long form):

* expected = max seq + 1 (the sender numbers its probes from 0);
* unique = distinct seq received; duplicates = arrivals − unique;
* loss % = 100 × (1 − unique / expected);
* reorder % = 100 × reordered / unique, where a probe is reordered when its first arrival
  comes after the arrival of a higher seq;
* latency figures use the first arrival of each seq, minus the minimum one-way latency
  (which removes the clock offset between two hosts, and the base propagation delay);
  percentiles are nearest-rank: the value at rank ceil(p/100 × n) of the sorted values.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

__all__ = ["Record", "Report", "ReportError", "load_csv", "percentile", "plot", "summarize"]

PLOTS = ("rate.png", "latency.png", "latency_histogram.png", "latency_vs_rate.png")


class ReportError(Exception):
    """The CSV cannot be read; the message is one line for users."""


class Record(NamedTuple):
    counter: int
    seq: int
    send_ns: int
    arrival_ns: int
    target_rate: float
    achieved_rate: float | None
    size: int


_REQUIRED = ("seq", "send_ns", "arrival_ns", "target_rate")


def load_csv(path: str | os.PathLike[str]) -> list[Record]:
    """The records of an rx CSV, in arrival order; raise `ReportError` on a bad file."""
    name = os.fspath(path)
    try:
        with open(path, encoding="ascii", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ReportError(
                    f"{name}: not a `warp gauge rx` CSV (missing columns: {', '.join(missing)})"
                )
            records: list[Record] = []
            for row in reader:
                try:
                    achieved = row.get("achieved_rate") or ""
                    records.append(
                        Record(
                            counter=int(row.get("counter") or len(records) + 1),
                            seq=int(row["seq"]),
                            send_ns=int(row["send_ns"]),
                            arrival_ns=int(row["arrival_ns"]),
                            target_rate=float(row["target_rate"]),
                            achieved_rate=float(achieved) if achieved else None,
                            size=int(row.get("size") or 0),
                        )
                    )
                except (TypeError, ValueError):
                    raise ReportError(
                        f"{name}, line {reader.line_num}: invalid row {list(row.values())}"
                    ) from None
    except FileNotFoundError:
        raise ReportError(f"{name}: no such file") from None
    except UnicodeDecodeError:
        raise ReportError(f"{name}: not a `warp gauge rx` CSV (not ASCII text)") from None
    except OSError as exc:
        raise ReportError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if not records:
        raise ReportError(f"{name}: no probes were recorded")
    return records


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of ascending ``sorted_values`` (non-empty), 0 < p ≤ 100."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Report:
    expected: int
    received: int
    unique: int
    duplicates: int
    lost: int
    loss_pct: float
    reordered: int
    reorder_pct: float
    min_latency_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    duration_s: float
    target_rate_mean: float
    achieved_rate_mean: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, source: str) -> str:
        achieved = (
            "—"
            if self.achieved_rate_mean is None
            else f"{self.achieved_rate_mean:.1f} over {self.duration_s:.2f} s"
        )
        return "\n".join(
            [
                f"warp gauge report: {source}",
                f"datagrams: {self.expected} expected (max seq + 1), {self.received} received, "
                f"{self.unique} unique, {self.duplicates} duplicates",
                f"loss: {self.loss_pct:.2f} % ({self.lost} of {self.expected})",
                f"reorder: {self.reorder_pct:.2f} % ({self.reordered} of {self.unique} arrived "
                "after a higher seq)",
                f"latency above the minimum, ms: p50 {self.p50_ms:.3f}  p90 {self.p90_ms:.3f}  "
                f"p99 {self.p99_ms:.3f}  max {self.max_ms:.3f}",
                f"minimum one-way latency: {self.min_latency_ms:.3f} ms "
                "(includes any clock offset between sender and receiver)",
                f"rate, datagrams/s: target mean {self.target_rate_mean:.1f}, achieved {achieved}",
            ]
        )


def _first_arrivals(records: Sequence[Record]) -> tuple[list[Record], int]:
    """The first arrival of each seq (arrival order), and how many of them were reordered."""
    seen: set[int] = set()
    firsts: list[Record] = []
    highest = -1
    reordered = 0
    for record in records:
        if record.seq in seen:
            continue
        seen.add(record.seq)
        firsts.append(record)
        if record.seq < highest:
            reordered += 1
        highest = max(highest, record.seq)
    return firsts, reordered


def _time_weighted_target(firsts: Sequence[Record]) -> float:
    """Mean target rate over the sending time (each probe's target weighs the time until the
    next received probe was sent), so a sawtooth's fast part does not count more."""
    ordered = sorted(firsts, key=lambda r: r.seq)
    span = ordered[-1].send_ns - ordered[0].send_ns
    if span <= 0:
        return sum(r.target_rate for r in ordered) / len(ordered)
    weighted = sum(a.target_rate * (b.send_ns - a.send_ns) for a, b in itertools.pairwise(ordered))
    return weighted / span


def summarize(records: Sequence[Record]) -> Report:
    """The figures of a run (``records`` in arrival order, non-empty)."""
    if not records:
        raise ReportError("no probes were recorded")
    firsts, reordered = _first_arrivals(records)
    unique = len(firsts)
    expected = max(r.seq for r in firsts) + 1
    latencies = sorted(r.arrival_ns - r.send_ns for r in firsts)
    base = latencies[0]
    above = [latency - base for latency in latencies]
    arrivals = [r.arrival_ns for r in records]
    duration_ns = max(arrivals) - min(arrivals)
    return Report(
        expected=expected,
        received=len(records),
        unique=unique,
        duplicates=len(records) - unique,
        lost=expected - unique,
        loss_pct=100.0 * (1 - unique / expected),
        reordered=reordered,
        reorder_pct=100.0 * reordered / unique,
        min_latency_ms=base / 1e6,
        p50_ms=percentile(above, 50) / 1e6,
        p90_ms=percentile(above, 90) / 1e6,
        p99_ms=percentile(above, 99) / 1e6,
        max_ms=above[-1] / 1e6,
        duration_s=duration_ns / 1e9,
        target_rate_mean=_time_weighted_target(firsts),
        achieved_rate_mean=(len(records) - 1) / (duration_ns / 1e9) if duration_ns > 0 else None,
    )


def binned_rate(records: Sequence[Record]) -> tuple[float, list[float], list[float]]:
    """Arrivals per second in equal time bins: (bin width s, bin centres s, rates).

    The width is 1/100 of the run, but at least what holds ~20 arrivals at the mean rate,
    and at least 1 ms.
    """
    start = min(r.arrival_ns for r in records)
    span = (max(r.arrival_ns for r in records) - start) / 1e9
    mean_rate = (len(records) - 1) / span if span > 0 else 0.0
    width = max(span / 100, 20 / mean_rate if mean_rate > 0 else 0.0, 0.001)
    count = max(1, math.ceil(span / width)) if span > 0 else 1
    bins = [0] * count
    for record in records:
        index = min(int((record.arrival_ns - start) / 1e9 / width), count - 1)
        bins[index] += 1
    centers = [(i + 0.5) * width for i in range(count)]
    return width, centers, [n / width for n in bins]


def plot(records: Sequence[Record], directory: str | os.PathLike[str]) -> list[str]:
    """Draw the four PNGs into ``directory`` (created if needed); return their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(directory, exist_ok=True)
    firsts, _ = _first_arrivals(records)
    base = min(r.arrival_ns - r.send_ns for r in firsts)
    start = min(r.arrival_ns for r in records)
    t = [(r.arrival_ns - start) / 1e9 for r in firsts]
    latency = [(r.arrival_ns - r.send_ns - base) / 1e6 for r in firsts]
    t_all = [(r.arrival_ns - start) / 1e9 for r in records]
    target = [r.target_rate for r in records]
    paths = [os.path.join(os.fspath(directory), name) for name in PLOTS]

    def new() -> tuple[Figure, Any]:
        figure = Figure(figsize=(9, 5), layout="constrained")
        FigureCanvasAgg(figure)
        return figure, figure.add_subplot()

    figure, ax = new()
    ax.plot(t_all, target, label="target", linewidth=1.2)
    width, centers, rates = binned_rate(records)
    ax.step(
        centers, rates, where="mid", label=f"achieved ({width * 1000:.0f} ms bins)", linewidth=1.0
    )
    ax.set(xlabel="time since first arrival (s)", ylabel="datagrams/s", title="Rate over time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    figure.savefig(paths[0], dpi=100)

    figure, ax = new()
    ax.scatter(t, latency, s=2)
    ax.set(
        xlabel="time since first arrival (s)",
        ylabel="one-way latency above minimum (ms)",
        title="Latency over time",
    )
    ax.grid(True, alpha=0.3)
    figure.savefig(paths[1], dpi=100)

    figure, ax = new()
    ax.hist(latency, bins=min(100, max(10, len(latency) // 20)))
    ax.set(
        xlabel="one-way latency above minimum (ms)", ylabel="datagrams", title="Latency histogram"
    )
    ax.grid(True, alpha=0.3)
    figure.savefig(paths[2], dpi=100)

    figure, ax = new()
    ax.scatter([r.target_rate for r in firsts], latency, s=2)
    ax.set(
        xlabel="offered rate: the sender's target at send time (datagrams/s)",
        ylabel="one-way latency above minimum (ms)",
        title="Latency vs rate",
    )
    ax.grid(True, alpha=0.3)
    figure.savefig(paths[3], dpi=100)
    return paths
