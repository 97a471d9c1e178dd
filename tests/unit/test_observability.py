"""deploy/observability: the alert rules pass `promtool check rules` and their unit tests, and the
scrape config rendered for the example inventory passes `promtool check config`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (apt install prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=OBS, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_alert_rules_are_valid():
    done = _promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout


@needs_promtool
def test_alert_rules_unit_tests_pass():
    done = _promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_scrape_config_rendered_for_the_inventory_is_valid(tmp_path: Path):
    playbook = Path(sys.executable).with_name("ansible-playbook")
    if not playbook.exists():
        pytest.skip("needs ansible-playbook (the dev extra)")
    token = tmp_path / "admin-token"
    token.write_text("0123456789abcdef0123\n")
    out = tmp_path / "prometheus.yml"
    done = subprocess.run(
        [str(playbook), "-i", str(ROOT / "deploy/ansible/inventory/example"),
         str(OBS / "prometheus-config.yml"), "-e", f"observability_output={out}",
         "-e", f"observability_token_file={token}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    for target in ("192.168.56.21:9180", "192.168.56.11:9153", "192.168.56.31:9190", "192.168.56.11:2379"):
        assert target in text, target
    checked = _promtool("check", "config", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
