"""vmlab.recap reads PLAY RECAP lines from ansible's output and from the lab's provisioning logs."""

from __future__ import annotations

from tests.vm.conftest import load_vmlab

vmlab = load_vmlab()

RECAP = """\
PLAY RECAP *********************************************************************
app1                       : ok=27   changed=0    unreachable=0    failed=0    skipped=25   rescued=0
ns1                        : ok=43   changed=2    unreachable=0    failed=1    skipped=26   rescued=0
"""


def test_recap_of_ansible_output() -> None:
    counts = vmlab.recap(RECAP)
    assert counts["app1"]["changed"] == 0 and counts["ns1"]["changed"] == 2
    assert counts["ns1"]["failed"] == 1


def test_recap_of_a_provisioning_log_with_time_prefixes() -> None:
    # stream() writes each line as "[ 3239.9s] line": the recap must still be found
    # (the smoke lab's changed=0 test read none and failed on a run that changed nothing).
    log = "".join(f"[{3239.9 + i:7.1f}s] {line}\n" for i, line in enumerate(RECAP.splitlines()))
    assert vmlab.recap(log) == vmlab.recap(RECAP)


# `vagrant up`'s end when machines fail in parallel (edge3's lines from the tenth session's
# log; app2's error made up to show that other failures are not retried).
UP_FAILED = """\
==> edge3: Waiting for domain to get an IP address...
==> edge3: Removing domain...
==> edge3: An error occurred. The error will be shown after all tasks complete.
An error occurred while executing multiple actions in parallel.
Any errors that occurred are shown below.

An unexpected error occurred when executing the action on the
'edge3' machine. Please report this as a bug:

The specified wait_for timeout (2 seconds) was exceeded

/usr/share/rubygems-integration/all/gems/fog-core-2.3.0/lib/fog/core/wait_for.rb:9:in `block in wait_for'

An error occurred while executing the action on the 'app2'
machine. Please report this as a bug:

An unexpected error occurred when executing the action on the
'app1' machine. Please report this as a bug:

Call to virDomainCreateWithFlags failed: internal error
"""


def test_machines_that_got_no_address_are_told_from_other_failures() -> None:
    assert vmlab.machines_without_address(UP_FAILED) == ["edge3"]
    assert vmlab.machines_without_address("==> edge1: Machine booted and ready!\n") == []
