"""Bounded coverage-guided fuzz runs (a few seconds per harness) and the bugs fuzzing found.

The long runs are `make fuzz` (fuzz/README.md). Here each harness runs as its own
process, as libFuzzer wants, for FUZZ_SECONDS and must end without a crash, a hang
(libFuzzer's -timeout) or an invariant violation; the run must also have executed
a real number of inputs, so a harness that silently does nothing fails.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge.upstream.client import ResponseParser, UpstreamProtocolError

ROOT = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = 4
# Inputs the slowest harness (config: a file write and a full load each) runs in
# FUZZ_SECONDS on a loaded 2-core machine, with a wide margin.
MIN_INPUTS = {"dns": 2000, "http1": 1000, "registry": 2000, "config": 40}

needs_atheris = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris is not installed (pip install atheris)"
)


@needs_atheris
@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("harness", sorted(MIN_INPUTS))
def test_bounded_fuzz_run(harness: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"fuzz.{harness}",
            f"-max_total_time={FUZZ_SECONDS}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    assert m is not None, out[-4000:]
    assert int(m[1]) >= MIN_INPUTS[harness], f"only {m[1]} inputs ran:\n{out[-2000:]}"
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


# --- found by fuzz/http1.py --------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 2\xb300 OK\r\n\r\n",  # "2³00": str.isdigit() is true, int() raised ValueError
        b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",  # RFC 9112 4: exactly three digits
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",  # Content-Length "²"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n",
    ],
)
def test_member_response_with_non_ascii_digits_is_a_protocol_error(head: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ResponseParser().feed(head)


def test_member_response_with_a_plain_status_still_parses() -> None:
    p = ResponseParser()
    assert p.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno") == [b"no"]
    assert (p.status, p.state) == (404, "done")
