"""What every harness shares: seed corpus, atheris start-up, and the final figures.

A harness defines ``test_one_input(data)`` and a list of seeds, and calls
``run(...)``. Arguments are libFuzzer's (``-runs=N``, ``-max_total_time=S``,
``-timeout=S``, corpus directories). Without a corpus directory the seeds are
written to a fresh temporary one, so a run always starts from valid inputs.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

# A single input taking longer than this is a hang (libFuzzer -timeout, seconds).
HANG_SECONDS = 5


def run(name: str, test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Start atheris on ``test_one_input`` with libFuzzer's argv; never returns."""
    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=f"carousel-fuzz-{name}-"))
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:04d}").write_bytes(seed)
        argv.append(str(corpus))
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append(f"-timeout={HANG_SECONDS}")
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        argv.append(f"-artifact_prefix={tempfile.mkdtemp(prefix=f'carousel-fuzz-{name}-crash-')}/")
    if not any(a.startswith("-print_final_stats=") for a in argv):
        argv.append("-print_final_stats=1")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
