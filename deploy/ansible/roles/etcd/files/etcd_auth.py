#!/usr/bin/python3
"""Bring etcd's users, roles and permissions to the wanted set, then switch auth on.

Run by the etcd role on one member, as root (etcdctl's certificate, CN=root, from the
ETCDCTL_* environment). The wanted set comes as JSON in CAROUSEL_ETCD_AUTH:
{"prefix": "/carousel/", "roles": {ROLE: [{"perm": "read"|"readwrite", "key": KEY,
"prefix": BOOL}]}}; each role gets a user of the same name (the CN of the daemon's
client certificate) with no password: etcd logs it in by its certificate. Extra
permissions and roles of those users are revoked. Prints CHANGED when anything changed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

# etcd's permType, by name or number (JSON output omits 0, READ).
PERM_TYPES: dict[str | int, str] = {
    "READ": "read",
    "WRITE": "write",
    "READWRITE": "readwrite",
    0: "read",
    1: "write",
    2: "readwrite",
}


def ctl(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """etcdctl with the given arguments."""
    out = subprocess.run(["etcdctl", *args], capture_output=True, text=True, env=env, timeout=60)
    if check and out.returncode != 0:
        sys.exit(f"etcdctl {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def prefix_end(key: str) -> str:
    """etcd's range end for a prefix: the last byte plus one."""
    raw = key.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def current_perms(role: str) -> set[tuple[str, str, str]]:
    """(perm, key, range_end) of a role as etcd holds it."""
    data = json.loads(ctl("role", "get", role, "-w", "json").stdout)
    perms = set()
    for p in data.get("perm") or []:
        key = base64.b64decode(p.get("key", "")).decode()
        end = base64.b64decode(p.get("range_end", "")).decode()
        perms.add((PERM_TYPES[p.get("permType", 0)], key, end))
    return perms


def auth_enabled() -> bool:
    """True when etcd refuses a user that does not exist (the member's own CN)."""
    env = dict(os.environ)
    env["ETCDCTL_CERT"] = os.environ["CAROUSEL_ETCD_MEMBER_CERT"]
    env["ETCDCTL_KEY"] = os.environ["CAROUSEL_ETCD_MEMBER_KEY"]
    return ctl("role", "list", env=env, check=False).returncode != 0


def main() -> int:
    """Apply the wanted users and roles; enable auth."""
    spec = json.loads(os.environ["CAROUSEL_ETCD_AUTH"])
    changed = False
    roles = set(ctl("role", "list").stdout.split())
    users = set(ctl("user", "list").stdout.split())
    if "root" not in roles:
        ctl("role", "add", "root")
        changed = True
    if "root" not in users:
        ctl("user", "add", "root", "--no-password")
        ctl("user", "grant-role", "root", "root")
        changed = True
    for role, wanted_list in spec["roles"].items():
        if role not in roles:
            ctl("role", "add", role)
            changed = True
        wanted = {(p["perm"], p["key"], prefix_end(p["key"]) if p["prefix"] else "") for p in wanted_list}
        have = current_perms(role)
        for _perm, key, end in sorted(have - wanted):
            ctl("role", "revoke-permission", role, key, *([end] if end else []))
            changed = True
        for perm, key, end in sorted(wanted - have):
            ctl("role", "grant-permission", role, perm, key, *([end] if end else []))
            changed = True
        if role not in users:
            ctl("user", "add", role, "--no-password")
            changed = True
        user = json.loads(ctl("user", "get", role, "-w", "json").stdout)
        user_roles = set(user.get("roles") or [])
        for extra in sorted(user_roles - {role}):
            ctl("user", "revoke-role", role, extra)
            changed = True
        if role not in user_roles:
            ctl("user", "grant-role", role, role)
            changed = True
    if not auth_enabled():
        ctl("auth", "enable")
        changed = True
    print("CHANGED" if changed else "unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
