"""deploy/ansible: lint, syntax, and every template rendered by Ansible and checked by carousel.

The render runs the roles' own template tasks (deploy/ansible/tests/render.yml)
for every host of an inventory into a temp dir, so each TOML goes through the
same `validate: carousel check-config` it meets on a real node; the test then
feeds every rendered config to `carousel check-config` itself and every unit to
`systemd-analyze verify`. A template that drifts from a daemon's config
dataclasses fails here, not on a VM.

Tools come from the venv (ansible-core, ansible-lint) or Debian (systemd,
ruby); a missing one skips its test with the package to install.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.core.config import RouteConfig
from edge.core.routing import RouteTable

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory" / "example" / "hosts.yml"
VENV_BIN = Path(sys.executable).parent
CAROUSEL = VENV_BIN / "carousel"
ROLES = ("common", "etcd", "dnsd", "edge", "agent", "app")
CONFIG_KINDS = {
    "dnsd.toml": "dnsd",
    "dashboard.toml": "dashboard",
    "edge.toml": "edge",
    "agent.toml": "agent",
    "app.toml": "app",
}


def _tool(name: str) -> str:
    found = VENV_BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (pip install ansible-core ansible-lint into the venv)")
    return path


def _mitogen_strategy() -> dict[str, str]:
    """Mitogen's strategy for the render runs, when installed (the dev extra has it).

    Rendering the example inventory's templates took 88.8 s of user CPU with Ansible's own
    strategy and 36.7 s with mitogen_linear, same rendered files (measured here, 00:20 UTC
    2026-12-07): the three renders were the suite's slowest tests (62-67 s each in CI).
    """
    try:
        import ansible_mitogen
    except ImportError:
        return {}
    strategies = Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"
    return {"ANSIBLE_STRATEGY_PLUGINS": str(strategies), "ANSIBLE_STRATEGY": "mitogen_linear"}


def _ansible_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_ROLES_PATH=str(ANSIBLE_DIR / "roles"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    return env


def _etcd_binary() -> str:
    # The rendered etcd unit must name a binary that exists for systemd-analyze verify.
    return str(VENV_BIN / "etcd") if (VENV_BIN / "etcd").exists() else "/bin/true"


def render(tmp: Path, inventory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run tests/render.yml for every host of ``inventory`` into tmp/rendered."""
    root = tmp / "rendered"
    root.mkdir(parents=True, exist_ok=True)
    argv = [
        _tool("ansible-playbook"),
        "-i",
        str(inventory),
        str(ANSIBLE_DIR / "tests" / "render.yml"),
        "-e",
        f"render_root={root}",
        "-e",
        f"common_venv_dir={VENV_BIN.parent}",
        "-e",
        f"etcd_binary={_etcd_binary()}",
        *extra,
    ]
    env = {**_ansible_env(tmp), **_mitogen_strategy()}
    return subprocess.run(argv, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    kind = CONFIG_KINDS[path.name]
    argv = [str(CAROUSEL), "check-config", "--kind", kind, str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def example_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every template rendered for every host of the example inventory.

    One ansible-playbook run over the nine hosts (about 70 s of CPU): every test of this
    file that only reads the tree shares it, and `make test`'s workers keep a file together.
    """
    tmp = tmp_path_factory.mktemp("render-example")
    out = render(tmp, EXAMPLE_INVENTORY)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return tmp / "rendered"


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    lint = _tool("ansible-lint")
    out = subprocess.run(
        [lint, "--profile", "production", "--offline", "--nocolor", "."],
        cwd=ANSIBLE_DIR,
        env=_ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in out.stdout + out.stderr


@pytest.mark.parametrize("playbook", ["site.yml", "upgrade.yml", "tests/render.yml"])
def test_playbook_syntax_check(tmp_path: Path, playbook: str) -> None:
    out = subprocess.run(
        [_tool("ansible-playbook"), "-i", str(EXAMPLE_INVENTORY), "--syntax-check", playbook],
        cwd=ANSIBLE_DIR,
        env=_ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_template_is_rendered(example_render: Path) -> None:
    rendered = {p.name for p in example_render.rglob("*") if p.is_file()}
    templates = sorted(ANSIBLE_DIR.glob("roles/*/templates/*.j2"))
    assert len(templates) >= 10
    # The etcd config is written under the name etcd_config_file gives it.
    output_name = {"etcd.conf.yml.j2": "carousel.conf.yml"}
    for template in templates:
        name = output_name.get(template.name, template.name.removesuffix(".j2"))
        assert name in rendered, f"{template.relative_to(ANSIBLE_DIR)} was not rendered for any host"
    # Each host got exactly its groups' files.
    expected = {
        "ns1": {"dnsd.toml", "carousel-dnsd.service", "carousel.conf.yml", "etcd.service"}
        | {"dashboard.toml", "carousel-dashboard.service"},
        "edge1": {"edge.toml", "carousel-edge.service", "agent.toml", "carousel-agent.service"},
        "app1": {"app.toml", "carousel-app.service", "agent.toml", "carousel-agent.service"}
        | {"carousel.conf.yml", "etcd.service"},
        "app2": {"app.toml", "carousel-app.service", "agent.toml", "carousel-agent.service"},
    }
    for host, files in expected.items():
        assert {p.name for p in (example_render / host).rglob("*") if p.is_file()} == files


def test_every_rendered_config_passes_check_config(example_render: Path) -> None:
    configs = sorted(p for p in example_render.rglob("*.toml"))
    assert len(configs) == 2 * 2 + 3 * 2 + 2 * 2  # dnsd+dashboard x2, edge+agent x3, app+agent x2
    for config in configs:
        out = _check_config(config)
        assert out.returncode == 0, f"{config}: {out.stderr}"
        assert "valid" in out.stdout


def test_rendered_configs_carry_the_inventory(example_render: Path) -> None:
    dnsd = tomllib.loads((example_render / "ns2" / "etc/carousel/dnsd.toml").read_text())
    assert dnsd["dns"]["listen"] == ["192.168.56.12:53"]
    zone = dnsd["zone"][0]
    assert zone["origin"] == "example.test" and zone["services"]["www"] == "edge"
    assert [(ns["name"], ns["ipv4"]) for ns in zone["ns"]] == [
        ("ns1", ["192.168.56.11"]),
        ("ns2", ["192.168.56.12"]),
    ]
    # TLS by default: the daemons name the scheme.
    assert dnsd["etcd"]["endpoints"] == [
        "https://192.168.56.11:2379",
        "https://192.168.56.12:2379",
        "https://192.168.56.31:2379",
    ]

    agent = tomllib.loads((example_render / "edge3" / "etc/carousel/agent.toml").read_text())
    assert agent["agent"]["node"] == "edge3"
    assert agent["agent"]["drain_delay"] >= zone["service_ttl"]
    (service,) = agent["service"]
    assert (service["name"], service["port"], service["ipv4"]) == ("edge", 80, ["192.168.56.23"])
    edge = tomllib.loads((example_render / "edge3" / "etc/carousel/edge.toml").read_text())
    # The edge's admin listener is on the node's address (see the admin token test below).
    assert service["check"]["url"] == f"http://192.168.56.23:{edge['admin']['port']}/healthz"

    app_agent = tomllib.loads((example_render / "app2" / "etc/carousel/agent.toml").read_text())
    assert [s["name"] for s in app_agent["service"]] == ["app"]
    assert app_agent["service"][0]["check"]["url"] == "http://192.168.56.32:9000/healthz"

    etcd = json.loads((example_render / "app1" / "etc/etcd/carousel.conf.yml").read_text())
    assert etcd["name"] == "app1"
    assert etcd["initial-cluster"] == (
        "ns1=https://192.168.56.11:2380,ns2=https://192.168.56.12:2380,app1=https://192.168.56.31:2380"
    )
    assert etcd["election-timeout"] == 1000


def test_dnsd_and_edge_keep_their_registry_snapshot_in_a_writable_directory(example_render: Path) -> None:
    # A daemon restarted while etcd is down serves the snapshot only if it could write one:
    # the directory is in the config, exists, is the daemon's alone, and is the unit's
    # one writable path under ProtectSystem=strict.
    for host, kind in (("ns1", "dnsd"), ("edge2", "edge")):
        config = tomllib.loads((example_render / host / f"etc/carousel/{kind}.toml").read_text())
        directory = Path(config["snapshot"]["directory"])
        assert directory == example_render / host / "var/lib/carousel" / kind
        assert directory.is_dir() and directory.stat().st_mode & 0o777 == 0o700
        assert config["snapshot"]["past_max_age"] == "refuse"
        unit = (example_render / host / f"etc/systemd/system/carousel-{kind}.service").read_text()
        assert f"\nReadWritePaths={directory}\n" in unit


def test_units_are_hardened(example_render: Path) -> None:
    units = sorted(example_render.rglob("*.service"))
    for unit in units:
        text = unit.read_text()
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure"):
            assert line in text, f"{unit.name}: missing {line}"
        binds_low_ports = unit.name in ("carousel-dnsd.service", "carousel-edge.service")
        assert ("CAP_NET_BIND_SERVICE" in text) == binds_low_ports, unit.name
        assert "\nUser=" in text and "\nGroup=" in text, f"{unit.name}: no dedicated user"
    agent = (example_render / "edge1" / "etc/systemd/system/carousel-agent.service").read_text()
    stop_timeout = int(agent.split("TimeoutStopSec=")[1].split()[0])
    assert stop_timeout > 6  # the drain_delay of the example inventory
    assert "ExecReload=/bin/kill -USR2 $MAINPID" in agent


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt-get install systemd)"
)
def test_units_pass_systemd_analyze_verify(example_render: Path) -> None:
    units = sorted(example_render.rglob("*.service"))
    assert len(units) == 2 * 2 + 3 * 2 + 2 * 2 + 3  # dnsd+dashboard, edge+agent, app+agent, 3 etcd members
    for unit in units:
        out = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
        )
        # Warnings (unknown keys, bad values) go to stderr with status 0: they fail the test too.
        assert out.returncode == 0 and not out.stderr.strip(), f"{unit}: {out.stderr}"


# The etcd-security defaults as the example inventory renders them (the roles' checks and the
# PKI are in test_deploy_etcd_security.py); here to share this file's render.


def test_rendered_daemons_use_tls_and_their_own_identity(example_render: Path) -> None:
    root = example_render
    wanted = {
        ("ns1", "dnsd.toml"): "carousel-dnsd",
        # The dashboard too: without its TLS lines it dialled etcd's TLS port with no CA,
        # and the failed handshakes piled up (328 connections on a VM lab's etcd).
        ("ns1", "dashboard.toml"): "carousel-dashboard",
        ("edge1", "edge.toml"): "carousel-edge",
        ("edge1", "agent.toml"): "carousel-agent-edge1",
        ("app1", "agent.toml"): "carousel-agent-app1",
    }
    for (host, name), identity in wanted.items():
        etcd = tomllib.loads((root / host / "etc/carousel" / name).read_text())["etcd"]
        assert etcd["cert_file"].endswith(f"/pki/{identity}.pem"), (host, name)
        assert etcd["key_file"].endswith(f"/pki/{identity}-key.pem")
        assert etcd["ca_file"].endswith("/pki/ca.pem")
        assert all(ep.startswith("https://") for ep in etcd["endpoints"])
    member = json.loads((root / "ns1" / "etc/etcd/carousel.conf.yml").read_text())
    assert member["client-transport-security"]["client-cert-auth"] is True
    assert member["peer-transport-security"]["client-cert-auth"] is True
    assert member["listen-client-urls"].startswith("https://")


def test_edge_template_denies_admin_paths_for_every_host(example_render: Path) -> None:
    config = tomllib.loads((example_render / "edge1" / "etc/carousel/edge.toml").read_text())
    routes = [RouteConfig(**r) for r in config["route"]]
    table = RouteTable(routes)
    for host in ("www.example.test", "example.test", "unknown.example"):
        for method in ("GET", "POST", "HEAD"):
            for path in ("/admin", "/admin/", "/admin/health"):
                route = table.find(host, path, method)
                assert route is not None and route.config.respond == 403, (host, method, path)
        # The rest still goes to the AP pool.
        route = table.find(host, "/administrators-page", "GET")
        assert route is not None and route.config.pool == "app"


def test_tls_and_auth_render_and_validate(tmp_path: Path) -> None:
    out = render(
        tmp_path,
        EXAMPLE_INVENTORY,
        "-e",
        '{"common_etcd_username": "carousel", "common_etcd_password": "s3cret"}',
    )
    assert out.returncode == 0, out.stdout[-4000:]
    root = tmp_path / "rendered"
    agent = tomllib.loads((root / "app1" / "etc/carousel/agent.toml").read_text())
    assert agent["etcd"]["ca_file"].endswith("/pki/ca.pem")
    assert agent["etcd"]["cert_file"].endswith("/pki/carousel-agent-app1.pem")
    assert agent["etcd"]["username"] == "carousel"
    assert agent["etcd"]["password_file"].endswith("/etcd-password")
    assert "s3cret" not in (root / "app1" / "etc/carousel/agent.toml").read_text()
    for config in root.rglob("*.toml"):
        assert _check_config(config).returncode == 0, config
    etcd = json.loads((root / "ns1" / "etc/etcd/carousel.conf.yml").read_text())
    assert etcd["client-transport-security"]["client-cert-auth"] is True
    assert etcd["listen-peer-urls"].startswith("https://")


def test_a_bad_value_is_stopped_by_the_validate_step(tmp_path: Path) -> None:
    # A negative TTL renders fine as TOML, but carousel refuses it: the live file must not appear.
    out = render(tmp_path, EXAMPLE_INVENTORY, "-e", '{"dnsd_service_ttl": -1}', "--limit", "ns1")
    assert out.returncode != 0
    output = out.stdout + out.stderr
    assert "failed to validate" in output and "zone[0].service_ttl: must be a TTL" in output
    assert not (tmp_path / "rendered" / "ns1" / "etc/carousel/dnsd.toml").exists()


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed (apt-get install ruby)")
def test_vagrant_lab_inventory_renders_and_validates(tmp_path: Path) -> None:
    # The inventory Vagrant's provisioner generates: its groups, node_address per host.
    plan_out = subprocess.run(
        ["ruby", "-r", "./lab.rb", "-e", "puts CarouselLab.plan({}).to_json"],
        cwd=REPO / "vagrant",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert plan_out.returncode == 0, plan_out.stderr
    plan = json.loads(plan_out.stdout)
    inventory = {
        "all": {
            "hosts": {m["name"]: {"node_address": m["ip"]} for m in plan["machines"]},
            "children": {g: {"hosts": {h: None for h in hosts}} for g, hosts in plan["groups"].items()},
        }
    }
    path = tmp_path / "vagrant-inventory.json"
    path.write_text(json.dumps(inventory))
    out = render(tmp_path, path)
    assert out.returncode == 0, out.stdout[-4000:]
    configs = sorted((tmp_path / "rendered").rglob("*.toml"))
    assert len(configs) == 14  # dnsd+dashboard x2, edge+agent x3, app+agent x2
    for config in configs:
        assert _check_config(config).returncode == 0, config


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CAROUSEL_DEPLOY_CHROOT") != "1",
    reason="opt-in (slow: debootstrap, apt, pip): set CAROUSEL_DEPLOY_CHROOT=1, as root",
)
def test_site_yml_into_a_chroot_twice_changes_nothing_the_second_time() -> None:
    out = subprocess.run(
        ["bash", str(ANSIBLE_DIR / "tests" / "chroot-run.sh")], capture_output=True, text=True, timeout=3600
    )
    print(out.stdout[-6000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "the second run changed nothing" in out.stdout


def test_dashboard_scrapes_etcd_on_its_plain_metrics_listener(example_render: Path) -> None:
    # etcd's client port asks for a client certificate: the dashboard's scrape of
    # http://member:2379/metrics failed every round on the VM lab. Each member serves
    # /metrics on a plain listener of its own, and the dashboard scrapes that.
    members = {}
    for host in ("ns1", "ns2", "app1"):
        member = json.loads((example_render / host / "etc/etcd/carousel.conf.yml").read_text())
        assert member["listen-metrics-urls"].startswith("http://"), host
        assert not member["listen-metrics-urls"].endswith(":2379"), host
        members[host] = member["listen-metrics-urls"]
    dashboard = tomllib.loads((example_render / "ns1" / "etc/carousel/dashboard.toml").read_text())
    etcd_targets = sorted(t["url"] for t in dashboard["dashboard"]["target"] if t["role"] == "etcd")
    assert etcd_targets == sorted(members.values())


def _admin_sections(root: Path) -> dict[tuple[str, str], dict[str, object]]:
    """The [admin] table of every rendered dnsd, edge and agent config: (host, file) -> table."""
    found = {}
    for config in sorted(root.rglob("*.toml")):
        if config.name in ("dnsd.toml", "edge.toml", "agent.toml"):
            host = config.relative_to(root).parts[0]
            found[(host, config.name)] = tomllib.loads(config.read_text())["admin"]
    return found


def test_admin_listeners_face_the_cluster_with_one_generated_token(example_render: Path) -> None:
    # The dashboard on ns1 scrapes every node's admin listeners: on 127.0.0.1 they were
    # out of its reach (every scrape of another node failed on the VM lab). They bind the
    # node's address and ask for the cluster's admin token, which the controller made once.
    token_file = example_render / "admin-token"
    token = token_file.read_text().strip()
    assert len(token) >= 16 and token.isalnum()
    assert token_file.stat().st_mode & 0o777 == 0o600
    inventory = {"ns1": "192.168.56.11", "ns2": "192.168.56.12", "edge1": "192.168.56.21"}
    inventory |= {"edge2": "192.168.56.22", "edge3": "192.168.56.23"}
    inventory |= {"app1": "192.168.56.31", "app2": "192.168.56.32"}
    admin = _admin_sections(example_render)
    assert len(admin) == 2 + 3 * 2 + 2  # dnsd x2, edge+agent x3, agent x2
    for (host, name), table in admin.items():
        assert table["host"] == inventory[host], (host, name)
        assert table["token"] == token, (host, name)
    dashboard = tomllib.loads((example_render / "ns1" / "etc/carousel/dashboard.toml").read_text())
    assert dashboard["dashboard"]["token"] == token
    dns_targets = sorted(t["url"] for t in dashboard["dashboard"]["target"] if t["role"] == "dns")
    assert dns_targets == [f"http://{inventory[h]}:{admin[(h, 'dnsd.toml')]['port']}" for h in ("ns1", "ns2")]
    # The edges and agents are found through their registry records: the agent publishes
    # the URLs of the listeners it renders beside (meta "admin" and "agent").
    for host in ("edge1", "app2"):
        agent = tomllib.loads((example_render / host / "etc/carousel/agent.toml").read_text())
        (service,) = agent["service"]
        assert service["meta"]["agent"] == f"http://{inventory[host]}:{admin[(host, 'agent.toml')]['port']}"
        if host.startswith("edge"):
            edge_admin = f"http://{inventory[host]}:{admin[(host, 'edge.toml')]['port']}"
            assert service["meta"]["admin"] == edge_admin
            assert service["check"]["url"] == edge_admin + "/healthz"


def test_an_existing_admin_token_is_kept(tmp_path: Path) -> None:
    # A second run reads the token back: the listeners and the dashboard keep agreeing.
    (tmp_path / "rendered").mkdir()
    (tmp_path / "rendered" / "admin-token").write_text("kept0123456789abcdefKEPT\n")
    out = render(tmp_path, EXAMPLE_INVENTORY, "--limit", "edge1")
    assert out.returncode == 0, out.stdout[-4000:]
    admin = _admin_sections(tmp_path / "rendered")
    assert {name for _host, name in admin} == {"edge.toml", "agent.toml"}
    assert all(table["token"] == "kept0123456789abcdefKEPT" for table in admin.values())


def _duration(text: str) -> float:
    """etcdctl's duration flags ("30s", "2m") in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    raise ValueError(text)


def _upgrade_etcdctl_tasks(play: dict[str, Any]) -> list[dict[str, Any]]:
    """upgrade.yml's etcdctl tasks, in order."""
    tasks = play["pre_tasks"] + play["post_tasks"]
    return [t for t in tasks if t.get("ansible.builtin.command", {}).get("argv", [""])[0] == "etcdctl"]


def test_upgrade_registry_writes_outlast_a_tcg_tls_handshake() -> None:
    # A TLS handshake with etcd took 3.1-7.6 s on a TCG VM (vagrant/README.md), beyond
    # etcdctl's defaults (2 s to connect, 5 s a command): upgrade.yml's writes of the
    # maintenance flag must wait longer than that and try again, or one slow handshake
    # leaves an edge drained with its flag set.
    play = yaml.safe_load((ANSIBLE_DIR / "upgrade.yml").read_text())[0]
    env = play["vars"]["upgrade_etcdctl_env"]
    # Not in the environment: etcdctl 3.4 ignores ETCDCTL_COMMAND_TIMEOUT for get, put and
    # del (test_upgrade_etcdctl_timeouts_are_the_ones_etcdctl_applies).
    assert not {"ETCDCTL_DIAL_TIMEOUT", "ETCDCTL_COMMAND_TIMEOUT"} & set(env)
    assert _duration(play["vars"]["upgrade_etcdctl_dial_timeout"]) >= 15
    assert _duration(play["vars"]["upgrade_etcdctl_command_timeout"]) >= 15
    etcdctl = _upgrade_etcdctl_tasks(play)
    assert len(etcdctl) == 4  # flag set, record gone, flag cleared, record back
    for task in etcdctl:
        argv = task["ansible.builtin.command"]["argv"]
        assert argv[1:3] == [
            "--dial-timeout={{ upgrade_etcdctl_dial_timeout }}",
            "--command-timeout={{ upgrade_etcdctl_command_timeout }}",
        ], task["name"]
        assert task["environment"] == "{{ upgrade_etcdctl_env }}", task["name"]
        assert "until" in task and task["retries"], task["name"]
        # Every wait and write tries again after a failed etcdctl: its output is empty then,
        # which alone satisfied "the record is gone" and ended that wait at its first
        # attempt, failed (upgrade.yml on the VM lab: "context deadline exceeded").
        assert task["until"].startswith(f"{task['register']}.rc == 0"), task["name"]


@pytest.mark.skipif(shutil.which("etcdctl") is None, reason="no etcdctl (apt-get install etcd-client)")
def test_upgrade_etcdctl_timeouts_are_the_ones_etcdctl_applies() -> None:
    # upgrade.yml set ETCDCTL_COMMAND_TIMEOUT=60s, and a wait on the VM lab still failed
    # with "context deadline exceeded" after 5 s of etcdctl (its default): etcdctl 3.4 reads
    # that timeout before it applies its environment. Here upgrade.yml's own get, with the
    # command timeout set to 1 s, must give up after about 1 s at a silent TLS endpoint:
    # with the timeout in the environment it took etcdctl's 5 s.
    import jinja2

    play = yaml.safe_load((ANSIBLE_DIR / "upgrade.yml").read_text())[0]
    wait = next(t for t in _upgrade_etcdctl_tasks(play) if "removed the edge's record" in t["name"])
    values = {
        "upgrade_etcdctl_dial_timeout": "1s", "upgrade_etcdctl_command_timeout": "1s",
        "upgrade_prefix": "/carousel/", "upgrade_node": "edge1",
    }  # fmt: skip
    argv = [jinja2.Template(a).render(values) for a in wait["ansible.builtin.command"]["argv"]]
    with socket.socket() as silent:  # accepts the connection, never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        env |= {"ETCDCTL_ENDPOINTS": f"https://127.0.0.1:{port}", "ETCDCTL_INSECURE_SKIP_TLS_VERIFY": "true"}
        started = time.monotonic()
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
    assert out.returncode != 0 and "deadline exceeded" in out.stderr, out.stderr
    assert took < 3.5, f"etcdctl gave up after {took:.1f} s, not the task's 1 s"
