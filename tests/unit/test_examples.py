"""The example configs in deploy/examples/ are the configuration reference: they must load,
and they must mention every option the code knows, so the reference cannot fall behind."""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest

from carousel.cli import DAEMONS

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def _option_paths(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every option under a config dataclass."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = typing.get_args(args[0])
        if typing.get_origin(args[0]) is list and inner and dataclasses.is_dataclass(inner[0]):
            paths += _option_paths(inner[0], f"{path}.")
        elif typing.get_origin(args[0]) is dict and inner and dataclasses.is_dataclass(inner[1]):
            paths += _option_paths(inner[1], f"{path}.*.")
        elif dataclasses.is_dataclass(args[0]):
            paths += _option_paths(args[0], f"{path}.")
        else:
            paths.append(path)
    return paths


@pytest.mark.parametrize("kind", sorted(DAEMONS))
def test_example_config_loads_and_lists_every_option(kind: str):
    path = EXAMPLES / f"{kind}.toml"
    assert path.exists(), f"{path} is the configuration reference of `carousel {kind}`"
    module = importlib.import_module(f"{DAEMONS[kind]}.main")
    module.load_config(str(path))
    text = path.read_text()
    missing = [
        p
        for p in _option_paths(module.Config)
        if not re.search(rf"(^|[\s#\[.]){re.escape(p.split('.')[-1])}\b", text, re.M)
    ]
    assert not missing, f"{path.name} does not mention: {', '.join(missing)}"
