"""The dashboard's Ansible role renders a config that `carousel check-config` accepts, for a dns host
of the example inventory, with the tokens, the dnsd and etcd targets from the inventory."""

from __future__ import annotations

import getpass
import grp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carousel.dashboard.config import load

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "deploy" / "ansible"


def test_dashboard_role_renders_a_valid_config(tmp_path: Path):
    playbook_bin = Path(sys.executable).with_name("ansible-playbook")
    if not playbook_bin.exists():
        pytest.skip("needs ansible-playbook (the dev extra)")
    venv = Path(sys.executable).parent.parent
    # Extra vars: above the common role's files, which the play loads for its defaults.
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            {
                "common_config_dir": f"{tmp_path}/etc",
                "common_systemd_dir": f"{tmp_path}/systemd",
                "common_state_dir": f"{tmp_path}/state",
                "common_venv_dir": str(venv),
                "common_manage_services": False,
                "common_user": getpass.getuser(),
                "common_group": grp.getgrgid(os.getgid()).gr_name,
            }
        )
    )
    play = tmp_path / "render.yml"
    play.write_text(
        f"""
- hosts: ns1
  connection: local
  gather_facts: false
  vars_files:
    - {ANSIBLE}/roles/common/defaults/main.yml
    - {ANSIBLE}/roles/common/vars/main.yml
  vars:
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
    common_config_dir: {tmp_path}/etc
    common_systemd_dir: {tmp_path}/systemd
    common_state_dir: {tmp_path}/state
    common_venv_dir: {venv}
    common_user: "{{{{ lookup('ansible.builtin.pipe', 'id -un') }}}}"
    common_group: "{{{{ lookup('ansible.builtin.pipe', 'id -gn') }}}}"
    common_manage_services: false
    common_build_id: test
    dashboard_host: 0.0.0.0
    dashboard_token: "0123456789abcdef-admin"
    dashboard_tokens: {{alice: "alice-0123456789abcdef"}}
  tasks:
    - ansible.builtin.file: {{path: "{tmp_path}/etc", state: directory}}
    - ansible.builtin.file: {{path: "{tmp_path}/systemd", state: directory}}
    - ansible.builtin.include_role: {{name: dashboard, tasks_from: config.yml}}
"""
    )
    done = subprocess.run(
        [str(playbook_bin), "-i", str(ANSIBLE / "inventory" / "example"), str(play), "-e", f"@{extra}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"), "PATH": f"{venv}/bin:/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    cfg = load(str(tmp_path / "etc" / "dashboard.toml"))
    d = cfg.dashboard
    assert d.host == "0.0.0.0" and d.operators()["alice-0123456789abcdef"] == "alice"
    assert [t.url for t in d.target if t.role == "dns"] == [
        "http://192.168.56.11:9153",
        "http://192.168.56.12:9153",
    ]
    assert len([t for t in d.target if t.role == "etcd"]) == 3
    assert cfg.etcd.endpoints and all(e.endswith(":2379") for e in cfg.etcd.endpoints)
    unit = (tmp_path / "systemd" / "carousel-dashboard.service").read_text()
    assert "carousel dashboard --config" in unit and "ReadWritePaths=" in unit
