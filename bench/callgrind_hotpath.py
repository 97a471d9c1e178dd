"""Instructions per request on the edge's in-process paths, by callgrind: what no load moves.

    python bench/callgrind_hotpath.py [--route hit] [--requests 1000] [--tree OLD_TREE ...]
                                      [--annotate 30] [--keep DIR]

Runs ``bench/hotpath_bench.py --callgrind`` (this tree's bench) under ``valgrind
--tool=callgrind`` once per tree (this one, then each ``--tree``, whose ``edge`` package is
imported instead: build its compiled modules first), with ``PYTHONHASHSEED=0``. The bench
zeroes the counts after its 2,000 warm-up requests and dumps them after the measured ones,
so the figure is the measured requests' instructions alone, divided by their number.
Deterministic to a few hundred instructions per request between runs, whatever else the
machine is doing (a wall-clock benchmark is not). ``--annotate N`` prints callgrind_annotate's
N costliest functions, inclusive, for each tree; ``--keep DIR`` keeps the dump files there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "hotpath_bench.py"
# Imports the chosen tree's edge before the bench runs (the bench adds its own tree only
# when no edge is imported yet).
LAUNCH = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); import edge; "
    "sys.argv = [sys.argv[2], *sys.argv[3:]]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def total_instructions(dump: Path) -> int:
    """The Ir total of one callgrind dump file."""
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"no totals in {dump}")


def measure(tree: Path, route: str, requests: int, out_dir: Path) -> Path:
    """Run the bench for one tree under callgrind; the dump of its measured part."""
    stem = out_dir / f"callgrind.{route}.{tree.name or 'root'}"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={stem}.%p",
        sys.executable, "-c", LAUNCH, str(tree), str(BENCH),
        "--route", route, "--requests", str(requests), "--repeat", "1", "--callgrind",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stderr[-3000:]}")
    dumps = sorted(out_dir.glob(f"{stem.name}.*.1"))
    if len(dumps) != 1:
        raise SystemExit(f"{tree}: expected one 'measured' dump, found {dumps}")
    print(f"  {tree}: {done.stdout.strip()}", file=sys.stderr)
    return dumps[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", choices=("proxied", "fixed", "static", "hit"), default="proxied")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--tree", action="append", default=[], help="another source tree to measure")
    parser.add_argument("--annotate", type=int, default=0, help="print the N costliest functions (inclusive)")
    parser.add_argument("--keep", help="a directory to keep the callgrind dumps in")
    args = parser.parse_args()
    trees = [ROOT, *(Path(t).resolve() for t in args.tree)]
    with tempfile.TemporaryDirectory(prefix="carousel-callgrind-") as tmp:
        out_dir = Path(args.keep).resolve() if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        first = 0.0
        for tree in trees:
            dump = measure(tree, args.route, args.requests, out_dir)
            per_request = total_instructions(dump) / args.requests
            first = first or per_request
            ratio = f" ({per_request / first:.3f}x the first)" if tree != trees[0] else ""
            print(f"{args.route}: {per_request / 1000:.1f}k instructions per request, {tree}{ratio}")
            if args.annotate:
                report = subprocess.run(
                    ["callgrind_annotate", "--inclusive=yes", str(dump)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                lines = [line for line in report.splitlines() if "(" in line and ":" in line]
                print("\n".join(lines[: args.annotate]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
