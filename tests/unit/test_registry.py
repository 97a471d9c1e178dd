"""The registry schema: round trips, versioning, corrupt values, key layout."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carousel.registry import (
    BanRecord,
    Keys,
    MaintenanceFlag,
    PurgeEvent,
    SchemaError,
    ServiceRecord,
)


def rec(**kw):
    base = dict(service="edge", node="n1", port=8080, ipv4=("10.0.0.1",), ipv6=("2001:db8::1",))
    base.update(kw)
    return ServiceRecord(**base)


def test_round_trip():
    r = rec(weight=3, state="draining", meta={"zone": "a"}, since=12.5)
    assert ServiceRecord.decode(r.encode()) == r
    for value in (
        MaintenanceFlag("n1", "kernel upgrade", 1.0),
        PurgeEvent("prefix", "http://www.example.test/img/", 2.0),
        BanRecord("192.0.2.7", "flood", 3.0, "edge1"),
    ):
        assert type(value).decode(value.encode()) == value


def test_values_carry_a_version():
    assert json.loads(rec().encode())["v"] == 1


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"v": 2, "service": "edge"}', "unknown schema version 2"),
        (b'{"service": "edge"}', "unknown schema version None"),
        (b'{"v": 1, "service": "edge", "node": "n1"}', "missing field 'port'"),
        (b'{"v": 1, "service": "edge", "node": "n1", "port": "80", "ipv4": ["1.2.3.4"]}', "wrong type"),
        (b'{"v": 1, "service": "edge", "node": "n1", "port": 80, "ipv4": ["1.2.3.999"]}', "IPv4"),
        (b'{"v": 1, "service": "edge", "node": "n1", "port": 80}', "at least one"),
        (
            b'{"v": 1, "service": "edge", "node": "n1", "port": 80, "ipv4": ["1.2.3.4"], "state": "x"}',
            "state",
        ),
        (
            b'{"v": 1, "service": "edge", "node": "n1", "port": 80, "ipv4": ["1.2.3.4"], "weight": true}',
            "wrong type",
        ),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_corrupt_values_raise_schema_error(raw, words):
    with pytest.raises(SchemaError, match=words):
        ServiceRecord.decode(raw)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_schema_error(raw):
    try:
        ServiceRecord.decode(raw)
    except SchemaError:
        pass


def test_key_layout():
    k = Keys("/c/")
    assert k.service("edge", "n1") == "/c/services/edge/n1"
    assert k.split_service("/c/services/edge/n1") == ("edge", "n1")
    assert k.maintenance_flag("n1") == "/c/maintenance/n1"
    assert k.purge("x").startswith("/c/purge/") and k.ban("192.0.2.1") == "/c/bans/192.0.2.1"
    for bad in ("/c/services/edge", "/c/services/edge/n1/extra", "/other/services/edge/n1"):
        with pytest.raises(ValueError):
            k.split_service(bad)


@pytest.mark.parametrize("name", ["", "a/b", "..", "a b"])
def test_bad_names_rejected(name):
    with pytest.raises(ValueError):
        rec(node=name)
