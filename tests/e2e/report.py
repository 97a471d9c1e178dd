"""The measured failover figures: printed at the end of the run and kept in FAILOVER.md."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from tests.lab import LabSettings

REPORT_FILE = Path(__file__).with_name("FAILOVER.md")
HEADER = "| Scenario | Bound | Trials | Measured |"


class FailoverReport:
    """Rows of measured figures, keyed by scenario; merged into FAILOVER.md."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str, str]] = {}
        self.settings: LabSettings | None = None

    def add(self, scenario: str, bound: str, trials: int | str, measured: str) -> None:
        """Record one scenario's figures (and print them, for -s runs)."""
        self.rows[scenario] = (bound, str(trials), measured)
        print(f"\n[figures] {scenario}: {measured} (bound {bound}, trials {trials})")

    def lines(self) -> list[str]:
        return [f"| {s} | {b} | {t} | {m} |" for s, (b, t, m) in self.rows.items()]

    def write(self) -> None:
        """Merge this run's rows into FAILOVER.md, keeping rows of scenarios not run now."""
        rows: dict[str, str] = {}
        if REPORT_FILE.exists():
            for line in REPORT_FILE.read_text().splitlines():
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("Scenario", "---"):
                    rows[cells[0]] = line
        rows.update(zip(self.rows, self.lines(), strict=True))
        s = self.settings or LabSettings()
        text = [
            "# Measured failover times",
            "",
            "Measured by `sudo .venv/bin/pytest tests/e2e` in the network-namespace lab (tests/lab.py:",
            "3 etcd members, 2 dnsd, 3 edges with their agents and 2 APs with their agents, each in its",
            f"own namespace), last run {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, "
            f"Linux {platform.release()}.",
            "",
            f"Lab timings: lease TTL {s.lease_ttl} s, DNS TTL {s.dns_ttl} s, health check every "
            f"{s.check_interval} s (timeout {s.check_timeout} s, rise {s.rise}, fall {s.fall}), "
            f"drain_delay {s.drain_delay} s, etcd election timeout 1 s.",
            "A removal time runs from the fault (kill, link down, cut) to the moment the last of the",
            "two dnsd stopped answering with the edge, seen by a client polling both every 40 ms.",
            "Several trials read min / median / max.",
            "",
            HEADER,
            "|---|---|---|---|",
            *rows.values(),
            "",
        ]
        REPORT_FILE.write_text("\n".join(text))


REPORT = FailoverReport()
