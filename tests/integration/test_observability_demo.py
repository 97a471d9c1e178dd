"""Every metric name the Grafana dashboard and the alert rules query is exported by a running demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from carousel.dashboard.scrape import parse_metrics
from tests.demo_ports import demo_ports

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
METRIC = re.compile(r"\b(?:carousel|dnsd|etcd)_[a-z0-9_]+\b")


def queried_names() -> dict[str, set[str]]:
    """Metric names in every PromQL expression of the dashboard and the rules, by where they come from."""
    found: dict[str, set[str]] = {}
    dash = json.loads((OBS / "grafana" / "carousel.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            found.setdefault("grafana", set()).update(METRIC.findall(target["expr"]))
    for group in yaml.safe_load((OBS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            found.setdefault("alerts", set()).update(METRIC.findall(rule["expr"]))
    return found


def test_queries_use_only_names_the_demo_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ports = demo_ports()
    monkeypatch.setenv("CAROUSEL_DEMO_STATE", str(tmp_path / "state.json"))
    argv = [sys.executable, "-m", "carousel.cli", "demo", "--workdir", str(tmp_path / "demo"), "--json-ready"]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while '"ready": true' not in log.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        edge, port = "127.0.0.11", ports["--edge-port"]
        for path in ("/", "/cacheable", "/cacheable", "/static/img/tile01.svg"):  # counters with samples
            urllib.request.urlopen(f"http://{edge}:{port}{path}", timeout=5).read()
        urls = [
            f"http://{edge}:{port + 1}/metrics",  # edge admin
            f"http://{edge}:{port + 2}/metrics",  # edge1's agent
            f"http://127.0.0.21:{ports['--app-port'] + 1}/metrics",  # ap1's agent
            f"http://127.0.0.1:{ports['--dns-port'] + 1}/metrics",  # dnsd admin
            f"http://127.0.0.1:{ports['--etcd-port']}/metrics",  # etcd
        ]
        exported: set[str] = set()
        for url in urls:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            exported |= set(parse_metrics(text))
            # A labelled family with no child yet (no upstream failure so far) is declared, not sampled.
            for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
                counter = kind == "counter" and not name.endswith("_total")
                exported.add(name + "_total" if counter else name)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    for where, names in queried_names().items():
        assert names, where
        missing = sorted(names - exported)
        assert not missing, f"{where} queries names no demo daemon exports: {missing}"
