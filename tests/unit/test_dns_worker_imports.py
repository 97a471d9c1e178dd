"""A dnsd worker process (workers = N) imports what answering needs, not the etcd client."""

from __future__ import annotations

import subprocess
import sys


def test_the_worker_module_imports_neither_etcd_nor_the_admin_listener() -> None:
    """A restarted worker is spawned: a fresh interpreter imports dnsd.worker.

    The etcd client (aetcd, gRPC, protobuf), tenacity, aiohttp and prometheus_client
    cost it about 0.1 s of CPU on the core its peers answer on, for nothing it uses.
    """
    heavy = ("grpc", "aetcd", "google.protobuf", "tenacity", "aiohttp", "prometheus_client")
    code = (
        "import sys, dnsd.worker\n"
        f"print(sorted({{m for m in sys.modules for h in {heavy!r} if m == h or m.startswith(h + '.')}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
