"""Operator tools in the lab: `warp gauge` against a known loss, and a Prometheus scrape of two
running gateways.

* `test_gauge_measures_configured_loss`: site "a" with one uplink (cone NAT), a public host;
  5 % loss on the uplink's upstream direction (nftables random drop: this kernel has no
  netem); `warp gauge tx` 20 000 probes at 4000/s straight to `warp gauge rx` on the public
  host (a plain path, no FEC, so the measured loss is the configured one), `warp gauge report
  --json`: loss within 5 ± 1.5 %.
* `test_gauge_through_warp_fec_residual_loss`: the same 5 % loss on both uplinks of site "a",
  but the probes go through a warp tunnel with FEC (the full-warp configs of
  `warp migrate-engarde`, (k, n) = (3, 5), a → public host): the residual loss is far lower.
* `test_metrics_scrape_matches_status`: the two-site harness of test_gateway.py (map, cone
  NAT, two uplinks each), both `warp run` with `[metrics] listen = "127.0.0.1:9716"` in their
  own namespace; each endpoint is scraped from inside its namespace, parsed with
  prometheus_client's parser, and shows exactly the paths and tunnels of `warp status`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.lab.netlab import Lab
from tests.lab.test_engarde_wire import GATE_PORT, WG_PORT, Setup, setup  # noqa: F401
from tests.lab.test_gateway import ROOT, WARP, Net, loopback_gate, net  # noqa: F401

GAUGE_PORT = 7000
METRICS = "127.0.0.1:9716"
SCRAPE = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
)


def test_gauge_measures_configured_loss(lab: Lab) -> None:
    a = lab.add_site("a", "cone", uplinks=1)
    srv = lab.add_public_host("srv")
    up1 = a.uplink("up1")
    up1.impair(loss_pct=5.0, direction="up")
    csv = lab.workdir / "gauge.csv"
    rx = lab.spawn(
        srv.ns,
        [*WARP, "gauge", "rx", f"{srv.address}:{GAUGE_PORT}", str(csv), "--duration", "30",
         "--idle", "2"],
        45, stdout=(lab.workdir / "rx.log").open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not lab.run(srv.ns, ["ss", "-Hlun", "sport", "=", f":{GAUGE_PORT}"]).stdout.strip():
            assert time.monotonic() < deadline and rx.poll() is None, "gauge rx not up"
            time.sleep(0.05)
        tx = lab.run(
            a.host_ns,
            [*WARP, "gauge", "tx", f"{srv.address}:{GAUGE_PORT}", "--rate", "4000",
             "--duration", "5", "--size", "200"],
            30,
        )  # fmt: skip
        rx.wait(timeout=30)
    finally:
        lab.stop(rx)
    report = json.loads(
        subprocess.run(
            [*WARP, "gauge", "report", str(csv), "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )  # fmt: skip
    print(f"\ngauge over up1 with 5 % nftables loss: expected {report['expected']}, "
          f"received {report['received']}, loss {report['loss_pct']:.2f} %; "
          f"tx: {tx.stdout.strip()}")  # fmt: skip
    assert report["expected"] >= 19_000, report
    assert 3.5 <= report["loss_pct"] <= 6.5, report


def _gauge(lab: Lab, tx_ns: str, rx_ns: str, dest: str, bind: str, rate: int, seconds: int
           ) -> dict[str, float]:  # fmt: skip
    csv = lab.workdir / "gauge.csv"
    port = bind.rsplit(":", 1)[1]
    rx = lab.spawn(
        rx_ns, [*WARP, "gauge", "rx", bind, str(csv), "--duration", "30", "--idle", "2"],
        45, stdout=(lab.workdir / "rx.log").open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not lab.run(rx_ns, ["ss", "-Hlun", "sport", "=", f":{port}"]).stdout.strip():
            assert time.monotonic() < deadline and rx.poll() is None, "gauge rx not up"
            time.sleep(0.05)
        lab.run(tx_ns, [*WARP, "gauge", "tx", dest, "--rate", str(rate), "--duration",
                        str(seconds), "--size", "200"], seconds + 25)  # fmt: skip
        rx.wait(timeout=30)
    finally:
        lab.stop(rx)
    report: dict[str, float] = json.loads(
        subprocess.run([*WARP, "gauge", "report", str(csv), "--json"], capture_output=True,
                       text=True, timeout=60, check=True).stdout
    )  # fmt: skip
    return report


def test_gauge_through_warp_fec_residual_loss(setup: Setup) -> None:  # noqa: F811
    s = setup
    s.full_warp_pair()
    deadline = time.monotonic() + 10
    while s.status("a")["session"]["handshake_state"] != "established":
        assert time.monotonic() < deadline, s.status("a")
        time.sleep(0.05)
    for up in s.lab.sites["a"].uplinks:
        up.impair(loss_pct=5.0, direction="up")
    report = _gauge(s.lab, s.ns["a"], s.ns["srv"], f"127.0.0.1:{GATE_PORT}",
                    f"127.0.0.1:{WG_PORT}", 2000, 5)  # fmt: skip
    (tunnel,) = s.status("srv")["tunnels"]
    print(f"\ngauge through warp (3, 5) FEC, 5 % loss on both uplinks: expected "
          f"{report['expected']}, received {report['received']}, residual loss "
          f"{report['loss_pct']:.3f} %; server blocks rebuilt {tunnel['blocks_rebuilt']}, "
          f"lost {tunnel['datagrams_lost']}")  # fmt: skip
    assert report["expected"] >= 9_500, report
    assert report["loss_pct"] < 1.0, report
    assert tunnel["blocks_rebuilt"] > 0


def _scrape(lab: Lab, ns: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = lab.run(ns, [sys.executable, "-c", SCRAPE, f"http://{METRICS}/metrics"]).stdout
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def test_metrics_scrape_matches_status(net: Net) -> None:  # noqa: F811
    extra = f'[metrics]\nlisten = "{METRICS}"\n'
    for name in ("a", "b"):
        net.write_config(name, loopback_gate(), k=2, n=4, extra=extra)
    net.start("a")
    net.wait_registered("a")
    net.start("b")
    net.wait_paths("a", 4)
    net.wait_paths("b", 4)
    time.sleep(1.2)  # the exporter refreshes its snapshot every second
    for name, gw in net.gws.items():
        status = gw.status()
        samples = _scrape(net.lab, gw.site.host_ns)
        active = {
            (p["uplink"], p["remote_address"]) for p in status["paths"] if p["state"] == "active"
        }
        scraped = {
            (labels["uplink"], labels["remote"])
            for labels, value in samples["warp_path_state"]
            if labels["state"] == "active" and value == 1
        }
        tunnels = {labels["tunnel"] for labels, _ in samples["warp_tunnel_info"]}
        sent = {
            (labels["uplink"], labels["remote"]): value
            for labels, value in samples["warp_path_sent_packets_total"]
        }
        print(f"\n{name}: status active paths {sorted(active)}; scraped {sorted(scraped)}; "
              f"tunnels {sorted(tunnels)}; sent packets {sent}")  # fmt: skip
        assert scraped == active and len(active) == 4
        assert tunnels == {t["name"] for t in status["tunnels"]} == {"app"}
        assert samples["warp_up"] == [({}, 1.0)]
        assert all(value > 0 for value in sent.values())
