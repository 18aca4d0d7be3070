"""``warp demo``: a warp-map and two gateways on this machine, traffic through them, one uplink
cut half-way, a live per-path table and a final summary; everything cleaned up on exit.

As root (with ``ip``, ``nft``, ``tc``, ``conntrack``) the demo builds a network-namespace lab
(:mod:`warp.netlab`): a public namespace running ``warp-map``, and two sites, each behind its own
NAT router with two uplinks, each running ``warp run`` in its host namespace. A traffic source in
site A sends sequence-numbered datagrams to A's loopback gate; a sink in site B counts what
comes out of B's gate (deliveries, duplicates, order). Half-way, site A's uplink ``up1`` is
black-holed on its router (nftables drops everything, the link stays up). The tunnel uses
(k, n) = (2, 4): the shards of every block are spread over the paths so that one dead uplink
of two costs no datagram.

Without root it runs the largest honest subset on loopback: the same warp-map and two gateways
as processes, each with two static "uplinks" bound to 127.0.0.x addresses (no NAT, no
interfaces), and the cut is simulated inside gateway A's process: from that moment its uplink
``lo-a1`` drops every datagram it would send or receive (nothing in the kernel changes).

The helpers the demo starts (source, sink, the loopback gateway wrapper) are modes of this
module: ``python -m warp.demo source|sink|gateway ...``.

Exit codes: 0 when every datagram sent was delivered exactly once, 2 otherwise (or when the
demo could not run), 1 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_RUNTIME = 2

#: Datagram header of the demo traffic: sequence number, tag (0 warm-up, 1 counted), send time.
HEADER = struct.Struct("!IBd")
TAG_WARMUP = 0
TAG_COUNTED = 1

TUNNEL = "demo"
K, N = 2, 4
MAP_PORT = 13116
GATE_PORT = 59401  # application → gate, in each site (namespaces)
SINK_PORT = 59500  # gate → application, in site B (namespaces)
#: How long the demo waits for the tunnel to come up on every path before giving up.
SETUP_TIMEOUT = 20.0
#: After the source stops: time for the last datagrams to arrive.
DRAIN = 1.5


# ---------------------------------------------------------------------------------------------
# helpers run inside the namespaces (python -m warp.demo source|sink|gateway)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _source(args: argparse.Namespace) -> int:
    """Warm-up datagrams (tag 0, 50/s) until ``--start-file`` exists, then ``--rate``/s counted
    datagrams (tag 1) for ``--duration`` s. Progress and the final count go to ``--report``."""
    deadline = time.monotonic() + args.lifetime
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    to = _addr(args.to)
    pad = b"\0" * max(0, args.size - HEADER.size)
    report: dict[str, Any] = {"phase": "warmup", "warmup_sent": 0, "sent": 0, "errors": 0}
    next_report = 0.0
    start_file = Path(args.start_file)

    def send(seq: int, tag: int) -> None:
        try:
            sock.sendto(HEADER.pack(seq, tag, time.time()) + pad, to)
        except OSError:  # the gate is not there yet: try again
            report["errors"] += 1

    while not start_file.exists():
        if time.monotonic() > deadline:
            report["phase"] = "timeout"
            _write_json(args.report, report)
            return 2
        send(report["warmup_sent"], TAG_WARMUP)
        report["warmup_sent"] += 1
        if time.monotonic() >= next_report:
            _write_json(args.report, report)
            next_report = time.monotonic() + 0.25
        time.sleep(0.02)
    count = round(args.rate * args.duration)
    start = time.monotonic()
    report.update(phase="counted", start_wall=time.time(), count=count)
    for seq in range(count):
        due = start + seq / args.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        if now > deadline:
            break
        send(seq, TAG_COUNTED)
        report["sent"] = seq + 1
        if now >= next_report:
            _write_json(args.report, report)
            next_report = now + 0.25
    report.update(phase="done", end_wall=time.time())
    _write_json(args.report, report)
    return 0


def _sink(args: argparse.Namespace) -> int:
    """Count what arrives on ``--bind`` until ``--stop-file`` exists (or ``--lifetime``)."""
    deadline = time.monotonic() + args.lifetime
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(_addr(args.bind))
    sock.settimeout(0.05)
    stop_file = Path(args.stop_file)
    seen: set[int] = set()
    latencies: list[float] = []
    state: dict[str, Any] = {
        "delivered": 0,
        "duplicates": 0,
        "reordered": 0,
        "malformed": 0,
        "warmup_received": 0,
        "first_warmup_wall": None,
        "first_counted_wall": None,
        "last_wall": None,
    }
    highest = -1
    next_report = 0.0
    _write_json(args.report, {**state, "ready": True})
    while time.monotonic() < deadline and not stop_file.exists():
        try:
            data = sock.recv(65536)
        except TimeoutError:
            data = b""
        now_wall = time.time()
        if len(data) >= HEADER.size:
            seq, tag, sent_at = HEADER.unpack_from(data)
            if tag == TAG_WARMUP:
                state["warmup_received"] += 1
                if state["first_warmup_wall"] is None:
                    state["first_warmup_wall"] = now_wall
            elif tag == TAG_COUNTED:
                if state["first_counted_wall"] is None:
                    state["first_counted_wall"] = now_wall
                state["last_wall"] = now_wall
                if seq in seen:
                    state["duplicates"] += 1
                else:
                    seen.add(seq)
                    state["delivered"] += 1
                    latencies.append(now_wall - sent_at)
                    if seq < highest:
                        state["reordered"] += 1
                    highest = max(highest, seq)
            else:
                state["malformed"] += 1
        elif data:
            state["malformed"] += 1
        mono = time.monotonic()
        if mono >= next_report:
            _write_json(args.report, {**state, "ready": True})
            next_report = mono + 0.2
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    state.update(
        ready=True,
        done=True,
        latency_ms={"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        seqs=_ranges(sorted(seen)),
    )
    _write_json(args.report, state)
    return 0


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] → [[0, 2], [5, 6]] (compact list of what arrived)."""
    out: list[list[int]] = []
    for s in seqs:
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _gateway(args: argparse.Namespace) -> int:
    """A gateway with static loopback uplinks (no root). SIGUSR1 "cuts" uplink ``--cut``: from
    then on this process drops every datagram that uplink would send or receive."""
    import asyncio

    from warp.config import load_gateway_config
    from warp.event_loop import install_event_loop_policy
    from warp.logs import configure_logging
    from warp.node import Gateway
    from warp.paths import uplinks as uplinks_module

    config = load_gateway_config(args.config)
    configure_logging(config.log.level, config.log.format)
    install_event_loop_policy()
    static = [tuple(u.split("=", 1)) for u in args.uplink]
    cut: set[str] = set()
    uplink_class = uplinks_module.Uplink
    real_send = uplink_class.send

    def send(self: Any, data: bytes, addr: Any) -> bool:
        if self.name in cut:
            return True  # into the black hole: the sender cannot tell
        return real_send(self, data, addr)

    uplink_class.send = send  # type: ignore[method-assign]

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def do_cut() -> None:
            cut.add(args.cut)
            print(f"demo.cut uplink={args.cut} (simulated in this process)", file=sys.stderr)

        loop.add_signal_handler(signal.SIGUSR1, do_cut)
        # SIGUSR1 is this wrapper's "cut", not the gateway's rekey hook.
        gateway = Gateway(config, static_uplinks=[(n, a) for n, a in static], rekey_signal=False)
        real_receive = gateway._on_uplink_datagram

        def receive(uplink: Any, data: bytes, source: Any) -> None:
            if uplink.name not in cut:
                real_receive(uplink, data, source)

        gateway._on_uplink_datagram = receive  # type: ignore[method-assign]
        await gateway.run(stop)

    asyncio.run(main())
    return 0


def helper_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m warp.demo")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("source")
    p.add_argument("--to", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--start-file", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--lifetime", type=float, required=True)
    p.set_defaults(func=_source)
    p = sub.add_parser("sink")
    p.add_argument("--bind", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--lifetime", type=float, required=True)
    p.set_defaults(func=_sink)
    p = sub.add_parser("gateway")
    p.add_argument("config")
    p.add_argument("--uplink", action="append", required=True, help="NAME=ADDRESS")
    p.add_argument("--cut", required=True, help="uplink to drop on SIGUSR1")
    p.set_defaults(func=_gateway)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


# ---------------------------------------------------------------------------------------------
# configs


@dataclass
class Peer:
    """One demo gateway: its keys, config and where its things are."""

    name: str  # "A" / "B"
    private_key: bytes
    public_key: bytes
    config: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[str] | None = None


def _gateway_toml(
    *,
    private_key: str,
    far_key: str,
    socket_path: Path,
    gate_port: int,
    app_port: int | None,
    map_address: str | None,
    map_key: str | None,
    endpoints: Sequence[str] = (),
    listen_port: int = 0,
    log_level: str = "info",
) -> str:
    lines = [
        "# written by `warp demo`",
        f'private_key = "{private_key}"',
        f"listen_port = {listen_port}",
        "",
        "[interfaces]",
        'exclusion_patterns = ["^lo$"]',
        "",
    ]
    if map_address is not None:
        lines += ["[warp_map]", f'address = "{map_address}"', f'public_key = "{map_key}"', ""]
    lines += ["[far_gate]", f'public_key = "{far_key}"']
    if endpoints:
        lines.append("endpoints = [" + ", ".join(f'"{e}"' for e in endpoints) + "]")
    lines += ["", f"[tunnels.{TUNNEL}.gate]", "ipv4 = true", f"application_to_gate = {gate_port}"]
    if app_port is not None:
        lines.append(f"gate_to_application = {app_port}")
    lines += [
        "",
        f"[tunnels.{TUNNEL}.transport.redundancy]",
        f"num_shards = {N}",
        f"required_shards = {K}",
        "",
        "[control]",
        f'socket = "{socket_path}"',
        "",
        "[log]",
        f'level = "{log_level}"',
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the two ways to run: namespaces (root) or loopback


class DemoError(Exception):
    """The demo cannot go on; one line for the user."""


class Topology:
    """Where the processes run and how an uplink is cut."""

    mode = ""
    map_address = ""
    cut_uplink = ""
    a_uplinks: tuple[str, ...] = ()
    honesty = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[str], Path]] = []

    def spawn(self, where: str, name: str, argv: Sequence[str], lifetime: float) -> Path:
        raise NotImplementedError

    def map_argv(self) -> list[str] | None:
        return None

    def gateway_argv(self, peer: Peer) -> list[str]:
        raise NotImplementedError

    def cut(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def check_processes(self) -> None:
        for name, proc, log in self.procs:
            code = proc.poll()
            if code is not None and name not in ("source", "sink"):
                raise DemoError(f"{name} exited with code {code}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def _console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -c`` its main."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


class NamespaceTopology(Topology):
    """Root: the netlab topology (public namespace with warp-map, two NATed sites)."""

    mode = "namespaces"
    cut_uplink = "up1"
    a_uplinks = ("up1", "up2")
    honesty = (
        "real network namespaces, NAT routers (nftables, cone), two uplinks per site; the cut "
        "is an nftables black hole on site A's router for up1 (the link stays up)"
    )

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        from warp.netlab import Lab

        self.lab = Lab()
        try:
            self.site_a = self.lab.add_site("a", nat="cone", uplinks=2)
            self.site_b = self.lab.add_site("b", nat="cone", uplinks=2)
        except BaseException:
            self.lab.close()
            raise
        self.map_address = f"{self.lab.public_address}:{MAP_PORT}"
        self.ns = {"map": self.lab.public_ns, "A": self.site_a.host_ns, "B": self.site_b.host_ns}

    def spawn(self, where: str, name: str, argv: Sequence[str], lifetime: float) -> Path:
        log = self.workdir / f"{name}.log"
        with open(log, "w") as out:
            proc = self.lab.spawn(self.ns[where], argv, lifetime, stdout=out, stderr=out)
        self.procs.append((name, proc, log))
        return log

    def map_argv(self) -> list[str] | None:
        return [
            *_console_script("warp-map", "warp_map_server.cli"),
            *("--bind", self.map_address, "--private-key-file", str(self.workdir / "map.key")),
        ]

    def gateway_argv(self, peer: Peer) -> list[str]:
        return [sys.executable, "-m", "warp.cli", "run", str(peer.config)]

    def cut(self) -> str:
        up = self.site_a.uplink(self.cut_uplink)
        up.blackhole()
        return (
            f"site A uplink {up.name} ({up.address} → {up.public_address}) black-holed on its "
            "NAT router"
        )

    def close(self) -> None:
        self.lab.close()


class LoopbackTopology(Topology):
    """No root: processes on this machine, static uplinks on 127.0.0.x, a simulated cut."""

    mode = "loopback"
    cut_uplink = "lo-a1"
    a_uplinks = ("lo-a1", "lo-a2")
    honesty = (
        "loopback only: no namespaces, no NAT; each gateway has two static 'uplinks' bound to "
        "127.0.0.x; the cut is simulated inside gateway A's process (lo-a1 drops everything "
        "it would send or receive)"
    )

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ports = _free_ports(6)
        self.map_address = f"127.0.0.1:{self.ports[0]}"
        self.uplinks = {
            "A": [("lo-a1", "127.0.0.1"), ("lo-a2", "127.0.0.2")],
            "B": [("lo-b1", "127.0.0.3"), ("lo-b2", "127.0.0.4")],
        }
        self.timeout = shutil.which("timeout")

    def spawn(self, where: str, name: str, argv: Sequence[str], lifetime: float) -> Path:
        log = self.workdir / f"{name}.log"
        full = list(argv)
        if self.timeout:
            full = [self.timeout, "--signal=TERM", "--kill-after=5", f"{lifetime:g}", *full]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                text=True,
                start_new_session=True,
            )
        self.procs.append((name, proc, log))
        return log

    def map_argv(self) -> list[str] | None:
        return [
            *_console_script("warp-map", "warp_map_server.cli"),
            *("--bind", self.map_address, "--private-key-file", str(self.workdir / "map.key")),
        ]

    def gateway_argv(self, peer: Peer) -> list[str]:
        argv = [sys.executable, "-m", "warp.demo", "gateway", str(peer.config)]
        for name, address in self.uplinks[peer.name]:
            argv += ["--uplink", f"{name}={address}"]
        return [*argv, "--cut", self.cut_uplink]

    def cut(self) -> str:
        for name, proc, _ in self.procs:
            if name == "gateway-A":
                os.kill(proc.pid, signal.SIGUSR1) if not self.timeout else _signal_child(proc)
        return f"gateway A uplink {self.cut_uplink} (127.0.0.1) cut, simulated in its process"

    def close(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc, _ in self.procs:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


def _signal_child(proc: subprocess.Popen[str]) -> None:
    """SIGUSR1 to the gateway under ``timeout`` (the wrapper forwards only TERM-like signals):
    it is the other member of the process group."""
    for pid in _group_members(proc.pid):
        if pid != proc.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGUSR1)


def _group_members(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Sample:
    """One look at everything: both gateways' snapshots and the traffic reports."""

    at: float
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    sink: dict[str, Any] = field(default_factory=dict)


class Demo:
    def __init__(
        self,
        topology: Topology,
        *,
        duration: float,
        rate: float,
        size: int,
        live: bool,
        console: Console,
        log_level: str = "info",
    ) -> None:
        self.log_level = log_level
        self.topo = topology
        self.duration = duration
        self.rate = rate
        self.size = size
        self.live = live
        self.console = console
        self.workdir = topology.workdir
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.events: list[str] = []
        self.peers: dict[str, Peer] = {}
        self.source_report = self.workdir / "source.json"
        self.sink_report = self.workdir / "sink.json"
        self.start_file = self.workdir / "start"
        self.stop_file = self.workdir / "stop"
        self.last = Sample(0.0)
        self._next_plain = 0.0

    # --- setup ---

    def write_configs(self) -> None:
        from warp.config import parse_gateway_config
        from warp.keys import encode_key, generate_private_key, public_key_of

        map_private = generate_private_key()
        (self.workdir / "map.key").write_text(encode_key(map_private) + "\n")
        self.map_key = encode_key(public_key_of(map_private))
        for name in ("A", "B"):
            private = generate_private_key()
            self.peers[name] = Peer(
                name=name,
                private_key=private,
                public_key=public_key_of(private),
                config=self.workdir / f"gateway-{name}.toml",
                socket=self.workdir / f"gateway-{name}.sock",
                log=self.workdir / f"gateway-{name}.log",
            )
        topo = self.topo
        for name, other in (("A", "B"), ("B", "A")):
            peer = self.peers[name]
            if isinstance(topo, LoopbackTopology):
                gate_port = topo.ports[1] if name == "A" else topo.ports[2]
                app_port = None if name == "A" else topo.ports[3]
            else:
                gate_port, app_port = GATE_PORT, (None if name == "A" else SINK_PORT)
            text = _gateway_toml(
                private_key=encode_key(peer.private_key),
                far_key=encode_key(self.peers[other].public_key),
                socket_path=peer.socket,
                gate_port=gate_port,
                app_port=app_port,
                map_address=topo.map_address,
                map_key=self.map_key,
                log_level=self.log_level,
            )
            parse_gateway_config(text, str(peer.config))  # a broken demo config fails here
            peer.config.write_text(text)
        self.gate_a = f"127.0.0.1:{GATE_PORT}"
        self.sink_bind = f"127.0.0.1:{SINK_PORT}"
        if isinstance(topo, LoopbackTopology):
            self.gate_a = f"127.0.0.1:{topo.ports[1]}"
            self.sink_bind = f"127.0.0.1:{topo.ports[3]}"

    def start(self) -> None:
        lifetime = self.duration + SETUP_TIMEOUT + 30
        topo = self.topo
        map_argv = topo.map_argv()
        if map_argv is not None:
            topo.spawn("map", "warp-map", map_argv, lifetime)
            self.note(f"warp-map started on {topo.map_address}")
        module = [sys.executable, "-m", "warp.demo"]
        topo.spawn(
            "B",
            "sink",
            [*module, "sink", "--bind", self.sink_bind, "--stop-file", str(self.stop_file),
             "--report", str(self.sink_report), "--lifetime", f"{lifetime:g}"],
            lifetime,
        )  # fmt: skip
        self._wait(lambda: bool(_read_json(self.sink_report).get("ready")), 10, "the sink")
        for name in ("A", "B"):
            peer = self.peers[name]
            topo.spawn(name, f"gateway-{name}", topo.gateway_argv(peer), lifetime)
        self.second_started_wall = time.time()
        self.second_started = time.monotonic()
        self.note("gateways A and B started")
        topo.spawn(
            "A",
            "source",
            [*module, "source", "--to", self.gate_a, "--rate", f"{self.rate:g}",
             "--duration", f"{self.duration:g}", "--size", str(self.size),
             "--start-file", str(self.start_file), "--report", str(self.source_report),
             "--lifetime", f"{lifetime:g}"],
            lifetime,
        )  # fmt: skip

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.topo.check_processes()
            if time.monotonic() > deadline:
                raise DemoError(f"{what} did not start within {timeout:g} s")
            time.sleep(0.05)

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.2f}s] {text}"
        self.events.append(line)
        self.console.print(line, highlight=False, markup=False)

    # --- sampling ---

    def sample(self) -> Sample:
        from warp.status import StatusError, query_status

        s = Sample(time.monotonic())
        for name, peer in self.peers.items():
            try:
                s.status[name] = query_status(str(peer.socket), timeout=1.0)
            except StatusError as exc:
                s.errors[name] = str(exc)
        s.source = _read_json(self.source_report)
        s.sink = _read_json(self.sink_report)
        self.last = s
        return s

    def tunnel_ready(self, s: Sample) -> bool:
        """Both sessions up, and A has an active path on every uplink (to every address of B)."""
        if set(s.status) != {"A", "B"}:
            return False
        for st in s.status.values():
            if st.get("session", {}).get("handshake_state") != "established":
                return False
        paths_a = s.status["A"].get("paths", [])
        active = [p for p in paths_a if p.get("state") == "active"]
        if {p.get("uplink") for p in active} != set(self.topo.a_uplinks):
            return False
        return len(active) == len(paths_a) and len(active) >= 2 * len(self.topo.a_uplinks) - 2

    # --- rendering ---

    def render(self) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        s = self.last
        sent = int(s.source.get("sent", 0))
        delivered = int(s.sink.get("delivered", 0))
        header = Text.assemble(
            ("warp demo ", "bold"),
            f"({self.topo.mode})  ",
            (self.phase, "bold cyan"),
            f"  t={time.monotonic() - self.t0:5.1f}s  sent {sent}  delivered {delivered}",
            f"  duplicates {s.sink.get('duplicates', 0)}",
        )
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("gw", "uplink", "local", "remote", "state", "RTT ms", "loss %"):
            table.add_column(col)
        for col in ("tx pkts", "rx pkts", "tx", "rx"):
            table.add_column(col, justify="right")
        style = {"active": "green", "probing": "yellow", "dead": "bold red"}
        for name in ("A", "B"):
            if name in s.errors:
                table.add_row(name, Text(s.errors[name], style="red"))
                continue
            for p in s.status.get(name, {}).get("paths", []):
                state = str(p.get("state"))
                table.add_row(
                    name,
                    str(p.get("uplink")),
                    str(p.get("local_address")),
                    str(p.get("remote_address")),
                    Text(state, style=style.get(state, "")),
                    _num(p.get("rtt_ms"), "{:.2f}"),
                    _num(p.get("loss_pct"), "{:.1f}"),
                    str(p.get("tx_packets", 0)),
                    str(p.get("rx_packets", 0)),
                    _size(p.get("tx_bytes")),
                    _size(p.get("rx_bytes")),
                )
        return Group(header, table)

    def plain_line(self) -> str:
        s = self.last
        parts = [
            f"[{time.monotonic() - self.t0:6.2f}s] {self.phase}",
            f"sent={s.source.get('sent', 0)} delivered={s.sink.get('delivered', 0)}"
            f" dup={s.sink.get('duplicates', 0)}",
        ]
        for name in ("A", "B"):
            paths = s.status.get(name, {}).get("paths", [])
            cells = [
                f"{p.get('uplink')}->{p.get('remote_address')}:{p.get('state')}"
                f"/tx{p.get('tx_packets', 0)}/rx{p.get('rx_packets', 0)}"
                for p in paths
            ]
            parts.append(
                f"{name}[{' '.join(cells) or ('no status yet' if name in s.errors else '-')}]"
            )
        return " ".join(parts)

    # --- main loop ---

    def run(self) -> dict[str, Any]:
        self.write_configs()
        self.start()
        if self.live:
            from rich.live import Live

            with Live(self.render(), console=self.console, refresh_per_second=4) as live:
                return self._loop(lambda: live.update(self.render()))
        return self._loop(self._print_plain)

    def _print_plain(self) -> None:
        now = time.monotonic()
        if now >= self._next_plain:
            self._next_plain = now + 1.0
            self.console.print(self.plain_line(), highlight=False, markup=False, soft_wrap=True)

    def _loop(self, show: Callable[[], None]) -> dict[str, Any]:
        self.phase = "setting up the tunnel"
        deadline = time.monotonic() + SETUP_TIMEOUT
        while True:
            s = self.sample()
            show()
            self.topo.check_processes()
            if self.tunnel_ready(s):
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the tunnel did not come up on every path within {SETUP_TIMEOUT:g} s; "
                    + self.plain_line()
                    + "\n"
                    + "\n".join(
                        f"  {name} log:\n{_tail(peer.log)}" for name, peer in self.peers.items()
                    )
                )
            time.sleep(0.1)
        tunnel_up_s = time.monotonic() - self.second_started
        self.note(f"tunnel up on every path {tunnel_up_s:.2f} s after the second gateway started")
        before = s
        self.start_file.touch()
        self.phase = "traffic, all uplinks"
        start = time.monotonic()
        cut_at = start + self.duration / 2
        while time.monotonic() < cut_at:
            self.sample()
            show()
            self.topo.check_processes()
            time.sleep(0.1)
        at_cut = self.sample()
        what = self.topo.cut()
        cut_moment = time.monotonic() - start
        self.note(f"CUT at {cut_moment:.2f} s of traffic: {what}")
        self.phase = f"traffic, {self.topo.cut_uplink} cut"
        end_by = start + self.duration + 10
        while self.last.source.get("phase") != "done":
            self.sample()
            show()
            self.topo.check_processes()
            if time.monotonic() > end_by:
                raise DemoError("the traffic source did not finish in time")
            time.sleep(0.1)
        self.phase = "draining"
        drain_end = time.monotonic() + DRAIN
        while time.monotonic() < drain_end:
            self.sample()
            show()
            time.sleep(0.1)
        after = self.sample()
        self.stop_file.touch()
        self._wait(lambda: bool(_read_json(self.sink_report).get("done")), 5, "the sink report")
        final = self.sample()
        self.phase = "done"
        show()
        return self.summary(before, at_cut, after, final, tunnel_up_s, cut_moment)

    # --- summary ---

    def summary(
        self,
        before: Sample,
        at_cut: Sample,
        after: Sample,
        final: Sample,
        tunnel_up_s: float,
        cut_moment: float,
    ) -> dict[str, Any]:
        sent = int(final.source.get("sent", 0))
        sink = final.sink
        delivered = int(sink.get("delivered", 0))
        duplicates = int(sink.get("duplicates", 0))
        first_warm = sink.get("first_warmup_wall")
        ttfd = None if first_warm is None else round(first_warm - self.second_started_wall, 3)
        delivered_at_cut = int(at_cut.sink.get("delivered", 0))
        sent_at_cut = int(at_cut.source.get("sent", 0))
        a_ips = _uplink_ips(after.status.get("A", {}))
        tx_before = _per_uplink(before.status.get("A", {}), at_cut.status.get("A", {}), "tx")
        tx_after = _per_uplink(at_cut.status.get("A", {}), after.status.get("A", {}), "tx")
        rx_before = _per_remote(before.status.get("B", {}), at_cut.status.get("B", {}), a_ips)
        rx_after = _per_remote(at_cut.status.get("B", {}), after.status.get("B", {}), a_ips)
        uplinks = list(self.topo.a_uplinks)
        tunnel: dict[str, Any] = next(iter(after.status.get("B", {}).get("tunnels", [])), {})
        return {
            "mode": self.topo.mode,
            "simulated": self.topo.honesty,
            "duration_s": self.duration,
            "rate": self.rate,
            "k": K,
            "n": N,
            "sent": sent,
            "delivered": delivered,
            "duplicates": duplicates,
            "lost": max(0, sent - delivered),
            "reordered": int(sink.get("reordered", 0)),
            "time_to_first_datagram_s": ttfd,
            "tunnel_up_s": round(tunnel_up_s, 3),
            "latency_ms": sink.get("latency_ms", {}),
            "cut_uplink": self.topo.cut_uplink,
            "cut_at_s": round(cut_moment, 3),
            "sent_before_cut": sent_at_cut,
            "delivered_before_cut": delivered_at_cut,
            "delivered_after_cut": delivered - delivered_at_cut,
            "a_tx_packets_before_cut": {u: tx_before.get(u, 0) for u in uplinks},
            "a_tx_packets_after_cut": {u: tx_after.get(u, 0) for u in uplinks},
            "b_rx_packets_before_cut": {u: rx_before.get(u, 0) for u in uplinks},
            "b_rx_packets_after_cut": {u: rx_after.get(u, 0) for u in uplinks},
            "b_blocks_rebuilt": tunnel.get("blocks_rebuilt"),
            "b_drops": tunnel.get("drops", {}),
            "events": self.events,
        }


def _num(value: Any, fmt: str) -> str:
    return "—" if not isinstance(value, int | float) else fmt.format(value)


def _size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    v = float(value)
    for unit in ("B", "KiB", "MiB"):
        if v < 1024:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def _uplink_ips(status_a: Mapping[str, Any]) -> dict[str, str]:
    """A's uplink → the IP B sees it from: the reflexive address the map reported, else the
    local address (loopback, no NAT)."""
    out: dict[str, str] = {}
    reflexive = (status_a.get("map") or {}).get("reflexive") or {}
    for up in status_a.get("uplinks", []):
        name = str(up.get("name"))
        address = reflexive.get(name) or up.get("local_address") or ""
        out[name] = str(address).rpartition(":")[0]
    return out


def _per_uplink(old: Mapping[str, Any], new: Mapping[str, Any], kind: str) -> dict[str, int]:
    def totals(st: Mapping[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in st.get("paths", []):
            key = str(p.get("uplink"))
            out[key] = out.get(key, 0) + int(p.get(f"{kind}_packets", 0))
        return out

    a, b = totals(old), totals(new)
    return {k: b.get(k, 0) - a.get(k, 0) for k in b}


def _per_remote(
    old: Mapping[str, Any], new: Mapping[str, Any], a_ips: Mapping[str, str]
) -> dict[str, int]:
    """Packets B received from each of A's uplinks (by the address they come from)."""
    by_ip = {ip: name for name, ip in a_ips.items()}

    def totals(st: Mapping[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in st.get("paths", []):
            ip = str(p.get("remote_address", "")).rpartition(":")[0]
            name = by_ip.get(ip, ip)
            out[name] = out.get(name, 0) + int(p.get("rx_packets", 0))
        return out

    a, b = totals(old), totals(new)
    return {k: b.get(k, 0) - a.get(k, 0) for k in b}


def _share(counts: Mapping[str, int], name: str) -> str:
    total = sum(counts.values())
    if not total:
        return "—"
    return f"{100 * counts.get(name, 0) / total:.0f} % ({counts.get(name, 0)})"


def render_summary(summary: Mapping[str, Any]) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    ok = summary["lost"] == 0 and summary["duplicates"] == 0
    table = Table(title="warp demo: summary", show_header=False, title_style="bold")
    table.add_column("what", style="bold")
    table.add_column("value")
    latency = summary.get("latency_ms") or {}
    rows: list[tuple[str, str | Text]] = [
        ("mode", f"{summary['mode']}: {summary['simulated']}"),
        ("tunnel", f"(k, n) = ({summary['k']}, {summary['n']}), {summary['rate']:g} datagrams/s"),
        ("sent", str(summary["sent"])),
        ("delivered", str(summary["delivered"])),
        ("duplicates", str(summary["duplicates"])),
        ("lost", Text(str(summary["lost"]), style="bold green" if ok else "bold red")),
        ("reordered", str(summary["reordered"])),
        (
            "time to first datagram",
            _seconds(summary["time_to_first_datagram_s"])
            + " after the second gateway process was started",
        ),
        ("tunnel up on every path", _seconds(summary["tunnel_up_s"])),
        (
            "one-way latency",
            f"p50 {_num(latency.get('p50'), '{:.2f}')} ms, p99 "
            f"{_num(latency.get('p99'), '{:.2f}')} ms, max {_num(latency.get('max'), '{:.2f}')} ms",
        ),
        ("cut", f"{summary['cut_uplink']} at {summary['cut_at_s']:.2f} s of traffic"),
        (
            "delivered before / after the cut",
            f"{summary['delivered_before_cut']} / {summary['delivered_after_cut']}",
        ),
    ]
    for name in summary["a_tx_packets_before_cut"]:
        rows.append(
            (
                f"uplink {name}: A sent",
                f"before {_share(summary['a_tx_packets_before_cut'], name)}, "
                f"after {_share(summary['a_tx_packets_after_cut'], name)}",
            )
        )
        rows.append(
            (
                f"uplink {name}: B received",
                f"before {_share(summary['b_rx_packets_before_cut'], name)}, "
                f"after {_share(summary['b_rx_packets_after_cut'], name)}",
            )
        )
    rows.append(("FEC blocks rebuilt at B", str(summary.get("b_blocks_rebuilt"))))
    for what, value in rows:
        table.add_row(what, value)
    verdict = Text(
        "nothing lost: one uplink of two died and every datagram arrived exactly once"
        if ok
        else "datagrams were lost or duplicated",
        style="bold green" if ok else "bold red",
    )
    return Group(table, verdict)


def _seconds(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{value:.2f} s"


# ---------------------------------------------------------------------------------------------
# warp demo


def why_not_namespaces() -> str | None:
    """Why the namespace lab cannot run here (None: it can)."""
    from warp.netlab import prerequisites_missing

    reason = prerequisites_missing()
    if reason and reason.startswith("missing tools"):
        reason += " (Debian/Ubuntu: apt-get install iproute2 nftables conntrack coreutils)"
    return reason


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from warp.netlab import LabError

    console = Console(force_terminal=None if args.live else False, soft_wrap=not args.live)
    if args.duration < 4 or args.rate <= 0:
        print("warp demo: error: --duration must be ≥ 4 s and --rate > 0", file=sys.stderr)
        return EXIT_USAGE
    mode = args.mode
    reason = why_not_namespaces() if mode != "loopback" else "--mode loopback"
    if mode == "namespaces" and reason:
        print(f"warp demo: error: namespace lab unavailable: {reason}", file=sys.stderr)
        return EXIT_RUNTIME
    if reason and mode == "auto":
        console.print(
            f"[yellow]warp demo: the full demo (network namespaces, NAT, two uplinks per site) "
            f"needs root: {reason}.[/yellow]\n"
            "Running the largest honest subset instead, on loopback: warp-map and two gateways "
            "as processes with two static 127.0.0.x uplinks each, no NAT, and a cut simulated "
            "inside gateway A. Run as root (e.g. sudo make demo) for the real thing.",
            highlight=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="warp-demo-"))
    topo: Topology | None = None
    summary: dict[str, Any] | None = None
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        topo = LoopbackTopology(workdir) if reason else NamespaceTopology(workdir)
        console.print(f"warp demo ({topo.mode}): {topo.honesty}", highlight=False)
        demo = Demo(
            topo,
            duration=args.duration,
            rate=args.rate,
            size=args.size,
            live=args.live,
            console=console,
            log_level=args.log_level,
        )
        summary = demo.run()
    except KeyboardInterrupt:
        console.print("warp demo: interrupted, cleaning up", highlight=False)
        return 130
    except (DemoError, LabError) as exc:
        console.print(f"[red]warp demo: error:[/red] {exc}", highlight=False)
        return EXIT_RUNTIME
    finally:
        with contextlib.suppress(Exception):
            if topo is not None:
                topo.close()
        if args.keep:
            console.print(f"configs and logs kept in {workdir}", highlight=False)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
    console.print(render_summary(summary))
    if args.summary_json:
        _write_json(args.summary_json, summary)
    return EXIT_OK if summary["lost"] == 0 and summary["duplicates"] == 0 else EXIT_RUNTIME


def register_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run warp-map and two gateways on this machine, cut an uplink, show what arrives",
        description="Start a warp-map and two gateways on this machine (as root: in network "
        "namespaces, each site behind NAT with two uplinks; otherwise on loopback), send "
        "sequence-numbered datagrams through the tunnel, cut one uplink of site A half-way, "
        "show a live per-path table and a summary (sent, delivered, duplicates, lost). "
        "Everything is cleaned up on exit, Ctrl-C included. Exit 0 when nothing was lost.",
    )
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of traffic (default 20)"
    )
    parser.add_argument("--rate", type=float, default=500.0, help="datagrams/s (default 500)")
    parser.add_argument("--size", type=int, default=200, help="datagram size in bytes")
    parser.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="plain periodic lines instead of the live table (for CI logs)",
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "namespaces", "loopback"],
        default="auto",
        help="auto (default): namespaces as root, loopback otherwise",
    )
    parser.add_argument("--summary-json", metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the configs and logs")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log.level of the two gateways (their logs are kept with --keep)",
    )
    parser.set_defaults(handler=run_demo)


if __name__ == "__main__":
    sys.exit(helper_main())
