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
