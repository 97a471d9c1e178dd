"""Network namespaces for the lab: hosts on a bridge, a thread inside a namespace, clean-up.

Each lab "host" is a network namespace with one veth link to a bridge, and the
bridge itself lives in a namespace of its own (the "switch"). Nothing is added
to the machine's own namespace and no host has a default route, so the lab's
address range is reachable only from inside the lab, and two runs may even
use the same addresses at once without meeting.

Ownership: before creating any namespace a run writes
``/run/carousel-lab/<id>.json`` naming its owner process. ``cleanup_leftovers``
destroys only labs with the ``czlab-`` prefix whose owner is gone (a crashed
run), never a live run's and never a persistent one (started by
``lab/netns_lab.py up``; its ``down`` removes it). Destroying a lab kills every
process inside its namespaces, by pid, then deletes the namespaces, which takes
the veths and the bridge with them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "czlab"  # every namespace a lab creates is named czlab-<run id>-<role>
STATE_DIR = Path("/run/carousel-lab")
_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """The lab could not be built or did not become ready."""


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; LabError with its stderr when it fails and ``check``."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (not root, no usable `ip netns`), or None."""
    if os.geteuid() != 0:
        return "the namespace lab needs root (it creates network namespaces and a bridge)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        made = run_ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "the namespace lab needs iproute2's `ip` command"
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    run_ip("netns", "del", probe, check=False)
    return None


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsThread:
    """A thread inside a namespace running an asyncio loop: every socket it opens lives there.

    Network namespaces are per thread, and threads inherit their creator's, so
    the loop's executor threads are inside too. Tests use it to query dnsd, the
    edges and etcd from the lab's client host without starting a process.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"netns-{ns}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise LabError(f"cannot enter namespace {ns}: {self._error}")

    def _main(self) -> None:
        try:
            enter_netns(self.ns)
        except OSError as exc:
            self._error = exc
            self._started.set()
            return
        asyncio.set_event_loop(self.loop)
        self._started.set()
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the namespace's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a coroutine there and wait for its result."""
        return self.submit(coro).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0) -> T:
        """Run a blocking function in one of the namespace's executor threads."""

        async def go() -> T:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

        return self.run(go(), timeout)

    def close(self) -> None:
        """Stop the loop and the thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


@dataclass(frozen=True)
class Host:
    """One lab host: a namespace with one address on the lab's bridge."""

    role: str
    ns: str
    address: str

    def argv(self, cmd: list[str]) -> list[str]:
        """The command line that runs ``cmd`` inside this host."""
        return ["ip", "netns", "exec", self.ns, *cmd]


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live owner from a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def lab_namespaces() -> dict[str, list[str]]:
    """Run id -> namespaces, for every namespace carrying the lab prefix."""
    out = run_ip("netns", "list", check=False).stdout
    runs: dict[str, list[str]] = {}
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1] != "probe":
            runs.setdefault(parts[1], []).append(name)
    return runs


def read_state(run_id: str) -> dict[str, Any] | None:
    """The state file of a run, or None."""
    try:
        return dict(json.loads((STATE_DIR / f"{run_id}.json").read_text()))
    except (OSError, ValueError):
        return None


def owner_alive(state: dict[str, Any] | None) -> bool:
    """True if the run that wrote ``state`` is still running, or is a persistent lab."""
    if state is None:
        return False
    if state.get("persistent"):
        return True
    pid = state.get("owner_pid")
    return isinstance(pid, int) and proc_start_time(pid) == state.get("owner_start")


def destroy_run(run_id: str, namespaces: list[str] | None = None) -> list[str]:
    """Kill every process inside a run's namespaces and delete them; returns what was deleted."""
    names = sorted(set(namespaces or []) | set(lab_namespaces().get(run_id, [])))
    delete_namespaces(names)
    (STATE_DIR / f"{run_id}.json").unlink(missing_ok=True)
    return names


def delete_namespaces(names: list[str]) -> None:
    """SIGKILL every process still inside these namespaces, then delete them."""
    for _ in range(3):
        pids = [int(p) for ns in names for p in run_ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    for ns in names:
        run_ip("netns", "del", ns, check=False)


def cleanup_leftovers() -> list[str]:
    """Destroy labs of crashed runs (prefix ``czlab-``, owner gone); returns their run ids."""
    removed = []
    for run_id, names in lab_namespaces().items():
        if not owner_alive(read_state(run_id)):
            destroy_run(run_id, names)
            removed.append(run_id)
    return removed
