"""Structure-aware config fuzzing: the reference configs with values swapped, removed and added.

The byte-level fuzzer (fuzz/config.py) mostly meets TOML syntax errors; this one
starts from the parsed deploy/examples/*.toml and changes what TOML can express
(a value of another type or out of range, a key removed, an unknown key, a table
where a value was), so every validator is reached. Whatever the change, the
loader must return a config or raise ConfigError: never another exception.
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.config
import dnsd.config
import edge.main
from carousel.config import ConfigError, from_dict
from dnsd.zone import ZoneError, compile_zones

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"

scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**32]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -0.0, 1e308]),
    st.text(max_size=40),
    st.sampled_from(["", " ", "127.0.0.1:0", "[::1]:53", "::", "a" * 300, "x\r\ny", "/", "0.0.0.0/0", "*"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _load_dnsd(data: dict[str, Any]) -> None:
    config = from_dict(dnsd.config.Config, data, "dnsd.toml")
    try:
        compile_zones(config.zone)  # dnsd.config.load turns ZoneError into ConfigError
    except ZoneError:
        pass


LOADERS = {
    "edge": lambda data: edge.main.from_dict(data, "edge.toml"),
    "dnsd": _load_dnsd,
    "agent": lambda data: from_dict(agent.config.Config, data, "agent.toml"),
}
BASE = {kind: tomllib.loads((EXAMPLES / f"{kind}.toml").read_text()) for kind in LOADERS}


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    data = copy.deepcopy(BASE[kind])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "replace", "remove", "add"]))
        if action == "remove":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
        else:
            parent[key] = draw(values)
    return data


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_mutated_reference_configs_load_or_raise_config_error(kind: str) -> None:
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated(kind))
    def check(data: dict[str, Any]) -> None:
        section = data.get("edge")
        if kind == "edge" and isinstance(section, dict) and section.get("features"):
            return  # module names the loader imports by design
        try:
            LOADERS[kind](data)
            seen["ok"] += 1
        except ConfigError as exc:
            assert exc.key or exc.message  # names where, or what
            seen["refused"] += 1

    check()
    assert seen["refused"] > 50, seen  # the mutations really reached the validators
