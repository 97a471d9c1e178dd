"""The VM lab's isolation check: a sealed namespace passes, every way out is caught.

No VM is booted: the check runs on namespaces this test makes (one sealed, one
linked by a veth pair to a second namespace of the test, never to the host), so it
is cheap enough for CI. The VM lab runs the same check before its first VM boots.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(120)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two fresh namespaces (loopback up), deleted afterwards whatever happens."""
    tag = uuid.uuid4().hex[:8]
    inner, outer = f"cvlab-in-{tag}", f"cvlab-out-{tag}"
    try:
        for ns in (inner, outer):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        yield inner, outer
    finally:
        for ns in (inner, outer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_a_sealed_namespace_passes(vmlab: ModuleType, namespaces: tuple[str, str]) -> None:
    inner, _ = namespaces
    assert vmlab.isolation_problems(inner) == []


def test_libvirt_style_bridge_and_tap_pass(vmlab: ModuleType, namespaces: tuple[str, str]) -> None:
    inner, _ = namespaces
    _ip("-n", inner, "link", "add", "virbr9", "type", "bridge")
    _ip("-n", inner, "addr", "add", "192.168.56.1/24", "dev", "virbr9")
    _ip("-n", inner, "tuntap", "add", "dev", "vnet9", "mode", "tap")
    _ip("-n", inner, "link", "set", "vnet9", "master", "virbr9")
    _ip("-n", inner, "link", "set", "virbr9", "up")
    assert vmlab.isolation_problems(inner) == []


def test_every_way_out_is_reported(vmlab: ModuleType, namespaces: tuple[str, str]) -> None:
    inner, outer = namespaces
    # A veth pair to another namespace, an address outside the lab, a default route.
    _ip("-n", inner, "link", "add", "out0", "type", "veth", "peer", "name", "out1", "netns", outer)
    _ip("-n", inner, "addr", "add", "10.99.0.2/24", "dev", "out0")
    _ip("-n", inner, "link", "set", "out0", "up")
    _ip("-n", outer, "link", "set", "out1", "up")
    _ip("-n", inner, "route", "add", "default", "via", "10.99.0.1")
    problems = "\n".join(vmlab.isolation_problems(inner))
    assert "link out0 of kind veth" in problems
    assert "peer in another namespace" in problems
    assert "10.99.0.2, outside the lab's networks" in problems
    assert "default route" in problems
    # With a route out, the probes no longer fail at once with "no route".
    assert "expected no route" in problems or "answered" in problems


def test_a_bridge_with_a_foreign_address_is_reported(vmlab: ModuleType, namespaces: tuple[str, str]) -> None:
    inner, _ = namespaces
    _ip("-n", inner, "link", "add", "br0", "type", "bridge")
    _ip("-n", inner, "addr", "add", "203.0.113.5/24", "dev", "br0")
    _ip("-n", inner, "link", "set", "br0", "up")
    problems = vmlab.isolation_problems(inner)
    assert any("203.0.113.5" in p for p in problems), problems
