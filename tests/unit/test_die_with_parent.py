"""A process started through die_with_parent ends when the process that started it is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carousel.etcdserver import die_with_parent

PARENT = """
import subprocess, sys, time
from carousel.etcdserver import die_with_parent
child = subprocess.Popen(die_with_parent(["sleep", "60"]))
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for its new parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


NO_SETPRIV = sys.platform != "linux" or shutil.which("setpriv") is None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


@pytest.mark.skipif(NO_SETPRIV, reason="needs Linux and setpriv (util-linux)")
def test_child_ends_with_a_killed_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # setpriv sets the signal and then execs the command: until the pid runs `sleep`,
        # a parent killed now would beat the prctl (seen once under load in CI).
        deadline = time.monotonic() + 5
        while _comm(child) != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _comm(child) == "sleep"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(child), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait(10)
        if child and not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_command_is_kept_whole() -> None:
    argv = ["etcd", "--name", "m1"]
    wrapped = die_with_parent(argv)
    assert wrapped[-3:] == argv
    if shutil.which("setpriv"):
        assert wrapped[1:4] == ["--pdeathsig", "TERM", "--"]
