"""vagrant/failover.py: the failover experiments' logic, run on the simulated cluster of --dry-run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests import vagrant_scripts

VAGRANT_DIR = vagrant_scripts.VAGRANT_DIR
EDGES = {"edge1": "192.168.56.21", "edge2": "192.168.56.22", "edge3": "192.168.56.23"}


failover = vagrant_scripts.load("failover")


def _cluster(**kw: object) -> tuple[object, object]:
    clock = failover.VirtualClock()
    real = failover.build_parser().parse_args([])
    commands = failover.CommandCluster(
        ns=real.ns,
        dns_port=real.dns_port,
        name=real.name,
        http_port=real.http_port,
        crash_cmd=real.crash_cmd,
        halt_cmd=real.halt_cmd,
        start_cmd=real.start_cmd,
        restart_cmd=real.restart_cmd,
    )
    return clock, failover.SimulatedCluster(clock, dict(EDGES), real=commands, **kw)


def test_crash_leaves_the_answers_when_the_lease_expires() -> None:
    clock, cluster = _cluster(lease_ttl=5.0, boot_seconds=20.0, register_seconds=2.0)
    out = failover.measure_outage(cluster, clock, "edge2", EDGES["edge2"], True, timeout=60, poll=0.1)
    # Polled every 0.1 s: seen gone within one poll of the lease expiry.
    assert out.gone_after is not None and 5.0 <= out.gone_after <= 5.1 + 1e-9
    assert out.back_after is not None and 22.0 <= out.back_after <= 22.1 + 1e-9
    assert cluster.commands == ["vagrant halt --force edge2", "vagrant up --no-provision edge2"]
    assert EDGES["edge2"] in cluster.resolve()


def test_graceful_halt_drains_out_of_the_answers_at_once() -> None:
    clock, cluster = _cluster()
    out = failover.measure_outage(cluster, clock, "edge1", EDGES["edge1"], False, timeout=60, poll=0.1)
    assert out.gone_after is not None and out.gone_after <= 0.3
    assert cluster.commands[0] == "vagrant halt edge1"


def test_an_edge_that_never_leaves_is_reported_as_a_timeout() -> None:
    clock, cluster = _cluster(lease_ttl=1000.0)
    out = failover.measure_outage(cluster, clock, "edge3", EDGES["edge3"], True, timeout=30, poll=0.5)
    assert out.gone_after is None
    assert clock.now() >= 30


def test_rolling_restart_with_drain_loses_no_request() -> None:
    clock, cluster = _cluster(drain=True)
    count = failover.rolling_restart(cluster, clock, dict(EDGES), timeout=120, interval=0.05)
    assert count.requests > 300  # the client really looped through all three restarts
    assert count.failed == 0
    assert [c.split()[2] for c in cluster.commands] == ["edge1", "edge2", "edge3"]
    assert sorted(cluster.resolve()) == sorted(EDGES.values())


def test_rolling_restart_without_drain_is_caught_by_the_client_count() -> None:
    clock, cluster = _cluster(drain=False, edge_restart_seconds=1.0, register_seconds=2.0)
    count = failover.rolling_restart(cluster, clock, dict(EDGES), timeout=120, interval=0.05)
    # Each edge is down 1 s while DNS still lists it; the client hits it on every third request.
    assert count.failed > 0
    assert count.failed < count.requests


def test_client_counts_an_empty_answer_as_a_failure() -> None:
    class NoAnswers:
        def resolve(self) -> list[str]:
            return []

    count = failover.ClientCount()
    count.one(NoAnswers())  # type: ignore[arg-type]
    assert (count.requests, count.failed, count.unresolved) == (1, 1, 1)


@pytest.mark.parametrize("bad", ["", "edge1", "edge1=300.1.1.1", "=192.168.56.21", "edge1=::1"])
def test_edge_list_is_validated(bad: str) -> None:
    with pytest.raises(ValueError):
        failover.parse_edges(bad)


def test_dry_run_of_the_script_prints_the_commands_and_figures() -> None:
    out = subprocess.run(
        ["bash", str(VAGRANT_DIR / "failover.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "would run: vagrant halt --force edge2" in text
    assert "would run: vagrant halt edge2" in text
    assert "would run: vagrant ssh edge3 -c" in text
    assert "edge2 left the answers after 5.1 s" in text
    assert " 0 failed (0.00 %)" in text


def test_dry_run_without_drain_exits_1_for_lost_requests() -> None:
    out = subprocess.run(
        [sys.executable, str(VAGRANT_DIR / "failover.py"), "--dry-run", "--no-drain", "rolling"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "failed" in out.stdout and " 0 failed" not in out.stdout


def test_unknown_experiment_and_victim_are_refused() -> None:
    script = str(VAGRANT_DIR / "failover.py")
    bad_experiment = subprocess.run([sys.executable, script, "--dry-run", "explode"], capture_output=True)
    assert bad_experiment.returncode == 2
    bad_victim = subprocess.run(
        [sys.executable, script, "--dry-run", "--victim", "edge9"], capture_output=True
    )
    assert bad_victim.returncode == 2


def test_the_edge_is_started_only_after_its_stop_command_returned() -> None:
    # On the VM lab the address left DNS while `vagrant halt` still held the machine's
    # lock, and the `vagrant up` started then was refused.
    clock, cluster = _cluster(lease_ttl=1.0, boot_seconds=5.0, register_seconds=1.0)

    class SlowStop:
        def __init__(self) -> None:
            self.until = clock.now() + 20.0

        def done(self) -> bool:
            return clock.now() >= self.until

    stop, start = cluster.stop, cluster.start
    stopped: list[object] = []
    started_at: list[float] = []

    def slow_stop(edge: str, address: str, crash: bool) -> object:
        stop(edge, address, crash)
        stopped.append(SlowStop())
        return stopped[-1]

    def timed_start(edge: str, address: str) -> object:
        started_at.append(clock.now())
        return start(edge, address)

    cluster.stop, cluster.start = slow_stop, timed_start  # type: ignore[attr-defined]
    out = failover.measure_outage(cluster, clock, "edge2", EDGES["edge2"], True, timeout=60, poll=0.1)
    assert out.gone_after is not None and out.gone_after < 2.0
    assert started_at and started_at[0] >= 20.0
    assert out.back_after is not None


def test_a_failed_dig_is_not_counted_as_the_edge_leaving() -> None:
    # Under TCG a dig got no answer within its 1 s now and then: an empty result is no
    # evidence that the edge left, and must not end the measurement early.
    clock, cluster = _cluster(lease_ttl=5.0, boot_seconds=20.0, register_seconds=2.0)
    resolve = cluster.resolve
    calls = [0]

    def flaky() -> list[str]:
        calls[0] += 1
        return [] if calls[0] in (3, 4, 5) else resolve()

    cluster.resolve = flaky  # type: ignore[attr-defined]
    out = failover.measure_outage(cluster, clock, "edge2", EDGES["edge2"], True, timeout=60, poll=0.1)
    assert out.gone_after is not None and 5.0 <= out.gone_after <= 5.1 + 1e-9


def test_the_baseline_window_counts_failures_with_no_fault() -> None:
    # With no fault every request must succeed; an edge that stopped serving (here: no
    # drain, so DNS still lists it) is caught by the baseline's count as well.
    clock, cluster = _cluster()
    args = failover.build_parser().parse_args(["baseline"])
    ok, failed = failover.run_experiment("baseline", "baseline", cluster, clock, args, dict(EDGES), "edge2")
    assert ok and failed == 0.0 and clock.now() >= args.window
    cluster.edges[EDGES["edge3"]].serving.append((clock.now(), False))
    ok, failed = failover.run_experiment("baseline", "baseline", cluster, clock, args, dict(EDGES), "edge2")
    assert not ok and failed is not None and failed > 0


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby not installed (apt-get install ruby)")
def test_a_vm_booting_back_gets_the_labs_boot_timeout() -> None:
    # After a graceful halt, `vagrant up --no-provision edge2` ended in Vagrant's
    # VMBootTimeout (300 s for SSH) on a loaded TCG host: the lab sets its own.
    def plan(**env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CAROUSEL_")}
        return subprocess.run(
            ["ruby", "-r", "./lab.rb", "-e", "puts CarouselLab.plan(ENV)['boot_timeout'].inspect"],
            cwd=VAGRANT_DIR, env={**base, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert plan().stdout.strip() == "nil"  # Vagrant's own
    assert plan(CAROUSEL_BOOT_TIMEOUT="900").stdout.strip() == "900"
    refused = plan(CAROUSEL_BOOT_TIMEOUT="90.5")
    assert refused.returncode != 0 and "CAROUSEL_BOOT_TIMEOUT=90.5" in refused.stderr
    vagrantfile = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert 'config.vm.boot_timeout = LAB["boot_timeout"] if LAB["boot_timeout"]' in vagrantfile
    vmlab = vagrant_scripts.load("vmlab")
    assert int(vmlab.BOOT_TIMEOUT_TCG) > 300
