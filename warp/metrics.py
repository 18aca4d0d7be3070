"""Prometheus metrics of a running gateway (``[metrics] listen = "host:port"``).

Nothing here keeps its own counters: a custom collector (`SnapshotCollector`) turns the
gateway's `StatusSnapshot` (warp/status.py, the same dict ``warp status --json`` prints)
into metric families at scrape time. The HTTP server is ``prometheus_client``'s, on a
private `CollectorRegistry`, in a daemon thread.

Thread safety: the HTTP thread must not call into the event loop's objects. The gateway
therefore keeps a `SnapshotCache` that it refreshes on its own loop (once a second) and the
collector only reads the cached copy. `start_gateway_metrics` wires that up:

    exporter = start_gateway_metrics(config.metrics.listen, self.snapshot)   # on the loop
    tg.create_task(exporter.refresh_forever())                                # in the TaskGroup
    ...
    exporter.close()                                                          # at shutdown

See docs/metrics.md for every metric and label.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "PATH_STATES",
    "MetricsError",
    "MetricsExporter",
    "MetricsServer",
    "SnapshotCache",
    "SnapshotCollector",
    "snapshot_metrics",
    "start_gateway_metrics",
    "start_metrics_server",
]

#: a function returning the current snapshot (a `StatusSnapshot` mapping), or None if none yet
SnapshotSource: TypeAlias = Callable[[], Mapping[str, Any] | None]

PATH_STATES = ("probing", "active", "dead")
HANDSHAKE_STATES = ("none", "initiating", "established", "expired")


class MetricsError(Exception):
    """The metrics endpoint cannot be started; the message is one line for users."""


# ---------------------------------------------------------------------------------------------
# Snapshot → metric families


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _rows(snapshot: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = snapshot.get(key)
    if not isinstance(value, list):
        return []
    return [row for row in value if isinstance(row, Mapping)]


class _Families:
    """Families created on demand, yielded in creation order."""

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
        family = self._families.get(name)
        if family is None:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            self._families[name] = family
        assert isinstance(family, GaugeMetricFamily)
        return family

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
        family = self._families.get(name)
        if family is None:
            family = CounterMetricFamily(name, doc, labels=list(labels))
            self._families[name] = family
        assert isinstance(family, CounterMetricFamily)
        return family

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def snapshot_metrics(snapshot: Mapping[str, Any], *, age_s: float | None = None) -> list[Metric]:
    """The metric families of one `StatusSnapshot` (missing or malformed fields are skipped)."""
    f = _Families()
    f.gauge("warp_up", "1 when the gateway provided a status snapshot").add_metric([], 1)
    f.gauge(
        "warp_info",
        "Constant 1, labelled with the gateway's version and public key",
        ["version", "public_key"],
    ).add_metric([str(snapshot.get("version", "")), str(snapshot.get("public_key", ""))], 1)
    uptime = _number(snapshot.get("uptime_s"))
    if uptime is not None:
        f.gauge("warp_uptime_seconds", "Seconds since the gateway started").add_metric([], uptime)
    if age_s is not None:
        f.gauge(
            "warp_metrics_snapshot_age_seconds",
            "Age of the status snapshot these metrics were read from (refreshed every second)",
        ).add_metric([], age_s)

    path_labels = ["uplink", "remote"]
    for path in _rows(snapshot, "paths"):
        labels = [str(path.get("uplink", "")), str(path.get("remote_address", ""))]
        state = str(path.get("state", ""))
        state_family = f.gauge(
            "warp_path_state",
            "1 for the path's current state (probing, active, dead), 0 for the others",
            [*path_labels, "state"],
        )
        for name in (*PATH_STATES, *([state] if state not in PATH_STATES else [])):
            state_family.add_metric([*labels, name], 1.0 if name == state else 0.0)
        rtt_ms = _number(path.get("rtt_ms"))
        rtt = f.gauge("warp_path_rtt_seconds", "Smoothed probe round-trip time", path_labels)
        if rtt_ms is not None:
            rtt.add_metric(labels, rtt_ms / 1000.0)
        loss_pct = _number(path.get("loss_pct"))
        loss = f.gauge(
            "warp_path_loss_ratio", "Probe loss over the recent window (0 to 1)", path_labels
        )
        if loss_pct is not None:
            loss.add_metric(labels, loss_pct / 100.0)
        age = _number(path.get("last_rx_age_s"))
        last_rx = f.gauge(
            "warp_path_last_rx_age_seconds",
            "Seconds since the last authenticated packet on the path",
            path_labels,
        )
        if age is not None:
            last_rx.add_metric(labels, age)
        for field, name, doc in (
            ("tx_bytes", "warp_path_sent_bytes", "UDP payload bytes sent on the path"),
            ("rx_bytes", "warp_path_received_bytes", "UDP payload bytes received on the path"),
            ("tx_packets", "warp_path_sent_packets", "Packets sent on the path"),
            ("rx_packets", "warp_path_received_packets", "Packets received on the path"),
        ):
            value = _number(path.get(field))
            family = f.counter(name, doc, path_labels)
            if value is not None:
                family.add_metric(labels, value)

    for uplink in _rows(snapshot, "uplinks"):
        name = str(uplink.get("name", ""))
        f.gauge("warp_uplink_up", "1 when the uplink socket is up", ["uplink"]).add_metric(
            [name], 1.0 if uplink.get("state") == "up" else 0.0
        )
        errors = _number(uplink.get("send_errors"))
        family = f.counter("warp_uplink_send_errors", "Local send errors", ["uplink"])
        if errors is not None:
            family.add_metric([name], errors)

    for tunnel in _rows(snapshot, "tunnels"):
        name = str(tunnel.get("name", ""))
        gate = tunnel.get("gate") if isinstance(tunnel.get("gate"), Mapping) else {}
        assert isinstance(gate, Mapping)
        f.gauge(
            "warp_tunnel_info",
            "Constant 1, labelled with the tunnel's id and gate",
            ["tunnel", "tunnel_id", "gate_kind", "gate_address"],
        ).add_metric(
            [
                name,
                str(tunnel.get("tunnel_id", "")),
                str(gate.get("kind", "")),
                str(gate.get("address", "")),
            ],
            1,
        )
        datagrams = f.counter(
            "warp_tunnel_datagrams",
            "Datagrams through the gate; direction in = application to tunnel, "
            "out = tunnel to application",
            ["tunnel", "direction"],
        )
        data_bytes = f.counter(
            "warp_tunnel_bytes",
            "Bytes through the gate; direction in = application to tunnel, "
            "out = tunnel to application",
            ["tunnel", "direction"],
        )
        for direction in ("in", "out"):
            count = _number(tunnel.get(f"datagrams_{direction}"))
            if count is not None:
                datagrams.add_metric([name, direction], count)
            size = _number(tunnel.get(f"bytes_{direction}"))
            if size is not None:
                data_bytes.add_metric([name, direction], size)
        rebuilt = _number(tunnel.get("blocks_rebuilt"))
        family = f.counter(
            "warp_tunnel_blocks_rebuilt",
            "FEC repairs: received blocks rebuilt with parity because a data shard never "
            "arrived (0 on a clean link)",
            ["tunnel"],
        )
        if rebuilt is not None:
            family.add_metric([name], rebuilt)
        surplus = _number(tunnel.get("surplus_shards"))
        family = f.counter(
            "warp_tunnel_surplus_shards",
            "Shards received after their block was already rebuilt: parity the link did not "
            "need (normal, not a drop)",
            ["tunnel"],
        )
        if surplus is not None:
            family.add_metric([name], surplus)
        lost = _number(tunnel.get("datagrams_lost"))
        family = f.counter(
            "warp_tunnel_datagrams_lost",
            "Datagrams from the far gate that the application did not get, each counted once",
            ["tunnel"],
        )
        if lost is not None:
            family.add_metric([name], lost)
        drops = f.counter(
            "warp_tunnel_drops",
            "Real drops by reason (surplus shards are not drops)",
            ["tunnel", "reason"],
        )
        raw_drops = tunnel.get("drops")
        if isinstance(raw_drops, Mapping):
            for reason, count in sorted(raw_drops.items()):
                value = _number(count)
                if value is not None:
                    drops.add_metric([name, str(reason)], value)

    session = snapshot.get("session")
    if isinstance(session, Mapping):
        state = str(session.get("handshake_state", ""))
        handshake = f.gauge(
            "warp_session_handshake_state",
            "1 for the far gate session's current handshake state, 0 for the others",
            ["far_gate", "state"],
        )
        far = str(session.get("far_gate", ""))
        for name in (*HANDSHAKE_STATES, *([state] if state not in HANDSHAKE_STATES else [])):
            handshake.add_metric([far, name], 1.0 if name == state else 0.0)
        age = _number(session.get("last_handshake_age_s"))
        if age is not None:
            f.gauge(
                "warp_session_last_handshake_age_seconds",
                "Seconds since the last completed handshake with the far gate",
            ).add_metric([], age)
        rekeys = _number(session.get("rekeys"))
        if rekeys is not None:
            f.counter(
                "warp_session_rekeys", "Handshakes completed while a session was established"
            ).add_metric([], rekeys)
        handshakes = _number(session.get("handshakes"))
        if handshakes is not None:
            f.counter(
                "warp_session_handshakes", "Handshakes completed with the far gate"
            ).add_metric([], handshakes)

    map_status = snapshot.get("map")
    if isinstance(map_status, Mapping):
        address = str(map_status.get("address", ""))
        f.gauge(
            "warp_map_registered",
            "1 when at least one uplink holds a live registration with warp-map",
            ["map"],
        ).add_metric([address], 1.0 if map_status.get("registered") else 0.0)
        reflexive = map_status.get("reflexive")
        if isinstance(reflexive, Mapping):
            uplinks = f.gauge(
                "warp_map_uplink_registered",
                "1 when warp-map told this uplink its reflexive (public) address",
                ["map", "uplink", "reflexive"],
            )
            for uplink_name, public in sorted(reflexive.items(), key=lambda kv: str(kv[0])):
                uplinks.add_metric(
                    [address, str(uplink_name), "" if public is None else str(public)],
                    0.0 if public is None else 1.0,
                )
        age = _number(map_status.get("last_registration_age_s"))
        if age is not None:
            f.gauge(
                "warp_map_last_registration_age_seconds",
                "Seconds since warp-map last acknowledged a registration",
                ["map"],
            ).add_metric([address], age)

    counters = snapshot.get("counters")
    if isinstance(counters, Mapping):
        family = f.counter(
            "warp_gateway_events",
            "Gateway-level events, mostly drops (unknown_frame, unknown_tunnel, send_failed, "
            "no_session, no_path)",
            ["event"],
        )
        for event, count in sorted(counters.items(), key=lambda kv: str(kv[0])):
            value = _number(count)
            if value is not None:
                family.add_metric([str(event)], value)
    return list(f)


class SnapshotCollector(Collector):
    """A ``prometheus_client`` collector that reads ``snapshot()`` at every scrape.

    ``snapshot`` is called from the HTTP server's thread: give it a thread-safe callable
    (a `SnapshotCache`). When it returns None or raises, only ``warp_up 0`` is exported.
    """

    def __init__(self, snapshot: SnapshotSource, age: Callable[[], float | None] | None = None):
        self._snapshot = snapshot
        self._age = age

    def describe(self) -> Iterable[Metric]:
        # No fixed set of families (they depend on the snapshot): the registry must not call
        # collect() at registration time.
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            snapshot = self._snapshot()
        except Exception:
            snapshot = None
        if snapshot is None:
            down = GaugeMetricFamily("warp_up", "1 when the gateway provided a status snapshot")
            down.add_metric([], 0)
            return [down]
        return snapshot_metrics(snapshot, age_s=self._age() if self._age else None)


class SnapshotCache:
    """The latest snapshot, written on the event loop and read from any thread.

    `update` stores a deep copy (one reference assignment, atomic under the GIL); calling the
    cache returns it (None before the first update).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entry: tuple[float, Mapping[str, Any]] | None = None

    def update(self, snapshot: Mapping[str, Any]) -> None:
        self._entry = (self._clock(), copy.deepcopy(dict(snapshot)))

    def __call__(self) -> Mapping[str, Any] | None:
        entry = self._entry
        return None if entry is None else entry[1]

    def age(self) -> float | None:
        """Seconds since the last `update` (None before the first)."""
        entry = self._entry
        return None if entry is None else max(0.0, self._clock() - entry[0])


# ---------------------------------------------------------------------------------------------
# HTTP server


class MetricsServer:
    """A running ``/metrics`` endpoint (`start_metrics_server`). `close` is idempotent."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, registry: CollectorRegistry):
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        address = httpd.server_address
        self.host = str(address[0])
        self.port = int(address[1])
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def start_metrics_server(
    host: str,
    port: int,
    snapshot: SnapshotSource,
    *,
    age: Callable[[], float | None] | None = None,
    poll_interval: float = 0.05,
) -> MetricsServer:
    """Serve ``snapshot()`` as Prometheus metrics on ``http://host:port/metrics`` (port 0: any).

    ``snapshot`` is called from the server's thread at each scrape. Raises `MetricsError`
    (one line) when the address cannot be bound.

    This is ``prometheus_client.start_http_server`` (its WSGI app and threading server on a
    private registry), except that the serving thread polls for shutdown every
    ``poll_interval`` instead of 0.5 s, so `MetricsServer.close` does not stall the caller.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, age))
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server_class = _Server6 if ":" in host else _Server
        httpd = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {shown}: {exc.strerror or exc}") from None
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": poll_interval},
        name=f"warp-metrics-{httpd.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(httpd, thread, registry)


class MetricsExporter:
    """A gateway's metrics endpoint: a `SnapshotCache` refreshed on the loop + the server."""

    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any]], server: MetricsServer,
        cache: SnapshotCache, interval: float,
    ) -> None:  # fmt: skip
        self._snapshot = snapshot
        self.server = server
        self.cache = cache
        self.interval = interval

    def refresh(self) -> None:
        """Take a snapshot now (call on the event loop)."""
        self.cache.update(self._snapshot())

    async def refresh_forever(self) -> None:
        """Refresh the cache every ``interval`` seconds until cancelled (run in the TaskGroup).

        A failing ``snapshot()`` keeps the previous copy (its age grows in
        ``warp_metrics_snapshot_age_seconds``); it never ends the task.
        """
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(Exception):
                self.refresh()

    def close(self) -> None:
        self.server.close()


def start_gateway_metrics(
    address: Any, snapshot: Callable[[], Mapping[str, Any]], *, interval: float = 1.0
) -> MetricsExporter:
    """Start the endpoint of ``[metrics] listen`` (a `HostPort`, or ``(host, port)``).

    Call on the event loop: it takes the first snapshot at once (so the first scrape has
    data), then binds. Raises `MetricsError` (one line) if the address is taken.
    """
    host, port = address[0], int(address[1])
    cache = SnapshotCache()
    cache.update(snapshot())
    server = start_metrics_server(str(host), port, cache, age=cache.age)
    return MetricsExporter(snapshot, server, cache, interval)
