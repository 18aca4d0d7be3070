"""AllowedIPs: longest-prefix match from IP addresses to peers (cryptokey routing)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: str | Network) -> Network:
    """``"10.0.0.1/24"`` → ``10.0.0.0/24`` (host bits cleared, as ``wg`` does); a bare address is a
    host route."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    return ipaddress.ip_network(str(value).strip(), strict=False)


class AllowedIPs:
    """A table of networks → peer public key with longest-prefix-match lookup.

    One dict per (IP version, prefix length); a lookup tries the lengths in use, longest first.
    Inserting a network that another peer holds moves it to the new peer (as WireGuard).
    """

    __slots__ = ("_lengths", "_tables")

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, bytes]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def insert(self, network: str | Network, peer: bytes) -> Network:
        net = parse_network(network)
        tables = self._tables[net.version]
        table = tables.get(net.prefixlen)
        if table is None:
            table = tables[net.prefixlen] = {}
            self._lengths[net.version] = sorted(tables, reverse=True)
        table[int(net.network_address)] = peer
        return net

    def remove(self, network: str | Network, peer: bytes | None = None) -> None:
        net = parse_network(network)
        table = self._tables[net.version].get(net.prefixlen)
        if table is None:
            return
        key = int(net.network_address)
        if peer is None or table.get(key) == peer:
            table.pop(key, None)
        self._compact(net.version)

    def remove_peer(self, peer: bytes) -> None:
        for version, tables in self._tables.items():
            for table in tables.values():
                for key in [k for k, v in table.items() if v == peer]:
                    del table[key]
            self._compact(version)

    def _compact(self, version: int) -> None:
        tables = self._tables[version]
        for length in [n for n, t in tables.items() if not t]:
            del tables[length]
        self._lengths[version] = sorted(tables, reverse=True)

    def networks(self, peer: bytes) -> list[Network]:
        out: list[Network] = []
        for version, tables in self._tables.items():
            cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
            for length, table in tables.items():
                out.extend(cls((key, length)) for key, value in table.items() if value == peer)
        return out

    def lookup(self, address: bytes) -> bytes | None:
        """The peer owning the longest prefix containing ``address`` (4 or 16 raw bytes)."""
        n = len(address)
        if n == 4:
            version, bits = 4, 32
        elif n == 16:
            version, bits = 6, 128
        else:
            return None
        value = int.from_bytes(address, "big")
        tables = self._tables[version]
        for length in self._lengths[version]:
            peer = tables[length].get((value >> (bits - length)) << (bits - length))
            if peer is not None:
                return peer
        return None

    def lookup_address(self, address: str) -> bytes | None:
        return self.lookup(ipaddress.ip_address(address).packed)

    def __len__(self) -> int:
        return sum(len(t) for tables in self._tables.values() for t in tables.values())

    def extend(self, networks: Iterable[str | Network], peer: bytes) -> list[Network]:
        return [self.insert(n, peer) for n in networks]
