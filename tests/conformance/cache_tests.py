"""Run the cache-tests.fyi suite (npm package ``http-cache-tests``) against a caching edge.

    python tests/conformance/cache_tests.py                 # the pinned npm release
    python tests/conformance/cache_tests.py --suite DIR     # any unpacked revision of the suite

The suite's origin server (node) and its client run as subprocesses; the edge runs in this
process with the configuration edge/README.md gives for the suite, on free loopback ports.
Results are counted the way cache-tests.fyi shows them: required tests pass or fail, optimal
ones pass or fall short, checks answer yes or no; a test whose dependency did not pass is not
counted as a failure of its own. With the pinned release, the run fails (exit 1) when a required
test fails that is not in ``KNOWN`` below, or when one of ``KNOWN`` passes (update the list and
edge/README.md). npm is reached only to fetch the pinned release and its two dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from edge.testing import running_edge

VERSION = "0.4.5"
ROOT = Path(__file__).resolve().parents[2]
# The suite's client and server import these two; nothing else of its package.json is needed.
NODE_DEPS = ("liquidjs@9", "node-fetch@2")

# Required tests of the pinned release that fail on purpose; each reason is in edge/README.md.
KNOWN = {
    **{
        f"age-parse-{name}": "0.4.5 wants an invalid or list-valued Age to make the response stale; "
        "RFC 9111 5.1 (and the suite's later revision) say: first member, invalid ignored"
        for name in (
            "nonnumeric",
            "negative",
            "float",
            "prefix-twoline",
            "dup-0",
            "dup-0-twoline",
            "dup-old",
            "parameter",
            "numeric-parameter",
        )
    },
    "304-etag-update-response-ETag": "a 304 whose strong ETag matches no stored response is not "
    "used to update one (RFC 9111 4.3.4): the edge refetches, which the suite counts as a retry",
}


def edge_config(origin_port: int) -> dict[str, Any]:
    """What edge/README.md gives for the suite: Set-Cookie stored as RFC 9111 7.3 allows, and
    Surrogate-Control read (the suite's CLI runs its surrogate tests)."""
    return {
        "cache": {
            "enabled": True,
            "cluster_purge": False,
            "targeted_fields": ["CDN-Cache-Control", "Surrogate-Control"],
        },
        "pool": {
            "origin": {
                "members": [{"address": f"127.0.0.1:{origin_port}"}],
                "max_tries": 1,  # the suite flags retried requests
                "eject": {"failures": 100000},  # "disconnect" tests must not eject the origin
            }
        },
        "route": [{"path": "/", "pool": "origin", "cache_set_cookie": "store"}],
    }


KINDS_SCRIPT = """
import { readdirSync } from 'fs'
const dir = process.argv[2] + '/tests/'
const out = {}
for (const file of readdirSync(dir)) {
  if (!file.endsWith('.mjs') || file === 'index.mjs') continue
  const suite = (await import(dir + file)).default
  if (!suite || !Array.isArray(suite.tests)) continue
  for (const t of suite.tests) out[t.id] = { kind: t.kind || 'required', depends_on: t.depends_on || [] }
}
console.log(JSON.stringify(out))
"""


def install_deps(work: Path) -> None:
    """The suite's two dependencies under ``work`` (installed once)."""
    if not (work / "node_modules" / "node-fetch").exists():
        # Node resolves imports up the tree: work/node_modules serves every revision under it.
        (work / "package.json").write_text('{"private": true}\n')
        subprocess.run(
            [
                "npm",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "install",
                "--prefix",
                str(work),
                *NODE_DEPS,
            ],
            check=True,
        )


def fetch_release(work: Path) -> Path:
    """The pinned release unpacked under ``work`` (fetched once)."""
    suite = work / VERSION / "package"
    if not (suite / "cli.mjs").exists():
        (work / VERSION).mkdir(parents=True, exist_ok=True)
        npm = ["npm", "--no-audit", "--no-fund", "--loglevel=error"]
        name = subprocess.run(
            [*npm, "pack", f"http-cache-tests@{VERSION}", "--pack-destination", str(work / VERSION)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        with tarfile.open(work / VERSION / name) as tar:
            tar.extractall(work / VERSION, filter="data")
    return suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def run_suite(suite: Path, only: str = "") -> dict[str, Any]:
    """The suite's raw results (test id -> true or [kind, message]) against a fresh edge;
    ``only``: one test id (its result alone)."""
    origin_port = free_port()
    env = {**os.environ, "npm_config_protocol": "http", "npm_config_port": str(origin_port)}
    env["npm_config_pidfile"] = str(suite / "server.pid")
    server = await asyncio.create_subprocess_exec(
        "node", "server/server.mjs", cwd=suite, env=env, stdout=subprocess.DEVNULL
    )
    try:
        await wait_for_port(origin_port, 30)
        async with running_edge(edge_config(origin_port)) as edge:
            client_env = {
                **os.environ,
                "npm_config_base": f"http://127.0.0.1:{edge.port}",
                "npm_config_id": only,
                "npm_package_config_id": only,
            }
            client = await asyncio.create_subprocess_exec(
                "node", "--no-warnings", "cli.mjs", cwd=suite, env=client_env, stdout=subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(client.communicate(), 600)
    finally:
        server.terminate()
        await server.wait()
    if only:  # the client prints a verdict line, not JSON: "<symbol> - <details>"
        verdict = out.decode().strip().splitlines()[-1] if out.strip() else ""
        return {only: True} if verdict.startswith("\u2705") else {only: ["Assertion", verdict]}
    return dict(json.loads(out))


def test_kinds(suite: Path, work: Path) -> dict[str, dict[str, Any]]:
    script = work / "kinds.mjs"
    script.write_text(KINDS_SCRIPT)
    out = subprocess.run(["node", str(script), str(suite)], check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def classify(kinds: dict[str, dict[str, Any]], results: dict[str, Any]) -> dict[str, str]:
    """Each test that ran: pass, fail, optional_fail, yes, no, setup_fail, dependency_fail."""
    memo: dict[str, str] = {}

    def one(test_id: str) -> str:
        if test_id in memo:
            return memo[test_id]
        result = results.get(test_id)
        info = kinds.get(test_id, {"kind": "required", "depends_on": []})
        if result is None:
            outcome = "untested"
        elif any(one(d) not in ("pass", "yes") for d in info["depends_on"]):
            outcome = "dependency_fail"
        elif isinstance(result, list) and result[:1] == ["Setup"]:
            outcome = "setup_fail"
        elif result is not True and not (isinstance(result, list) and result[:1] == ["Assertion"]):
            outcome = "harness_fail"
        else:
            ok = result is True
            outcome = {
                "required": "pass" if ok else "fail",
                "optimal": "pass" if ok else "optional_fail",
                "check": "yes" if ok else "no",
            }[info["kind"]]
        memo[test_id] = outcome
        return outcome

    return {test_id: one(test_id) for test_id in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, help="an unpacked revision of the suite (default: npm release)")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "http-cache-tests")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args()
    if shutil.which("node") is None or shutil.which("npm") is None:
        print("cache-tests: node and npm are needed", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    install_deps(args.work)
    suite = args.suite.resolve() if args.suite else fetch_release(args.work)
    kinds = test_kinds(suite, args.work)
    results = asyncio.run(run_suite(suite))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    outcomes = classify(kinds, results)
    counts = Counter((kinds.get(t, {}).get("kind", "required"), o) for t, o in outcomes.items())
    label = f"http-cache-tests {VERSION}" if not args.suite else str(suite)
    print(f"{label}: {len(outcomes)} tests ran")
    for kind in ("required", "optimal", "check"):
        parts = ", ".join(f"{o} {n}" for (k, o), n in sorted(counts.items()) if k == kind)
        print(f"  {kind}: {parts}")
    failed = {t for t, o in outcomes.items() if o in ("fail", "setup_fail", "harness_fail")}
    for test_id in sorted(failed):
        print(f"  required {outcomes[test_id]}: {test_id} -- {KNOWN.get(test_id, results[test_id])}")
    if args.suite:
        return 0  # another revision: report only
    unexpected = failed - KNOWN.keys()
    for test_id in sorted(unexpected):
        # The suite waits real seconds between requests: on a loaded machine a timing test can
        # miss once. Each unexpected failure gets one run of its own before it counts.
        again = asyncio.run(run_suite(suite, only=test_id))
        print(f"  rerun alone: {test_id} -> {again[test_id]}")
        if again[test_id] is True:
            unexpected.discard(test_id)
    fixed = {t for t in KNOWN if outcomes.get(t) == "pass"}
    for test_id in sorted(unexpected):
        print(f"UNEXPECTED required failure: {test_id}", file=sys.stderr)
    for test_id in sorted(fixed):
        print(f"now passes, drop it from KNOWN and edge/README.md: {test_id}", file=sys.stderr)
    return 1 if unexpected or fixed else 0


if __name__ == "__main__":
    sys.exit(main())
