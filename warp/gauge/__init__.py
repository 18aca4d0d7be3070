"""``warp gauge``: measure the one-way quality of a link or a tunnel (docs/gauge.md).

``warp gauge tx DEST`` sends sequence-numbered, timestamped probes at a steady rate or in a
sawtooth; ``warp gauge rx BIND OUT.csv`` records each arrival (counter, target and achieved
rates, arrival time, one-way latency); ``warp gauge report OUT.csv`` prints loss, reorder
and latency percentiles and draws PNG plots. docs/gauge.md defines every figure.

A probe is one datagram: the header `PROBE` (network byte order) and zero padding up to
``--size`` bytes::

    magic   4 bytes  b"WGP1"
    seq     u64      0, 1, 2, … per run
    send    u64      sender's wall clock (CLOCK_REALTIME) in ns when the probe was sent
    target  f64      the rate (datagrams/s) the sender was aiming at at that moment

Endpoints (``DEST``, ``BIND``) are ``host:port`` (UDP; ``[v6]:port``) or a Unix datagram
socket path (anything containing a ``/``, e.g. ``./g.sock`` or ``/run/app.sock``).
"""

from __future__ import annotations

import argparse
import math
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "MAGIC",
    "MAX_SIZE",
    "PROBE",
    "Endpoint",
    "GaugeError",
    "Probe",
    "pack_probe",
    "parse_endpoint",
    "register_gauge",
    "unpack_probe",
]

MAGIC = b"WGP1"
PROBE = struct.Struct("!4sQQd")
#: largest probe (the largest UDP payload over IPv4)
MAX_SIZE = 65507

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2


class GaugeError(Exception):
    """A gauge command cannot go on; the message is one line for users."""


class Probe(NamedTuple):
    seq: int
    send_ns: int
    target_rate: float


def pack_probe(seq: int, send_ns: int, target_rate: float, size: int = PROBE.size) -> bytes:
    """One probe datagram of ``size`` bytes (≥ the header's 28)."""
    header = PROBE.pack(MAGIC, seq, send_ns, target_rate)
    return header + bytes(max(0, size - len(header)))


def unpack_probe(data: bytes | bytearray | memoryview) -> Probe | None:
    """The probe in ``data``, or None if it is not one (too short, wrong magic)."""
    if len(data) < PROBE.size:
        return None
    magic, seq, send_ns, target = PROBE.unpack_from(data)
    if magic != MAGIC:
        return None
    return Probe(seq, send_ns, target)


@dataclass(frozen=True)
class Endpoint:
    """A UDP ``host:port`` or a Unix datagram socket ``path``."""

    kind: str  # "udp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def family(self) -> int:
        if self.kind == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def address(self) -> Any:
        """The socket address (for ``bind``/``sendto``)."""
        return self.path if self.kind == "unix" else (self.host, self.port)

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str, *, bind: bool = False) -> Endpoint:
    """``host:port`` / ``[v6]:port`` (UDP) or a path containing ``/`` (Unix datagram socket).

    Host names are resolved here (the gauge measures a link, not DNS). With ``bind``, port 0
    and the wildcard hosts are allowed.
    """
    if "/" in text:
        return Endpoint("unix", path=text)
    from warp.config import parse_host_port

    if bind and text.rpartition(":")[2] == "0":
        host = text.rpartition(":")[0].strip("[]")
        port = 0
    else:
        try:
            host, port = parse_host_port(text)
        except ValueError as exc:
            raise GaugeError(
                f"{text!r}: {exc} (or give a Unix socket path containing '/', like ./g.sock)"
            ) from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise GaugeError(f"cannot resolve {host!r}: {exc.strerror}") from None
    address = str(infos[0][4][0])
    return Endpoint("udp", host=address, port=port)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_rate_arg(text: str, size: int) -> float:
    """A rate option: a number of datagrams/s, or bits/s with a unit (``10Mbit``) at ``size``."""
    try:
        value = float(text)
    except ValueError:
        from warp.config import parse_rate

        try:
            bits = parse_rate(text)
        except ValueError as exc:
            raise GaugeError(f"{exc}; or give datagrams/s as a plain number") from None
        if bits is None:
            raise GaugeError("a gauge rate cannot be unlimited") from None
        value = bits / (8 * size)
    if not math.isfinite(value) or value < 0:
        raise GaugeError(f"a rate must be ≥ 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not PROBE.size <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be {PROBE.size}..{MAX_SIZE} bytes, got {value}")
    return value


def _fail(exc: Exception) -> None:
    print(f"warp gauge: error: {exc}", file=sys.stderr)


def _run_tx(args: argparse.Namespace) -> int:
    from warp.gauge.tx import Schedule, run_tx

    try:
        dest = parse_endpoint(args.dest)
        if args.rate is not None:
            if args.peak is not None or args.base is not None or args.period is not None:
                raise GaugeError("give either --rate (steady) or --peak/--base/--period (sawtooth)")
            schedule = Schedule.steady(parse_rate_arg(args.rate, args.size))
        elif args.peak is not None:
            if args.period is None:
                raise GaugeError("a sawtooth needs --period (seconds from --base up to --peak)")
            base = parse_rate_arg(args.base, args.size) if args.base is not None else 0.0
            peak = parse_rate_arg(args.peak, args.size)
            if peak < base:
                raise GaugeError(f"--peak ({args.peak}) is below --base ({args.base})")
            schedule = Schedule.sawtooth(base, peak, args.period)
        else:
            raise GaugeError("give --rate R (steady) or --peak P --period T [--base B] (sawtooth)")
        if schedule.peak <= 0:
            raise GaugeError("the rate is 0: nothing would be sent")
    except GaugeError as exc:
        _fail(exc)
        return EXIT_USAGE
    try:
        result = run_tx(dest, schedule, duration=args.duration, size=args.size)
    except GaugeError as exc:
        _fail(exc)
        return EXIT_RUNTIME
    print(result.summary())
    if result.sent == 0:
        _fail(GaugeError(f"nothing could be sent to {dest} ({result.first_error})"))
        return EXIT_RUNTIME
    return EXIT_OK


def _run_rx(args: argparse.Namespace) -> int:
    from warp.gauge.rx import run_rx

    try:
        bind = parse_endpoint(args.bind, bind=True)
    except GaugeError as exc:
        _fail(exc)
        return EXIT_USAGE
    try:
        result = run_rx(
            bind,
            args.out,
            duration=args.duration,
            idle=args.idle,
            window=args.window,
            handle_signals=True,
        )
    except GaugeError as exc:
        _fail(exc)
        return EXIT_RUNTIME
    print(result.summary(), file=sys.stderr)
    return EXIT_OK


def _run_report(args: argparse.Namespace) -> int:
    from warp.gauge.report import ReportError, load_csv, plot, summarize

    try:
        records = load_csv(args.csv)
        report = summarize(records)
    except ReportError as exc:
        _fail(exc)
        return EXIT_USAGE
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text(args.csv))
    if args.plots:
        try:
            files = plot(records, args.plots)
        except OSError as exc:
            _fail(GaugeError(f"cannot write plots to {args.plots}: {exc.strerror or exc}"))
            return EXIT_RUNTIME
        print("plots: " + ", ".join(files), file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


_DESCRIPTION = (
    "Measure the one-way quality of a link or a tunnel: `tx` sends sequence-numbered, "
    "timestamped probes (steady or sawtooth rate) to a UDP address or a Unix datagram socket; "
    "`rx` records every arrival to a CSV; `report` prints loss, reorder and latency "
    "percentiles from the CSV and draws PNG plots. See docs/gauge.md."
)


def register_gauge(subparsers: Any) -> None:
    """Add ``gauge tx|rx|report`` to the ``warp`` command."""
    parser = subparsers.add_parser(
        "gauge",
        help="measure one-way loss, reorder and latency of a link or tunnel",
        description=_DESCRIPTION,
        epilog="Exit codes: 0 success, 1 usage error, 2 runtime failure.",
    )
    commands = parser.add_subparsers(title="gauge commands", metavar="tx|rx|report")
    parser.set_defaults(handler=lambda _args: (parser.print_help(sys.stderr), EXIT_USAGE)[1])

    tx = commands.add_parser(
        "tx",
        help="send probes",
        description="Send probes to DEST: steady with --rate, or a sawtooth from --base up to "
        "--peak over each --period. Rates are datagrams/s, or bits/s of UDP payload with a "
        "unit (10Mbit, 500kbit, 2MB/s) at --size bytes per probe.",
    )
    tx.add_argument("dest", metavar="DEST", help="host:port (UDP) or a Unix socket path with '/'")
    tx.add_argument("--rate", help="steady rate")
    tx.add_argument("--peak", help="sawtooth: the top rate")
    tx.add_argument("--base", help="sawtooth: the bottom rate (default 0)")
    tx.add_argument("--period", type=_positive, metavar="SECONDS", help="sawtooth period")
    tx.add_argument(
        "--duration", type=_positive, default=10.0, metavar="SECONDS", help="default 10"
    )
    tx.add_argument(
        "--size", type=_size, default=1200, metavar="BYTES", help="probe size (default 1200)"
    )
    tx.set_defaults(handler=_run_tx)

    rx = commands.add_parser(
        "rx",
        help="record probes to a CSV",
        description="Receive probes on BIND and write one CSV row per arrival to OUT.csv "
        "(counter, seq, send and arrival time, one-way latency, target and achieved rate). "
        "Stops after --duration, after --idle seconds without probes once some arrived, "
        "or on Ctrl-C/SIGTERM.",
    )
    rx.add_argument("bind", metavar="BIND", help="host:port (UDP) or a Unix socket path with '/'")
    rx.add_argument("out", metavar="OUT.csv", help="the CSV to write")
    rx.add_argument("--duration", type=_positive, metavar="SECONDS", help="stop after this long")
    rx.add_argument(
        "--idle", type=_positive, metavar="SECONDS", help="stop after this long without probes"
    )
    rx.add_argument(
        "--window",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="window of the achieved rate (default 1)",
    )
    rx.set_defaults(handler=_run_rx)

    report = commands.add_parser(
        "report",
        help="summarize a CSV and draw plots",
        description="Print loss %, reorder %, latency percentiles (p50, p90, p99, max, above "
        "the minimum latency, which removes the clock offset between hosts) of an rx CSV; with "
        "--plots, draw rate.png, latency.png, latency_histogram.png and latency_vs_rate.png.",
    )
    report.add_argument("csv", metavar="OUT.csv", help="a CSV written by `warp gauge rx`")
    report.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    report.add_argument("--json", action="store_true", help="print the figures as JSON")
    report.set_defaults(handler=_run_report)
