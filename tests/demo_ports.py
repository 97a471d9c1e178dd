"""Ports for a `carousel demo` started by a test, every planned address checked free."""

from __future__ import annotations

import argparse
import random

from carousel.demo_plan import make_plan, port_problems

# Below Linux's ephemeral range (32768-60999 by default), so no outgoing connection and no
# `bind(port 0)` of another test takes one of these between the check and the demo's bind.
# The demo derives ports from the ones it is given (admin = port + 1, agent admin = port + 2,
# etcd peer = port + 10), so a free port from bind(0) alone is not enough.
_LOW, _HIGH = 20000, 32700


def demo_ports(edges: int = 3, apps: int = 2) -> dict[str, int]:
    """The demo's port flags, laid out in one block of 20 ports in which every address is free."""
    for _ in range(200):
        base = random.randrange(_LOW, _HIGH - 20)
        ports = {
            "--dns-port": base,
            "--edge-port": base + 2,
            "--app-port": base + 5,
            "--etcd-port": base + 7,
            "--tls-port": base + 8,
            "--forward-port": base + 9,
            "--dashboard-port": base + 11,
        }
        flags = {k[2:].replace("-", "_"): v for k, v in ports.items()}
        args = argparse.Namespace(edges=edges, apps=apps, **flags)
        if not port_problems(make_plan(args)):
            return ports
    raise RuntimeError(f"no block of 20 free ports found in {_LOW}-{_HIGH}")
