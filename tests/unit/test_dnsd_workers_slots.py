"""workers = N: every answer that rotates has its node-wide counter before any table is built.

The supervisor forwards registry changes to the workers before it builds a
table of its own, so it hands out the rotation counters from the zones
alone (``TableBuilder.rotating_keys``); a rotating answer without one
would rotate per worker.
"""

from __future__ import annotations

import dataclasses

from dnsd.build import TableBuilder
from dnsd.config import RecordConfig
from dnsd.sites import SiteMap, site_order
from dnsd.table import AnswerTable
from dnsd.zone import compile_zones
from tests.unit.test_dns_answer import ZONE, edges
from tests.unit.test_dns_sites import EDGES, FALLBACK, SITES


def rotating(table: AnswerTable) -> set[bytes]:
    return {e.rrl_key for e in table.entries() if e.answer is not None}


def test_every_rotating_answer_key_is_known_from_the_zones() -> None:
    pair = [RecordConfig("pair", "A", "192.0.2.1"), RecordConfig("pair", "A", "192.0.2.2")]
    zone = dataclasses.replace(ZONE, record=[*ZONE.record, *pair])
    builder = TableBuilder(compile_zones([zone]))
    keys = set(builder.rotating_keys())
    table = builder.build(edges(5), revision=3)
    found = rotating(table)
    # www and the apex (services), alias (a CNAME to www), pair (two static addresses): A and AAAA
    assert len(found) >= 7 and found <= keys
    assert not any(k.startswith(b"\x04mail") for k in keys)  # one static address never rotates


def test_site_answers_have_their_keys_too() -> None:
    builder = TableBuilder(compile_zones([ZONE]))
    builder.site_map = SiteMap(SITES)
    builder.site_orders = {s: site_order(s, FALLBACK) for s in SITES}
    table = builder.build(EDGES, revision=3)
    found = rotating(table)
    assert any(b"@tokyo" in k for k in found)
    assert found <= set(builder.rotating_keys())
