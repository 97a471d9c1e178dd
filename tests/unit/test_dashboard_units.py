"""The dashboard's pure parts: Prometheus text to figures, the view's states and ratios, input checks,
its config; the demo's generated configs and the state file `carousel status` finds a demo by."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from carousel.config import ConfigError, from_dict
from carousel.dashboard.config import Config, DashboardSection
from carousel.dashboard.scrape import (
    DNS_FAMILIES,
    EDGE_FAMILIES,
    ETCD_FAMILIES,
    ScrapeError,
    agent_checks,
    dns_figures,
    edge_figures,
    etcd_figures,
    parse_metrics,
)
from carousel.dashboard.server import _validate
from carousel.dashboard.view import ClusterView
from carousel.registry import BanRecord, MaintenanceFlag, ServiceRecord

EDGE_TEXT = """\
# TYPE carousel_edge_requests counter
carousel_edge_requests_total{route="app",status="200"} 90
carousel_edge_requests_total{route="app",status="503"} 10
carousel_edge_requests_total{route="static",status="404"} 0
# TYPE carousel_edge_cache_outcomes counter
carousel_edge_cache_outcomes_total{outcome="HIT"} 30
carousel_edge_cache_outcomes_total{outcome="MISS"} 10
# TYPE carousel_edge_upstream_failures counter
carousel_edge_upstream_failures_total{pool="app",member="ap1"} 4
# TYPE carousel_edge_queue_depth gauge
carousel_edge_queue_depth{pool="app"} 7
# TYPE carousel_edge_queue_timeouts counter
carousel_edge_queue_timeouts_total{pool="app"} 2
# TYPE carousel_edge_dos_actions counter
carousel_edge_dos_actions_total{action="rejected",dry_run="false"} 5
carousel_edge_dos_actions_total{action="rejected",dry_run="true"} 50
# TYPE carousel_edge_dos_bans gauge
carousel_edge_dos_bans 1
"""

DNS_TEXT = """\
# TYPE dnsd_queries counter
dnsd_queries_total{qtype="A",rcode="NOERROR"} 100
# TYPE dnsd_answer_first counter
dnsd_answer_first_total{name="www.example.test.",address="10.0.0.1"} 60
dnsd_answer_first_total{name="example.test.",address="10.0.0.1"} 0
dnsd_answer_first_total{name="www.example.test.",address="10.0.0.2"} 40
# TYPE dnsd_rrl_dropped counter
dnsd_rrl_dropped_total 3
# TYPE dnsd_registry_connected gauge
dnsd_registry_connected 0
# TYPE dnsd_registry_seconds_since_sync gauge
dnsd_registry_seconds_since_sync 12.5
"""


def test_edge_figures_from_prometheus_text():
    fig = edge_figures(parse_metrics(EDGE_TEXT))
    assert fig.requests == 100
    assert fig.by_class == {"2xx": 90, "5xx": 10, "4xx": 0}
    assert fig.cache == {"HIT": 30, "MISS": 10}
    assert (fig.upstream_failures, fig.queue_depth, fig.queue_timeouts, fig.bans) == (4, 7, 2, 1)
    assert fig.dos == {"rejected": 5}, "dry-run counts are not actions taken"


def test_dns_figures_from_prometheus_text():
    fig = dns_figures(parse_metrics(DNS_TEXT))
    assert fig.queries == 100 and fig.rrl_dropped == 3
    assert fig.first == {"10.0.0.1": 60, "10.0.0.2": 40}
    assert fig.connected is False and fig.seconds_since_sync == 12.5


@pytest.mark.parametrize("text", ["<html>oops</html>", "metric{unclosed 1", "x one"])
def test_garbage_is_a_scrape_error(text: str):
    with pytest.raises(ScrapeError):
        parse_metrics(text)


# What an etcd member or a busy daemon exposes beside the families the page reads.
NOISE = "".join(
    f"# HELP go_noise_{i} A family the page does not read.\n# TYPE go_noise_{i} histogram\n"
    f'go_noise_{i}_bucket{{le="0.5"}} {i}\ngo_noise_{i}_bucket{{le="+Inf"}} {i}\n'
    f"go_noise_{i}_sum 1.5e-05\ngo_noise_{i}_count {i} 1700000000000\n"
    for i in range(200)
)
ETCD_TEXT = (
    "# TYPE etcd_server_has_leader gauge\netcd_server_has_leader 1\n"
    + NOISE
    + ("# TYPE etcd_server_is_leader gauge\netcd_server_is_leader 0\n")
)


def test_only_the_families_read_are_parsed_and_the_figures_are_the_same():
    edge = parse_metrics(NOISE + EDGE_TEXT + NOISE, EDGE_FAMILIES)
    assert all(name.startswith(EDGE_FAMILIES) for name in edge)
    assert edge_figures(edge) == edge_figures(parse_metrics(EDGE_TEXT))
    dns = parse_metrics(DNS_TEXT + NOISE, DNS_FAMILIES)
    assert set(dns) == set(parse_metrics(DNS_TEXT))
    assert dns_figures(dns) == dns_figures(parse_metrics(DNS_TEXT))
    etcd = parse_metrics(ETCD_TEXT, ETCD_FAMILIES)
    assert set(etcd) == {"etcd_server_has_leader", "etcd_server_is_leader"}
    assert etcd_figures(etcd) == {"has_leader": True, "is_leader": False}
    assert etcd_figures(parse_metrics(ETCD_TEXT)) == etcd_figures(etcd)


@pytest.mark.parametrize(
    "junk",
    ["<html>oops</html>", "metric{unclosed 1", "x one", "go_gc 1 2 3", '  {a="b"} 1'],
)
def test_a_line_that_is_not_text_format_is_an_error_even_outside_the_families_read(junk: str):
    with pytest.raises(ScrapeError):
        parse_metrics(EDGE_TEXT + junk + "\n", EDGE_FAMILIES)
    # Blank lines, comments of any kind, NaN, infinities, exponents and timestamps are text format.
    odd = '\n# a free comment\nx NaN\ny -Inf\nz{a="}"} +Inf\nw 1e+06 -12\n   \n'
    assert edge_figures(parse_metrics(EDGE_TEXT + odd, EDGE_FAMILIES)).requests == 100


def test_agent_checks_from_status():
    status = {"services": {"edge": {"healthy": False, "last_check": "HTTP 503", "published": None}}}
    assert agent_checks(status) == {"edge": {"healthy": False, "last_check": "HTTP 503", "published": None}}
    with pytest.raises(ScrapeError):
        agent_checks({"node": "x"})


def _rec(node: str, ip: str, state: str = "up", service: str = "edge") -> ServiceRecord:
    return ServiceRecord(service, node, 8080, (ip,), state=state, since=time.time())  # type: ignore[arg-type]


def test_node_states_follow_the_registry():
    view = ClusterView()
    view.set_records({("edge", "e1"): _rec("e1", "10.0.0.1"), ("edge", "e2"): _rec("e2", "10.0.0.2")})
    assert view.node_state("edge", "e1") == "healthy"
    view.set_flags({"e2": MaintenanceFlag("e2", "test", time.time())})
    assert view.node_state("edge", "e2") == "draining", "flag seen before the agent reacts"
    e1 = _rec("e1", "10.0.0.1")
    view.set_records({("edge", "e1"): e1, ("edge", "e2"): _rec("e2", "10.0.0.2", "draining")})
    assert view.node_state("edge", "e2") == "draining"
    view.set_records({("edge", "e1"): _rec("e1", "10.0.0.1")})
    assert view.node_state("edge", "e2") == "maintenance"
    view.set_flags({})
    view.set_records({})
    states = {row["node"]: row["state"] for row in view.document()["nodes"]}
    assert states == {"e1": "down", "e2": "down"}, "nodes seen before and gone without a drain are down"


def test_rates_ratios_and_first_place_shares():
    view = ClusterView(window=60, interval=1)
    view.targets = {"dnsd": ("dns", "http://127.0.0.1:9153")}
    view.set_records({("edge", "e1"): _rec("e1", "10.0.0.1"), ("edge", "e2"): _rec("e2", "10.0.0.2")})
    t = 1000.0
    for i in range(3):
        text = EDGE_TEXT.replace(" 90\n", f" {90 + 20 * i}\n").replace('"HIT"} 30', f'"HIT"}} {30 + 9 * i}')
        text = text.replace('"MISS"} 10', f'"MISS"}} {10 + i}')
        fig = edge_figures(parse_metrics(text))
        view.record_scrape("edge:e1", fig, fig.counters(), t + i)
        dns = dns_figures(parse_metrics(DNS_TEXT.replace(" 100\n", f" {100 + 50 * i}\n")))
        view.record_scrape("dns:dnsd", dns, dns.counters(), t + i)
    e1 = view._edge("e1")
    assert e1["rps"] == 20.0 and e1["hit_ratio"] == 0.9 and e1["status_mix"] == {"2xx": 1.0}
    assert view._edge("e2")["scraped"] is False
    d = view._dns()
    assert d["qps"] == 50.0 and d["last_known_state"] is True
    # No answers counted in the window yet (the counters did not move): no shares invented.
    assert d["first_place"] == []
    point = view.tick()
    assert point["edges"]["e1"]["rps"] == 20.0 and point["qps"] == 50.0


def test_a_counter_reset_is_not_a_negative_rate():
    view = ClusterView(window=60)
    for i, n in enumerate((500, 520, 10)):  # the edge restarted between the 2nd and 3rd scrape
        fig = edge_figures(parse_metrics(f'carousel_edge_requests_total{{route="a",status="200"}} {n}\n'))
        view.record_scrape("edge:e1", fig, fig.counters(), 1000.0 + i)
    view.set_records({("edge", "e1"): _rec("e1", "10.0.0.1")})
    assert view._edge("e1")["rps"] >= 0


def test_bans_and_actions_in_the_document():
    view = ClusterView()
    view.set_bans({"192.0.2.7": BanRecord("192.0.2.7", "300 requests/s", time.time() + 60, "edge1/0")})
    view.add_action({"who": "alice", "action": "drain", "target": "edge2"})
    doc = view.document()
    assert doc["bans"][0]["address"] == "192.0.2.7" and 55 <= doc["bans"][0]["left"] <= 60
    assert doc["actions"][0]["who"] == "alice"
    json.dumps(doc)  # plain JSON all the way down


@pytest.mark.parametrize(
    ("action", "body", "expected"),
    [
        ("drain", {"node": "edge2"}, ("edge2", "")),
        ("drain", {"node": "edge2", "reason": "kernel update"}, ("edge2", "kernel update")),
        ("purge", {"kind": "prefix", "target": "/static/"}, ("/static/", "prefix")),
        ("unban", {"address": "2001:db8::/64"}, ("2001:db8::/64", "")),
    ],
)
def test_action_bodies_accepted(action: str, body: dict[str, str], expected: tuple[str, str]):
    assert _validate(action, body) == expected


@pytest.mark.parametrize(
    ("action", "body"),
    [
        ("drain", {}),
        ("drain", {"node": "../etc"}),
        ("drain", {"node": 7}),
        ("purge", {"kind": "everything", "target": "/"}),
        ("purge", {"kind": "url", "target": "http://x/\r\nX: y"}),
        ("purge", {"kind": "url", "target": "x" * 5000}),
        ("unban", {"address": "not-an-ip"}),
    ],
)
def test_action_bodies_refused(action: str, body: dict[str, object]):
    with pytest.raises(ValueError):
        _validate(action, body)


def test_config_refuses_an_open_listener_without_a_token():
    with pytest.raises(ConfigError, match=r"dashboard\.token: a dashboard listening off loopback requires"):
        from_dict(Config, {"dashboard": {"host": "0.0.0.0"}}, "d.toml")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        from_dict(Config, {"dashboard": {"token": "short"}}, "d.toml")
    with pytest.raises(ConfigError, match=r"dashboard.target\[0\].url"):
        from_dict(Config, {"dashboard": {"target": [{"name": "d", "url": "ftp://x"}]}}, "d.toml")
    section = from_dict(DashboardSection, {"token": "t" * 16, "tokens": {"alice": "a" * 20}})
    assert section.operators() == {"t" * 16: "admin", "a" * 20: "alice"}


# --- the demo -----------------------------------------------------------------------------


def _demo_args(**over: int) -> argparse.Namespace:
    base = dict(edges=3, apps=2, dns_port=1053, edge_port=8080, app_port=9000, etcd_port=23790)
    base |= dict(tls_port=8443, forward_port=3128, dashboard_port=8090)
    return argparse.Namespace(**(base | over))


def test_every_generated_demo_config_is_valid(tmp_path: Path):
    from agent.config import load as load_agent
    from carousel.dashboard.config import load as load_dashboard
    from carousel.demo_plan import (
        agent_config,
        dashboard_config,
        dnsd_config,
        edge_config,
        make_certificates,
        make_plan,
    )
    from dnsd.main import load_config as load_dnsd
    from edge.main import load_config as load_edge

    plan = make_plan(_demo_args())
    tls = make_certificates(tmp_path)
    if tls is None:
        pytest.skip("needs openssl to make the demo's certificate")
    texts = {
        "edge": (edge_config(plan, "edge1", "127.0.0.11", 8080, 8081, tmp_path, tls), load_edge),
        "edge-no-tls": (edge_config(plan, "edge1", "127.0.0.11", 8080, 8081, tmp_path, None), load_edge),
        "dnsd": (dnsd_config(plan), load_dnsd),
        "agent": (agent_config(plan, "e1", "edge", "127.0.0.11", 8080, "http://x/", "http://a"), load_agent),
        "dashboard": (dashboard_config(plan), load_dashboard),
    }
    for name, (text, loader) in texts.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        cfg = loader(str(path))
        assert cfg is not None, name
    edge = load_edge(str(tmp_path / "edge.toml"))
    assert edge.cache.enabled and edge.compression.enabled and edge.dos.enabled and edge.forward.enabled
    assert edge.tls.certificate, "HTTPS listener with the demo's certificate"


def test_state_file_round_trip_and_a_dead_demo_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from carousel.demo_plan import make_plan, read_state, remove_state, write_state

    monkeypatch.setenv("CAROUSEL_DEMO_STATE", str(tmp_path / "state.json"))
    plan = make_plan(_demo_args(etcd_port=23999))
    path = write_state(plan, tmp_path, None)
    assert oct(path.stat().st_mode & 0o777) == "0o600", "it holds the admin token"
    state = read_state()
    assert state is not None and state["etcd"] == ["127.0.0.1:23999"] and state["token"] == plan.token
    data = json.loads(path.read_text())
    data["pid"] = 2**22 + 12345  # above pid_max's default: no such process
    path.write_text(json.dumps(data))
    assert read_state() is None
    path.write_text("{not json")
    assert read_state() is None
    write_state(plan, tmp_path, None)
    remove_state()
    assert not path.exists()


def test_etcd_flags_win_over_the_environment_and_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from carousel.cli import _etcd_config, build_parser
    from carousel.demo_plan import make_plan, write_state

    monkeypatch.setenv("CAROUSEL_DEMO_STATE", str(tmp_path / "state.json"))
    monkeypatch.delenv("CAROUSEL_ETCD", raising=False)
    parse = build_parser().parse_args
    assert _etcd_config(parse(["status"])).endpoints == ["127.0.0.1:2379"], "no demo: the default"
    write_state(make_plan(_demo_args(etcd_port=23999)), tmp_path, None)
    assert _etcd_config(parse(["status"])).endpoints == ["127.0.0.1:23999"], "the running demo's"
    monkeypatch.setenv("CAROUSEL_ETCD", "10.0.0.1:2379")
    assert _etcd_config(parse(["status"])).endpoints == ["10.0.0.1:2379"], "the environment wins"
    assert _etcd_config(parse(["drain", "e1", "--etcd", "10.0.0.2:2379"])).endpoints == ["10.0.0.2:2379"]
    assert os.getpid() == json.loads((tmp_path / "state.json").read_text())["pid"]
