"""WARP's network lab: Linux network-namespace topologies for tests and `warp demo`, always torn
down.

Topology (see docs/lab.md)::

    site host ns "<p>-a"           router ns "<p>-a-nat"            public ns "<p>-pub"
    up1 10.1.1.2/24 ==veth== lan1 10.1.1.1/24                       bridge pub0
    up2 10.1.2.2/24 ==veth== lan2 10.1.2.1/24   wan ==veth== w-a    203.0.113.1/24
    ...                       SNAT 10.1.i.0/24 -> 203.0.113.1i        198.51.100.1/24
                                                                    |  h-map ==veth== eth0
                                                                    public host ns "<p>-map"
                                                                    198.51.100.10/24

Every address lives only inside the lab's namespaces. Namespace names carry a per-instance
prefix ``wl<pid>x<n>`` so parallel or crashed runs never collide; :func:`cleanup_stale`
removes namespaces whose owning pid is dead. Veth ends are created directly inside their
namespaces, so nothing ever appears in the root namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

#: A site router's NAT (docs/lab.md): "cone" maps and filters endpoint-independently (full
#: cone); "port-restricted" maps endpoint-independently and filters by address and port, with a
#: firewall dropping unsolicited inbound; "cone-no-firewall" is the same without that firewall
#: (an unsolicited packet creates a conntrack entry that can pin a port); "symmetric" takes a
#: new random port per destination and filters by address and port.
NatKind = Literal["cone", "port-restricted", "cone-no-firewall", "symmetric"]
NAT_KINDS: tuple[NatKind, ...] = ("cone", "port-restricted", "cone-no-firewall", "symmetric")
Direction = Literal["both", "up", "down"]
Addr = tuple[str, int]

PUBLIC_NAT_NET = "203.0.113.0/24"  # NAT routers' WAN (public) addresses
PUBLIC_HOST_NET = "198.51.100.0/24"  # public hosts (warp-map, servers, interop peers)
PUBLIC_NAT_GW = "203.0.113.1"  # the public namespace on the NAT side
PUBLIC_ADDRESS = "198.51.100.1"  # the public namespace itself, gateway of public hosts
MAX_UPLINKS = 9

UDP_TOOLS = Path(__file__).with_name("udp_tools.py")  # warp/udp_tools.py, a standalone script
PREFIX_RE = r"^wl(\d+)x\d+-"
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
REQUIRED_TOOLS = ("ip", "nft", "tc", "sysctl", "timeout", "conntrack")


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


class NetemUnavailable(LabError):
    """The kernel has no ``sch_netem``: delay, jitter and bursty loss cannot be emulated."""


def _cmd(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 30.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def prerequisites_missing() -> str | None:
    """Why the lab cannot run here (None if it probably can)."""
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables, tc)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    return None


def list_namespaces() -> list[str]:
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str) -> None:
    proc = _cmd(["ip", "netns", "pids", ns], check=False)
    for token in proc.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(token), signal.SIGKILL)


def _delete_ns(ns: str) -> None:
    _kill_ns_pids(ns)
    _cmd(["ip", "netns", "del", ns], check=False)


def cleanup_stale(pattern: str = PREFIX_RE) -> list[str]:
    """Delete namespaces left by crashed runs of this suite: names matching ``pattern`` whose
    first group is the pid of the owning process, and that pid is dead. Returns their names."""
    rx = re.compile(pattern)
    removed = []
    for ns in list_namespaces():
        m = rx.match(ns)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _delete_ns(ns)
        removed.append(ns)
    return removed


# --- teardown on exit and on signals -------------------------------------------------------

_LIVE: list[Lab] = []
_LIVE_LOCK = threading.Lock()
_COUNTER = itertools.count()
_PREV_HANDLERS: dict[int, Any] = {}


def _close_all() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _close_all()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    if _PREV_HANDLERS or threading.current_thread() is not threading.main_thread():
        return
    atexit.register(_close_all)
    # SIGINT already raises KeyboardInterrupt: context managers, fixtures and atexit clean up.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        _PREV_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


# --- topology objects ----------------------------------------------------------------------


@dataclass
class Impairment:
    """``tc`` settings of one direction of an uplink (netem + optional tbf rate limit)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    # Gilbert-Elliott ``loss gemodel p r 1-h 1-k`` in percent, e.g. (1, 20, 100, 0)
    gemodel: tuple[float, ...] | None = None
    rate_kbit: int | None = None

    def netem_args(self) -> list[str]:
        args: list[str] = ["limit", "10000"]
        if self.delay_ms or self.jitter_ms:
            args += ["delay", f"{self.delay_ms:g}ms"]
            if self.jitter_ms:
                args += [f"{self.jitter_ms:g}ms"]
        if self.gemodel is not None:
            args += ["loss", "gemodel", *(f"{v:g}%" for v in self.gemodel)]
        elif self.loss_pct:
            args += ["loss", f"{self.loss_pct:g}%"]
        return args

    @property
    def has_netem(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct or self.gemodel)


@dataclass
class Uplink:
    """One uplink of a site (think: one LTE modem): a veth pair host ``upN`` <-> router ``lanN``
    on 10.<site>.<N>.0/24, SNATed by the router to its own public address 203.0.113.<10*site+N>.
    """

    site: Site
    index: int  # N, 1-based
    name: str  # host-side interface name, e.g. "up1"
    router_if: str  # router-side interface name, e.g. "lan1"
    address: str  # host address, 10.<site>.<N>.2
    gateway: str  # router address, 10.<site>.<N>.1
    public_address: str  # the router's public address for this uplink
    table: int  # host policy-routing table for source address ``address``
    blackholed: bool = False
    down: bool = False
    nft_loss_up: float = 0.0  # percent, used when the kernel has no netem
    nft_loss_down: float = 0.0

    @property
    def subnet(self) -> str:
        return f"{self.gateway.rsplit('.', 1)[0]}.0/24"

    def blackhole(self, on: bool = True) -> None:
        """Drop everything on this uplink in both directions (router side), link stays up."""
        self.blackholed = on
        self.site._write_nft()

    def restore(self) -> None:
        self.blackhole(False)

    def set_down(self) -> None:
        """Carrier loss: the router end goes down, so the host's ``upN`` has NO-CARRIER."""
        self.site.lab._ip(self.site.router_ns, "link", "set", self.router_if, "down")
        self.down = True

    def set_up(self) -> None:
        lab = self.site.lab
        lab._ip(self.site.router_ns, "link", "set", self.router_if, "up")
        lab._ip(self.site.host_ns, "link", "set", self.name, "up")
        self.site._host_routes(self)
        self.down = False

    def impair(
        self,
        *,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        gemodel: tuple[float, ...] | None = None,
        rate_kbit: int | None = None,
        direction: Direction = "both",
    ) -> None:
        """Set netem (delay/jitter/loss/bursty loss) and a tbf rate limit on this uplink.

        Settings apply per direction: ``up`` = host->router (egress of ``upN``), ``down`` =
        router->host (egress of ``lanN``). With ``both`` a delay of d adds 2d to the RTT.
        Replaces any earlier impairment of the selected directions. Without netem in the kernel
        (``lab.has_netem`` False) uniform loss is done by nftables (``numgen random``) in the
        router, the rate by tbf, and delay/jitter/``gemodel`` raise :class:`NetemUnavailable`."""
        imp = Impairment(delay_ms, jitter_ms, loss_pct, gemodel, rate_kbit)
        lab = self.site.lab
        if not lab.has_netem and (delay_ms or jitter_ms or gemodel is not None):
            raise NetemUnavailable(
                "tc netem is not available in this kernel (CONFIG_NET_SCH_NETEM): "
                "delay, jitter and Gilbert-Elliott loss need it; plain loss and rate do not"
            )
        nft_loss = 0.0 if lab.has_netem else loss_pct
        if direction in ("both", "up"):
            self.nft_loss_up = nft_loss
        if direction in ("both", "down"):
            self.nft_loss_down = nft_loss
        for ns, dev in self._ends(direction):
            lab._tc_apply(ns, dev, imp if lab.has_netem else Impairment(rate_kbit=rate_kbit))
        self.site._write_nft()

    def clear_impairment(self, direction: Direction = "both") -> None:
        self.impair(direction=direction)

    def _ends(self, direction: Direction) -> list[tuple[str, str]]:
        ends = []
        if direction in ("both", "up"):
            ends.append((self.site.host_ns, self.name))
        if direction in ("both", "down"):
            ends.append((self.site.router_ns, self.router_if))
        return ends


@dataclass
class Site:
    """A field kit: host namespace (``warp run``) behind its own NAT router namespace."""

    lab: Lab
    name: str
    index: int  # site number s: LANs 10.s.N.0/24, public 203.0.113.<10s+N>
    nat: NatKind
    host_ns: str
    router_ns: str
    wan_address: str  # the router's own WAN address 203.0.113.<10s>
    uplinks: list[Uplink] = field(default_factory=list)

    def uplink(self, name: str) -> Uplink:
        for up in self.uplinks:
            if up.name == name:
                return up
        raise KeyError(name)

    def add_uplink(self) -> Uplink:
        """Add an uplink at runtime (next free number); returns it."""
        used = {u.index for u in self.uplinks}
        free = [i for i in range(1, MAX_UPLINKS + 1) if i not in used]
        if not free:
            raise LabError(f"site {self.name}: at most {MAX_UPLINKS} uplinks")
        i = free[0]
        s = self.index
        up = Uplink(
            site=self,
            index=i,
            name=f"up{i}",
            router_if=f"lan{i}",
            address=f"10.{s}.{i}.2",
            gateway=f"10.{s}.{i}.1",
            public_address=f"203.0.113.{10 * s + i}",
            table=100 + i,
        )
        lab = self.lab
        lab._veth(self.host_ns, up.name, self.router_ns, up.router_if)
        # Router side and its NAT rule first, the host address last: a gateway uses the new
        # address the moment it appears, and a first packet that left before its SNAT rule
        # existed would pin an un-NATed conntrack entry.
        lab._ip(self.router_ns, "addr", "add", f"{up.gateway}/24", "dev", up.router_if)
        lab._ip(self.router_ns, "link", "set", up.router_if, "up")
        lab._ip(self.router_ns, "addr", "add", f"{up.public_address}/32", "dev", "wan")
        self.uplinks.append(up)
        self.uplinks.sort(key=lambda u: u.index)
        self._write_nft()
        lab._ip(
            self.host_ns,
            "rule", "add", "from", up.address, "lookup", str(up.table), "pref", str(1000 + i),
        )  # fmt: skip
        lab._ip(self.host_ns, "link", "set", up.name, "up")
        lab._ip(self.host_ns, "addr", "add", f"{up.address}/24", "dev", up.name)
        self._host_routes(up)
        return up

    def remove_uplink(self, up: Uplink) -> None:
        """Remove an uplink at runtime (the interface disappears from the host)."""
        lab = self.lab
        self.uplinks.remove(up)
        lab._ip(self.host_ns, "link", "del", up.name)
        lab._ip(
            self.host_ns, "rule", "del", "from", up.address, "lookup", str(up.table), check=False
        )
        lab._ip(self.router_ns, "addr", "del", f"{up.public_address}/32", "dev", "wan")
        self._write_nft()

    def flush_conntrack(self) -> None:
        """Forget all NAT mappings of this site's router (``conntrack -F``)."""
        self.lab.run(self.router_ns, ["conntrack", "-F"])

    def conntrack(self) -> str:
        """The router's conntrack table (``conntrack -L``), for debugging and assertions."""
        return self.lab.run(self.router_ns, ["conntrack", "-L"], check=False).stdout

    def set_udp_timeout(self, seconds: int, stream_seconds: int | None = None) -> None:
        """NAT UDP mapping timeout of this router (per-netns conntrack sysctls). The "stream"
        timeout applies to flows that saw traffic both ways; it defaults to ``seconds``."""
        stream = seconds if stream_seconds is None else stream_seconds
        self.lab._sysctl(
            self.router_ns,
            {
                "net.netfilter.nf_conntrack_udp_timeout": str(seconds),
                "net.netfilter.nf_conntrack_udp_timeout_stream": str(stream),
            },
        )

    def _host_routes(self, up: Uplink) -> None:
        lab = self.lab
        # main table: one default per uplink, distinct metrics; a socket bound with
        # SO_BINDTODEVICE picks the default route of its device (the lookup honours the oif).
        lab._ip(
            self.host_ns,
            "route", "replace", "default", "via", up.gateway, "dev", up.name,
            "metric", str(100 + up.index),
        )  # fmt: skip
        # policy routing: a socket bound to the uplink's source address leaves through it too.
        lab._ip(
            self.host_ns,
            "route", "replace", "default", "via", up.gateway, "dev", up.name,
            "table", str(up.table),
        )  # fmt: skip

    def _write_nft(self) -> None:
        snat_flags = " fully-random" if self.nat == "symmetric" else ""
        snat = "\n".join(
            f'        oifname "wan" ip saddr {u.subnet} snat to {u.public_address}{snat_flags}'
            for u in self.uplinks
        )
        # "cone": endpoint-independent filtering too (RFC 4787 EIM + EIF, "full cone"): UDP
        # arriving at an uplink's public address goes to that uplink's host address, same port.
        # The SNAT keeps the port, so this is exactly the host's mapping; a peer behind a
        # symmetric NAT (whose port the host cannot know in advance) can then reach it.
        dnat = (
            "\n".join(
                f'        iifname "wan" ip daddr {u.public_address} meta l4proto udp '
                f"dnat to {u.address}"
                for u in self.uplinks
            )
            if self.nat == "cone"
            else ""
        )
        # Unsolicited UDP from the internet to the router itself is dropped, as a NAT router's
        # firewall does. Dropped here, its conntrack entry is never confirmed; otherwise that
        # entry would take the port that a later outbound packet of the LAN host needs, and
        # SNAT would pick another port (hole punching would fail): "cone-no-firewall" has no
        # such rule, on purpose.
        firewall = (
            ""
            if self.nat == "cone-no-firewall"
            else '        iifname "wan" meta l4proto udp ct state new drop\n'
        )
        holes = [u.router_if for u in self.uplinks if u.blackholed]
        up_loss = [(u.router_if, u.nft_loss_up) for u in self.uplinks if u.nft_loss_up]
        down_loss = [(u.router_if, u.nft_loss_down) for u in self.uplinks if u.nft_loss_down]

        def loss(match: str, items: list[tuple[str, float]]) -> str:
            rules = []
            for dev, pct in items:
                ppm = round(pct * 10000)
                cond = "" if ppm >= 1000000 else f" numgen random mod 1000000 < {ppm}"
                rules.append(f'        {match} "{dev}"{cond} drop\n')
            return "".join(rules)

        elements = f"        elements = {{ {', '.join(holes)} }}\n" if holes else ""
        ruleset = (
            "table ip lab\n"
            "delete table ip lab\n"
            "table ip lab {\n"
            "    set blackholed {\n"
            "        type ifname\n"
            f"{elements}"
            "    }\n"
            "    chain prerouting {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            f"{dnat}\n"
            "    }\n"
            "    chain postrouting {\n"
            "        type nat hook postrouting priority srcnat; policy accept;\n"
            f"{snat}\n"
            "    }\n"
            "    chain forward {\n"
            "        type filter hook forward priority filter; policy accept;\n"
            "        iifname @blackholed drop\n"
            "        oifname @blackholed drop\n"
            f"{loss('iifname', up_loss)}{loss('oifname', down_loss)}"
            "    }\n"
            "    chain input {\n"
            "        type filter hook input priority filter; policy accept;\n"
            f"{firewall}"
            "        iifname @blackholed drop\n"
            f"{loss('iifname', up_loss)}"
            "    }\n"
            "    chain output {\n"
            "        type filter hook output priority filter; policy accept;\n"
            "        oifname @blackholed drop\n"
            f"{loss('oifname', down_loss)}"
            "    }\n"
            "}\n"
        )
        self.lab.run(self.router_ns, ["nft", "-f", "-"], input=ruleset)


@dataclass
class PublicHost:
    """A host on the public internet, no NAT: its own namespace, ``eth0`` on 198.51.100.0/24."""

    name: str
    ns: str
    address: str
    interface: str = "eth0"


@dataclass
class ProbeResult:
    """Result of :meth:`Lab.udp_probe`: ``replies[target]`` is the address the target saw us
    from (our NAT mapping towards it), or None if it never answered."""

    local: Addr
    replies: dict[Addr, Addr | None]
    sent: int
    received: int
    errors: list[str]

    def mapping(self, target: Addr) -> Addr | None:
        return self.replies[target]


def _addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _fmt(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@dataclass
class UdpEcho:
    """A running ``udp_tools.py echo`` server; see :meth:`Lab.udp_echo`."""

    lab: Lab
    proc: subprocess.Popen[str]
    log: Path
    binds: list[Addr]

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log)

    def received(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "recv"]

    def stop(self) -> None:
        self.lab.stop(self.proc)


class Lab:
    """A set of namespaces, built step by step, always torn down by :meth:`close`.

    Use as a context manager (or the ``lab`` fixture). Teardown also runs from ``atexit`` and
    on SIGTERM/SIGHUP; Ctrl-C raises KeyboardInterrupt, which unwinds into :meth:`close`.
    """

    def __init__(self, prefix: str | None = None, *, ipv6: bool = False) -> None:
        reason = prerequisites_missing()
        if reason:
            raise LabError(reason)
        self.prefix = prefix or f"wl{os.getpid()}x{next(_COUNTER)}"
        self.ipv6 = ipv6
        self.public_ns = f"{self.prefix}-pub"
        self.public_address = PUBLIC_ADDRESS
        self.sites: dict[str, Site] = {}
        self.hosts: dict[str, PublicHost] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._closed = False
        self._has_netem: bool | None = None
        self._site_numbers = itertools.count(1)
        self._host_numbers = itertools.count(10)
        with _LIVE_LOCK:
            _LIVE.append(self)
        _install_handlers()
        try:
            self._add_ns(self.public_ns, forwarding=True)
            ns = self.public_ns
            self._ip(ns, "link", "add", "pub0", "type", "bridge")
            self._ip(ns, "addr", "add", f"{PUBLIC_NAT_GW}/24", "dev", "pub0")
            self._ip(ns, "addr", "add", f"{PUBLIC_ADDRESS}/24", "dev", "pub0")
            self._ip(ns, "link", "set", "pub0", "up")
        except BaseException:
            self.close()
            raise

    # --- context manager ---

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LabError:
            if exc_type is None:
                raise

    # --- building ---

    def add_site(self, name: str, nat: NatKind = "cone", uplinks: int = 2) -> Site:
        """A site ``name`` (1-8 chars [a-z0-9]) behind a NAT of kind ``nat`` (`NatKind`) with
        ``uplinks`` (1-3, more possible) uplinks. Namespaces ``<p>-<name>``, ``<p>-<name>-nat``."""
        self._check_name(name)
        if nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {', '.join(NAT_KINDS)}, not {nat!r}")
        if not 1 <= uplinks <= MAX_UPLINKS:
            raise ValueError(f"uplinks must be 1..{MAX_UPLINKS}")
        s = next(self._site_numbers)
        if s > 24:
            raise LabError("at most 24 sites")
        site = Site(
            lab=self,
            name=name,
            index=s,
            nat=nat,
            host_ns=f"{self.prefix}-{name}",
            router_ns=f"{self.prefix}-{name}-nat",
            wan_address=f"203.0.113.{10 * s}",
        )
        self.sites[name] = site
        self._add_ns(site.host_ns)
        self._add_ns(site.router_ns, forwarding=True)
        self._veth(site.router_ns, "wan", self.public_ns, f"w-{name}")
        self._ip(self.public_ns, "link", "set", f"w-{name}", "master", "pub0", "up")
        # /32 addresses: the routers share the bridge, but traffic between them goes through
        # the public namespace, one routed hop (as the internet between two NATs): a packet
        # whose TTL crosses its own router dies there (the low-TTL punch, docs/lab.md).
        self._ip(site.router_ns, "addr", "add", f"{site.wan_address}/32", "dev", "wan")
        self._ip(site.router_ns, "link", "set", "wan", "up")
        self._ip(site.router_ns, "route", "add", PUBLIC_NAT_GW, "dev", "wan")
        self._ip(site.router_ns, "route", "add", "default", "via", PUBLIC_NAT_GW, "dev", "wan")
        for _ in range(uplinks):
            site.add_uplink()
        if not site.uplinks:
            site._write_nft()
        return site

    def add_public_host(self, name: str) -> PublicHost:
        """A host ``<p>-<name>`` attached to the public bridge without NAT (198.51.100.x)."""
        self._check_name(name)
        k = next(self._host_numbers)
        if k > 250:
            raise LabError("too many public hosts")
        host = PublicHost(name=name, ns=f"{self.prefix}-{name}", address=f"198.51.100.{k}")
        self.hosts[name] = host
        self._add_ns(host.ns)
        self._veth(host.ns, host.interface, self.public_ns, f"h-{name}")
        self._ip(self.public_ns, "link", "set", f"h-{name}", "master", "pub0", "up")
        self._ip(host.ns, "addr", "add", f"{host.address}/24", "dev", host.interface)
        self._ip(host.ns, "link", "set", host.interface, "up")
        self._ip(host.ns, "route", "add", "default", "via", PUBLIC_ADDRESS, "dev", host.interface)
        return host

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    @property
    def has_netem(self) -> bool:
        """Whether the kernel has ``tc netem`` (probed once, on the public namespace's lo)."""
        if self._has_netem is None:
            ns = self.public_ns
            probe = _cmd(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem"],
                check=False,
            )
            self._has_netem = probe.returncode == 0
            if self._has_netem:
                _cmd(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"])
        return self._has_netem

    # --- processes ---

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        lifetime_s: float,
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` in namespace ``ns`` in its own process group, ended by ``timeout``
        (TERM, KILL 5 s later) after ``lifetime_s`` at the latest and by :meth:`close`."""
        self._check_ns(ns)
        full = [
            "ip", "netns", "exec", ns,
            "timeout", "--signal=TERM", "--kill-after=5", f"{lifetime_s:g}", *argv,
        ]  # fmt: skip
        proc = subprocess.Popen(
            full,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            text=True,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], grace_s: float = 3.0) -> int:
        """TERM the process group of a spawned process, KILL it after ``grace_s``."""
        if proc.returncode is None:  # not reaped yet: its pid (= pgid) cannot be reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        timeout: float = 10.0,
        *,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in ``ns``; raises :class:`LabError` (with stderr) on failure."""
        self._check_ns(ns)
        full = ["ip", "netns", "exec", ns, "timeout", "--kill-after=2", f"{timeout:g}", *argv]
        return _cmd(full, input=input, timeout=timeout + 5, check=check, env=env)

    def python(
        self, ns: str, script: str | Path, args: Sequence[str], timeout: float = 10.0
    ) -> str:
        """Run a Python script with this interpreter (the venv) in ``ns``; returns stdout."""
        return self.run(ns, [sys.executable, str(script), *args], timeout).stdout

    # --- UDP helpers (warp/udp_tools.py) ---

    def udp_echo(
        self,
        ns: str,
        binds: Sequence[Addr],
        *,
        lifetime_s: float = 10.0,
        replies: int = 1,
        reply_interval_s: float = 0.0,
        device: str | None = None,
    ) -> UdpEcho:
        """Start an echo/STUN-like server bound to ``binds``; returns once it is listening."""
        log = self.workdir / f"echo-{ns}-{len(self._procs)}.jsonl"
        argv = [sys.executable, str(UDP_TOOLS), "echo", "--log", str(log)]
        argv += ["--duration", f"{lifetime_s:g}", "--replies", str(replies)]
        argv += ["--reply-interval", f"{reply_interval_s:g}"]
        for b in binds:
            argv += ["--bind", _fmt(b)]
        if device:
            argv += ["--device", device]
        proc = self.spawn(ns, argv, lifetime_s + 2, stderr=subprocess.PIPE)
        echo = UdpEcho(self, proc, log, list(binds))
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "ready" for e in echo.events()):
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise LabError(f"udp echo server in {ns} exited: {err}")
            if time.monotonic() > deadline:
                raise LabError(f"udp echo server in {ns} not ready")
            time.sleep(0.02)
        return echo

    def udp_probe(
        self,
        ns: str,
        targets: Sequence[Addr],
        *,
        device: str | None = None,
        bind: Addr | None = None,
        timeout_s: float = 2.0,
        interval_s: float = 0.1,
    ) -> ProbeResult:
        """From one socket in ``ns`` (optionally bound to ``device``/``bind``), send to each
        target until it answers (an echo server) or ``timeout_s``; report what each saw."""
        argv = ["probe", "--timeout", f"{timeout_s:g}", "--interval", f"{interval_s:g}"]
        for t in targets:
            argv += ["--to", _fmt(t)]
        if device:
            argv += ["--device", device]
        if bind:
            argv += ["--bind", _fmt(bind)]
        out = self.python(ns, UDP_TOOLS, argv, timeout=timeout_s + 10)
        data = json.loads(out.strip().splitlines()[-1])
        replies = {
            _addr(k): (_addr(v) if v is not None else None) for k, v in data["replies"].items()
        }
        return ProbeResult(
            local=_addr(data["local"]),
            replies=replies,
            sent=int(data["sent"]),
            received=int(data["received"]),
            errors=list(data["errors"]),
        )

    # --- teardown ---

    def close(self) -> None:
        """Kill every process, delete every namespace of this lab. Idempotent."""
        if self._closed:
            return
        self._closed = True
        main = threading.current_thread() is threading.main_thread()
        if main:  # a second Ctrl-C must not interrupt the teardown
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        errors: list[str] = []
        try:
            for proc in self._procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            for proc in self._procs:
                try:
                    proc.wait(max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        errors.append(f"process {proc.pid} survived SIGKILL")
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            stream.close()
            for ns in reversed(self._namespaces):
                try:
                    _delete_ns(ns)
                except LabError as exc:
                    errors.append(str(exc))
            left = set(self._namespaces) & set(list_namespaces())
            if left:
                errors.append(f"namespaces left: {sorted(left)}")
            shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            with _LIVE_LOCK:
                if self in _LIVE:
                    _LIVE.remove(self)
            if main:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))

    # --- internals ---

    def _check_name(self, name: str) -> None:
        if not _NAME_RE.match(name) or name == "pub":
            raise ValueError(f"bad name {name!r}: 1-8 chars [a-z0-9], starting with a letter")
        if name in self.sites or name in self.hosts:
            raise ValueError(f"name {name!r} already used in this lab")

    def _check_ns(self, ns: str) -> None:
        if ns not in self._namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab")
        if self._closed:
            raise LabError("lab is closed")

    def _add_ns(self, ns: str, *, forwarding: bool = False) -> None:
        if self._closed:
            raise LabError("lab is closed")
        _cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        settings = {
            "net.ipv4.ip_forward": "1" if forwarding else "0",
            # several uplinks = asymmetric routes: reverse-path filtering would drop replies
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv4.conf.all.send_redirects": "0",
            "net.ipv4.conf.default.send_redirects": "0",
        }
        if not self.ipv6:
            settings["net.ipv6.conf.all.disable_ipv6"] = "1"
            settings["net.ipv6.conf.default.disable_ipv6"] = "1"
        self._sysctl(ns, settings)

    def _sysctl(self, ns: str, settings: Mapping[str, str]) -> None:
        self.run(ns, ["sysctl", "-q", "-e", "-w", *(f"{k}={v}" for k, v in settings.items())])

    def _ip(self, ns: str, *args: str, check: bool = True) -> None:
        _cmd(["ip", "-n", ns, *args], check=check)

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        for n in (name_a, name_b):
            if len(n) > 15:
                raise LabError(f"interface name too long: {n!r}")
        _cmd(
            [
                *("ip", "link", "add", name_a, "netns", ns_a, "type", "veth"),
                *("peer", "name", name_b, "netns", ns_b),
            ]
        )

    def _tc_apply(self, ns: str, dev: str, imp: Impairment) -> None:
        _cmd(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev]
        if imp.rate_kbit:
            burst = max(1600, imp.rate_kbit * 1000 // 8 // 50)  # ~20 ms worth, >= one packet
            _cmd(
                [
                    *(*tc, "root", "handle", "1:", "tbf", "rate", f"{imp.rate_kbit}kbit"),
                    *("burst", str(burst), "latency", "100ms"),
                ]
            )
            if imp.has_netem:
                _cmd([*tc, "parent", "1:1", "handle", "10:", "netem", *imp.netem_args()])
        elif imp.has_netem:
            _cmd([*tc, "root", "handle", "10:", "netem", *imp.netem_args()])
