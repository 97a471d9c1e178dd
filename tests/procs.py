"""Run carousel daemons as real child processes in tests, and always clean them up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from carousel.etcdserver import die_with_parent


class Daemon:
    """One child process with its log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ProcessGroup:
    """Starts `carousel <kind> --config FILE` processes under a temp dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.daemons: list[Daemon] = []

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Daemon:
        """Start ``python -m carousel.cli *argv`` with its output in <workdir>/<name>.log."""
        log = self.workdir / f"{name}.log"
        full_env = {
            **os.environ,
            "CAROUSEL_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                die_with_parent([sys.executable, "-m", "carousel.cli", *argv]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                start_new_session=True,
            )
        daemon = Daemon(name, proc, log)
        self.daemons.append(daemon)
        return daemon

    def daemon(self, kind: str, name: str, config_text: str) -> Daemon:
        """Write a config and start `carousel <kind> --config` on it."""
        path = self.write(f"{name}.toml", config_text)
        return self.start(name, [kind, "--config", str(path)])

    def stop_all(self, timeout: float = 5.0) -> None:
        for d in self.daemons:
            if d.running():
                try:
                    os.killpg(d.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for d in self.daemons:
            try:
                d.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if d.running():
                try:
                    os.killpg(d.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                d.proc.wait(5)


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> float:  # type: ignore[no-untyped-def]
    """Poll until predicate() is truthy; return the seconds it took, or raise AssertionError."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.2f}s waiting for {what}")
        time.sleep(interval)
