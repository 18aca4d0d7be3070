"""Unix gate: a datagram Unix socket that applications send to.

* warp binds ``path`` (a stale socket file there is replaced; a live socket or a file
  that is not a socket is refused) and removes it on close;
* tunnel data goes to ``application_path`` if set, else to the last application sender
  (a sender that never bound its socket has no address: those replies are counted as
  ``unbound_sender``);
* datagrams up to 64 KiB; larger ones are dropped and counted as ``too_large``;
* **back-pressure**: while the gate is paused (``on_datagram`` returned False, or the
  gateway called `pause_reading`) warp does not read; the kernel queue fills and the
  application's blocking ``send()`` waits instead of anything being dropped.
"""

from __future__ import annotations

import os
import socket

from warp.gate.base import (
    DatagramSocketGate,
    GateError,
    OnDatagram,
    claim_socket_path,
    remove_socket_path,
    set_socket_buffers,
)

__all__ = ["UNIX_MAX_DATAGRAM", "UNIX_SOCKET_BUFFER", "UnixGate"]

#: largest application datagram a Unix gate accepts
UNIX_MAX_DATAGRAM = 65536
#: SO_SNDBUF / SO_RCVBUF asked for: room for several 64 KiB datagrams each way
UNIX_SOCKET_BUFFER = 1024 * 1024


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
        mode: int | None = None,
    ) -> None:
        super().__init__(on_datagram)
        self.path = path
        self.application_path = application_path
        self._socket_buffer = socket_buffer
        self._mode = mode
        self._inode: tuple[int, int] | None = None
        if application_path is not None:
            self._fixed_target = application_path

    @property
    def address(self) -> str:
        return self.path

    def _open(self) -> socket.socket:
        claim_socket_path(self.path, socket.SOCK_DGRAM)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            set_socket_buffers(sock, self._socket_buffer)
            sock.bind(self.path)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            if self._mode is not None:
                os.chmod(self.path, self._mode)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            remove_socket_path(self.path, self._inode)
            raise GateError(f"unix gate cannot bind {self.path}: {exc.strerror or exc}") from None
        return sock

    def _cleanup(self) -> None:
        remove_socket_path(self.path, self._inode)
        self._inode = None
