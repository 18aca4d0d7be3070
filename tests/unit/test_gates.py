"""Loopback and Unix gates: real sockets on loopback / in a temp dir, on both event loops."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from warp.gate.base import DropReason, Gate, GateError
from warp.gate.loopback import LoopbackGate
from warp.gate.unix import UnixGate

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a Linux dependency
    uvloop = None  # type: ignore[assignment]

LOOPS = [
    "asyncio",
    # uvloop is a dependency: only a local install without it skips; under CI it fails.
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(uvloop is None and not os.environ.get("CI"), reason="no uvloop"),
    ),
]
FAMILIES = [pytest.param(True, id="ipv4"), pytest.param(False, id="ipv6")]


def run(loop_kind: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop

    async def bounded() -> Any:
        return await asyncio.wait_for(fn(), timeout=20)

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


class Sink:
    """A gateway stand-in: records what the gate hands over."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.gates: list[Gate] = []
        self.verdict: bool | None = None

    def __call__(self, gate: Gate, payload: bytes) -> bool | None:
        self.got.append(payload)
        self.gates.append(gate)
        return self.verdict


@pytest.fixture
def sockdir() -> Iterator[str]:
    # short path: AF_UNIX paths are limited to 108 bytes
    d = tempfile.mkdtemp(prefix="warp-gt-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def udp_app(ipv4: bool) -> socket.socket:
    fam = socket.AF_INET if ipv4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1" if ipv4 else "::1", 0))
    s.settimeout(2.0)
    return s


def unix_app(path: str | None, sndbuf: int = 1 << 20) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    if path is not None:
        s.bind(path)
    s.settimeout(2.0)
    return s


# ---------------------------------------------------------------------------------------
# loopback gate


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("ipv4", FAMILIES)
def test_loopback_both_ways_replies_from_gate_port(loop_kind: str, ipv4: bool) -> None:
    async def main() -> None:
        sink = Sink()
        gate = LoopbackGate(sink, application_to_gate=0, ipv4=ipv4)
        assert isinstance(gate, Gate)
        await gate.start()
        host = "127.0.0.1" if ipv4 else "::1"
        assert gate.port != 0
        assert gate.address == (f"{host}:{gate.port}" if ipv4 else f"[{host}]:{gate.port}")
        app = udp_app(ipv4)
        try:
            app.sendto(b"hello tunnel", (host, gate.port))
            app.sendto(b"second", (host, gate.port))
            await until(lambda: len(sink.got) == 2)
            assert sink.got == [b"hello tunnel", b"second"]
            assert sink.gates[0] is gate
            assert gate.counters.datagrams_in == 2
            assert gate.counters.bytes_in == len(b"hello tunnel") + len(b"second")

            assert gate.deliver(b"from far gate")
            data, src = app.recvfrom(65536)
            assert data == b"from far gate"
            assert src[:2] == (host, gate.port)  # from the application_to_gate socket
            assert gate.counters.datagrams_out == 1
            assert gate.counters.bytes_out == len(b"from far gate")
            assert gate.counters.drops == {}
        finally:
            app.close()
            await gate.close()
            await gate.close()  # idempotent
        assert not gate.is_reading
        assert not gate.deliver(b"late")
        assert gate.counters.drops == {DropReason.CLOSED: 1}

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("ipv4", FAMILIES)
def test_loopback_replies_follow_the_last_sender(loop_kind: str, ipv4: bool) -> None:
    async def main() -> None:
        sink = Sink()
        gate = LoopbackGate(sink, application_to_gate=0, ipv4=ipv4)
        await gate.start()
        host = "127.0.0.1" if ipv4 else "::1"
        a, b = udp_app(ipv4), udp_app(ipv4)
        try:
            a.sendto(b"a", (host, gate.port))
            await until(lambda: len(sink.got) == 1)
            b.sendto(b"b", (host, gate.port))  # e.g. WireGuard restarted on a new port
            await until(lambda: len(sink.got) == 2)
            assert gate.deliver(b"reply")
            assert b.recvfrom(100)[0] == b"reply"
            a.settimeout(0.05)
            with pytest.raises(TimeoutError):
                a.recvfrom(100)
        finally:
            a.close()
            b.close()
            await gate.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("ipv4", FAMILIES)
def test_loopback_gate_to_application_honoured(loop_kind: str, ipv4: bool) -> None:
    async def main() -> None:
        host = "127.0.0.1" if ipv4 else "::1"
        sender, receiver = udp_app(ipv4), udp_app(ipv4)
        sink = Sink()
        gate = LoopbackGate(
            sink,
            application_to_gate=0,
            ipv4=ipv4,
            gate_to_application=receiver.getsockname()[1],
        )
        await gate.start()
        try:
            # before anyone has spoken: goes to gate_to_application anyway
            assert gate.deliver(b"early")
            data, src = receiver.recvfrom(100)
            assert data == b"early"
            assert src[:2] == (host, gate.port)
            sender.sendto(b"up", (host, gate.port))
            await until(lambda: sink.got == [b"up"])
            assert gate.deliver(b"down")
            assert receiver.recvfrom(100)[0] == b"down"
            sender.settimeout(0.05)
            with pytest.raises(TimeoutError):
                sender.recvfrom(100)
        finally:
            sender.close()
            receiver.close()
            await gate.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("ipv4", FAMILIES)
def test_loopback_no_application_drop_counted(loop_kind: str, ipv4: bool) -> None:
    async def main() -> None:
        gate = LoopbackGate(Sink(), application_to_gate=0, ipv4=ipv4)
        await gate.start()
        try:
            assert not gate.deliver(b"nobody listens")
            assert not gate.deliver(b"still nobody")
            assert gate.counters.drops == {DropReason.NO_APPLICATION: 2}
            assert gate.counters.datagrams_out == 0
        finally:
            await gate.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_largest_udp_datagram_byte_exact(loop_kind: str) -> None:
    async def main() -> None:
        sink = Sink()
        gate = LoopbackGate(sink, application_to_gate=0)
        await gate.start()
        app = udp_app(True)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        try:
            big = os.urandom(65507)
            app.sendto(big, ("127.0.0.1", gate.port))
            await until(lambda: len(sink.got) == 1)
            assert sink.got[0] == big
            assert gate.deliver(big[::-1])
            assert app.recvfrom(65536)[0] == big[::-1]
        finally:
            app.close()
            await gate.close()

    run(loop_kind, main)


def test_loopback_port_in_use_is_a_gate_error() -> None:
    async def main() -> None:
        first = LoopbackGate(Sink(), application_to_gate=0)
        await first.start()
        try:
            second = LoopbackGate(Sink(), application_to_gate=first.port)
            with pytest.raises(GateError, match=rf"cannot bind 127\.0\.0\.1:{first.port}"):
                await second.start()
        finally:
            await first.close()
        # the port is free again after close
        third = LoopbackGate(Sink(), application_to_gate=first.port)
        await third.start()
        await third.close()

    run("asyncio", main)


def test_callback_error_is_counted_and_the_gate_keeps_reading() -> None:
    async def main() -> None:
        got: list[bytes] = []

        def flaky(gate: Gate, payload: bytes) -> None:
            if payload == b"boom":
                raise ValueError("gateway bug")
            got.append(payload)

        gate = LoopbackGate(flaky, application_to_gate=0)
        await gate.start()
        app = udp_app(True)
        try:
            for p in (b"one", b"boom", b"two"):
                app.sendto(p, ("127.0.0.1", gate.port))
            await until(lambda: got == [b"one", b"two"])
            assert gate.counters.drops == {DropReason.CALLBACK_ERROR: 1}
        finally:
            app.close()
            await gate.close()

    run("asyncio", main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopback_burst_larger_than_a_read_batch(loop_kind: str) -> None:
    async def main() -> None:
        sink = Sink()
        gate = LoopbackGate(sink, application_to_gate=0)
        await gate.start()
        app = udp_app(True)
        try:
            n = 1000
            for i in range(n):
                app.sendto(i.to_bytes(4, "big") * 100, ("127.0.0.1", gate.port))
            await until(lambda: len(sink.got) == n)
            assert [int.from_bytes(p[:4], "big") for p in sink.got] == list(range(n))
        finally:
            app.close()
            await gate.close()

    run(loop_kind, main)


# ---------------------------------------------------------------------------------------
# unix gate


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("size", [8 * 1024, 60 * 1024, 64 * 1024])
def test_unix_both_ways_byte_exact(loop_kind: str, size: int, sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        sink = Sink()
        gate = UnixGate(sink, path=path)
        assert isinstance(gate, Gate)
        await gate.start()
        assert gate.address == path
        app = unix_app(os.path.join(sockdir, "app.sock"))
        try:
            up = os.urandom(size)
            app.sendto(up, path)
            await until(lambda: len(sink.got) == 1)
            assert sink.got[0] == up
            down = os.urandom(size)
            assert gate.deliver(down)
            data, src = app.recvfrom(1 << 17)
            assert data == down
            assert src == path
            c = gate.counters
            assert (c.datagrams_in, c.bytes_in, c.datagrams_out, c.bytes_out) == (1, size, 1, size)
            assert c.drops == {}
        finally:
            app.close()
            await gate.close()
        assert not os.path.exists(path)

    run(loop_kind, main)


def test_unix_application_path_honoured(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        app_path = os.path.join(sockdir, "app.sock")
        receiver = unix_app(app_path)
        sender = unix_app(os.path.join(sockdir, "other.sock"))
        sink = Sink()
        gate = UnixGate(sink, path=path, application_path=app_path)
        await gate.start()
        try:
            assert gate.deliver(b"early")
            assert receiver.recvfrom(100) == (b"early", path)
            sender.sendto(b"up", path)
            await until(lambda: sink.got == [b"up"])
            assert gate.deliver(b"down")
            assert receiver.recvfrom(100)[0] == b"down"
        finally:
            receiver.close()
            sender.close()
            await gate.close()
        # the application went away: counted, not raised
        gate2 = UnixGate(Sink(), path=path, application_path=os.path.join(sockdir, "gone.sock"))
        await gate2.start()
        try:
            assert not gate2.deliver(b"x")
            assert gate2.counters.drops == {DropReason.APPLICATION_GONE: 1}
        finally:
            await gate2.close()

    run("asyncio", main)


def test_unix_unbound_sender_and_no_application_counted(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        sink = Sink()
        gate = UnixGate(sink, path=path)
        await gate.start()
        app = unix_app(None)  # never bound: it has no address to reply to
        try:
            assert not gate.deliver(b"nobody yet")
            app.sendto(b"anonymous", path)
            await until(lambda: sink.got == [b"anonymous"])
            assert not gate.deliver(b"reply")
            assert gate.counters.drops == {
                DropReason.NO_APPLICATION: 1,
                DropReason.UNBOUND_SENDER: 1,
            }
        finally:
            app.close()
            await gate.close()

    run("asyncio", main)


def test_unix_oversize_datagram_dropped_and_counted(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        sink = Sink()
        gate = UnixGate(sink, path=path)
        await gate.start()
        app = unix_app(os.path.join(sockdir, "app.sock"), sndbuf=1 << 20)
        try:
            app.sendto(b"x" * (64 * 1024 + 1), path)
            app.sendto(b"fits", path)
            await until(lambda: sink.got == [b"fits"])
            assert gate.counters.drops == {DropReason.TOO_LARGE: 1}
            assert gate.counters.datagrams_in == 1
        finally:
            app.close()
            await gate.close()

    run("asyncio", main)


class BlockingSender(threading.Thread):
    """An application with a blocking send(): counts datagrams the kernel accepted."""

    def __init__(self, sock: socket.socket, dest: str, count: int, size: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.dest, self.count, self.size = sock, dest, count, size
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.count):
                self.sock.sendto(i.to_bytes(4, "big") * (self.size // 4), self.dest)
                self.sent += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("how", ["callback_false", "pause_reading"])
def test_unix_back_pressure_blocks_the_sender_and_loses_nothing(
    loop_kind: str, how: str, sockdir: str
) -> None:
    count, size = 300, 4096

    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        sink = Sink()
        # a small receive buffer on warp's side: the kernel queue fills quickly
        gate = UnixGate(sink, path=path, socket_buffer=16 * 1024)
        await gate.start()
        if how == "pause_reading":
            gate.pause_reading()
            assert not gate.is_reading
        else:
            sink.verdict = False  # "saturated": the gate must pause after each datagram
        app = unix_app(os.path.join(sockdir, "app.sock"), sndbuf=16 * 1024)
        app.settimeout(None)  # a truly blocking send()
        sender = BlockingSender(app, path, count, size)
        sender.start()
        try:
            # the sender fills the queue, then blocks; warp reads nothing more
            await asyncio.sleep(0.3)
            stuck_at = sender.sent
            assert sender.is_alive(), "sender should be blocked in send()"
            assert stuck_at < count
            assert len(sink.got) <= 1
            await asyncio.sleep(0.2)
            assert sender.sent == stuck_at  # still blocked, not dropping
            assert not gate.is_reading

            # the tunnel caught up: resume (repeatedly, for the saturated callback)
            sink.verdict = None
            gate.resume_reading()
            await until(lambda: len(sink.got) == count, timeout=10)
            sender.join(timeout=5)
            assert not sender.is_alive()
            assert sender.error is None
            assert sender.sent == count
            assert [int.from_bytes(p[:4], "big") for p in sink.got] == list(range(count))
            assert all(len(p) == size for p in sink.got)
            assert gate.counters.datagrams_in == count
            assert gate.counters.drops == {}
        finally:
            await gate.close()  # unblocks a stuck sender with an error, if any
            app.close()
            sender.join(timeout=5)

    run(loop_kind, main)


def test_unix_stale_socket_file_replaced(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        old.bind(path)
        old.close()  # the file stays behind, nobody bound: stale
        assert os.path.exists(path)
        sink = Sink()
        gate = UnixGate(sink, path=path)
        await gate.start()
        app = unix_app(None)
        try:
            app.sendto(b"works", path)
            await until(lambda: sink.got == [b"works"])
        finally:
            app.close()
            await gate.close()
        assert not os.path.exists(path)

    run("asyncio", main)


def test_unix_refuses_non_socket_file(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "important.txt")
        with open(path, "w") as f:
            f.write("keep me")
        gate = UnixGate(Sink(), path=path)
        with pytest.raises(GateError, match=r"refusing to replace .*important\.txt.*not a socket"):
            await gate.start()
        with open(path) as f:
            assert f.read() == "keep me"
        await gate.close()
        assert os.path.exists(path)

    run("asyncio", main)


def test_unix_refuses_a_live_socket(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        first = UnixGate(Sink(), path=path)
        await first.start()
        try:
            second = UnixGate(Sink(), path=path)
            with pytest.raises(GateError, match="in use"):
                await second.start()
            await second.close()
            assert os.path.exists(path)  # the failed gate did not remove the live one's file
        finally:
            await first.close()
        assert not os.path.exists(path)

    run("asyncio", main)


def test_unix_close_leaves_a_replaced_file_alone(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "gate.sock")
        gate = UnixGate(Sink(), path=path, group=os.getgid())
        await gate.start()
        assert os.stat(path).st_mode & 0o777 == 0o660
        os.unlink(path)
        with open(path, "w") as f:
            f.write("someone else's")
        await gate.close()
        assert os.path.exists(path)

    run("asyncio", main)


def test_unix_missing_directory_is_a_gate_error(sockdir: str) -> None:
    async def main() -> None:
        gate = UnixGate(Sink(), path=os.path.join(sockdir, "no", "such", "gate.sock"))
        with pytest.raises(GateError, match="cannot bind"):
            await gate.start()

    run("asyncio", main)


# ---------------------------------------------------------------------------------------
# Unix gate: who may replace the socket, who may write to it


NOBODY = 65534  # uid and gid of "nobody" / "nogroup" on Debian-like systems


def send_as(uid: int, gid: int, path: str, payload: bytes, reply_to: str | None = None) -> int:
    """Send ``payload`` to ``path`` from a forked child running as ``uid``/``gid``; its exit
    status (0: sent)."""
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, send one datagram, leave without cleanup
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                if reply_to is not None:
                    s.bind(reply_to)
                s.sendto(payload, path)
            os._exit(0)
        except BaseException as exc:
            os.write(2, repr(exc).encode())
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# Skipped without root locally; under CI it runs (and fails) whatever the user.
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root to switch users"
)


@needs_root
def test_unix_gate_refuses_a_directory_where_others_could_replace_its_socket(
    sockdir: str,
) -> None:
    async def main() -> None:
        shared = os.path.join(sockdir, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)  # like a world-writable spool directory without the sticky bit
        path = os.path.join(shared, "gate.sock")
        with pytest.raises(GateError, match="writable by other users"):
            await UnixGate(Sink(), path=path).start()
        assert not os.path.exists(path)
        os.chown(shared, NOBODY, NOBODY)
        os.chmod(shared, 0o755)  # not writable by us, but its owner may swap the socket
        with pytest.raises(GateError, match="owned by uid 65534"):
            await UnixGate(Sink(), path=path).start()
        os.chown(shared, 0, 0)
        os.chmod(shared, 0o1777)  # sticky, as /tmp: only the socket's owner may remove it
        sticky = UnixGate(Sink(), path=path)
        await sticky.start()
        await sticky.close()
        os.chmod(shared, 0o777)
        opted_in = UnixGate(Sink(), path=path, allow_shared_directory=True)
        await opted_in.start()
        await opted_in.close()

    run("asyncio", main)


def test_unix_gate_socket_is_owner_only_or_for_its_group(sockdir: str) -> None:
    async def main() -> None:
        old_umask = os.umask(0)  # the gate must not depend on a careful umask
        try:
            private = UnixGate(Sink(), path=os.path.join(sockdir, "private.sock"))
            await private.start()
            grouped = UnixGate(Sink(), path=os.path.join(sockdir, "grouped.sock"), group=NOBODY)
            await grouped.start()
        finally:
            os.umask(old_umask)
        assert os.stat(private.path).st_mode & 0o777 == 0o600
        st = os.stat(grouped.path)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, NOBODY)
        await private.close()
        await grouped.close()
        with pytest.raises(GateError, match="no group named"):
            await UnixGate(Sink(), path=private.path, group="no-such-group-here").start()

    run("asyncio", main)


@needs_root
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_unix_gate_drops_datagrams_from_senders_not_allowed(
    sockdir: str, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate's group lets nobody write to it, but only uid 0 is allowed: nobody's datagrams
    are dropped and counted, never delivered, and never become where replies go."""
    os.chmod(sockdir, 0o711)  # nobody may reach the socket inside

    async def main() -> None:
        sink = Sink()
        path = os.path.join(sockdir, "gate.sock")
        gate = UnixGate(sink, path=path, group=NOBODY, allowed_uids=(0,))
        await gate.start()
        try:
            loop = asyncio.get_running_loop()
            home = os.path.join(sockdir, "nobody")
            os.mkdir(home, 0o700)
            os.chown(home, NOBODY, NOBODY)
            for i in range(3):
                status = await loop.run_in_executor(
                    None,
                    send_as,
                    NOBODY,
                    NOBODY,
                    path,
                    b"intruder %d" % i,
                    f"{home}/{i}.sock" if i else None,
                )
                assert (
                    status == 0
                )  # the kernel let it through (bound or not): the gate must drop it
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as app:
                app.bind(os.path.join(sockdir, "app.sock"))
                app.sendto(b"application", path)
                await until(lambda: sink.got == [b"application"])
                await until(lambda: gate.counters.drops.get("sender_not_allowed") == 3)
                assert gate.deliver(b"reply")
                app.settimeout(2)
                assert app.recv(100) == b"reply"  # to the allowed sender, not the intruder
        finally:
            await gate.close()
        assert DropReason.SENDER_NOT_ALLOWED == "sender_not_allowed"
        refused = [
            r.getMessage() for r in caplog.records if "gate.sender_refused" in r.getMessage()
        ]
        assert len(refused) == 1 and f"uid={NOBODY}" in refused[0]  # one line, not one per drop

    run(loop_kind, main)
