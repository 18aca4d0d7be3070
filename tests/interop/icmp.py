"""Hand-built IPv4/IPv6 ICMP echo packets (no TUN, no kernel): what the interop driver puts
inside WireGuard transport messages, and how it answers echo requests."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
IPV4_HEADER = 20
IPV6_HEADER = 40
ICMP_HEADER = 8
PROTO_ICMP = 1
PROTO_ICMP6 = 58


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def payload_for(size: int, seq: int) -> bytes:
    """A deterministic, sequence-dependent payload, so a reply can be checked byte for byte."""
    seed = seq.to_bytes(2, "big")
    pattern = bytes((seed[0] ^ i) & 0xFF for i in range(256)) + seed
    return (pattern * (size // len(pattern) + 1))[:size]


def _icmp(typ: int, ident: int, seq: int, payload: bytes, pseudo: bytes = b"") -> bytes:
    header = struct.pack("!BBHHH", typ, 0, 0, ident, seq)
    csum = checksum(pseudo + header + payload)
    return struct.pack("!BBHHH", typ, 0, csum, ident, seq) + payload


def ipv4_packet(src: str, dst: str, proto: int, body: bytes, *, ttl: int = 64) -> bytes:
    total = IPV4_HEADER + len(body)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0x4000,  # DF
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    csum = checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:] + body


def _pseudo6(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, PROTO_ICMP6)


def ipv6_packet(src: str, dst: str, proto: int, body: bytes, *, hop_limit: int = 64) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(body),
        proto,
        hop_limit,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + body


def echo_request(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 ICMP echo request, chosen by the address family of ``src``."""
    if ":" in src:
        s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
        body = _icmp(
            ICMP6_ECHO_REQUEST, ident, seq, payload, _pseudo6(s, d, ICMP_HEADER + len(payload))
        )
        return ipv6_packet(src, dst, PROTO_ICMP6, body)
    return ipv4_packet(src, dst, PROTO_ICMP, _icmp(ICMP_ECHO_REQUEST, ident, seq, payload))


def request_size(total: int, *, v6: bool = False) -> int:
    """The ICMP payload size that makes an IP packet of ``total`` bytes."""
    return total - (IPV6_HEADER if v6 else IPV4_HEADER) - ICMP_HEADER


@dataclass(frozen=True)
class Echo:
    """A parsed ICMP echo request or reply."""

    version: int
    src: bytes
    dst: bytes
    request: bool
    ident: int
    seq: int
    payload: bytes


def parse_echo(packet: bytes) -> Echo | None:
    """Parse an IPv4/IPv6 ICMP echo request or reply; None for anything else or bad checksums."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < IPV4_HEADER + ICMP_HEADER:
            return None
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        if packet[9] != PROTO_ICMP or total != len(packet) or checksum(packet[:ihl]) != 0:
            return None
        icmp = packet[ihl:]
        if checksum(icmp) != 0:
            return None
        typ = icmp[0]
        if typ not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            return None
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return Echo(4, packet[12:16], packet[16:20], typ == ICMP_ECHO_REQUEST, ident, seq, icmp[8:])
    if version == 6:
        if len(packet) < IPV6_HEADER + ICMP_HEADER:
            return None
        length = struct.unpack_from("!H", packet, 4)[0]
        if packet[6] != PROTO_ICMP6 or IPV6_HEADER + length != len(packet):
            return None
        src, dst = packet[8:24], packet[24:40]
        icmp = packet[IPV6_HEADER:]
        if checksum(_pseudo6(src, dst, len(icmp)) + icmp) != 0:
            return None
        typ = icmp[0]
        if typ not in (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY):
            return None
        ident, seq = struct.unpack_from("!HH", icmp, 4)
        return Echo(6, src, dst, typ == ICMP6_ECHO_REQUEST, ident, seq, icmp[8:])
    return None


def echo_reply(echo: Echo) -> bytes:
    """The reply to a parsed echo request, from its destination back to its source."""
    if echo.version == 4:
        body = _icmp(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.payload)
        src = str(ipaddress.IPv4Address(echo.dst))
        dst = str(ipaddress.IPv4Address(echo.src))
        return ipv4_packet(src, dst, PROTO_ICMP, body)
    pseudo = _pseudo6(echo.dst, echo.src, ICMP_HEADER + len(echo.payload))
    body = _icmp(ICMP6_ECHO_REPLY, echo.ident, echo.seq, echo.payload, pseudo)
    src6 = str(ipaddress.IPv6Address(echo.dst))
    dst6 = str(ipaddress.IPv6Address(echo.src))
    return ipv6_packet(src6, dst6, PROTO_ICMP6, body)
