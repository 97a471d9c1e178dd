"""vagrant/box: the boot loader step's single boot ends by powering off, never by a panic."""

from __future__ import annotations

import re

from tests import vagrant_scripts

BOX_DIR = vagrant_scripts.VAGRANT_DIR / "box"


def _finish_script() -> list[str]:
    """The lines of carousel-box-finish, the boot's PID 1, as customize.sh writes it."""
    text = (BOX_DIR / "customize.sh").read_text()
    found = re.search(r"carousel-box-finish\" <<'SH'\n(.*?)\nSH\n", text, re.S)
    assert found, "customize.sh no longer writes carousel-box-finish"
    return [line.strip() for line in found.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_pid_1_outlives_its_power_off_request() -> None:
    # The sysrq power-off runs from a kernel work queue: a PID 1 that exits right after
    # asking for it panics the kernel ("Attempted to kill init"), and on a fresh machine
    # the build's qemu then sat until its 900 s timeout.
    lines = _finish_script()
    trigger = lines.index("echo o >/proc/sysrq-trigger")
    after = lines[trigger + 1 :]
    assert after and re.fullmatch(r"sleep \d+", after[0]), after
    assert int(after[0].split()[1]) >= 30


def test_a_panic_of_the_build_boot_ends_qemu_at_once() -> None:
    # panic=-1 reboots on a panic, and -no-reboot turns that into qemu exiting: whatever
    # goes wrong in the boot, the build does not wait out its timeout.
    build = (BOX_DIR / "build.sh").read_text()
    qemu = build[build.index("qemu-system-x86_64 -accel") :]
    qemu = qemu[: qemu.index("\n\n") if "\n\n" in qemu else len(qemu)]
    assert "-no-reboot" in qemu
    append = re.search(r'-append "([^"]*)"', qemu)
    assert append and "panic=-1" in append.group(1).split()
