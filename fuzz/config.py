"""Fuzz the config loaders: TOML bytes -> typed config for the edge, dnsd and agent.

Each input is written to a file and loaded by the daemon's own ``load(path)``
(the same call ``carousel check-config`` and start-up make). The only thing
allowed out is ``ConfigError`` (which names file, key, expected and found).
The first byte picks the daemon; seeds are the reference configs in
deploy/examples/, so mutations start from every option there is.

Inputs naming ``edge.features`` are skipped: those strings are module names
the loader imports by design, and a fuzzer must not import arbitrary modules.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

from fuzz.common import run

INSTRUMENTED = ["carousel.config", "carousel.snapshot", "dnsd.config", "dnsd.zone", "dnsd.main"]
INSTRUMENTED += ["edge.core.config", "edge.main", "agent.config"]
with atheris.instrument_imports(include=INSTRUMENTED):
    from agent.config import load as load_agent
    from carousel.config import ConfigError
    from dnsd.main import load_config as load_dnsd
    from edge.main import load_config as load_edge


LOADERS = (load_edge, load_dnsd, load_agent)
EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"
_fd, _PATH = tempfile.mkstemp(prefix="carousel-fuzz-config-", suffix=".toml")
os.close(_fd)


def test_one_input(data: bytes) -> None:
    """One fuzz input: a config file for the daemon the first byte names."""
    if not data or b"features" in data:
        return
    load = LOADERS[data[0] % len(LOADERS)]
    with open(_PATH, "wb") as f:
        f.write(data[1:])
    try:
        load(_PATH)
    except ConfigError:
        pass


SEEDS = [
    bytes([i]) + (EXAMPLES / f"{name}.toml").read_bytes() for i, name in enumerate(("edge", "dnsd", "agent"))
]
SEEDS += [b"\x00[edge]\nport = 8080\n", b"\x01[[zone]]\norigin = \"a.test\"\n[[zone.ns]]\nname = \"ns1\"\n",
          b"\x02[[service]]\nname = \"edge\"\nport = 80\n"]  # fmt: skip

if __name__ == "__main__":
    run("config", test_one_input, SEEDS)
    sys.exit(0)
