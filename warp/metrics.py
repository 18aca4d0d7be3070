"""Prometheus metrics of a running gateway (``[metrics] listen = "host:port"``).

Nothing here keeps its own counters: a custom collector (`SnapshotCollector`) turns the
gateway's `StatusSnapshot` (warp/status.py, the same dict ``warp status --json`` prints)
into metric families at scrape time, and ``prometheus_client``'s ``generate_latest`` renders
them. The HTTP server (`MetricsServer`) is a small asyncio server on the gateway's event loop,
with timeouts and a connection cap: no thread per connection.

The gateway keeps a `SnapshotCache` that it refreshes on its loop (once a second) and the
collector only reads the cached copy (scrapes never touch the data path, and
`start_metrics_server` can serve the same cache from a thread of its own). `start_gateway_metrics`
wires that up:

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
import ipaddress
import logging
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from warp.log_limit import LogLimiter

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

log = logging.getLogger("warp.metrics")

#: HTTP serving bounds (see `MetricsServer`)
MAX_CONNECTIONS = 32
HEADER_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_HEAD = 8 * 1024
BACKLOG = 128

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


#: the ``far_gate`` label of a snapshot from a gateway with one ``[far_gate]`` (no names)
DEFAULT_FAR_GATE = "default"


def _far_gate(row: Mapping[str, Any]) -> str:
    """A path's or tunnel's ``far_gate`` label: its far gate's name, ``default`` from a
    snapshot without names."""
    name = row.get("far_gate")
    return DEFAULT_FAR_GATE if name is None else str(name)


def _far_gate_sessions(
    snapshot: Mapping[str, Any],
) -> list[tuple[str, str, str, Mapping[str, Any] | None, bool | None]]:
    """(name, public key, kind, session, relay) per far gate; a snapshot without
    ``far_gates`` has one, ``default``, with the top-level session."""
    far_gates = snapshot.get("far_gates")
    if isinstance(far_gates, Mapping) and far_gates:
        rows = []
        for name, info in sorted(far_gates.items(), key=lambda kv: str(kv[0])):
            info = info if isinstance(info, Mapping) else {}
            session = info.get("session")
            relay = info.get("relay")
            rows.append(
                (
                    str(name),
                    str(info.get("public_key", "")),
                    str(info.get("kind", "")),
                    session if isinstance(session, Mapping) else None,
                    relay if isinstance(relay, bool) else None,
                )
            )
        return rows
    session = snapshot.get("session")
    if not isinstance(session, Mapping):
        return []
    return [(DEFAULT_FAR_GATE, str(session.get("far_gate", "")), "", session, None)]


def _capacity_metrics(f: _Families, snapshot: Mapping[str, Any]) -> None:
    """Per far gate and uplink: the measured capacity and the pacing rate."""
    far_gates = snapshot.get("far_gates")
    if not isinstance(far_gates, Mapping):
        return
    capacity = f.gauge(
        "warp_uplink_capacity_bytes_per_second",
        "What the uplink carries towards the far gate (wire bytes/s, from receive reports; "
        "a lower bound while measured is 0)",
        ["far_gate", "uplink", "measured"],
    )
    pacing = f.gauge(
        "warp_uplink_pacing_bytes_per_second",
        "Rate the uplink is paced at towards the far gate (absent: unpaced)",
        ["far_gate", "uplink"],
    )
    for far, info in sorted(far_gates.items(), key=lambda kv: str(kv[0])):
        rows = info.get("uplink_capacity") if isinstance(info, Mapping) else None
        if not isinstance(rows, Mapping):
            continue
        for uplink, row in sorted(rows.items(), key=lambda kv: str(kv[0])):
            if not isinstance(row, Mapping):
                continue
            value = _number(row.get("capacity"))
            if value is not None:
                measured = "1" if row.get("measured") else "0"
                capacity.add_metric([str(far), str(uplink), measured], value)
            rate = _number(row.get("pacing_rate"))
            if rate is not None:
                pacing.add_metric([str(far), str(uplink)], rate)


def _usage_metrics(f: _Families, snapshot: Mapping[str, Any]) -> None:
    """Per uplink: bytes used in the budget period, the budget, whether it ran out."""
    usage = snapshot.get("uplink_usage")
    if not isinstance(usage, Mapping):
        return
    used = f.gauge(
        "warp_uplink_usage_bytes",
        "Bytes the uplink moved (both ways) in its budget period",
        ["uplink", "tier", "period"],
    )
    budget = f.gauge("warp_uplink_data_budget_bytes", "The uplink's data budget", ["uplink"])
    exhausted = f.gauge(
        "warp_uplink_budget_exhausted",
        "1 while the uplink's budget has run out (it carries no traffic)",
        ["uplink"],
    )
    for uplink, row in sorted(usage.items(), key=lambda kv: str(kv[0])):
        if not isinstance(row, Mapping):
            continue
        value = _number(row.get("used_bytes"))
        if value is not None:
            used.add_metric([str(uplink), str(row.get("tier")), str(row.get("period"))], value)
        limit = _number(row.get("data_budget"))
        if limit is not None:
            budget.add_metric([str(uplink)], limit)
            exhausted.add_metric([str(uplink)], 1.0 if row.get("budget_exhausted") else 0.0)


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

    path_labels = ["far_gate", "uplink", "remote"]
    for path in _rows(snapshot, "paths"):
        labels = [
            _far_gate(path),
            str(path.get("uplink", "")),
            str(path.get("remote_address", "")),
        ]
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
        far = _far_gate(tunnel)
        gate = tunnel.get("gate") if isinstance(tunnel.get("gate"), Mapping) else {}
        assert isinstance(gate, Mapping)
        f.gauge(
            "warp_tunnel_info",
            "Constant 1, labelled with the tunnel's far gate, id and gate",
            ["far_gate", "tunnel", "tunnel_id", "gate_kind", "gate_address"],
        ).add_metric(
            [
                far,
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
            ["far_gate", "tunnel", "direction"],
        )
        data_bytes = f.counter(
            "warp_tunnel_bytes",
            "Bytes through the gate; direction in = application to tunnel, "
            "out = tunnel to application",
            ["far_gate", "tunnel", "direction"],
        )
        for direction in ("in", "out"):
            count = _number(tunnel.get(f"datagrams_{direction}"))
            if count is not None:
                datagrams.add_metric([far, name, direction], count)
            size = _number(tunnel.get(f"bytes_{direction}"))
            if size is not None:
                data_bytes.add_metric([far, name, direction], size)
        rebuilt = _number(tunnel.get("blocks_rebuilt"))
        family = f.counter(
            "warp_tunnel_blocks_rebuilt",
            "FEC repairs: received blocks rebuilt with parity because a data shard never "
            "arrived (0 on a clean link)",
            ["far_gate", "tunnel"],
        )
        if rebuilt is not None:
            family.add_metric([far, name], rebuilt)
        surplus = _number(tunnel.get("surplus_shards"))
        family = f.counter(
            "warp_tunnel_surplus_shards",
            "Shards received after their block was already rebuilt: parity the link did not "
            "need (normal, not a drop)",
            ["far_gate", "tunnel"],
        )
        if surplus is not None:
            family.add_metric([far, name], surplus)
        redundancy = tunnel.get("redundancy")
        shards = _number(redundancy.get("effective_n")) if isinstance(redundancy, Mapping) else None
        shards_gauge = f.gauge(
            "warp_tunnel_shards_per_block",
            "Shards the sender sends per block now (n, more with added or adaptive parity)",
            ["far_gate", "tunnel"],
        )
        if shards is not None:
            shards_gauge.add_metric([far, name], shards)
        for key, metric, doc in (
            ("usable_rate", "warp_tunnel_usable_bytes_per_second",
             "Application bytes/s the uplinks carry with the tunnel's spread (measured)"),
            ("protected_rate", "warp_tunnel_protected_bytes_per_second",
             "Application bytes/s that lose nothing when any one uplink goes"),
        ):  # fmt: skip
            value = _number(redundancy.get(key)) if isinstance(redundancy, Mapping) else None
            rate_gauge = f.gauge(metric, doc, ["far_gate", "tunnel"])
            if value is not None:
                rate_gauge.add_metric([far, name], value)
        lost = _number(tunnel.get("datagrams_lost"))
        family = f.counter(
            "warp_tunnel_datagrams_lost",
            "Datagrams from the far gate that the application did not get, each counted once",
            ["far_gate", "tunnel"],
        )
        if lost is not None:
            family.add_metric([far, name], lost)
        drops = f.counter(
            "warp_tunnel_drops",
            "Real drops by reason (surplus shards are not drops)",
            ["far_gate", "tunnel", "reason"],
        )
        raw_drops = tunnel.get("drops")
        if isinstance(raw_drops, Mapping):
            for reason, count in sorted(raw_drops.items()):
                value = _number(count)
                if value is not None:
                    drops.add_metric([far, name, str(reason)], value)

    _capacity_metrics(f, snapshot)
    _usage_metrics(f, snapshot)
    for far, key, kind, session, relay in _far_gate_sessions(snapshot):
        f.gauge(
            "warp_far_gate_info",
            "Constant 1, labelled with the far gate's public key and kind",
            ["far_gate", "public_key", "kind"],
        ).add_metric([far, key, kind], 1)
        if relay is not None:
            f.gauge(
                "warp_far_gate_relayed",
                "1 while traffic to the far gate goes through warp-map's relay",
                ["far_gate"],
            ).add_metric([far], 1.0 if relay else 0.0)
        if session is None:
            continue
        state = str(session.get("handshake_state", ""))
        handshake = f.gauge(
            "warp_session_handshake_state",
            "1 for the far gate session's current handshake state, 0 for the others",
            ["far_gate", "state"],
        )
        for name in (*HANDSHAKE_STATES, *([state] if state not in HANDSHAKE_STATES else [])):
            handshake.add_metric([far, name], 1.0 if name == state else 0.0)
        age = _number(session.get("last_handshake_age_s"))
        if age is not None:
            f.gauge(
                "warp_session_last_handshake_age_seconds",
                "Seconds since the last completed handshake with the far gate",
                ["far_gate"],
            ).add_metric([far], age)
        rekeys = _number(session.get("rekeys"))
        if rekeys is not None:
            f.counter(
                "warp_session_rekeys",
                "Handshakes completed while a session was established",
                ["far_gate"],
            ).add_metric([far], rekeys)
        handshakes = _number(session.get("handshakes"))
        if handshakes is not None:
            f.counter(
                "warp_session_handshakes", "Handshakes completed with the far gate", ["far_gate"]
            ).add_metric([far], handshakes)

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
        nat_mapping = map_status.get("nat_mapping")
        if isinstance(nat_mapping, Mapping):
            mappings = f.gauge(
                "warp_uplink_nat_mapping",
                "1 for the NAT mapping behaviour learned for this uplink "
                '("endpoint-independent", "address-dependent" or "unknown")',
                ["uplink", "mapping"],
            )
            for uplink_name, mapping in sorted(nat_mapping.items(), key=lambda kv: str(kv[0])):
                mappings.add_metric([str(uplink_name), str(mapping)], 1.0)
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
    """A ``/metrics`` endpoint served by an asyncio server on an event loop.

    Plain HTTP/1.1, one request per connection (``Connection: close``), ``GET``/``HEAD`` of
    ``/metrics`` (or ``/``); the body is ``prometheus_client``'s ``generate_latest`` of a
    private registry. Bounds, so that slow or hostile clients cost nothing lasting:

    * the request head must arrive within ``header_timeout`` and fit in `MAX_HEAD` bytes,
      the reply must be taken within ``write_timeout`` (else the connection is dropped);
    * at most ``max_connections`` at once: one more closes the oldest connection that has
      not sent its request yet (so idle sockets cannot lock a scraper out), or is answered
      ``503`` when every slot is busy replying.

    Refusals are counted in ``rejected`` by reason and logged (``metrics.rejected``, at most
    once per reason per 10 s). `close` is idempotent and ends every connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._sock = sock
        self.registry = registry
        address = sock.getsockname()
        self.host = str(address[0])
        self.port = int(address[1])
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.rejected: Counter[str] = Counter()
        self._reject_log = LogLimiter()
        self._server: asyncio.AbstractServer | None = None
        #: open connections -> whether its request head has arrived, oldest first
        self._connections: OrderedDict[asyncio.StreamWriter, bool] = OrderedDict()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def serve(self) -> None:
        """Start serving on the running loop (idempotent)."""
        if self._server is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, sock=self._sock, limit=MAX_HEAD)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if thread is not None and loop is not None:
            loop.call_soon_threadsafe(self._stop)
            thread.join(timeout=5)
        elif loop is not None and not loop.is_closed():
            self._stop()
        else:
            self._sock.close()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()
        if self._thread is not None and self._loop is not None:
            self._loop.stop()

    # ------------------------------------------------------------------------------ serving

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
            except TimeoutError:
                self._reject("header_timeout")
                return
            except asyncio.LimitOverrunError:
                self._reject("head_too_long")
                await self._reply(writer, 431, b"request head too long\n", {})
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            self._connections[writer] = True
            status, body, headers = self._respond(head)
            await self._reply(writer, status, body, headers)
        finally:
            self._connections.pop(writer, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that stopped reading must not hold it open
            else:
                writer.close()

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        if len(self._connections) >= self.max_connections:
            idle = next((w for w, busy in self._connections.items() if not busy), None)
            if idle is None:
                self._reject("busy")
                writer.write(_http(503, b"busy\n", {}))
                writer.close()
                return False
            self._reject("evicted_idle")
            del self._connections[idle]
            idle.transport.abort()
        self._connections[writer] = False
        return True

    def _respond(self, head: bytes) -> tuple[int, bytes, dict[str, str]]:
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._reject("bad_request")
            return 400, b"bad request\n", {}
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._reject("bad_method")
            return 405, b"only GET and HEAD\n", {"Allow": "GET, HEAD"}
        if target not in (b"/metrics", b"/"):
            return 404, b"not found: try /metrics\n", {}
        body = generate_latest(self.registry)
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        if method == b"HEAD":
            headers["Content-Length"] = str(len(body))
            return 200, b"", headers
        return 200, body, headers

    async def _reply(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        writer.write(_http(status, body, headers))
        try:
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except TimeoutError:
            self._reject("write_timeout")
        except ConnectionError:
            pass

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self._reject_log.due(reason, time.monotonic()):
            log.warning(
                "metrics.rejected reason=%s total=%d address=%s",
                reason,
                self.rejected[reason],
                self.url,
            )


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _http(status: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", "Connection: close"]
    headers = {"Content-Type": "text/plain; charset=utf-8", **headers}
    headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _bind(host: str, port: int) -> socket.socket:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise MetricsError(f"cannot serve metrics on {shown}: {exc.strerror or exc}") from None
    if not _is_loopback(host):
        log.warning(
            "metrics.not_loopback address=%s (the endpoint has no authentication and shows "
            "peer addresses, public keys and traffic counters to whoever reaches it)",
            shown,
        )
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _registry(
    snapshot: SnapshotSource, age: Callable[[], float | None] | None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, age))
    return registry


def start_metrics_server(
    host: str,
    port: int,
    snapshot: SnapshotSource,
    *,
    age: Callable[[], float | None] | None = None,
    max_connections: int = MAX_CONNECTIONS,
    header_timeout: float = HEADER_TIMEOUT,
) -> MetricsServer:
    """Serve ``snapshot()`` as Prometheus metrics on ``http://host:port/metrics`` (port 0: any),
    on an event loop of its own in one thread (for callers without a loop; the gateway serves
    on its own loop, see `start_gateway_metrics`). Raises `MetricsError` (one line) when the
    address cannot be bound."""
    server = MetricsServer(
        _bind(host, port),
        _registry(snapshot, age),
        max_connections=max_connections,
        header_timeout=header_timeout,
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())
        started.set()
        loop.run_forever()
        # connections were aborted: their handlers end on their own (cancelling one makes
        # asyncio log a traceback for it)
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
        loop.close()

    server._loop = loop
    server._thread = threading.Thread(target=run, name=f"warp-metrics-{server.port}", daemon=True)
    server._thread.start()
    started.wait(5)
    return server


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
        """Serve the endpoint on this loop and refresh the cache every ``interval`` seconds
        until cancelled (run in the TaskGroup).

        A failing ``snapshot()`` keeps the previous copy (its age grows in
        ``warp_metrics_snapshot_age_seconds``); it never ends the task.
        """
        await self.server.serve()
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
    data), then binds; connections are served on this loop once `refresh_forever` runs.
    Raises `MetricsError` (one line) if the address is taken.
    """
    host, port = address[0], int(address[1])
    cache = SnapshotCache()
    cache.update(snapshot())
    server = MetricsServer(_bind(str(host), port), _registry(cache, cache.age))
    return MetricsExporter(snapshot, server, cache, interval)
