"""The lab itself: isolated from the host, hosts register across namespaces, leftovers are cleaned."""

from __future__ import annotations

import json
import re
import secrets
import subprocess

from lab.netns import PREFIX, STATE_DIR, cleanup_leftovers, lab_namespaces, run_ip
from tests.e2e.clients import http_get
from tests.lab import Lab


def test_lab_traffic_stays_inside_its_namespaces(healthy_lab: Lab) -> None:
    lab = healthy_lab
    subnet = f"{lab.settings.subnet}."
    # The machine's own namespace gains no address, route or bridge port in the lab's range.
    assert subnet not in run_ip("-4", "addr").stdout
    assert subnet not in run_ip("route").stdout
    for role in lab.hosts:
        routes = lab.ip(role, "route").stdout.strip().splitlines()
        # Only the bridge's /24: no default route, so nothing leaves the lab.
        assert routes == [f"{subnet}0/24 dev eth0 proto kernel scope link src {lab.address(role)}"], routes
    assert "br0" in lab.ip("sw", "link", "show", "br0").stdout


def test_every_host_registers_and_serves_from_its_own_namespace(healthy_lab: Lab) -> None:
    lab = healthy_lab
    records = lab.registry()
    for role in lab.roles("edge") + lab.roles("ap"):
        service = "edge" if role.startswith("edge") else "app"
        rec = records[(service, role)]
        assert rec.ipv4 == (lab.address(role),) and rec.port == 80 and rec.state == "up"
    client = lab.client()
    for role in lab.roles("edge"):
        served_by = set()
        for _ in range(6):  # the pool balances over both APs it discovered in etcd
            status, body = client.run(http_get(lab.address(role)), timeout=10)
            assert status == 200, body[:200]
            served_by.update(re.findall(rb"Served by AP (\w+)", body))
        assert served_by == {r.encode() for r in lab.roles("ap")}
        status, body = client.run(http_get(lab.address(role), "/static/css/site.css"), timeout=10)
        assert status == 200 and body, "static files come from the edge itself"


def test_cleanup_removes_crashed_runs_only(healthy_lab: Lab) -> None:
    lab = healthy_lab
    dead_owner = subprocess.Popen(["true"])  # its pid no longer runs once reaped
    dead_owner.wait()
    crashed, kept = f"dead{secrets.token_hex(2)}", f"keep{secrets.token_hex(2)}"
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / f"{crashed}.json").write_text(json.dumps({"owner_pid": dead_owner.pid, "owner_start": "1"}))
    (STATE_DIR / f"{kept}.json").write_text(json.dumps({"persistent": True}))
    for run in (crashed, kept):
        run_ip("netns", "add", f"{PREFIX}-{run}-host")
    # A process left running inside the crashed run's namespace must be killed too.
    orphan = subprocess.Popen(
        ["ip", "netns", "exec", f"{PREFIX}-{crashed}-host", "sleep", "60"], start_new_session=True
    )
    try:
        removed = cleanup_leftovers()
        assert crashed in removed and kept not in removed and lab.run_id not in removed
        runs = lab_namespaces()
        assert crashed not in runs and kept in runs and lab.run_id in runs
        assert orphan.wait(5) == -9
        assert not (STATE_DIR / f"{crashed}.json").exists()
    finally:
        orphan.kill()
        run_ip("netns", "del", f"{PREFIX}-{kept}-host", check=False)
        run_ip("netns", "del", f"{PREFIX}-{crashed}-host", check=False)
        (STATE_DIR / f"{kept}.json").unlink(missing_ok=True)
        (STATE_DIR / f"{crashed}.json").unlink(missing_ok=True)
