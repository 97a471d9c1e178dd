"""Config loading: every bad input names the file and the key path; the CLI exits 2."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

import agent.config
from carousel.config import ConfigError, EtcdConfig, from_dict, load_config

GOOD_AGENT = """
[agent]
node = "n1"
ttl = 5

[[service]]
name = "edge"
port = 8080
ipv4 = ["127.0.0.1"]
"""


@dataclass(frozen=True)
class Inner:
    size: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    ratio: float = 0.5
    opt: str | None = None


def test_defaults_and_nesting():
    cfg = from_dict(Outer, {"name": "x", "inner": {"size": 3}, "items": [{"mode": "b"}], "ratio": 1})
    assert cfg == Outer("x", Inner(3), [Inner(1, "b")], 1.0)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"name": "x", "bogus": 1}, "bogus", "unknown key"),
        ({"name": "x", "inner": {"sise": 1}}, "inner.sise", "unknown key"),
        ({"name": 3}, "name", "expected a string, found integer 3"),
        ({"name": "x", "inner": {"size": "3"}}, "inner.size", "expected an integer"),
        ({"name": "x", "inner": {"size": True}}, "inner.size", "found boolean"),
        ({"name": "x", "inner": {"mode": "c"}}, "inner.mode", "one of 'a', 'b'"),
        ({"name": "x", "items": [{}, {"size": []}]}, "items[1].size", "found an array"),
        ({"name": "x", "ratio": "1"}, "ratio", "expected a number"),
        ({}, "name", "missing required key"),
    ],
)
def test_errors_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data, "f.toml")
    assert info.value.file == "f.toml"
    assert info.value.key == key
    assert words in info.value.message
    assert str(info.value).startswith(f"f.toml: {key}: ")


def test_etcd_section_validation():
    with pytest.raises(ConfigError, match=r"etcd.endpoints: expected 'host:port'"):
        from_dict(_Wrap, {"etcd": {"endpoints": ["nohost"]}}, "f.toml")
    with pytest.raises(ConfigError, match="prefix: must start and end"):
        from_dict(EtcdConfig, {"prefix": "carousel"}, "f.toml")
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        from_dict(EtcdConfig, {"cert_file": "/c.pem"}, "f.toml")


@dataclass(frozen=True)
class _Wrap:
    etcd: EtcdConfig = field(default_factory=EtcdConfig)


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(Outer, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(Outer, bad)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carousel.cli", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("foo = 1\n" + GOOD_AGENT, "foo"),
        (GOOD_AGENT + "\nfoo = 1\n", "service[0].foo"),
        (GOOD_AGENT.replace("ttl = 5", "ttl = 'five'"), "agent.ttl"),
        (GOOD_AGENT.replace("ttl = 5", "ttl = 1"), "agent.ttl"),
        (GOOD_AGENT.replace('ipv4 = ["127.0.0.1"]', 'ipv4 = ["300.1.1.1"]'), "service[0].ipv4"),
        (GOOD_AGENT.replace('name = "edge"', 'name = "a/b"'), "service[0].name"),
        (GOOD_AGENT.replace("port = 8080", ""), "service[0].port"),
        (GOOD_AGENT + "\n[etcd]\nendpoints = ['x']\n", "etcd.endpoints"),
        (GOOD_AGENT + "\n[admin]\nhost = '0.0.0.0'\n", "admin.token"),
        (GOOD_AGENT + "\n[log]\nlevel = 'loud'\n", "log.level"),
    ],
)
def test_bad_agent_config_exits_2_naming_file_and_key(tmp_path: Path, text: str, key: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    for argv in (["check-config", str(path)], ["agent", "--config", str(path)]):
        out = _cli(*argv)
        assert out.returncode == 2, out
        assert f"{path}: {key}: " in out.stderr, out.stderr


def test_missing_config_file_exits_2(tmp_path: Path):
    path = tmp_path / "absent.toml"
    out = _cli("agent", "--config", str(path))
    assert out.returncode == 2
    assert f"{path}: file not found" in out.stderr


def test_good_config_passes_check(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text(GOOD_AGENT)
    out = _cli("check-config", str(path))
    assert out.returncode == 0, out.stderr
    assert "valid agent config" in out.stdout


@pytest.mark.parametrize("value", [float("inf"), 1.1984620899082105e308, 50.5, 0.0, float("nan")])
def test_an_election_timeout_etcd_cannot_have_is_refused_naming_the_key(value: float) -> None:
    # The config fuzzer found 1.2e308 here: 1.5 x it overflowed to inf and math.ceil raised
    # OverflowError out of the loader instead of a ConfigError (exit status 1, not 2).
    data = tomllib.loads(GOOD_AGENT)
    data["agent"]["etcd_election_timeout"] = value
    with pytest.raises(ConfigError) as info:
        from_dict(agent.config.Config, data, "agent.toml")
    assert "agent.etcd_election_timeout" in str(info.value), str(info.value)
