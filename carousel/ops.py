"""Operator commands: `carousel status`, `drain`/`undrain`, `purge`."""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
import uuid
from typing import Any

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.registry import Keys, MaintenanceFlag, PurgeEvent, SchemaError, ServiceRecord, check_name

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


async def write_drain(etcd: Etcd, cfg: EtcdConfig, node: str, on: bool, reason: str = "") -> bool:
    """Set or clear a node's maintenance flag (no lease: it survives agent restarts).

    Returns whether anything changed: a flag written, or a flag that existed removed.
    """
    check_name("node", node)
    key = Keys(cfg.prefix).maintenance_flag(node)
    if on:
        flag = MaintenanceFlag(
            node=node, reason=reason or f"drained by {os.environ.get('USER', '?')}", since=time.time()
        )
        await etcd.put(key, flag.encode())
        return True
    return await etcd.delete(key)


async def set_drain(etcd: Etcd, cfg: EtcdConfig, node: str, on: bool, reason: str = "") -> int:
    """`carousel drain` / `undrain`: write the flag and say what happens next."""
    try:
        changed = await write_drain(etcd, cfg, node, on, reason)
    except ValueError as exc:
        print(f"carousel: {exc}", file=sys.stderr)
        return 2
    if on:
        print(f"{node}: drain requested; its agent sets it draining now and removes it after drain_delay")
    else:
        print(f"{node}: " + ("maintenance flag cleared" if changed else "was not drained"))
    return 0


async def write_purge(etcd: Etcd, cfg: EtcdConfig, kind: str, target: str) -> str:
    """Write a purge event under a short lease; every edge applies it on sight. Returns its key."""
    if kind not in ("url", "prefix", "tag"):
        raise ValueError(f"purge kind must be url, prefix or tag, found {kind!r}")
    if not target:
        raise ValueError("purge target is empty")
    keys = Keys(cfg.prefix)
    event = PurgeEvent(kind=kind, target=target, issued=time.time())  # type: ignore[arg-type]
    lease = await etcd.grant(PURGE_EVENT_TTL)
    key = keys.purge(f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}")
    await etcd.put(key, event.encode(), lease=lease.id)
    return key


async def publish_purge(etcd: Etcd, cfg: EtcdConfig, kind: str, target: str) -> int:
    """`carousel purge`: publish the event and print its key."""
    key = await write_purge(etcd, cfg, kind, target)
    print(f"purge {kind} {target!r} published ({key})")
    return 0


async def lift_ban(etcd: Etcd, cfg: EtcdConfig, address: str) -> bool:
    """Delete a cluster-wide ban before its lease ends; True if there was one."""
    try:
        ipaddress.ip_network(address, strict=False)
    except ValueError:
        raise ValueError(f"not an address or network: {address!r}") from None
    return await etcd.delete(Keys(cfg.prefix).ban(address))
