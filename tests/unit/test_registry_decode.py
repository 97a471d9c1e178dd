"""ServiceRecord.decode: the plain-typed fast path (dnsd's start-up at 10,000 records) reads
every value as the field-by-field path does, and rejects the same bad values, with orjson
and with the standard library's JSON (the fallback when orjson is missing)."""

from __future__ import annotations

import json

import pytest

from carousel import registry
from carousel.registry import SchemaError, ServiceRecord

BASE = {"v": 1, "service": "edge", "node": "n1", "port": 80, "ipv4": ["192.0.2.1"]}


@pytest.fixture(autouse=True, params=["orjson", "standard library"])
def json_decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "orjson":
        orjson = pytest.importorskip("orjson")
        monkeypatch.setattr(registry, "_loads", orjson.loads)
    else:
        monkeypatch.setattr(registry, "_loads", registry._pure_loads)


def value(**fields: object) -> bytes:
    return json.dumps({**BASE, **fields}).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"ipv6": ["2001:db8::1", "fe80::1%eth0"], "weight": 7, "state": "draining", "since": 12},
        {"meta": {"rack": "r1", "n": 3}, "since": 1.5, "site": "tokyo"},  # meta: the general path
        {"ipv4": [], "ipv6": ["2001:db8::2"]},
    ],
)
def test_the_fast_path_reads_what_the_general_path_reads(fields: dict[str, object]) -> None:
    raw = value(**fields)
    record = ServiceRecord.decode(raw)
    obj = json.loads(raw)
    assert record.service == obj["service"] and record.node == obj["node"] and record.port == obj["port"]
    assert record.ipv4 == tuple(obj.get("ipv4", ())) and record.ipv6 == tuple(obj.get("ipv6", ()))
    assert record.weight == obj.get("weight", 1) and record.state == obj.get("state", "up")
    assert record.since == float(obj.get("since", 0.0)) and type(record.since) is float
    assert record.meta == {str(k): str(v) for k, v in obj.get("meta", {}).items()}
    assert record.site == obj.get("site", "")
    assert ServiceRecord.decode(record.encode()) == record


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"node": "a b"}, "invalid node name"),
        ({"service": ".."}, "invalid service name"),
        ({"site": "to/kyo"}, "invalid site name"),
        ({"port": 0}, "port out of range"),
        ({"port": True}, "wrong type"),
        ({"weight": 0}, "weight must be"),
        ({"ipv4": ["192.0.2.300"]}, "IPv4"),
        ({"ipv4": [1]}, "list of strings"),
        ({"state": "gone"}, "state"),
        ({"since": "yesterday"}, "wrong type"),
    ],
)
def test_the_fast_path_rejects_what_the_general_path_rejects(fields: dict[str, object], words: str) -> None:
    with pytest.raises(SchemaError, match=words):
        ServiceRecord.decode(value(**fields))


def test_values_must_be_utf8() -> None:
    with pytest.raises(SchemaError, match="not JSON"):
        ServiceRecord.decode(value().decode().encode("utf-16"))


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"", b'{"v": 1, "service": "edge"', b"[1]"])
def test_malformed_json_is_a_schema_error_with_either_decoder(raw: bytes) -> None:
    with pytest.raises(SchemaError):
        ServiceRecord.decode(raw)
