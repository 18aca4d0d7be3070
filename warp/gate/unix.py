"""Unix gate: a datagram Unix socket that applications send to.

* warp binds ``path`` (a stale socket file there is replaced; a live socket or a file
  that is not a socket is refused) and removes it on close;
* the directory of ``path`` must be safe: owned by us or root, and not writable by others
  unless sticky (as /tmp). Otherwise another local user could remove the socket and bind
  their own in its place, receiving the application's traffic; such a directory is refused
  unless ``allow_shared_directory`` is set;
* the socket is 0600 (owner only), or 0660 with ``group`` (bound under a umask that never
  lets it exist with looser permissions);
* with ``allowed_uids`` / ``allowed_gids``, each datagram's sender credentials (the kernel's
  ``SCM_CREDENTIALS``, asked for with ``SO_PASSCRED``: a datagram socket has no peer for
  ``SO_PEERCRED``) must match one of them; other datagrams are dropped and counted as
  ``sender_not_allowed`` (and never become the reply target);
* tunnel data goes to ``application_path`` if set, else to the last application sender
  (a sender that never bound its socket has no address: those replies are counted as
  ``unbound_sender``);
* datagrams up to 64 KiB; larger ones are dropped and counted as ``too_large``;
* **back-pressure**: while the gate is paused (``on_datagram`` returned False, or the
  gateway called `pause_reading`) warp does not read; the kernel queue fills and the
  application's blocking ``send()`` waits instead of anything being dropped.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from warp.gate.base import (
    READ_BATCH,
    DatagramSocketGate,
    DropReason,
    GateError,
    OnDatagram,
    claim_socket_path,
    remove_socket_path,
    set_socket_buffers,
)
from warp.log_limit import LogLimiter

__all__ = ["UNIX_MAX_DATAGRAM", "UNIX_SOCKET_BUFFER", "UnixGate", "check_gate_directory"]

log = logging.getLogger("warp.gate")

#: largest application datagram a Unix gate accepts
UNIX_MAX_DATAGRAM = 65536
#: SO_SNDBUF / SO_RCVBUF asked for: room for several 64 KiB datagrams each way
UNIX_SOCKET_BUFFER = 1024 * 1024
#: struct ucred: pid, uid, gid
_UCRED = struct.Struct("iII")
_CREDENTIALS_SPACE = socket.CMSG_SPACE(_UCRED.size)


def check_gate_directory(path: str) -> str | None:
    """Why the directory of ``path`` lets another local user replace a socket there, or None
    when it does not: it must be owned by us or root, and either not writable by group and
    others or sticky (then only a file's owner may remove or rename it)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None  # binding will say so
    except OSError as exc:
        return f"cannot inspect {directory}: {exc.strerror or exc}"
    if st.st_uid not in (0, os.geteuid()):
        return f"{directory} is owned by uid {st.st_uid}, who could replace the gate socket"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (
            f"{directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}, "
            "not sticky): another user could replace the gate socket"
        )
    return None


class UnixGate(DatagramSocketGate):
    """SOCK_DGRAM Unix-socket gate."""

    kind = "unix"
    # one byte more than the largest accepted datagram, to tell oversize ones apart
    _recv_size = UNIX_MAX_DATAGRAM + 1
    _max_datagram = UNIX_MAX_DATAGRAM

    def __init__(
        self,
        on_datagram: OnDatagram,
        *,
        path: str,
        application_path: str | None = None,
        socket_buffer: int = UNIX_SOCKET_BUFFER,
        group: str | int | None = None,
        allowed_uids: tuple[int, ...] = (),
        allowed_gids: tuple[int, ...] = (),
        allow_shared_directory: bool = False,
    ) -> None:
        super().__init__(on_datagram)
        self.path = path
        self.application_path = application_path
        self._socket_buffer = socket_buffer
        self._group = group
        self._allowed_uids = frozenset(allowed_uids)
        self._allowed_gids = frozenset(allowed_gids)
        self._allow_shared_directory = allow_shared_directory
        self._inode: tuple[int, int] | None = None
        self._refused_log = LogLimiter()
        if application_path is not None:
            self._fixed_target = application_path

    @property
    def address(self) -> str:
        return self.path

    @property
    def checks_credentials(self) -> bool:
        return bool(self._allowed_uids or self._allowed_gids)

    def _open(self) -> socket.socket:
        problem = check_gate_directory(self.path)
        if problem is not None:
            if not self._allow_shared_directory:
                raise GateError(
                    f"unix gate refuses {self.path}: {problem} "
                    "(use a private directory, or set allow_shared_directory = true)"
                )
            log.warning("gate.shared_directory path=%s %s", self.path, problem)
        gid = self._resolve_group()
        claim_socket_path(self.path, socket.SOCK_DGRAM)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        mode = 0o600 if gid is None else 0o660
        try:
            set_socket_buffers(sock, self._socket_buffer)
            if self.checks_credentials:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # created with no more than its final mode (bind follows the umask), then exact
            old_umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            if gid is not None:
                os.chown(self.path, -1, gid)
            os.chmod(self.path, mode)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            remove_socket_path(self.path, self._inode)
            raise GateError(f"unix gate cannot bind {self.path}: {exc.strerror or exc}") from None
        return sock

    def _resolve_group(self) -> int | None:
        group = self._group
        if group is None or isinstance(group, int):
            return group
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise GateError(f"unix gate {self.path}: no group named {group!r}") from None

    def _receiver(self, sock: socket.socket) -> Callable[[int], tuple[bytes, Any]]:
        if not self.checks_credentials:
            return super()._receiver(sock)
        recvmsg = sock.recvmsg
        allowed_uids, allowed_gids = self._allowed_uids, self._allowed_gids

        def receive(size: int) -> tuple[bytes, Any]:
            # Disallowed datagrams are consumed here, at most READ_BATCH per call (a flood
            # from a refused sender cannot hold the loop: the reader is called again).
            for _ in range(READ_BATCH):
                data, ancillary, _flags, addr = recvmsg(size, _CREDENTIALS_SPACE)
                credentials = _credentials(ancillary)
                if credentials is not None:
                    pid, uid, gid = credentials
                    if uid in allowed_uids or gid in allowed_gids:
                        return data, addr
                else:
                    pid = uid = gid = -1
                self._refuse(pid, uid, gid)
            raise BlockingIOError

        return receive

    def _refuse(self, pid: int, uid: int, gid: int) -> None:
        self.counters.drop(DropReason.SENDER_NOT_ALLOWED)
        if self._refused_log.due("sender_refused", time.monotonic()):
            log.warning(
                "gate.sender_refused path=%s pid=%d uid=%d gid=%d total=%d",
                self.path,
                pid,
                uid,
                gid,
                self.counters.drops[DropReason.SENDER_NOT_ALLOWED],
            )

    def _cleanup(self) -> None:
        remove_socket_path(self.path, self._inode)
        self._inode = None


def _credentials(ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int, int] | None:
    for level, kind, data in ancillary:
        if (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(data) >= _UCRED.size
        ):
            pid, uid, gid = _UCRED.unpack_from(data)
            return pid, uid, gid
    return None
