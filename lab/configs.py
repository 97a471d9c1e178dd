"""The lab's sizes and timings, and the configs and command lines of its daemons.

Ports are fixed: every lab host is a network namespace with a port space of
its own, so nothing can clash. Admin listeners stay on each host's loopback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from carousel.etcdserver import etcd_binary

STATIC_DIR = Path(__file__).resolve().parent.parent / "sampleapp" / "static"


@dataclass(frozen=True)
class LabSettings:
    """Sizes and timings of a lab; short timings keep the failover tests quick."""

    subnet: str = "10.213.0"  # a /24 used only inside the lab's namespaces
    etcds: int = 3
    dnsds: int = 2
    edges: int = 3
    aps: int = 2
    zone: str = "example.test"
    name: str = "www"  # www.<zone> -> the edges
    lease_ttl: int = 2  # etcd's minimum with its 1 s election timeout
    dns_ttl: int = 2
    # Longer than the DNS TTL: clients that cached the answer just before the
    # drain have re-resolved by the time the edge stops.
    drain_delay: float = 3.0
    check_interval: float = 0.2
    check_timeout: float = 0.3
    rise: int = 2
    fall: int = 2

    def octets(self) -> dict[str, int]:
        """Role -> last octet of its address."""
        roles = {f"etcd{i}": 10 + i for i in range(1, self.etcds + 1)}
        roles |= {f"dns{i}": 52 + i for i in range(1, self.dnsds + 1)}
        roles |= {f"edge{i}": 20 + i for i in range(1, self.edges + 1)}
        roles |= {f"ap{i}": 30 + i for i in range(1, self.aps + 1)}
        roles["client"] = 100
        return roles


EDGE_PORT = 80
AP_PORT = 80
DNS_PORT = 53
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
EDGE_ADMIN = 9100  # on each host's own loopback
AGENT_ADMIN = 9101
DNSD_ADMIN = 9200


def etcd_section(endpoints: list[str]) -> str:
    """The `[etcd]` table every daemon of the lab shares."""
    return f'[etcd]\nendpoints = {json.dumps(endpoints)}\nprefix = "/carousel/"\ntimeout = 1.0\n'


def etcd_command(name: str, address: str, cluster: str, data_dir: Path, token: str) -> list[str]:
    """One member of the lab's etcd cluster (all members share ``cluster`` and ``token``)."""
    return [
        etcd_binary(),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://{address}:{ETCD_CLIENT_PORT}",
        "--advertise-client-urls", f"http://{address}:{ETCD_CLIENT_PORT}",
        "--listen-peer-urls", f"http://{address}:{ETCD_PEER_PORT}",
        "--initial-advertise-peer-urls", f"http://{address}:{ETCD_PEER_PORT}",
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", token,
        # Fast elections keep failover short; etcd's minimum lease TTL is
        # then 1.5 x 1 s, which the agents' 2 s TTL respects.
        "--heartbeat-interval", "100",
        "--election-timeout", "1000",
        "--log-level", "warn",
    ]  # fmt: skip


def dnsd_toml(s: LabSettings, address: str, name_servers: list[str], endpoints: list[str]) -> str:
    """A dnsd authoritative for the lab's zone, answering <name>.<zone> with the edges."""
    ns_tables = "".join(
        f'[[zone.ns]]\nname = "ns{i}"\nipv4 = ["{addr}"]\n\n' for i, addr in enumerate(name_servers, 1)
    )
    return f"""[dns]
listen = ["{address}:{DNS_PORT}"]

[[zone]]
origin = "{s.zone}"
service_ttl = {s.dns_ttl}
services = {{ "{s.name}" = "edge" }}

{ns_tables}{etcd_section(endpoints)}
[admin]
port = {DNSD_ADMIN}
"""


def edge_toml(address: str, endpoints: list[str]) -> str:
    """An edge serving the sample app's static files itself and proxying the rest to the APs."""
    return f"""[edge]
host = "{address}"
port = {EDGE_PORT}
shutdown_timeout = 5.0

[[route]]
name = "static"
path = "/static/"
static = "{STATIC_DIR}"

[[route]]
name = "app"
path = "/"
pool = "app"
default = true

[pool.app]
service = "app"

{etcd_section(endpoints)}
[admin]
port = {EDGE_ADMIN}
"""


def agent_toml(
    s: LabSettings, node: str, service: str, port: int, address: str, check_url: str, endpoints: list[str]
) -> str:
    """An agent registering one service of its host, checked over HTTP."""
    return f"""[agent]
node = "{node}"
ttl = {s.lease_ttl}
drain_delay = {s.drain_delay}
etcd_election_timeout = 1.0

{etcd_section(endpoints)}
[admin]
port = {AGENT_ADMIN}

[[service]]
name = "{service}"
port = {port}
ipv4 = ["{address}"]

[service.check]
type = "http"
url = "{check_url}"
interval = {s.check_interval}
timeout = {s.check_timeout}
rise = {s.rise}
fall = {s.fall}
"""
