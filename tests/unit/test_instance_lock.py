"""The instance lock: one `warp run` per key and per control socket; a crashed holder
(kill -9) never blocks a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warp.instance_lock import (
    InstanceBusy,
    InstanceLockError,
    claim_instance,
    control_lock_path,
    key_lock_path,
    runtime_dir,
)
from warp.keys import generate_private_key, public_key_of


@pytest.fixture
def key() -> bytes:
    return public_key_of(generate_private_key())


def test_second_claim_with_the_same_key_is_refused_naming_the_holder(
    tmp_path: Path, key: bytes
) -> None:
    locks = tmp_path / "locks"
    with claim_instance(key, str(tmp_path / "a.sock"), lock_dir=str(locks)):
        with (
            pytest.raises(InstanceBusy) as refused,
            claim_instance(key, str(tmp_path / "b.sock"), lock_dir=str(locks)),
        ):
            pytest.fail("second instance with the same key got the lock")
        message = str(refused.value)
        assert message.startswith("another warp is running with this key")
        assert f"pid {os.getpid()}" in message and "\n" not in message
        assert refused.value.holder_pid == os.getpid()
        # the refused claim took nothing: its control socket is still free
        with claim_instance(None, str(tmp_path / "b.sock")):
            pass


def test_second_claim_of_the_same_control_socket_is_refused(tmp_path: Path, key: bytes) -> None:
    locks = str(tmp_path / "locks")
    control = str(tmp_path / "run" / "warp.sock")  # the parent is created
    with claim_instance(key, control, lock_dir=locks):
        other_key = public_key_of(generate_private_key())
        with (
            pytest.raises(InstanceBusy, match=r"^control socket .*warp\.sock is in use by "),
            claim_instance(other_key, control, lock_dir=locks),
        ):
            pytest.fail("second instance with the same control socket got the lock")
        # the refused instance released its key lock: that key can start elsewhere
        with claim_instance(other_key, str(tmp_path / "other.sock"), lock_dir=locks):
            pass


def test_release_removes_the_lock_files_and_frees_both(tmp_path: Path, key: bytes) -> None:
    locks = tmp_path / "locks"
    control = str(tmp_path / "warp.sock")
    with claim_instance(key, control, lock_dir=str(locks)):
        assert Path(key_lock_path(key, str(locks))).read_text() == f"{os.getpid()}\n"
        assert Path(control_lock_path(control)).exists()
    assert list(locks.iterdir()) == [] and not Path(control_lock_path(control)).exists()
    with claim_instance(key, control, lock_dir=str(locks)):
        pass


_HOLDER = """
import sys, time
from warp.instance_lock import claim_instance
with claim_instance(bytes.fromhex(sys.argv[1]), sys.argv[2], lock_dir=sys.argv[3]):
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sys.argv[2])
    server.listen()
    print("held", flush=True)
    time.sleep(60)
"""


def test_holder_killed_with_sigkill_leaves_nothing_that_blocks_a_restart(
    tmp_path: Path, key: bytes
) -> None:
    locks = str(tmp_path / "locks")
    control = str(tmp_path / "warp.sock")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, key.hex(), control, locks],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with (
            pytest.raises(InstanceBusy, match=f"pid {holder.pid}"),
            claim_instance(key, control, lock_dir=locks),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    # kill -9: the lock files and the socket file stay behind, but no lock is held
    assert Path(control).exists() and Path(control_lock_path(control)).exists()
    started = time.monotonic()
    with claim_instance(key, control, lock_dir=locks):
        # lock free: the socket file is stale (nobody listens), the restart may replace it
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(control)
        probe.close()
    assert time.monotonic() - started < 1.0


def test_runtime_dir_fallbacks(tmp_path: Path) -> None:
    assert runtime_dir({"WARP_RUNTIME_DIR": str(tmp_path)}, euid=0) == str(tmp_path)
    assert runtime_dir({}, euid=0) == "/run/warp"
    if not os.access("/run/warp", os.W_OK):
        assert runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}, euid=1000) == str(tmp_path / "warp")
        assert runtime_dir({}, euid=1000) == "/tmp/warp-1000"


def test_a_lock_dir_others_can_write_is_refused(tmp_path: Path, key: bytes) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with (
        pytest.raises(InstanceLockError, match="writable by others"),
        claim_instance(key, str(tmp_path / "warp.sock"), lock_dir=str(shared)),
    ):
        pass
