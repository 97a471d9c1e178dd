"""deploy/ansible: a daemon's restart handler restarts only a unit that ran before the run.

On a first run a daemon role writes its files, notifies its handler, then starts the
unit, which reads those very files: a restart at the end of the play would start the
same daemon again minutes later (on TCG-emulated VMs such restarts took up to 525 s
each, measured in vagrant/README.md). The common role notes (systemctl is-active) the carousel units that
were running before the run changed anything; every handler that restarts or reloads
a unit is skipped unless its unit is in that list. The condition is evaluated here with
ansible-core's own templar, as Ansible evaluates it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with ansible-core (pip install -e '.[dev]')")
templar_mod = pytest.importorskip("ansible.template", reason="ansible-core not installed")

ROLES = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "roles"
DAEMON_ROLES = {
    "dnsd": "carousel-dnsd.service",
    "dashboard": "carousel-dashboard.service",
    "app": "carousel-app.service",
    "edge": "carousel-edge.service",
    "agent": "carousel-agent.service",
}


def _service_handlers(role: str) -> list[dict[str, Any]]:
    handlers = yaml.safe_load((ROLES / role / "handlers" / "main.yml").read_text())
    found = [h for h in handlers if "ansible.builtin.systemd_service" in h]
    assert found, f"{role} has no service handler"
    return found


def _when(handler: dict[str, Any], variables: dict[str, Any]) -> bool:
    from ansible.parsing.dataloader import DataLoader

    # ansible-core 2.19 templates only text marked as trusted (a playbook's is).
    trust = getattr(templar_mod, "trust_as_template", lambda text: text)
    templar = templar_mod.Templar(loader=DataLoader(), variables=variables)
    when = handler["when"]
    conditions = when if isinstance(when, list) else [when]
    return all(templar.template(trust("{{ " + c + " }}")) in (True, "True") for c in conditions)


@pytest.mark.parametrize(("role", "unit"), sorted(DAEMON_ROLES.items()))
def test_a_daemon_handler_runs_only_for_a_unit_that_was_running(role: str, unit: str) -> None:
    for handler in _service_handlers(role):
        assert handler["ansible.builtin.systemd_service"]["name"] == unit
        running = {"common_manage_services": True, "common_services_running": [unit]}
        started_now = {"common_manage_services": True, "common_services_running": ["carousel-other.service"]}
        assert _when(handler, running), handler["name"]
        assert not _when(handler, started_now), handler["name"]
        assert not _when(handler, {"common_manage_services": False, "common_services_running": [unit]})
        # The render test and the chroot run never note running units: nothing restarts.
        assert not _when(handler, {"common_manage_services": True})


def test_etcd_is_restarted_only_when_it_was_running() -> None:
    (handler,) = _service_handlers("etcd")
    assert _when(handler, {"etcd_manage_service": True, "etcd_was_running": True})
    assert not _when(handler, {"etcd_manage_service": True, "etcd_was_running": False})
    assert not _when(handler, {"etcd_manage_service": True})


def test_the_running_units_are_noted_before_any_daemon_role_writes() -> None:
    # The common role runs first in the play; its note must come before anything it
    # changes itself, and the etcd role's before etcd's first start.
    common = _tasks("common")
    note = _setting("common_services_running", common)
    assert "systemctl" in common[note - 1]["ansible.builtin.command"]["argv"]
    assert note < [t["name"] for t in common].index("Install the Debian packages carousel needs.")
    etcd = _tasks("etcd")
    assert _setting("etcd_was_running", etcd) < [t["name"] for t in etcd].index("Enable and start etcd.")


def _tasks(role: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load((ROLES / role / "tasks" / "main.yml").read_text()))


def _setting(fact: str, tasks: list[dict[str, Any]]) -> int:
    """Index of the set_fact task that sets `fact`."""
    return next(i for i, t in enumerate(tasks) if fact in t.get("ansible.builtin.set_fact", {}))


def _template(expression: str, variables: dict[str, Any]) -> bool:
    from ansible.parsing.dataloader import DataLoader

    trust = getattr(templar_mod, "trust_as_template", lambda text: text)
    templar = templar_mod.Templar(loader=DataLoader(), variables=variables)
    return templar.template(trust(expression)) in (True, "True")


def _start_task(role: str) -> dict[str, Any]:
    return next(
        t["ansible.builtin.systemd_service"]
        for t in _tasks(role)
        if t.get("ansible.builtin.systemd_service", {}).get("state") == "started"
    )


def _unit_register(role: str) -> str:
    """The name the role's config tasks register the unit file's template result under."""
    tasks = yaml.safe_load((ROLES / role / "tasks" / "config.yml").read_text())
    (task,) = [t for t in tasks if "systemd unit" in t["name"]]
    return str(task["register"])


@pytest.mark.parametrize(("role", "unit"), sorted(DAEMON_ROLES.items()))
def test_systemd_is_reloaded_only_for_a_new_or_changed_unit(role: str, unit: str) -> None:
    # A daemon-reload on every run timed out on a loaded TCG VM in a run that changed
    # nothing ("Reload daemon failed: Connection timed out", vagrant/README.md).
    reload = str(_start_task(role)["daemon_reload"])
    written = _unit_register(role)
    same = {written: {"changed": False}, "common_services_running": [unit]}
    assert not _template(reload, same)
    assert _template(reload, {**same, written: {"changed": True}})
    # A unit not running before the run (its first start, or one a failed run left
    # written but not loaded) is loaded afresh.
    assert _template(reload, {**same, "common_services_running": []})
    assert _template(reload, {written: {"changed": False}})


def test_etcd_reloads_systemd_only_for_a_new_or_changed_unit() -> None:
    reload = str(_start_task("etcd")["daemon_reload"])
    written = _unit_register("etcd")
    assert not _template(reload, {written: {"changed": False}, "etcd_was_running": True})
    assert _template(reload, {written: {"changed": True}, "etcd_was_running": True})
    assert _template(reload, {written: {"changed": False}, "etcd_was_running": False})


def _start_task_whole(role: str) -> dict[str, Any]:
    return next(
        t for t in _tasks(role) if t.get("ansible.builtin.systemd_service", {}).get("state") == "started"
    )


@pytest.mark.parametrize("role", sorted([*DAEMON_ROLES, "etcd"]))
def test_a_start_whose_daemon_reload_timed_out_is_tried_again(role: str) -> None:
    # The eleventh session's first provisioning failed on ns1 and ns2 at the dashboard's
    # first start: its unit was new, so the reload was needed, and systemd's D-Bus call for
    # it timed out on a starved TCG vCPU ("failure 1 during daemon-reload: Reload daemon
    # failed: Connection timed out"). The task is tried again, as Ansible's until/retries do.
    task = _start_task_whole(role)
    registered = task["register"]
    timed_out = {
        "failed": True,
        "changed": False,
        "msg": "failure 1 during daemon-reload: Reload daemon failed: Connection timed out\n",
    }
    assert not _template("{{ " + task["until"] + " }}", {registered: timed_out})
    assert _template("{{ " + task["until"] + " }}", {registered: {"changed": True}})
    assert int(task["retries"]) >= 2
    assert int(task["delay"]) > 0
