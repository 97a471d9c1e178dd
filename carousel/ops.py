"""Operator commands: `carousel status`, `drain`/`undrain`, `purge`."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.registry import Keys, MaintenanceFlag, PurgeEvent, SchemaError, ServiceRecord

# Purge events live this long in etcd: long enough for every edge's watch to
# see them, short enough that the prefix never grows.
PURGE_EVENT_TTL = 30


def _age(seconds: float) -> str:
    if seconds < 0:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


async def collect_status(etcd: Etcd, cfg: EtcdConfig) -> list[dict[str, Any]]:
    """One row per registered service instance, with lease TTL left and maintenance flag."""
    keys = Keys(cfg.prefix)
    snap = await etcd.get_prefix(keys.services)
    flags = await etcd.get_prefix(keys.maintenance)
    flagged = {kv.key.rsplit("/", 1)[-1] for kv in flags.items}
    ttl_cache: dict[int, int] = {}
    rows: list[dict[str, Any]] = []
    now = time.time()
    for kv in snap.items:
        try:
            rec = ServiceRecord.decode(kv.value)
        except SchemaError as exc:
            rows.append({"key": kv.key, "error": str(exc)})
            continue
        if kv.lease and kv.lease not in ttl_cache:
            ttl_cache[kv.lease] = await etcd.time_to_live(kv.lease)
        rows.append(
            {
                "service": rec.service,
                "node": rec.node,
                "addresses": list(rec.addresses),
                "port": rec.port,
                "weight": rec.weight,
                "state": rec.state,
                "maintenance": rec.node in flagged,
                "ttl_left": ttl_cache.get(kv.lease) if kv.lease else None,
                "since": rec.since,
                "age": now - rec.since if rec.since else -1,
            }
        )
    for node in sorted(flagged - {r.get("node") for r in rows}):
        rows.append(
            {
                "service": "-",
                "node": node,
                "addresses": [],
                "port": 0,
                "weight": 0,
                "state": "maintenance",
                "maintenance": True,
                "ttl_left": None,
                "since": 0,
                "age": -1,
            }
        )
    rows.sort(key=lambda r: (r.get("service", ""), r.get("node", ""), r.get("key", "")))
    return rows


async def print_status(etcd: Etcd, cfg: EtcdConfig, *, as_json: bool = False) -> int:
    """Print the status table (or JSON)."""
    rows = await collect_status(etcd, cfg)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("SERVICE", "NODE", "ADDRESS", "STATE", "TTL", "LAST CHANGE")
    table = [header]
    for r in rows:
        if "error" in r:
            table.append(("?", r["key"], "-", "corrupt", "-", r["error"][:40]))
            continue
        addr = ",".join(f"{a}:{r['port']}" if ":" not in a else f"[{a}]:{r['port']}" for a in r["addresses"])
        state = r["state"] + (" (maint)" if r["maintenance"] and r["state"] != "maintenance" else "")
        ttl = "-" if r["ttl_left"] is None else f"{r['ttl_left']}s"
        table.append((r["service"], r["node"], addr or "-", state, ttl, _age(r["age"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if len(table) == 1:
        print(f"(nothing registered under {cfg.prefix})", file=sys.stderr)
    return 0


async def set_drain(etcd: Etcd, cfg: EtcdConfig, node: str, on: bool, reason: str = "") -> int:
    """Set or clear a node's maintenance flag (no lease: it survives agent restarts)."""
    keys = Keys(cfg.prefix)
    key = keys.maintenance_flag(node)
    if on:
        flag = MaintenanceFlag(
            node=node, reason=reason or f"drained by {os.environ.get('USER', '?')}", since=time.time()
        )
        await etcd.put(key, flag.encode())
        print(f"{node}: drain requested; its agent sets it draining now and removes it after drain_delay")
    else:
        existed = await etcd.delete(key)
        print(f"{node}: " + ("maintenance flag cleared" if existed else "was not drained"))
    return 0


async def publish_purge(etcd: Etcd, cfg: EtcdConfig, kind: str, target: str) -> int:
    """Write a purge event under a short lease; every edge applies it on sight."""
    keys = Keys(cfg.prefix)
    event = PurgeEvent(kind=kind, target=target, issued=time.time())  # type: ignore[arg-type]
    lease = await etcd.grant(PURGE_EVENT_TTL)
    key = keys.purge(f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}")
    await etcd.put(key, event.encode(), lease=lease.id)
    print(f"purge {kind} {target!r} published ({key})")
    return 0
