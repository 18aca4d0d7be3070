"""A tiny reference engarde (github.com/porech/engarde), faithful to its wire behaviour.

client: a UDP socket on --listen takes WireGuard's datagrams (the last sender is WireGuard);
each is sent once on every --ifaces socket (SO_BINDTODEVICE) to --dst; whatever those sockets
receive goes back to WireGuard from the --listen socket.
server: one UDP socket on --listen; each datagram from a client address is forwarded to
WireGuard (--dst) from one local socket, and remembered; each datagram from WireGuard is sent
to every client address heard from within --client-timeout seconds (others are forgotten).
Runs for --lifetime seconds at most. No framing, no FEC, no keys: raw WireGuard datagrams.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import time


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "0.0.0.0", int(port))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["client", "server"])
    parser.add_argument("--listen", required=True, type=_addr)
    parser.add_argument("--dst", required=True, type=_addr)
    parser.add_argument("--ifaces", default="", help="client: comma-separated interfaces")
    parser.add_argument("--client-timeout", type=float, default=30.0)
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()
    sel = selectors.DefaultSelector()
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(args.listen)
    sel.register(listen, selectors.EVENT_READ, "listen")
    wg_addr: tuple[str, int] | None = None
    if args.role == "client":
        for name in filter(None, args.ifaces.split(",")):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
            sock.bind(("0.0.0.0", 0))
            sel.register(sock, selectors.EVENT_READ, "iface")
    else:
        wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wg.bind(("127.0.0.1", 0))
        wg.connect(args.dst)
        sel.register(wg, selectors.EVENT_READ, "wg")
    clients: dict[tuple[str, int], float] = {}
    print(f"engarde_peer {args.role} ready", flush=True)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data, src = sock.recvfrom(65535)
            except OSError:
                continue
            now = time.monotonic()
            try:
                if args.role == "client" and key.data == "listen":  # from WireGuard
                    wg_addr = src
                    for other in sel.get_map().values():
                        if other.data == "iface":
                            other.fileobj.sendto(data, args.dst)  # type: ignore[union-attr]
                elif args.role == "client":  # from the server, on one interface
                    if wg_addr is not None:
                        listen.sendto(data, wg_addr)
                elif key.data == "listen":  # server: from a client address
                    clients[src] = now
                    wg.send(data)
                else:  # server: from WireGuard, to every client heard within the timeout
                    for client, seen in list(clients.items()):
                        if now - seen > args.client_timeout:
                            del clients[client]
                        else:
                            listen.sendto(data, client)
            except OSError:
                pass  # engarde logs and goes on (e.g. a black-holed interface)


if __name__ == "__main__":
    main()
