"""Who a client is (the key it is counted and banned under) and the bans in force."""

from __future__ import annotations

import ipaddress
import time
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from carousel.registry import BanRecord


class ClientKeys:
    """Maps an address to the key it is counted and banned under."""

    def __init__(self, ipv6_prefix: int) -> None:
        self.ipv6_prefix = ipv6_prefix
        self._v6 = lru_cache(maxsize=65536)(self._v6_key)

    def __call__(self, address: str) -> str:
        return self._v6(address) if ":" in address else address

    def bannable(self, key: str) -> bool:
        """True when a key names one client: an IPv4 address, or an IPv6 /ipv6_prefix network."""
        try:
            net = ipaddress.ip_network(key)  # strict: "10.0.0.1/8" is not a key either
        except ValueError:
            return False
        if net.version == 4:
            return net.prefixlen == 32 and "/" not in key
        return net.prefixlen == self.ipv6_prefix and "/" in key

    def _v6_key(self, address: str) -> str:
        try:
            ip = ipaddress.IPv6Address(address.split("%", 1)[0])
        except ValueError:
            return address
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/{self.ipv6_prefix}", strict=False))


class BanTable:
    """Banned keys and networks with their end (wall-clock time): this edge's own and the cluster's."""

    def __init__(self, keys: ClientKeys) -> None:
        self.keys = keys
        self.local: dict[str, float] = {}
        self.remote: dict[str, float] = {}
        self.remote_networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, float]] = []
        # What the request path reads: exact keys, and networks that are not keys.
        self.exact: dict[str, float] = {}
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, float]] = []

    def until(self, key: str, address: str) -> float:
        """When the ban on this client ends (0: not banned)."""
        until = self.exact.get(key, 0.0) if self.exact else 0.0
        if self.networks:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return until
            for net, end in self.networks:
                if ip in net and end > until:
                    until = end
        return until if until > time.time() else 0.0

    def load_remote(self, records: list[BanRecord]) -> None:
        """Replace the cluster's bans with what etcd holds now."""
        exact: dict[str, float] = {}
        networks = []
        for rec in records:
            net = ipaddress.ip_network(rec.address, strict=False)
            if net.version == 4 and net.prefixlen == 32:
                key = str(net.network_address)
            elif net.version == 6 and net.prefixlen == self.keys.ipv6_prefix:
                key = str(net)  # what this edge counts IPv6 clients by
            else:
                networks.append((net, rec.until))  # e.g. a /24, or one IPv6 address an operator named
                continue
            exact[key] = max(exact.get(key, 0.0), rec.until)
        self.remote = exact
        self.remote_networks = networks
        self._merge()

    def add_local(self, key: str, until: float) -> None:
        self.local[key] = until
        self._merge()

    def lift_local(self, keys: set[str]) -> None:
        """Forget this edge's own bans on ``keys`` (an operator deleted them from etcd)."""
        if keys & self.local.keys():
            self.local = {k: u for k, u in self.local.items() if k not in keys}
            self._merge()

    def prune(self, now: float) -> bool:
        """Drop ended bans; True when something was dropped."""
        before = len(self.local) + len(self.remote) + len(self.remote_networks)
        self.local = {k: u for k, u in self.local.items() if u > now}
        self.remote = {k: u for k, u in self.remote.items() if u > now}
        self.remote_networks = [(n, u) for n, u in self.remote_networks if u > now]
        if len(self.local) + len(self.remote) + len(self.remote_networks) == before:
            return False
        self._merge()
        return True

    def _merge(self) -> None:
        merged = dict(self.remote)
        for key, until in self.local.items():
            if until > merged.get(key, 0.0):
                merged[key] = until
        self.exact = merged
        self.networks = list(self.remote_networks)

    def __len__(self) -> int:
        return len(self.exact) + len(self.networks)
