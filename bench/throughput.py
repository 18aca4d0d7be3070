"""Gateway throughput, latency and CPU in the namespace lab, next to plain UDP, against the
project's targets (≥ 250 Mbit/s lossless; added one-way latency p50 ≤ 0.3 ms, p99 ≤ 2 ms).

    sudo .venv/bin/python bench/throughput.py [--quick] [--loops uvloop,asyncio]
                                              [--sizes 64,512,1400]
                                              [--repeat 3] [--seconds 3] [--profile 5]

Lab (warp/netlab.py): sites "a" and "b" behind cone NAT, two uplinks each, `warp-map` in the
public namespace, CPE input filter on both routers (as tests/lab/test_gateway.py). Each site
host runs `warp run` with a loopback gate (application_to_gate 59401, gate_to_application
59500) and (k, n) = (3, 5); the gateways punch through both NATs, so there are 2 × 2 = 4
active paths (`--uplinks-b 1` gives exactly two). A paced sender of sequence-numbered,
timestamped (CLOCK_MONOTONIC, shared by all namespaces) datagrams (64, 512 and 1400 B:
`--sizes`) sends into a's gate; a receiver on 127.0.0.1:59500 behind b's gate counts unique
datagrams and one-way latency. The gateways run the code of the tree this script is in
(`python -m warp.cli` from it), so a copy of another commit measures that commit.

Plain UDP baseline through the same lab: the same sender in a's host namespace sends to b's
up1 public address, port 40000, which b's router forwards (DNAT) to b's host: host a → NAT a
→ public bridge → NAT b → host b, one uplink each way, no gateway.

For each of plain UDP, warp on uvloop and warp on stock asyncio (`WARP_EVENT_LOOP=asyncio`):

* the offered rate is stepped up; each point runs `--repeat` times; a point is lossless when
  the median delivered share is ≥ 99.9 %; stepping stops at the first lossy point. Reported:
  the highest lossless rate (app datagrams/s and app Mbit/s) and the CPU % of each warp
  process there (utime + stime from /proc/<pid>/stat over the run);
* latency p50 / p99 at 10 k datagrams/s (median of the repeats); "added" = warp − plain UDP;
* at the highest lossless rate: packets on the wire per app datagram and wire bytes (IP
  packets, i.e. the veths' tx bytes less 14 B of Ethernet header each) per app byte, both
  counted on site a's uplink interfaces (`ip -s link`: probes and keepalives included, no
  assumption about the shard layout); CPU µs per app datagram: both gateways (user + system)
  for warp, the sending and receiving programs (their syscalls include the kernel path) for
  plain UDP.

`--profile S` then samples both gateways with py-spy (when installed) for S s at 10 k/s…
at the highest lossless uvloop rate, and prints the top functions by own time and by
inclusive time (share of all samples, idle included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from warp.keys import encode_key, generate_private_key, public_key_of  # noqa: E402
from warp.netlab import Lab, Site  # noqa: E402
from warp.status import query_status  # noqa: E402

BIN = Path(sys.executable).parent
# Run from REPO (cwd and PYTHONPATH): the code next to this script, not whatever is installed.
WARP = [sys.executable, "-m", "warp.cli"]
WARP_MAP = [sys.executable, "-m", "warp_map_server.cli"]
PY_SPY = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
MAP_PORT = 13116
GATE_PORT = 59401
APP_PORT = 59500
PLAIN_PORT = 40000
SIZES = (64, 512, 1400)
ETHERNET_HEADER = 14
HEADER = struct.Struct("!IQ")  # seq, CLOCK_MONOTONIC ns at send
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOSSLESS = 0.999

CPE_FIREWALL = """table ip cpe {
    chain input {
        type filter hook input priority filter - 1; policy accept;
        iifname "wan" meta l4proto udp ct state new drop
    }
}
"""


# --- agents (run inside lab namespaces: `throughput.py agent-send|agent-recv ...`) ---------


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def agent_send(dest: str, rate: float, count: int, start_at: float, size: int) -> None:
    host, port = dest.rsplit(":", 1)
    addr = (host, int(port))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    buf = bytearray(size)
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = _cpu_s()
    t0 = time.monotonic()
    sent = errors = 0
    while sent < count:
        now = time.monotonic()
        due = min(count, int((now - t0) * rate) + 1)
        while sent < due:
            HEADER.pack_into(buf, 0, sent, time.monotonic_ns())
            try:
                sock.sendto(buf, addr)
            except OSError:
                errors += 1
                if errors > 100_000:
                    count = sent
                    break
                continue
            sent += 1
        if sent < count:
            wait = t0 + (sent + 1) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
    seconds = time.monotonic() - t0
    print(json.dumps({"sent": sent, "errors": errors, "seconds": seconds,
                      "cpu_s": _cpu_s() - cpu0}), flush=True)  # fmt: skip


def agent_recv(bind: str, count: int, lifetime: float, idle: float) -> None:
    host, port = bind.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((host, int(port)))
    sock.settimeout(0.2)
    seen = bytearray(count)
    lat: list[int] = []
    received = unique = dup = 0
    first = last = 0.0
    buf = bytearray(65536)
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + lifetime
    cpu0 = _cpu_s()
    while time.monotonic() < end and unique < count:
        if first and time.monotonic() - last > idle:
            break
        try:
            n = sock.recv_into(buf)
        except TimeoutError:
            continue
        now = time.monotonic_ns()
        received += 1
        if n < HEADER.size:
            continue
        seq, sent_ns = HEADER.unpack_from(buf)
        if seq >= count:
            continue
        last = time.monotonic()
        if not first:
            first = last
        if seen[seq]:
            dup += 1
            continue
        seen[seq] = 1
        unique += 1
        lat.append(now - sent_ns)
    lat.sort()

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6 if lat else None

    print(json.dumps({"received": received, "unique": unique, "dup": dup,
                      "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                      "cpu_s": _cpu_s() - cpu0}), flush=True)  # fmt: skip


# --- the lab -------------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    site: Site
    config: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    pid: int = 0

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


@dataclass
class Bench:
    lab: Lab
    a: Site
    b: Site
    args: argparse.Namespace
    keys: dict[str, bytes] = field(default_factory=dict)
    map_key: bytes = b""
    gws: dict[str, Gateway] = field(default_factory=dict)

    @classmethod
    def build(cls, lab: Lab, args: argparse.Namespace) -> Bench:
        a = lab.add_site("a", "cone", uplinks=2)
        b = lab.add_site("b", "cone", uplinks=args.uplinks_b)
        for site in (a, b):
            lab.run(site.router_ns, ["nft", "-f", "-"], input=CPE_FIREWALL)
        # plain-UDP baseline: b's router forwards udp/40000 on up1's public address to b's host
        up = b.uplinks[0]
        lab.run(
            b.router_ns,
            ["nft", "-f", "-"],
            input=(
                "table ip bench {\n  chain prerouting {\n"
                "    type nat hook prerouting priority dstnat; policy accept;\n"
                f'    iifname "wan" ip daddr {up.public_address} udp dport {PLAIN_PORT} '
                f"dnat to {up.address}:{PLAIN_PORT}\n  }}\n}}\n"
            ),
        )
        bench = cls(lab, a, b, args, map_key=generate_private_key())
        bench.keys = {"a": generate_private_key(), "b": generate_private_key()}
        (lab.workdir / "map.toml").write_text(
            f'bind = "{lab.public_address}:{MAP_PORT}"\n'
            f'private_key = "{encode_key(bench.map_key)}"\n'
        )
        map_log = lab.workdir / "map.log"
        proc = lab.spawn(
            lab.public_ns,
            [*WARP_MAP, "--config", str(lab.workdir / "map.toml")],
            3600,
            stdout=map_log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=_env(),
        )
        deadline = time.monotonic() + 10
        while "map.listening" not in map_log.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"warp-map did not start: {map_log.read_text()}")
            time.sleep(0.02)
        return bench

    def config(self, name: str) -> Gateway:
        site = self.a if name == "a" else self.b
        other = "b" if name == "a" else "a"
        w = self.lab.workdir
        path = w / f"{name}.toml"
        path.write_text(
            f'private_key = "{encode_key(self.keys[name])}"\n'
            "[interfaces]\n"
            'inclusion_patterns = ["^up"]\nexclusion_patterns = []\n'
            "[warp_map]\n"
            f'address = "{self.lab.public_address}:{MAP_PORT}"\n'
            f'public_key = "{encode_key(public_key_of(self.map_key))}"\n'
            "[far_gate]\n"
            f'public_key = "{encode_key(public_key_of(self.keys[other]))}"\n'
            "[tunnels.app.gate]\n"
            f"ipv4 = true\napplication_to_gate = {GATE_PORT}\n"
            f"gate_to_application = {APP_PORT}\n"
            "[tunnels.app.transport.redundancy]\n"
            f"num_shards = {self.args.n}\nrequired_shards = {self.args.k}\n"
            f'[control]\nsocket = "{w / (name + ".sock")}"\n'
            '[log]\nformat = "json"\n'
        )
        return Gateway(name, site, path, w / f"{name}.sock", w / f"{name}.log")

    def start_gateways(self, loop: str) -> None:
        env = _env()
        env["WARP_EVENT_LOOP"] = loop
        for name in ("a", "b"):
            gw = self.config(name)
            gw.proc = self.lab.spawn(
                gw.site.host_ns,
                [*WARP, "run", str(gw.config)],
                3600,
                env=env,
                stdout=gw.log.open("w"),
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            gw.pid = _child_pid(gw.proc.pid)
            self.gws[name] = gw
            if name == "a":
                time.sleep(0.3)
        want = 2 * self.args.uplinks_b
        deadline = time.monotonic() + 20
        for gw in self.gws.values():
            while True:
                try:
                    snap = query_status(str(gw.socket))
                    if sum(p["state"] == "active" for p in snap["paths"]) >= want:
                        break
                except Exception:  # not up yet (StatusError, OSError)
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{gw.name}: paths not up\n{gw.log.read_text()[-3000:]}")
                time.sleep(0.1)
        time.sleep(0.5)

    def stop_gateways(self) -> None:
        for gw in self.gws.values():
            if gw.proc is not None:
                self.lab.stop(gw.proc, grace_s=5)
        self.gws.clear()

    def wire_counters(self) -> tuple[int, int]:
        """(packets, IP bytes) sent so far on site a's uplink interfaces."""
        out = self.lab.run(self.a.host_ns, ["ip", "-s", "-j", "link", "show"]).stdout
        packets = wire = 0
        for link in json.loads(out):
            if link["ifname"].startswith("up"):
                tx = link["stats64"]["tx"]
                packets += tx["packets"]
                wire += tx["bytes"] - ETHERNET_HEADER * tx["packets"]
        return packets, wire

    def run_once(self, mode: str, rate: float, seconds: float, size: int) -> dict[str, Any]:
        """One paced run; mode "plain" or "warp". Returns delivered share, latency, CPU."""
        count = max(100, int(rate * seconds))
        if mode == "plain":
            dest = f"{self.b.uplinks[0].public_address}:{PLAIN_PORT}"
            bind = f"0.0.0.0:{PLAIN_PORT}"
        else:
            dest = f"127.0.0.1:{GATE_PORT}"
            bind = f"127.0.0.1:{APP_PORT}"
        me = [sys.executable, str(Path(__file__).resolve())]
        recv = self.lab.spawn(
            self.b.host_ns,
            [*me, "agent-recv", bind, str(count), f"{seconds + 10:g}", "1.0"],
            seconds + 20,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert recv.stdout is not None
        ready = recv.stdout.readline()
        if "ready" not in ready:
            raise RuntimeError(f"receiver: {ready}{recv.stdout.read()}")
        start_at = time.time() + 0.2
        ticks0 = {n: g.cpu_ticks() for n, g in self.gws.items()}
        box0 = _box_ticks()
        wire0 = self.wire_counters()
        t0 = time.monotonic()
        send = self.lab.spawn(
            self.a.host_ns,
            [*me, "agent-send", dest, f"{rate:g}", str(count), f"{start_at:.3f}", str(size)],
            seconds + 20,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        s_out, _ = send.communicate(timeout=seconds + 25)
        r_out, _ = recv.communicate(timeout=seconds + 25)
        wall = time.monotonic() - t0 - 0.2
        ticks1 = {n: g.cpu_ticks() for n, g in self.gws.items()}
        box1 = _box_ticks()
        wire1 = self.wire_counters()
        s = json.loads(s_out.strip().splitlines()[-1])
        r = json.loads(r_out.strip().splitlines()[-1])
        # the gateways' CPU over the send window (the receiver waits ~1 s idle at the end)
        window = max(s["seconds"], wall - 1.0)
        sent = max(1, s["sent"])
        if mode == "plain":
            cpu_s = s["cpu_s"] + r["cpu_s"]
        else:
            cpu_s = sum(ticks1[n] - ticks0[n] for n in ticks0) / CLK_TCK
        return {
            "wire_packets": (wire1[0] - wire0[0]) / sent,
            "wire_bytes": (wire1[1] - wire0[1]) / (sent * size),
            "cpu_us": 1e6 * cpu_s / sent,
            "rate": rate,
            "sent": s["sent"],
            "delivered": r["unique"] / max(1, s["sent"]),
            "dup": r["dup"],
            "achieved": r["unique"] / s["seconds"] if s["seconds"] else 0.0,
            "p50": r["p50_ms"],
            "p99": r["p99_ms"],
            "cpu": {n: 100 * (ticks1[n] - ticks0[n]) / CLK_TCK / window for n in ticks0},
            "snd_cpu": 100 * s["cpu_s"] / s["seconds"],
            "box_cpu": 100 * (1 - (box1[1] - box0[1]) / max(1, box1[0] - box0[0])),
            "rcv_cpu": 100 * r["cpu_s"] / window,
        }

    def point(self, mode: str, rate: float, size: int) -> dict[str, Any]:
        runs = []
        for _ in range(self.args.repeat):
            runs.append(self.run_once(mode, rate, self.args.seconds, size))
            time.sleep(0.5)

        def med(key: str) -> float | None:
            vals = [r[key] for r in runs if r[key] is not None]
            return statistics.median(vals) if vals else None

        cpu = {n: statistics.median(r["cpu"][n] for r in runs) for n in runs[0]["cpu"]}
        out: dict[str, Any] = {
            k: med(k)
            for k in (
                *("delivered", "achieved", "p50", "p99", "snd_cpu", "rcv_cpu", "box_cpu"),
                *("wire_packets", "wire_bytes", "cpu_us"),
            )
        }
        out.update(rate=rate, cpu=cpu, runs=[round(r["delivered"] * 100, 2) for r in runs])
        tag = "ok " if out["delivered"] >= LOSSLESS else "LOSSY"
        cpus = " ".join(f"{n}={v:.0f}%" for n, v in cpu.items())
        print(f"  {mode:5s} {size:4d} B {rate / 1000:6.1f} k/s  delivered {out['runs']} %  "
              f"p50 {out['p50'] or 0:.3f} ms p99 {out['p99'] or 0:.3f} ms  {tag} "
              f"{out['wire_packets']:.2f} pkt/dgram {out['wire_bytes']:.2f} B/B "
              f"{out['cpu_us']:.1f} µs/dgram {cpus} machine={out['box_cpu']:.0f}% of 2 cores",
              flush=True)  # fmt: skip
        return out

    def sweep(self, mode: str, rates: list[float], size: int) -> dict[str, Any]:
        best: dict[str, Any] | None = None
        for rate in rates:
            p = self.point(mode, rate, size)
            if p["delivered"] < LOSSLESS:
                break
            best = p
        latency = self.point(mode, 10_000, size)
        return {"best": best, "latency": latency}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _box_ticks() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the whole machine, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(vals), vals[3] + vals[4]


def _child_pid(pid: int) -> int:
    """The command under `ip netns exec … timeout …` (timeout's only child)."""
    for _ in range(200):
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.01)
    raise RuntimeError("gateway process not found")


# --- profiling -----------------------------------------------------------------------------


def profile(bench: Bench, rate: float, seconds: float) -> None:
    if not PY_SPY:
        print("\npy-spy not installed (.venv/bin/pip install py-spy): no profile")
        return
    outs = {}
    procs = []
    for name, gw in bench.gws.items():
        out = bench.lab.workdir / f"profile-{name}.txt"
        outs[name] = out
        argv = [PY_SPY, "record", "--pid", str(gw.pid), "--duration", f"{seconds:g}",
                "--rate", "250", "--idle", "--nonblocking", "--format", "raw",
                "--output", str(out)]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.3)
    bench.run_once("warp", rate, seconds + 1, max(bench.args.sizes))
    for p in procs:
        p.wait(timeout=seconds + 30)
    for name, out in outs.items():
        if not out.exists():
            print(f"\nprofile {name}: py-spy wrote nothing")
            continue
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack:
                continue
            count = int(n)
            total += count
            frames = [_short(f) for f in stack.split(";") if f]
            if frames:
                own[frames[-1]] += count
            for f in set(frames):
                incl[f] += count
        role = "sender side (gate in, shards out)" if name == "a" else "receiver side"
        print(f"\nprofile of gateway {name}, {role}: {total} samples, {rate / 1000:g} k/s")
        print("  own time                                                      %")
        for f, c in own.most_common(bench.args.top):
            print(f"    {f[:60]:60s} {100 * c / total:5.1f}")
        print("  inclusive                                                     %")
        for f, c in incl.most_common(bench.args.top + 8)[: bench.args.top + 8]:
            print(f"    {f[:60]:60s} {100 * c / total:5.1f}")
        keep = REPO / "bench" / "out"
        keep.mkdir(exist_ok=True)
        (keep / out.name).write_bytes(out.read_bytes())


def _short(frame: str) -> str:
    """`func (path/to/file.py:123)` → `func (file.py)`: one row per function."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].rsplit(':', 1)[0].rstrip(')')})" if where else func


# --- main ----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def report(results: dict[int, dict[str, dict[str, Any]]]) -> None:
    print(f"\n(k, n) = ({ARGS.k}, {ARGS.n}), 2 + {ARGS.uplinks_b} uplinks, medians of "
          f"{ARGS.repeat} × {ARGS.seconds:g} s; lossless = ≥ 99.9 % delivered; pkt/dgram, "
          "wire B/app B and CPU µs/dgram at the lossless rate (CPU: gateways a + b for warp, "
          "sending + receiving program for plain)")  # fmt: skip
    head = (
        f"{'path':18s} {'lossless k/s':>12s} {'app Mbit/s':>10s} {'vs plain':>8s} "
        f"{'pkt/dgram':>9s} {'wire B/B':>8s} {'µs/dgram':>8s} "
        f"{'CPU a %':>8s} {'CPU b %':>8s} {'p50 ms':>7s} {'p99 ms':>7s} "
        f"{'+p50 ms':>8s} {'+p99 ms':>8s} {'CPU@10k a/b %':>14s}"
    )
    for size, by_mode in results.items():
        print(f"\n{size} B datagrams")
        print(head)
        print("-" * len(head))
        plain = by_mode.get("plain")
        for mode, res in by_mode.items():
            best, lat = res["best"], res["latency"]
            rate = best["rate"] if best else None
            mbit = rate * size * 8 / 1e6 if rate else None
            ratio = (
                f"{rate / plain['best']['rate']:.2f}"
                if rate and plain and plain["best"] and mode != "plain"
                else ""
            )
            if mode == "plain":
                cpu_a = cpu_b = "—"
                add50 = add99 = ""
                cpu10 = f"snd {lat['snd_cpu']:.0f}"
            else:
                cpu_a = fmt(best["cpu"]["a"], ".0f") if best else "—"
                cpu_b = fmt(best["cpu"]["b"], ".0f") if best else "—"
                pl = plain["latency"] if plain else None
                add50 = f"{lat['p50'] - pl['p50']:.3f}" if pl and lat["p50"] else ""
                add99 = f"{lat['p99'] - pl['p99']:.3f}" if pl and lat["p99"] else ""
                cpu10 = f"{lat['cpu']['a']:.0f}/{lat['cpu']['b']:.0f}"
            # at the lossless rate, else at 10 k/s (marked *)
            at = best or lat
            star = "" if best else "*"
            lossy10 = "" if lat["delivered"] >= LOSSLESS else f" (10k: {lat['delivered']:.1%})"
            print(
                f"{mode:18s} {fmt(rate and rate / 1000, '.1f'):>12s} {fmt(mbit, '.0f'):>10s} "
                f"{ratio:>8s} {fmt(at['wire_packets'], '.2f') + star:>9s} "
                f"{fmt(at['wire_bytes'], '.2f') + star:>8s} "
                f"{fmt(at['cpu_us'], '.1f') + star:>8s} {cpu_a:>8s} {cpu_b:>8s} "
                f"{fmt(lat['p50'], '.3f'):>7s} {fmt(lat['p99'], '.3f'):>7s} "
                f"{add50:>8s} {add99:>8s} {cpu10:>14s}{lossy10}"
            )
    print("\ntargets: ≥ 250 Mbit/s lossless; added one-way latency p50 ≤ 0.3 ms, "
          "p99 ≤ 2 ms at 10 k/s; * = no lossless rate: figures at 10 k/s")  # fmt: skip


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    if len(sys.argv) > 1 and sys.argv[1] == "agent-send":
        agent_send(
            sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
        )
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "agent-recv":
        agent_recv(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 run × 2 s, coarse rate steps")
    ap.add_argument("--loops", default="uvloop,asyncio", help="event loops for warp")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="datagram sizes, B")
    ap.add_argument("--uplinks-b", type=int, default=2, help="1: exactly two paths")
    ap.add_argument("--rates", default="", help="warp rates k/s, comma list")
    ap.add_argument("--plain-rates", default="", help="plain UDP rates k/s, comma list")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--profile", type=float, default=0.0, help="py-spy both gateways S s")
    ap.add_argument("--profile-rate", type=float, default=0.0, help="k/s (default: best)")
    ap.add_argument("--top", type=int, default=15)
    ARGS = args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    if min(args.sizes) < HEADER.size:
        ap.error(f"--sizes: at least {HEADER.size} B (sequence number and timestamp)")
    if args.quick:
        args.repeat, args.seconds = 1, 2.0
    full = [2.5, 5, 7.5, 10, 12.5, 15, 17.5, 20, 22.5, 25, 27.5, 30, 35, 40]
    quick = [5, 10, 15, 20, 25, 30]
    rates = [float(x) * 1000 for x in args.rates.split(",") if x] or [
        x * 1000 for x in (quick if args.quick else full)
    ]
    plain_rates = [float(x) * 1000 for x in args.plain_rates.split(",") if x] or (
        [25e3, 50e3, 100e3] if args.quick else [25e3, 50e3, 75e3, 100e3, 150e3, 200e3]
    )
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    try:
        from warp.paths import batch_io

        socket_io = batch_io.default().name
    except ImportError:  # a tree from before batched socket I/O
        socket_io = "per datagram"
    print(f"gateways' uplink socket I/O: {socket_io}")
    results: dict[int, dict[str, dict[str, Any]]] = {size: {} for size in args.sizes}
    with Lab() as lab:
        bench = Bench.build(lab, args)
        if not args.no_plain:
            print("plain UDP: host a → NAT a → public → NAT b (DNAT udp/40000) → host b")
            for size in args.sizes:
                results[size]["plain"] = bench.sweep("plain", plain_rates, size)
        for loop in [x for x in args.loops.split(",") if x]:
            print(f"warp ({loop}), ({args.k}, {args.n}), 2 + {args.uplinks_b} uplinks")
            bench.start_gateways(loop)
            try:
                for size in args.sizes:
                    results[size][f"warp {loop}"] = bench.sweep("warp", rates, size)
                if args.profile and loop == "uvloop":
                    best = results[max(args.sizes)]["warp uvloop"]["best"]
                    rate = args.profile_rate * 1000 or (best["rate"] if best else 10e3)
                    profile(bench, rate, args.profile)
            finally:
                bench.stop_gateways()
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
