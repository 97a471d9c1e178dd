"""vagrant/: the Vagrantfile parses and validates, and its lab layout is sound.

The layout is read from vagrant/lab.rb through ruby itself (the code the
Vagrantfile runs), so these tests need ruby; vagrant is needed only for
`vagrant validate`. Each skips with the Debian package to install when missing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
LAB_NETWORK = ipaddress.ip_network("192.168.56.0/21")

needs_ruby = pytest.mark.skipif(
    shutil.which("ruby") is None, reason="ruby not installed (apt-get install ruby)"
)


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAROUSEL_")}
    env.update(overrides)
    return env


def _plan(**overrides: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ruby", "-r", "./lab.rb", "-e", "puts CarouselLab.plan(ENV).to_json"],
        cwd=VAGRANT_DIR,
        env=_env(**overrides),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _plan_error(**overrides: str) -> str:
    out = subprocess.run(
        ["ruby", "-r", "./lab.rb", "-e", "puts CarouselLab.plan(ENV).to_json"],
        cwd=VAGRANT_DIR,
        env=_env(**overrides),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    return out.stderr


def _check_addresses(plan: dict[str, Any]) -> None:
    addresses = [ipaddress.ip_address(m["ip"]) for m in plan["machines"]]
    assert len(set(addresses)) == len(addresses), "two machines share an address"
    for addr in addresses:
        assert addr in LAB_NETWORK, f"{addr} is outside {LAB_NETWORK}"
        net24 = ipaddress.ip_network(f"{addr}/24", strict=False)
        # Neither the network, the broadcast nor .1 (the host's side of the host-only network).
        assert addr not in (net24.network_address, net24.broadcast_address, net24.network_address + 1)
    names = [m["name"] for m in plan["machines"]]
    assert len(set(names)) == len(names)


@needs_ruby
def test_vagrantfile_and_layout_parse() -> None:
    for name in ("Vagrantfile", "lab.rb"):
        out = subprocess.run(
            ["ruby", "-c", name], cwd=VAGRANT_DIR, capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert "Syntax OK" in out.stdout


@needs_ruby
def test_default_lab_layout() -> None:
    plan = _plan()
    assert [m["name"] for m in plan["machines"]] == ["ns1", "ns2", "edge1", "edge2", "edge3", "app1", "app2"]
    assert plan["groups"]["etcd"] == ["ns1", "ns2", "app1"]
    assert plan["groups"]["dns"] == ["ns1", "ns2"]
    assert plan["groups"]["edge"] == ["edge1", "edge2", "edge3"]
    assert plan["groups"]["app"] == ["app1", "app2"]
    _check_addresses(plan)
    # The box `make vm-box` builds locally, which has no version.
    assert plan["box"] == "carousel/bookworm"
    assert plan["box_version"] == ""
    # Nothing of the isolated VM lab unless vagrant/vmlab.py asks for it.
    assert plan["libvirt_uri"] == "" and not plan["isolated"] and plan["extra_vars"] == {}


@needs_ruby
def test_public_box_is_pinned() -> None:
    plan = _plan(CAROUSEL_BOX="debian/bookworm64")
    assert plan["box"] == "debian/bookworm64"
    assert plan["box_version"].split(".")[0] == "12"


@needs_ruby
def test_vm_lab_settings_reach_the_plan() -> None:
    plan = _plan(
        CAROUSEL_LIBVIRT_URI="qemu:///system?socket=/x/libvirt-sock",
        CAROUSEL_LIBVIRT_NETWORKS="isolated",
        CAROUSEL_OFFLINE_WHEELHOUSE="/x/wheelhouse",
        CAROUSEL_LIBVIRT_DRIVER="qemu",
        CAROUSEL_VENV_ARCHIVE="/x/venv.tar",
        CAROUSEL_ETCD_TIMEOUT="10",
        CAROUSEL_VENV_HAS_CAROUSEL="1",
        CAROUSEL_AGENT_TTL="15",
        CAROUSEL_CHECK_TIMEOUT="3",
        CAROUSEL_ANSIBLE_TIMEOUT="120",
        CAROUSEL_DASHBOARD_INTERVAL="10",
        CAROUSEL_CHECK_INTERVAL="4",
        CAROUSEL_ETCD_HEARTBEAT_MS="250",
        CAROUSEL_NODES_STRATEGY="mitogen_free",
    )
    assert plan["ansible_timeout"] == 120
    assert plan["libvirt_uri"].endswith("/x/libvirt-sock") and plan["isolated"] and plan["driver"] == "qemu"
    assert plan["extra_vars"] == {
        "common_offline": True,
        "common_wheelhouse": "/x/wheelhouse",
        "etcd_offline": True,
        "common_venv_archive": "/x/venv.tar",
        "common_venv_archive_has_carousel": True,
        "common_etcd_timeout": 10.0,
        "agent_ttl": 15,
        "agent_check_timeout": 3.0,
        "edge_pool_health_timeout": 3.0,
        "dashboard_scrape_timeout": 3.0,
        "dashboard_scrape_interval": 10.0,
        "agent_check_interval": 4.0,
        "edge_pool_health_interval": 4.0,
        # The election timeout ten heartbeats, and the agents told (they refuse a TTL
        # etcd would raise above 1.5 x the election timeout).
        "etcd_heartbeat_interval_ms": 250,
        "etcd_election_timeout_ms": 2500,
        "agent_etcd_election_timeout": 2.5,
        "site_nodes_strategy": "mitogen_free",
    }


def test_site_yml_nodes_play_takes_the_labs_strategy() -> None:
    # With Mitogen the nodes' play must run mitogen_free: a play that names `free`
    # itself bypasses Mitogen (each task then costs 15-47 s on seven TCG VMs, measured).
    plays = yaml.safe_load((REPO / "deploy" / "ansible" / "site.yml").read_text())
    (nodes,) = [p for p in plays if p["hosts"] == "dns:edge:app"]
    assert nodes["strategy"] == "{{ site_nodes_strategy | default('free') }}"


@needs_ruby
def test_ansible_timeout_is_the_provisioners_own_unless_set() -> None:
    # nil: the Vagrantfile passes no --timeout of its own and Vagrant's 30 s applies.
    assert _plan()["ansible_timeout"] is None


@needs_ruby
def test_carousel_in_the_archive_needs_an_archive() -> None:
    # Without an archive the nodes must get carousel from pip: the flag alone is ignored.
    plan = _plan(CAROUSEL_VENV_HAS_CAROUSEL="1")
    assert "common_venv_archive_has_carousel" not in plan["extra_vars"]


@needs_ruby
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CAROUSEL_AGENT_TTL", "7.5"),
        ("CAROUSEL_AGENT_TTL", "0"),
        ("CAROUSEL_CHECK_TIMEOUT", "x"),
        ("CAROUSEL_DASHBOARD_INTERVAL", "0"),
        ("CAROUSEL_CHECK_INTERVAL", "-1"),
        ("CAROUSEL_ETCD_HEARTBEAT_MS", "250.5"),
        ("CAROUSEL_ANSIBLE_TIMEOUT", "2.5"),
    ],
)
def test_bad_lab_timings_are_refused(key: str, value: str) -> None:
    assert f"{key}={value}" in _plan_error(**{key: value})


@needs_ruby
def test_largest_lab_layout_stays_in_range() -> None:
    plan = _plan(CAROUSEL_NS="9", CAROUSEL_EDGES="9", CAROUSEL_APPS="9", CAROUSEL_SUBNET="192.168.63")
    assert len(plan["machines"]) == 27
    _check_addresses(plan)


@needs_ruby
def test_playbook_path_exists_and_its_groups_are_the_labs() -> None:
    plan = _plan()
    playbook = (VAGRANT_DIR / plan["playbook"]).resolve()
    assert playbook == REPO / "deploy" / "ansible" / "site.yml"
    assert playbook.is_file()
    # Host patterns of the plays (`hosts: dns:edge:app` names three groups).
    targeted = set()
    for line in playbook.read_text().splitlines():
        if line.strip().startswith("hosts:"):
            targeted.update(re.split(r"[:,]", line.split("hosts:", 1)[1].strip()))
    for group in ("etcd", "dns", "edge", "app"):
        assert group in targeted, f"site.yml has no play for group {group}"
        assert plan["groups"][group], f"the lab has no machine in group {group}"


@needs_ruby
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAROUSEL_EDGES": "0"}, "CAROUSEL_EDGES=0"),
        ({"CAROUSEL_EDGES": "10"}, "CAROUSEL_EDGES=10"),
        ({"CAROUSEL_APPS": "two"}, "CAROUSEL_APPS=two"),
        ({"CAROUSEL_SUBNET": "10.0.0"}, "CAROUSEL_SUBNET=10.0.0"),
        ({"CAROUSEL_SUBNET": "192.168.64"}, "CAROUSEL_SUBNET=192.168.64"),
        ({"CAROUSEL_ETCD": "ns1,ns2"}, "odd number"),
        ({"CAROUSEL_ETCD": "ns1,ns2,ns9"}, "no machine named ns9"),
        ({"CAROUSEL_ETCD_TIMEOUT": "0"}, "CAROUSEL_ETCD_TIMEOUT=0"),
        ({"CAROUSEL_ETCD_TIMEOUT": "soon"}, "CAROUSEL_ETCD_TIMEOUT=soon"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(env: dict[str, str], message: str) -> None:
    assert message in _plan_error(**env)


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed (apt-get install vagrant)")
def test_vagrant_validate(tmp_path: Path) -> None:
    # No provider (VirtualBox, libvirt) can run here, so their blocks are not checked;
    # the layout, the network and the provisioner are.
    out = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=VAGRANT_DIR,
        env=_env(
            VAGRANT_CHECKPOINT_DISABLE="1",
            VAGRANT_HOME=str(tmp_path / "vagrant.d"),
            VAGRANT_DOTFILE_PATH=str(tmp_path / "dotvagrant"),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout
