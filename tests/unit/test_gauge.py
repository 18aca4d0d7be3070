"""warp gauge: probe format, schedules, the report's figures on a synthetic CSV, and real
tx → rx runs over loopback UDP and a Unix datagram socket (temp dir), in process and through
the `warp` command."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from warp.gauge import GaugeError, pack_probe, parse_endpoint, unpack_probe
from warp.gauge.report import PLOTS, load_csv, percentile, plot, summarize
from warp.gauge.rx import CSV_COLUMNS, RxResult, run_rx
from warp.gauge.tx import Schedule, TxResult, run_tx

WARP = [sys.executable, "-m", "warp.cli"]


# ---------------------------------------------------------------------------------------------
# Probe format and schedules


def test_probe_round_trip_and_garbage() -> None:
    data = pack_probe(7, 123_456_789, 1000.5, size=100)
    assert len(data) == 100
    probe = unpack_probe(data)
    assert probe is not None
    assert (probe.seq, probe.send_ns, probe.target_rate) == (7, 123_456_789, 1000.5)
    assert unpack_probe(b"short") is None
    assert unpack_probe(b"XXXX" + data[4:]) is None


def test_steady_and_sawtooth_schedules() -> None:
    steady = Schedule.steady(1000)
    assert steady.rate(0.3) == 1000
    assert steady.count(1.5) == pytest.approx(1500)
    saw = Schedule.sawtooth(100, 1100, 2.0)
    assert saw.rate(0.0) == 100
    assert saw.rate(1.0) == pytest.approx(600)
    assert saw.rate(2.5) == pytest.approx(350)
    # the count is the integral of the rate: compare with a fine Riemann sum
    for t in (0.7, 2.0, 3.3, 5.0):
        steps = 20000
        numeric = sum(saw.rate((i + 0.5) * t / steps) for i in range(steps)) * t / steps
        assert saw.count(t) == pytest.approx(numeric, rel=1e-3)
    assert saw.count(2.0) == pytest.approx(1200)  # one full period: mean 600/s × 2 s


def test_endpoints() -> None:
    udp = parse_endpoint("127.0.0.1:9000")
    assert (udp.kind, udp.address) == ("udp", ("127.0.0.1", 9000))
    assert parse_endpoint("[::1]:9000").address == ("::1", 9000)
    assert parse_endpoint("./g.sock").address == "./g.sock"
    assert parse_endpoint("127.0.0.1:0", bind=True).port == 0
    with pytest.raises(GaugeError):
        parse_endpoint("no-port-here")


def test_nearest_rank_percentile() -> None:
    values = list(range(1, 11))
    assert percentile(values, 50) == 5
    assert percentile(values, 90) == 9
    assert percentile(values, 99) == 10
    assert percentile([42], 50) == 42


# ---------------------------------------------------------------------------------------------
# report on a synthetic CSV with known loss, reordering and latency

T0 = 1_700_000_000_000_000_000
OFFSET_NS = -3_200_000  # the receiver's clock is 3.2 ms behind the sender's


def synthetic_csv(path: Path) -> None:
    """100 probes (seq 0..99) at 1000/s; 10, 20, 30, 40 lost; 50 duplicated; 61 overtakes 60
    and 75 overtakes 70. The 96 first arrivals have latencies (above the minimum)
    0.0, 0.1, …, 9.5 ms in a shuffled order; the duplicate comes 20 ms late."""
    order = [s for s in range(100) if s not in (10, 20, 30, 40)]
    order.remove(61)
    order.insert(order.index(60), 61)
    order.remove(75)
    order.insert(order.index(70), 75)
    extra = [k * 100_000 for k in range(96)]
    random.Random(7).shuffle(extra)
    rows = []
    for index, seq in enumerate(order):
        send = T0 + seq * 1_000_000
        rows.append((seq, send, send + OFFSET_NS + extra[index]))
        if seq == 50:
            rows.append((seq, send, send + OFFSET_NS + 20_000_000))
    rows.sort(key=lambda row: row[2])  # the CSV is in arrival order
    with path.open("w") as out:
        out.write(",".join(CSV_COLUMNS) + "\n")
        for counter, (seq, send, arrival) in enumerate(rows, 1):
            latency = (arrival - send) / 1e6
            out.write(f"{counter},{seq},{send},{arrival},{latency:.6f},1000.000,,1200\n")


def test_report_figures_are_exact(tmp_path: Path) -> None:
    csv_path = tmp_path / "run.csv"
    synthetic_csv(csv_path)
    records = load_csv(csv_path)
    report = summarize(records)
    assert (report.expected, report.received, report.unique, report.duplicates) == (100, 97, 96, 1)
    assert report.lost == 4
    assert report.loss_pct == pytest.approx(4.0)
    # reordered: seqs that arrive after a higher one (the latency shuffle reorders too)
    arrivals = [r.seq for r in records]
    firsts: list[int] = []
    for seq in arrivals:
        if seq not in firsts:
            firsts.append(seq)
    expected_reordered = sum(1 for i, s in enumerate(firsts) if i and s < max(firsts[:i]))
    assert report.reordered == expected_reordered > 0
    # nearest rank over 0.0 .. 9.5 ms (96 values): ranks 48, 87, 96
    assert (report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms) == pytest.approx(
        (4.7, 8.6, 9.5, 9.5)
    )
    assert report.min_latency_ms == pytest.approx(-3.2)

    result = subprocess.run(
        [*WARP, "gauge", "report", str(csv_path), "--plots", str(tmp_path / "plots")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    span = (max(r.arrival_ns for r in records) - min(r.arrival_ns for r in records)) / 1e9
    reorder_pct = 100 * expected_reordered / 96
    assert lines[:7] == [
        f"warp gauge report: {csv_path}",
        "datagrams: 100 expected (max seq + 1), 97 received, 96 unique, 1 duplicates",
        "loss: 4.00 % (4 of 100)",
        f"reorder: {reorder_pct:.2f} % ({expected_reordered} of 96 arrived after a higher seq)",
        "latency above the minimum, ms: p50 4.700  p90 8.600  p99 9.500  max 9.500",
        "minimum one-way latency: -3.200 ms (includes any clock offset between sender and "
        "receiver)",
        f"rate, datagrams/s: target mean 1000.0, achieved {96 / span:.1f} over {span:.2f} s",
    ]
    for name in PLOTS:
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_reordering_or_loss(tmp_path: Path) -> None:
    """Exact figures on a hand-written file: in order, no loss, latencies 1..10 ms."""
    csv_path = tmp_path / "clean.csv"
    lines = [",".join(CSV_COLUMNS)]
    for seq in range(10):
        send = T0 + seq * 10_000_000
        arrival = send + (seq + 1) * 1_000_000
        lines.append(f"{seq + 1},{seq},{send},{arrival},{(arrival - send) / 1e6},100,,64")
    csv_path.write_text("\n".join(lines) + "\n")
    report = summarize(load_csv(csv_path))
    assert (report.loss_pct, report.reorder_pct, report.duplicates) == (0.0, 0.0, 0)
    assert report.min_latency_ms == 1.0
    # above the minimum: 0..9 ms; nearest rank of 10 values: ranks 5, 9, 10
    assert (report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms) == (4.0, 8.0, 9.0, 9.0)
    assert report.target_rate_mean == 100.0


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(CSV_COLUMNS) + "\n")
    broken = tmp_path / "broken.csv"
    broken.write_text(",".join(CSV_COLUMNS) + "\n1,x,1,2,0.1,1,,64\n")
    for path, words in (
        (bad, "missing columns"),
        (empty, "no probes"),
        (broken, "line 2"),
        (tmp_path / "nope.csv", "no such file"),
    ):
        result = subprocess.run(
            [*WARP, "gauge", "report", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert words in result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# tx → rx for real (loopback UDP, Unix socket in a temp dir)


def run_pair(bind: str, dest: str, out: Path, schedule: Schedule, duration: float) -> TxResult:
    ready = threading.Event()
    stop = threading.Event()
    results: list[RxResult] = []
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            results.append(
                run_rx(parse_endpoint(bind, bind=True), str(out), stop=stop, ready=ready, idle=1.0)
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        assert ready.wait(5)
        assert not errors, errors
        sent = run_tx(parse_endpoint(dest), schedule, duration=duration, size=200)
    finally:
        thread.join(timeout=0.5)
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert not errors, errors
    assert results[0].received == sent.sent
    return sent


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("transport", ["udp", "unix"])
def test_steady_run_has_no_loss(tmp_path: Path, transport: str) -> None:
    if transport == "udp":
        port = free_udp_port()
        bind = dest = f"127.0.0.1:{port}"
    else:
        bind = dest = str(tmp_path / "g.sock")
    out = tmp_path / "steady.csv"
    sent = run_pair(bind, dest, out, Schedule.steady(1000), duration=1.0)
    assert sent.errors == 0
    assert 950 <= sent.sent <= 1001
    report = summarize(load_csv(out))
    assert report.loss_pct == 0.0
    assert report.duplicates == 0
    assert report.expected == sent.sent
    assert report.target_rate_mean == pytest.approx(1000)
    assert report.achieved_rate_mean == pytest.approx(1000, rel=0.1)
    if transport == "unix":
        assert not (tmp_path / "g.sock").exists()  # rx removed its socket file


@pytest.mark.parametrize("transport", ["udp", "unix"])
def test_sawtooth_run_has_no_loss(tmp_path: Path, transport: str) -> None:
    if transport == "udp":
        bind = dest = f"127.0.0.1:{free_udp_port()}"
    else:
        bind = dest = str(tmp_path / "g.sock")
    out = tmp_path / "saw.csv"
    schedule = Schedule.sawtooth(200, 2000, 0.5)
    sent = run_pair(bind, dest, out, schedule, duration=1.0)
    assert sent.sent == pytest.approx(schedule.count(1.0), abs=5)  # 1100
    records = load_csv(out)
    report = summarize(records)
    assert report.loss_pct == 0.0
    assert report.target_rate_mean == pytest.approx(1100, rel=0.05)
    assert report.achieved_rate_mean == pytest.approx(1100, rel=0.1)
    targets = [r.target_rate for r in records]
    assert min(targets) < 260 and max(targets) > 1900  # both ends of the ramp were sent


def test_cli_tx_rx_report_over_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    out = tmp_path / "cli.csv"
    rx = subprocess.Popen(
        [*WARP, "gauge", "rx", str(sock), str(out), "--duration", "20", "--idle", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            threading.Event().wait(0.05)
        assert sock.exists()
        tx = subprocess.run(
            [*WARP, "gauge", "tx", str(sock), "--rate", "1Mbit", "--size", "250", "--duration=1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert tx.returncode == 0, tx.stderr
        assert "steady 500/s" in tx.stdout  # 1 Mbit/s at 250 B = 500 datagrams/s
        _, rx_err = rx.communicate(timeout=30)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    assert rx.returncode == 0, rx_err
    assert "stopped by idle" in rx_err
    assert not sock.exists()
    report = subprocess.run(
        [*WARP, "gauge", "report", str(out), "--json"], capture_output=True, text=True, timeout=60
    )
    assert report.returncode == 0, report.stderr
    import json

    figures = json.loads(report.stdout)
    assert figures["loss_pct"] == 0.0
    assert 450 <= figures["received"] <= 501


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["tx", str(tmp_path / "nobody.sock"), "--rate", "10", "--duration", "0.2"], 2),
        (["tx", "127.0.0.1:9", "--duration", "0.2"], 1),
        (["tx", "127.0.0.1:9", "--rate", "10", "--peak", "20"], 1),
        (["tx", "127.0.0.1:9", "--peak", "20"], 1),
        (["tx", "127.0.0.1:9", "--rate", "fast"], 1),
        (["tx", "127.0.0.1:9", "--rate", "10", "--size", "3"], 1),
        (["rx", str(tmp_path / "missing-dir" / "g.sock"), str(tmp_path / "o.csv")], 2),
    ]
    for args, code in cases:
        result = subprocess.run([*WARP, "gauge", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == code, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(("warp gauge", "warp gauge:"))


def test_plot_writes_four_pngs(tmp_path: Path) -> None:
    csv_path = tmp_path / "run.csv"
    synthetic_csv(csv_path)
    files = plot(load_csv(csv_path), tmp_path / "p")
    assert [Path(f).name for f in files] == list(PLOTS)
    assert all(Path(f).stat().st_size > 1000 for f in files)
