"""A multi-host Carousel cluster on one Linux machine, in network namespaces (needs root).

The hosts (see lab/netns.py for how namespaces, the bridge and clean-up work)::

    czlab-<id>-sw: br0 --+-- czlab-<id>-etcd1-3  10.213.0.11-.13  etcd members (one cluster)
                         +-- czlab-<id>-dns1/2   .53/.54          dnsd
                         +-- czlab-<id>-edge1-3  .21-.23          edge + its agent
                         +-- czlab-<id>-ap1/2    .31/.32          carousel app + its agent
                         +-- czlab-<id>-client   .100             where tests and users probe from

Daemons (configs in lab/configs.py) run as ``ip netns exec NS cmd`` (ip execs, so the pid is the
daemon's). They use fixed ports (53, 80, 2379): every namespace has its own
port space, so nothing can clash. ``Lab.up()`` returns once every edge and AP
is registered; tests then act on ``lab.processes[name]`` ("edge1",
"edge1-agent", "ap1", "dns1", "etcd2", ...) and on the network (``set_link``,
``cut``/``heal``), and probe from the client host through ``lab.client()``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from carousel.etcdserver import die_with_parent
from carousel.registry import Keys, SchemaError, ServiceRecord
from lab.configs import (
    AP_PORT,
    EDGE_ADMIN,
    EDGE_PORT,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    LabSettings,
    agent_toml,
    dnsd_toml,
    edge_toml,
    etcd_command,
)
from lab.netns import (
    PREFIX,
    STATE_DIR,
    Host,
    LabError,
    NetnsThread,
    cleanup_leftovers,
    destroy_run,
    lab_namespaces,
    proc_start_time,
    read_state,
    run_ip,
    unavailable_reason,
)

REPO = Path(__file__).resolve().parent.parent


def missing_daemons() -> dict[str, str]:
    """Daemon kind -> why the lab cannot run it in this checkout (its package is incomplete)."""
    missing = {}
    for kind in ("dnsd", "edge", "agent", "sampleapp"):
        # Every daemon's entry point: <pkg>/main.py with load_config (the CLI's contract).
        if not (REPO / kind / "main.py").is_file():
            missing[kind] = f"{kind}/main.py does not exist in this checkout yet"
    return missing


class LabProcess:
    """One daemon of the lab, run inside its host; it can be stopped and started again."""

    def __init__(self, name: str, host: Host, cmd: list[str], log: Path) -> None:
        self.name = name
        self.host = host
        self.cmd = cmd
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LabProcess:
        """Start it (again); output is appended to its log file."""
        if self.running():
            raise LabError(f"{self.name} is already running")
        env = {**os.environ, "CAROUSEL_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                die_with_parent(self.host.argv(self.cmd)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process still runs."""
        if self.proc is not None and self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit status (subprocess.TimeoutExpired after ``timeout``)."""
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash does, and reap it."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log, for failure messages."""
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def etcd_call(address: str, path: str, request: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """POST to etcd's JSON gateway (no gRPC needed): e.g. /v3/kv/range, /v3/maintenance/status."""
    req = urllib.request.Request(f"http://{address}{path}", data=json.dumps(request).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def etcd_range(address: str, prefix: str, timeout: float = 1.0) -> tuple[int, list[tuple[str, bytes]]]:
    """(revision, [(key, value)]) of the keys under ``prefix``."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    b64 = base64.b64encode
    request = {"key": b64(prefix.encode()).decode(), "range_end": b64(end.encode()).decode()}
    doc = etcd_call(address, "/v3/kv/range", request, timeout)
    kvs = [
        (base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")))
        for kv in doc.get("kvs", [])
    ]
    return int(doc["header"]["revision"]), kvs


class Lab:
    """The whole cluster: network, configs, processes, readiness and teardown."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        settings: LabSettings | None = None,
        *,
        persistent: bool = False,
    ) -> None:
        self.settings = settings or LabSettings()
        self.run_id = secrets.token_hex(3)
        while read_state(self.run_id) is not None or self.run_id in lab_namespaces():
            self.run_id = secrets.token_hex(3)
        # A directory of the run's own: an etcd data dir left by an earlier run
        # would bring back its stale records.
        self.workdir = Path(workdir) / f"{PREFIX}-{self.run_id}"
        self.persistent = persistent
        s = self.settings
        self.hosts = {
            role: Host(role, f"{PREFIX}-{self.run_id}-{role}", f"{s.subnet}.{octet}")
            for role, octet in s.octets().items()
        }
        self.switch = f"{PREFIX}-{self.run_id}-sw"
        self.processes: dict[str, LabProcess] = {}
        self._client: NetnsThread | None = None

    # --- addresses ---------------------------------------------------------------------

    def roles(self, kind: str) -> list[str]:
        """Roles of one kind in order: roles('edge') == ['edge1', 'edge2', 'edge3']."""
        return [r for r in self.hosts if r.rstrip("0123456789") == kind]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"{self.hosts[r].address}:{ETCD_CLIENT_PORT}" for r in self.roles("etcd")]

    @property
    def dns_servers(self) -> list[str]:
        return [self.hosts[r].address for r in self.roles("dns")]

    @property
    def fqdn(self) -> str:
        return f"{self.settings.name}.{self.settings.zone}"

    def address(self, role: str) -> str:
        return self.hosts[role].address

    # --- network -----------------------------------------------------------------------

    def _claim(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "id": self.run_id,
            "owner_pid": None if self.persistent else os.getpid(),
            "owner_start": None if self.persistent else proc_start_time(os.getpid()),
            "persistent": self.persistent,
            "workdir": str(self.workdir),
            "namespaces": [self.switch, *(h.ns for h in self.hosts.values())],
            "hosts": {h.role: {"ns": h.ns, "address": h.address} for h in self.hosts.values()},
            "dns_servers": self.dns_servers,
            "etcd_endpoints": self.etcd_endpoints,
            "fqdn": self.fqdn,
            "created": time.time(),
        }
        try:
            with open(STATE_DIR / f"{self.run_id}.json", "x") as f:  # "x": two runs never share an id
                json.dump(state, f, indent=2)
        except FileExistsError:
            raise LabError(f"run id {self.run_id} is taken; try again") from None

    def _build_network(self) -> None:
        run_ip("netns", "add", self.switch)
        self.ip("sw", "link", "add", "br0", "type", "bridge")
        self.ip("sw", "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values()):
            run_ip("netns", "add", host.ns)
            self.ip(host.role, "link", "set", "lo", "up")
            veth = ["veth", "peer", "name", "eth0", "netns", host.ns]
            self.ip("sw", "link", "add", f"p{i}", "type", *veth)
            self.ip("sw", "link", "set", f"p{i}", "master", "br0", "up")
            self.ip(host.role, "addr", "add", f"{host.address}/24", "dev", "eth0")
            self.ip(host.role, "link", "set", "eth0", "up")

    def ip(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip ARGS`` inside host ``role`` (or inside the switch for role 'sw')."""
        ns = self.switch if role == "sw" else self.hosts[role].ns
        return run_ip("-n", ns, *args, check=check)

    def set_link(self, role: str, up: bool) -> None:
        """Take a host's only link down (it vanishes from the network) or up again."""
        self.ip(role, "link", "set", "eth0", "up" if up else "down")

    def cut(self, role: str, peers: list[str]) -> None:
        """Partition: blackhole traffic between ``role`` and each of ``peers``, both ways."""
        for peer in peers:
            self.ip(role, "route", "add", "blackhole", f"{self.address(peer)}/32")
            self.ip(peer, "route", "add", "blackhole", f"{self.address(role)}/32")

    def heal(self, role: str, peers: list[str]) -> None:
        """Undo ``cut``."""
        for peer in peers:
            self.ip(role, "route", "del", "blackhole", f"{self.address(peer)}/32", check=False)
            self.ip(peer, "route", "del", "blackhole", f"{self.address(role)}/32", check=False)

    def client(self) -> NetnsThread:
        """The probing thread inside the client host (created on first use)."""
        if self._client is None:
            self._client = NetnsThread(self.hosts["client"].ns)
        return self._client

    # --- configs and processes -------------------------------------------------------------

    def _write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def _daemon(self, name: str, role: str, kind: str, config: str) -> LabProcess:
        path = self._write(f"{name}.toml", config)
        cmd = [sys.executable, "-m", "carousel.cli", kind, "--config", str(path)]
        proc = LabProcess(name, self.hosts[role], cmd, self.workdir / f"{name}.log")
        self.processes[name] = proc
        return proc

    def _agent(self, role: str, service: str, port: int, check_url: str) -> LabProcess:
        text = agent_toml(
            self.settings, role, service, port, self.address(role), check_url, self.etcd_endpoints
        )
        return self._daemon(f"{role}-agent", role, "agent", text)

    def _define_processes(self) -> None:
        etcds = self.roles("etcd")
        cluster = ",".join(f"{r}=http://{self.address(r)}:{ETCD_PEER_PORT}" for r in etcds)
        for role in etcds:
            data_dir = self.workdir / f"{role}.data"
            cmd = etcd_command(role, self.address(role), cluster, data_dir, f"{PREFIX}-{self.run_id}")
            self.processes[role] = LabProcess(role, self.hosts[role], cmd, self.workdir / f"{role}.log")
        for role in self.roles("dns"):
            text = dnsd_toml(self.settings, self.address(role), self.dns_servers, self.etcd_endpoints)
            self._daemon(role, role, "dnsd", text)
        for role in self.roles("edge"):
            self._daemon(role, role, "edge", edge_toml(self.address(role), self.etcd_endpoints))
            self._agent(role, "edge", EDGE_PORT, f"http://127.0.0.1:{EDGE_ADMIN}/healthz")
        for role in self.roles("ap"):
            cmd = [sys.executable, "-m", "carousel.cli", "app", "--host", self.address(role)]
            cmd += ["--port", str(AP_PORT), "--name", role]
            self.processes[role] = LabProcess(role, self.hosts[role], cmd, self.workdir / f"{role}.log")
            self._agent(role, "app", AP_PORT, f"http://{self.address(role)}:{AP_PORT}/healthz")

    # --- lifecycle -------------------------------------------------------------------------

    def up(self, timeout: float = 90.0) -> Lab:
        """Build the network, start every daemon and wait until the cluster serves."""
        cleanup_leftovers()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._claim()
        try:
            self._build_network()
            self._define_processes()
            for role in self.roles("etcd"):
                self.processes[role].start()
            self.wait_etcd(timeout=30)
            for proc in self.processes.values():
                if not proc.running():
                    proc.start()
            self.wait_registered(timeout=timeout)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process and delete every namespace (and with them the bridge)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        for proc in self.processes.values():
            proc.signal(signal.SIGKILL)
        for proc in self.processes.values():
            if proc.proc is not None:
                try:
                    proc.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        destroy_run(self.run_id, [self.switch, *(h.ns for h in self.hosts.values())])

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def restore(self, timeout: float = 60.0) -> float:
        """Undo whatever a test did: links up, partitions healed, every process running.

        Returns the seconds it took until the registry was complete again.
        """
        for role in self.hosts:
            self.set_link(role, True)
            self.ip(role, "route", "flush", "type", "blackhole", check=False)
        start = time.monotonic()
        for role in self.roles("etcd"):
            if not self.processes[role].running():
                self.processes[role].start()
        self.wait_etcd(timeout=30)
        for proc in self.processes.values():
            if not proc.running():
                proc.start()
        self.wait_registered(timeout=max(1.0, timeout - (time.monotonic() - start)))
        return time.monotonic() - start

    # --- readiness -------------------------------------------------------------------------

    def _health_of(self, endpoint: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{endpoint}/health", timeout=1) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def etcd_health(self) -> dict[str, bool]:
        """Member role -> whether its /health says true (seen from the client host)."""
        return {
            role: self.client().call(self._health_of, ep)
            for role, ep in zip(self.roles("etcd"), self.etcd_endpoints, strict=True)
        }

    def wait_etcd(self, timeout: float) -> None:
        """Wait until every running member reports healthy (a cluster with a leader)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [r for r in self.roles("etcd") if self.processes[r].running()]
            health = self.etcd_health()
            if running and all(health[r] for r in running):
                return
            if not running or time.monotonic() > deadline:
                logs = "\n".join(f"{r}: {self.processes[r].tail(5)}" for r in self.roles("etcd"))
                raise LabError(f"etcd cluster not healthy: {health}\n{logs}")
            time.sleep(0.1)

    def etcd_leader(self) -> str | None:
        """The role of the current etcd leader, or None when no running member knows one."""
        for role, ep in zip(self.roles("etcd"), self.etcd_endpoints, strict=True):
            if not self.processes[role].running():
                continue
            try:
                doc = self.client().call(etcd_call, ep, "/v3/maintenance/status", {})
            except OSError:
                continue
            leader = doc.get("leader")
            if leader and leader == doc.get("header", {}).get("member_id"):
                return role
        return None

    def registry(self) -> dict[tuple[str, str], ServiceRecord]:
        """(service, node) -> record, read from the first etcd member that answers."""
        keys = Keys("/carousel/")
        last: Exception | None = None
        for ep in self.etcd_endpoints:
            try:
                _, kvs = self.client().call(etcd_range, ep, keys.services)
            except OSError as exc:
                last = exc
                continue
            out = {}
            for _key, value in kvs:
                try:
                    rec = ServiceRecord.decode(value)
                except SchemaError:
                    continue
                out[(rec.service, rec.node)] = rec
            return out
        raise LabError(f"no etcd member answers: {last}")

    def expected_registry(self) -> set[tuple[str, str]]:
        """What a healthy lab registers: every edge and every AP, up."""
        return {("edge", r) for r in self.roles("edge")} | {("app", r) for r in self.roles("ap")}

    def wait_registered(self, timeout: float, want: set[tuple[str, str]] | None = None) -> float:
        """Wait until exactly ``want`` (default: everything) is registered and up."""
        want = self.expected_registry() if want is None else want
        start = time.monotonic()
        seen: set[tuple[str, str]] = set()
        while time.monotonic() - start < timeout:
            try:
                seen = {k for k, rec in self.registry().items() if rec.state == "up"}
            except LabError:
                seen = set()
            if seen == want:
                return time.monotonic() - start
            for proc in self.processes.values():
                if proc.proc is not None and not proc.running() and proc.proc.returncode not in (0, -9, -15):
                    raise LabError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")
            time.sleep(0.1)
        raise LabError(f"registry holds {sorted(seen)}, wanted {sorted(want)} within {timeout:.0f}s")


__all__ = [
    "Host",
    "Lab",
    "LabError",
    "LabProcess",
    "LabSettings",
    "NetnsThread",
    "cleanup_leftovers",
    "destroy_run",
    "etcd_call",
    "etcd_range",
    "missing_daemons",
    "unavailable_reason",
]
