"""Loopback gate: a UDP socket on 127.0.0.1 or ::1 that applications (typically WireGuard)
send to.

* warp binds ``application_to_gate``; applications send their datagrams there;
* tunnel data goes to ``gate_to_application`` if set, else to the last application sender,
  always **from** the ``application_to_gate`` socket, so a WireGuard peer configured with
  ``Endpoint = 127.0.0.1:<application_to_gate>`` sees replies from its endpoint;
* tunnel data before any application has spoken (and without ``gate_to_application``) is
  dropped and counted as ``no_application``.
"""

from __future__ import annotations

import socket

from warp.gate.base import DatagramSocketGate, GateError, OnDatagram, set_socket_buffers

__all__ = ["LOOPBACK_SOCKET_BUFFER", "LoopbackGate"]

#: SO_RCVBUF / SO_SNDBUF asked for (the kernel doubles it for its bookkeeping and caps it at
#: net.core.[rw]mem_max). The receive queue is where application datagrams wait while the
#: gateway is busy, so its size bounds added latency, not just loss. Measured on loopback,
#: 1 MiB asked (2 MiB effective) holds ~910 datagrams of 1400 B: at most ~40-60 ms of queue
#: at the 15-25 k/s a gateway drains, while still absorbing a 1000-datagram burst of small
#: datagrams (~1640 of 400 B; tests/unit/test_gates.py) and ~90 ms of stall at 10 k/s. The
#: former 4 MiB held ~3640 of 1400 B: under overload datagrams queued for ~250 ms
#: (bench/throughput.py: p50 53 ms at 15 k/s) instead of being dropped at once. 512 KiB
#: (~455 / ~820 of 400 B) would drop that small-datagram burst.
LOOPBACK_SOCKET_BUFFER = 1024 * 1024


class LoopbackGate(DatagramSocketGate):
    """UDP gate on the loopback interface. ``application_to_gate=0`` binds any free port
    (tests); the bound port is then in `port`."""

    kind = "loopback"
    # the largest UDP payload is 65507 B (IPv4) / 65527 B (IPv6 without jumbograms): a
    # 64 KiB read never truncates, and stays below glibc's mmap threshold
    _recv_size = 65536
    _max_datagram = 65536

    def __init__(
        self,
        on_datagram: OnDatagram,
        *,
        application_to_gate: int,
        ipv4: bool = True,
        gate_to_application: int | None = None,
        socket_buffer: int = LOOPBACK_SOCKET_BUFFER,
    ) -> None:
        super().__init__(on_datagram)
        self.ipv4 = ipv4
        self.host = "127.0.0.1" if ipv4 else "::1"
        self.application_to_gate = application_to_gate
        self.gate_to_application = gate_to_application
        self._socket_buffer = socket_buffer
        if gate_to_application is not None:
            self._fixed_target = (self.host, gate_to_application)

    @property
    def port(self) -> int:
        """The bound port (``application_to_gate``, or the one chosen for port 0)."""
        return self.application_to_gate

    @property
    def address(self) -> str:
        if self.ipv4:
            return f"{self.host}:{self.application_to_gate}"
        return f"[{self.host}]:{self.application_to_gate}"

    def _open(self) -> socket.socket:
        family = socket.AF_INET if self.ipv4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if not self.ipv4:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            set_socket_buffers(sock, self._socket_buffer)
            sock.bind((self.host, self.application_to_gate))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise GateError(
                f"loopback gate cannot bind {self.address}: {exc.strerror or exc}"
            ) from None
        self.application_to_gate = sock.getsockname()[1]
        return sock
