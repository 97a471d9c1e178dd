"""e2e fixtures: one namespace lab per session, restored to full health before each test.

The measured figures are collected by ``failover_report``: printed in the
terminal summary and merged into tests/e2e/FAILOVER.md, a table the README
can carry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.clients import DnsWatch, exactly
from tests.e2e.report import HEADER, REPORT, FailoverReport
from tests.lab import Lab, LabSettings, missing_daemons, unavailable_reason


@pytest.fixture(scope="session")
def failover_report() -> FailoverReport:
    """Where tests put their measured figures."""
    return REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT.rows:
        return
    update = os.environ.get("CAROUSEL_UPDATE_FAILOVER") == "1"
    where = "written to tests/e2e/FAILOVER.md" if update else "CAROUSEL_UPDATE_FAILOVER=1 updates FAILOVER.md"
    terminalreporter.section(f"failover figures ({where})")
    terminalreporter.write_line(HEADER)
    for line in REPORT.lines():
        terminalreporter.write_line(line)
    # CI runs on a clean clone: it prints the figures and leaves the tracked file alone.
    if update:
        REPORT.write()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab, built once per session and torn down at its end, pass or fail."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    missing = missing_daemons()
    required = {k: v for k, v in missing.items() if k != "dnsd"}
    if required:
        pytest.skip("; ".join(required.values()))
    settings = LabSettings(dnsds=0 if "dnsd" in missing else 2)
    REPORT.settings = settings
    the_lab = Lab(tmp_path_factory.mktemp("lab"), settings)
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def healthy_lab(lab: Lab) -> Lab:
    """The lab with every process running, every link up and nothing partitioned."""
    lab.restore()
    return lab


@pytest.fixture
def dns_watch(healthy_lab: Lab) -> Iterator[DnsWatch]:
    """A watcher of both dnsd, started once they answer with every edge."""
    if not healthy_lab.dns_servers:
        pytest.skip(missing_daemons().get("dnsd", "the lab runs no dnsd"))
    watch = DnsWatch(healthy_lab.client(), healthy_lab.dns_servers, healthy_lab.fqdn)
    try:
        edges = {healthy_lab.address(r) for r in healthy_lab.roles("edge")}
        watch.wait(exactly(edges), timeout=10, what="every edge on every dnsd")
        yield watch
    finally:
        watch.stop()
