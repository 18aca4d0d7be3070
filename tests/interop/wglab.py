"""A two-namespace lab for interop tests and benchmarks: namespace A (ours) and namespace B
(Debian's ``wireguard-go``), joined by one veth pair.

::

    ns "<p>-a"  veth "a0" 192.168.77.1/24  ===  veth "b0" 192.168.77.2/24  ns "<p>-b"
                                                 wireguard-go "wg<p>b" 10.77.0.2/24 udp 51820

Every address lives only inside the two namespaces. Names carry a per-instance prefix
``wi<pid>x<n>`` so parallel or crashed runs never collide, and :func:`cleanup_stale` removes what
a dead run left behind. wireguard-go's UAPI socket directory is shared by all namespaces, so its
interface names are unique across them too (``wi<pid>x<n>b``, at most 15 characters).

Teardown (:meth:`WgLab.close`, also run by the context manager on failure) stops every process
this lab started (by PID, SIGTERM then SIGKILL), deletes both namespaces (which removes the
veths and the TUN devices in them) and removes wireguard-go's UAPI sockets.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from warp.wireguard import generate_private_key, public_key_of

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PYTHON = os.environ.get("WARP_PYTHON") or str(REPO / ".venv" / "bin" / "python")
UAPI_DIR = Path("/var/run/wireguard")

UNDERLAY_A = "192.168.77.1"
UNDERLAY_B = "192.168.77.2"
UNDERLAY6_A = "fd00:77::1"
UNDERLAY6_B = "fd00:77::2"
TUNNEL_A = "10.77.0.1"
TUNNEL_B = "10.77.0.2"
TUNNEL6_A = "fd77::1"
TUNNEL6_B = "fd77::2"
WG_PORT = 51820

REQUIRED_TOOLS = ("ip", "wireguard-go", "wg", "timeout")
_PREFIX_RE = re.compile(r"^wi(\d+)x\d+")
_counter = itertools.count(1)


class LabError(RuntimeError):
    """A lab command failed; the message has the command and its stderr."""


def prerequisites_missing(tools: Sequence[str] = REQUIRED_TOOLS) -> str | None:
    """Why this machine cannot run the interop lab, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if not os.path.exists(PYTHON):
        return f"no interpreter at {PYTHON} (set WARP_PYTHON)"
    return None


def run(
    argv: Sequence[str],
    *,
    timeout: float = 30.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with a timeout; raise `LabError` on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g} s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise LabError(f"exit {proc.returncode}: {' '.join(argv)}: {output}")
    return proc


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        private = generate_private_key()
        return cls(private, public_key_of(private))


@dataclass
class WgPeer:
    """A peer entry of a wireguard-go interface."""

    public_key: bytes
    allowed_ips: Sequence[str]
    endpoint: str | None = None
    preshared_key: bytes | None = None
    persistent_keepalive: int | None = None


@dataclass
class WireguardGo:
    """A running wireguard-go in one namespace."""

    ns: str
    ifname: str
    keys: KeyPair
    listen_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class WgLab:
    """Two namespaces, one veth pair; processes started in them are tracked and stopped."""

    prefix: str = field(default_factory=lambda: f"wi{os.getpid()}x{next(_counter)}")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="warp-interop-")))
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    wireguard_gos: list[WireguardGo] = field(default_factory=list)
    _log_files: list[IO[bytes]] = field(default_factory=list)
    _built: bool = False

    @property
    def ns_a(self) -> str:
        return f"{self.prefix}-a"

    @property
    def ns_b(self) -> str:
        return f"{self.prefix}-b"

    def ns(self, side: str) -> str:
        return self.ns_a if side == "a" else self.ns_b

    # -- build / teardown -------------------------------------------------------------------

    def __enter__(self) -> WgLab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def build(self) -> None:
        self._built = True
        for ns in (self.ns_a, self.ns_b):
            run(["ip", "netns", "add", ns])
        run(
            [
                "ip", "link", "add", "a0", "netns", self.ns_a, "type", "veth",
                "peer", "name", "b0", "netns", self.ns_b,
            ]
        )  # fmt: skip
        for ns, dev, addr, addr6 in (
            (self.ns_a, "a0", UNDERLAY_A, UNDERLAY6_A),
            (self.ns_b, "b0", UNDERLAY_B, UNDERLAY6_B),
        ):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run(["ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        # the underlay must not be what limits a benchmark: no offload surprises, long queues
        for ns, dev in ((self.ns_a, "a0"), (self.ns_b, "b0")):
            run(["ip", "-n", ns, "link", "set", dev, "txqueuelen", "10000"], check=False)

    def close(self) -> None:
        """Stop everything this lab started and delete its namespaces. Idempotent."""
        for proc in reversed(self.processes):
            stop_process(proc)
        self.processes.clear()
        for f in self._log_files:
            with contextlib.suppress(OSError):
                f.close()
        self._log_files.clear()
        if self._built:
            for ns in (self.ns_a, self.ns_b):
                _kill_namespace_pids(ns)
                run(["ip", "netns", "del", ns], check=False)
        for wg in self.wireguard_gos:
            with contextlib.suppress(OSError):
                (UAPI_DIR / f"{wg.ifname}.sock").unlink()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- processes --------------------------------------------------------------------------

    def spawn(
        self,
        side: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        stdin: Any = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``side`` ("a"/"b"); the lab stops it on close.
        ``ip netns exec`` execs, so the Popen's pid is the command's own."""
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(side), *argv],
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            env=full_env,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def exec(
        self, side: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns(side), *argv], timeout=timeout, check=check)

    def log_file(self, name: str) -> tuple[Path, IO[bytes]]:
        path = self.workdir / name
        f = path.open("wb")
        self._log_files.append(f)
        return path, f

    def write_key(self, name: str, key: bytes) -> Path:
        path = self.workdir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(b64(key) + "\n")
        return path

    # -- wireguard-go -------------------------------------------------------------------------

    def wireguard_go(
        self,
        side: str,
        *,
        keys: KeyPair,
        peers: Sequence[WgPeer],
        addresses: Sequence[str] = (),
        listen_port: int = WG_PORT,
        mtu: int | None = None,
        ifname: str | None = None,
    ) -> WireguardGo:
        """Start wireguard-go (foreground, debug log) in namespace ``side``, configure it with
        ``wg set``, address it and bring it up. Returns once the UAPI socket answers."""
        ifname = ifname or f"{self.prefix}{side}"
        assert len(ifname) <= 15, ifname
        log_path, log_f = self.log_file(f"wireguard-go-{side}.log")
        proc = self.spawn(
            side,
            ["wireguard-go", "-f", ifname],
            env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "debug"},
            stdout=log_f,
            stderr=subprocess.STDOUT,
        )
        wg = WireguardGo(self.ns(side), ifname, keys, listen_port, proc, log_path)
        self.wireguard_gos.append(wg)
        sock = UAPI_DIR / f"{ifname}.sock"
        deadline = time.monotonic() + 10.0
        while not sock.exists():
            if proc.poll() is not None:
                raise LabError(f"wireguard-go exited {proc.returncode}: {wg.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"wireguard-go did not create {sock}: {wg.log()[-2000:]}")
            time.sleep(0.02)
        key_file = self.write_key(f"{ifname}.key", keys.private)
        argv = ["wg", "set", ifname, "listen-port", str(listen_port), "private-key", str(key_file)]
        for i, peer in enumerate(peers):
            argv += ["peer", b64(peer.public_key)]
            if peer.preshared_key is not None:
                psk = self.write_key(f"{ifname}.psk{i}", peer.preshared_key)
                argv += ["preshared-key", str(psk)]
            if peer.endpoint:
                argv += ["endpoint", peer.endpoint]
            if peer.persistent_keepalive:
                argv += ["persistent-keepalive", str(peer.persistent_keepalive)]
            argv += ["allowed-ips", ",".join(peer.allowed_ips)]
        self.exec(side, argv)
        for address in addresses:
            self.exec(side, ["ip", "addr", "add", address, "dev", ifname, "nodad"])
        if mtu is not None:
            self.exec(side, ["ip", "link", "set", ifname, "mtu", str(mtu)])
        self.exec(side, ["ip", "link", "set", ifname, "up"])
        return wg


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL. Only ever this one PID."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _kill_namespace_pids(ns: str) -> None:
    """Kill what still runs in a namespace of ours (all of it was started by this lab)."""
    proc = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    for line in proc.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(line), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Remove namespaces and UAPI sockets left by interop runs whose process is dead."""
    removed: list[str] = []
    proc = run(["ip", "netns", "list"], check=False, timeout=10)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _PREFIX_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _kill_namespace_pids(name)
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    if UAPI_DIR.is_dir():
        for sock in UAPI_DIR.glob("wi*x*.sock"):
            m = _PREFIX_RE.match(sock.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    sock.unlink()
                removed.append(str(sock))
    return removed


def iperf3(
    lab: WgLab,
    server_addr: str,
    *,
    client_side: str = "a",
    server_side: str = "b",
    seconds: float = 5.0,
    reverse: bool = False,
    during: Callable[[], None] | None = None,
    during_at: float = 2.0,
) -> dict[str, Any]:
    """One iperf3 TCP test (client in ``client_side`` → server in ``server_side``, or the
    reverse direction with ``reverse``), with a one-shot server under ``timeout``. ``during``
    is called ``during_at`` s into the transfer. Returns Mbit/s figures from iperf3's JSON."""
    budget = int(seconds + 30)
    server = lab.spawn(
        server_side, ["timeout", str(budget), "iperf3", "-s", "-1", "-B", server_addr]
    )
    try:
        deadline = time.monotonic() + 10.0
        while True:  # wait until the server listens (ss in its namespace; no probe connection)
            out = lab.exec(server_side, ["ss", "-Hltn", "sport", "=", ":5201"], check=False)
            if out.stdout.strip():
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise LabError("iperf3 server did not start")
            time.sleep(0.05)
        argv = ["timeout", str(budget), "iperf3", "-c", server_addr, "-t", f"{seconds:g}", "-J"]
        if reverse:
            argv.append("-R")
        client = lab.spawn(client_side, argv)
        if during is not None:
            time.sleep(during_at)
            during()
        out_b, err_b = client.communicate(timeout=budget + 5)
    finally:
        stop_process(server)
    try:
        report = json.loads(out_b.decode())
    except ValueError:
        raise LabError(f"iperf3 printed no JSON: {out_b[-500:]!r} {err_b[-500:]!r}") from None
    if report.get("error"):
        raise LabError(f"iperf3: {report['error']}")
    end = report["end"]
    intervals = [i["sum"]["bits_per_second"] / 1e6 for i in report.get("intervals", [])]
    return {
        "sent_mbps": end["sum_sent"]["bits_per_second"] / 1e6,
        "received_mbps": end["sum_received"]["bits_per_second"] / 1e6,
        "retransmits": end["sum_sent"].get("retransmits"),
        "interval_mbps": [round(x, 1) for x in intervals],
        "exit": client.returncode,
    }


WARP = os.environ.get("WARP_BIN") or str(REPO / ".venv" / "bin" / "warp")


def warp_run_config(
    lab: WgLab,
    *,
    ours: KeyPair,
    theirs: KeyPair,
    psk: bytes | None,
    endpoint: str | None = f"{UNDERLAY_B}:{WG_PORT}",
    listen_port: int = WG_PORT,
    tun_name: str = "warp0",
    mtu: int = 1420,
    exclude_tun: bool = True,
    log_level: str = "info",
) -> Path:
    """A ``warp run`` config: one tun gate, ``far_gate.kind = "wireguard"``. With
    ``exclude_tun`` the tun interface is excluded from the uplinks explicitly."""
    exclusions = ['"^lo$"'] + ([f'"^{tun_name}$"'] if exclude_tun else [])
    lines = [
        f'private_key = "{b64(ours.private)}"',
        f"listen_port = {listen_port}",
        "[interfaces]",
        f"exclusion_patterns = [{', '.join(exclusions)}]",
        "[far_gate]",
        f'public_key = "{b64(theirs.public)}"',
        'kind = "wireguard"',
    ]
    if psk is not None:
        lines.append(f'preshared_key = "{b64(psk)}"')
    if endpoint is not None:
        lines.append(f'endpoints = ["{endpoint}"]')
    lines += [
        "[control]",
        f'socket = "{lab.workdir / "warp.sock"}"',
        "[log]",
        f'level = "{log_level}"',
        "[tunnels.wg.gate]",
        'type = "tun"',
        f'name = "{tun_name}"',
        f'address = ["{TUNNEL_A}/24", "{TUNNEL6_A}/64"]',
        f"mtu = {mtu}",
        f'allowed_ips = ["{TUNNEL_B}/32", "{TUNNEL6_B}/128"]',
    ]
    path = lab.workdir / "warp.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class WarpRun:
    """``warp run CONFIG`` in namespace A."""

    lab: WgLab
    config: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def socket(self) -> Path:
        return self.lab.workdir / "warp.sock"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> dict[str, Any] | None:
        """``warp status --json`` over the control socket, or None if it does not answer."""
        proc = self.lab.exec(
            "a", [WARP, "status", "--socket", str(self.socket), "--json"], check=False
        )
        if proc.returncode != 0:
            return None
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            return None
        return result

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; the exit code (the lab kills it if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.process)
            return -9


def start_warp_run(lab: WgLab, config: Path, *, ready_timeout: float = 15.0) -> WarpRun:
    """Start ``warp run`` in namespace A; return once its control socket answers."""
    log_path, log_f = lab.log_file("warp-run.log")
    proc = lab.spawn("a", [WARP, "run", str(config)], stdout=log_f, stderr=subprocess.STDOUT)
    node = WarpRun(lab, config, proc, log_path)
    deadline = time.monotonic() + ready_timeout
    while node.status() is None:
        if proc.poll() is not None:
            raise LabError(f"warp run exited {proc.returncode}: {node.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise LabError(f"warp run did not answer on {node.socket}: {node.log()[-3000:]}")
        time.sleep(0.1)
    return node
