"""One `warp run` per key and per control socket.

`claim_instance` takes two exclusive ``flock`` locks before the gateway touches the network:

* the key lock, ``<runtime dir>/key-<public key>.lock``: a second instance with the same key
  would handshake with the far gate and deregister from the map, taking every path from the
  running one;
* the control-socket lock, ``<control socket>.lock`` next to the socket: a second instance
  with the same socket would take `warp status` from the running one.

A lock that is held is refused with `InstanceBusy` (one line naming the holder's pid). The
kernel drops a lock when its holder dies, so a crashed (``kill -9``) instance leaves only a
free lock file and a stale socket file behind: neither blocks a restart (the control server
removes a socket file nobody listens on). Lock files are removed on release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator, Mapping

from warp.keys import encode_key

__all__ = [
    "FileLock",
    "InstanceBusy",
    "InstanceLockError",
    "claim_instance",
    "control_lock_path",
    "key_lock_path",
    "runtime_dir",
]

#: where root (or a service user owning it, e.g. systemd's ``RuntimeDirectory=warp``) locks keys
SYSTEM_RUNTIME_DIR = "/run/warp"
#: never follow a symlink planted at a lock path
_LOCK_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class InstanceLockError(Exception):
    """A lock file cannot be created or locked (a runtime failure; one line for users)."""


class InstanceBusy(InstanceLockError):
    """Another running instance holds the lock (a usage error: exit 1)."""

    def __init__(self, message: str, holder_pid: int | None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


def runtime_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """The directory of the key locks.

    ``$WARP_RUNTIME_DIR`` if set; else ``/run/warp`` for root or when it exists and is
    writable; else ``$XDG_RUNTIME_DIR/warp``; else ``/tmp/warp-<uid>`` (created 0700, a
    per-user directory so no other user can hold our lock file).
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    if env.get("WARP_RUNTIME_DIR"):
        return env["WARP_RUNTIME_DIR"]
    if uid == 0 or os.access(SYSTEM_RUNTIME_DIR, os.W_OK | os.X_OK):
        return SYSTEM_RUNTIME_DIR
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "warp")
    return f"/tmp/warp-{uid}"


def key_lock_path(public_key: bytes, directory: str) -> str:
    """The lock file of the instance with ``public_key`` (the key is public: it may show)."""
    return os.path.join(directory, f"key-{encode_key(public_key)}.lock")


def control_lock_path(control_socket: str) -> str:
    """The lock file of a control socket: next to it, so every user of the path sees it."""
    return control_socket + ".lock"


def _ensure_dir(path: str, private: bool) -> None:
    """Create ``path`` if missing (0700 if ``private``, else 0755, as the control socket's)."""
    if os.path.isdir(path):
        if private:
            st = os.lstat(path)
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
                raise InstanceLockError(
                    f"lock directory {path} is not ours or writable by others; "
                    "set WARP_RUNTIME_DIR to a private directory"
                )
        return
    try:
        os.makedirs(path, mode=0o700 if private else 0o755, exist_ok=True)
        os.chmod(path, 0o700 if private else 0o755)  # makedirs' mode is filtered by the umask
    except OSError as exc:
        raise InstanceLockError(
            f"cannot create lock directory {path}: {exc.strerror or exc}"
        ) from None


def _holder(path: str) -> int | None:
    """The pid written into a held lock file (None if unreadable or not written yet)."""
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read(32).strip())
    except (OSError, ValueError):
        return None


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path`` holding the owner's pid.

    The file is removed on `release` (while still locked). `acquire` checks, after locking,
    that ``path`` still names the locked file: a holder that released meanwhile removed it,
    and a lock on the removed file would guard nothing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Lock ``path``; `InstanceBusy` if another process holds it, `InstanceLockError` if
        the file cannot be created or locked."""
        if self._fd is not None:
            return
        for _ in range(100):  # each retry means a holder released in between: rare
            try:
                fd = os.open(self.path, _LOCK_FILE_FLAGS, 0o644)
            except OSError as exc:
                raise InstanceLockError(
                    f"cannot create lock file {self.path}: {exc.strerror or exc}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise InstanceBusy(f"{self.path} is held", _holder(self.path)) from None
                raise InstanceLockError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self._fd = fd
            return
        raise InstanceLockError(f"cannot lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still locked: nobody can lock this inode meanwhile
        os.close(fd)


@contextlib.contextmanager
def claim_instance(
    public_key: bytes | None, control_socket: str, *, lock_dir: str | None = None
) -> Iterator[None]:
    """Hold the key lock (unless ``public_key`` is None: engarde mode has no key) and the
    control-socket lock for the ``with`` block.

    Raises `InstanceBusy` with a one-line message naming what is taken and by which pid,
    or `InstanceLockError` if a lock file cannot be made.
    """
    locks: list[FileLock] = []
    try:
        if public_key is not None:
            directory = lock_dir if lock_dir is not None else runtime_dir()
            _ensure_dir(directory, private=directory != SYSTEM_RUNTIME_DIR)
            key_lock = FileLock(key_lock_path(public_key, directory))
            try:
                key_lock.acquire()
            except InstanceBusy as exc:
                raise InstanceBusy(
                    f"another warp is running with this key ({encode_key(public_key)[:8]}…, "
                    f"{_pid_text(exc.holder_pid)}; lock {key_lock.path})",
                    exc.holder_pid,
                ) from None
            locks.append(key_lock)
        parent = os.path.dirname(control_socket)
        if parent:
            _ensure_dir(parent, private=False)
        socket_lock = FileLock(control_lock_path(control_socket))
        try:
            socket_lock.acquire()
        except InstanceBusy as exc:
            raise InstanceBusy(
                f"control socket {control_socket} is in use by another warp "
                f"({_pid_text(exc.holder_pid)}); give this instance its own control.socket "
                "(or --socket)",
                exc.holder_pid,
            ) from None
        locks.append(socket_lock)
        yield
    finally:
        for lock in reversed(locks):
            lock.release()


def _pid_text(pid: int | None) -> str:
    return f"pid {pid}" if pid is not None else "pid unknown"
