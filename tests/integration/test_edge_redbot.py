"""REDbot (mnot's HTTP resource checker, from PyPI) against the edge: a cached object, an
uncacheable proxied one and a static file, each compressible.

REDbot fetches a URL, then makes its own follow-up requests (If-None-Match, If-Modified-Since,
a Range where Accept-Ranges offers one, Accept-Encoding: gzip) and grades what it sees against
the HTTP RFCs (9110-9112): each note is GOOD, INFO, WARN or BAD. The edge's answers must carry
no WARN and no BAD note, and the checks that apply must have run and passed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.front.server import Edge
from edge.testing.cache import ScriptedOrigin, edge_config, running_edge

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        shutil.which("redbot", path=str(Path(sys.executable).parent)) is None,
        reason="needs redbot (pip install redbot; in the dev extra)",
    ),
]

CSS = ("body { margin: 0; font-family: sans-serif; }\n" * 80).encode()  # compressible, 3.5 KiB
# What REDbot must report as passed on each URL (its note ids).
PASSES = {
    "/cached.css": {"INM_304", "IMS_304", "CONNEG_GZIP_GOOD", "FRESHNESS_FRESH", "CL_CORRECT"},
    "/dynamic": {"CONNEG_GZIP_GOOD", "CL_CORRECT", "STORE_NO_STORE"},
    "/static/site.css": {"INM_304", "IMS_304", "CONNEG_GZIP_GOOD", "RANGE_CORRECT", "FRESHNESS_FRESH"},
}


async def redbot_notes(url: str) -> list[dict[str, Any]]:
    """REDbot's notes on ``url``, from its HAR output."""
    redbot = shutil.which("redbot", path=str(Path(sys.executable).parent))
    assert redbot is not None
    proc = await asyncio.create_subprocess_exec(
        redbot, "-o", "har", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, f"redbot failed ({proc.returncode}): {err.decode()[-2000:]}"
    entries = json.loads(out)["log"]["entries"]
    assert entries, f"redbot fetched nothing from {url}"
    return [note for entry in entries for note in entry["_red_messages"]]


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[ScriptedOrigin, Edge]]:
    """An origin, and an edge with the cache and compression on and a static route."""
    (tmp_path / "site.css").write_bytes(CSS)
    origin = ScriptedOrigin()
    port = await origin.start()
    config = edge_config(port)
    # An operator's freshness for static files (nginx's `expires 1h`): without one, REDbot warns
    # that caches pick a heuristic lifetime (FRESHNESS_HEURISTIC), as it does for nginx.
    static = {"path": "/static/", "static": str(tmp_path), "headers": {"Cache-Control": "max-age=3600"}}
    config["route"] = [static, *config["route"]]
    config["compression"] = {"enabled": True, "min_size": 1024}
    try:
        async with running_edge(config) as running:
            yield origin, running
    finally:
        await origin.stop()


async def test_redbot_finds_nothing_wrong(edge: tuple[ScriptedOrigin, Edge]) -> None:
    origin, e = edge
    # The origin's Date is its clock at each answer (aiohttp's), as a real origin's is.
    origin.reply(
        "/cached.css", CSS, content_type="text/css", cache_control="max-age=300", etag='"v1"',
        last_modified=formatdate(1_700_000_000, usegmt=True),
    )  # fmt: skip
    origin.reply("/dynamic", CSS, content_type="text/css", cache_control="no-store")
    base = f"http://127.0.0.1:{e.port}"
    async with aiohttp.ClientSession() as s, s.get(base + "/cached.css") as r:
        assert r.status == 200  # stored: REDbot's requests with the same codings are cache hits
    for path, passes in PASSES.items():
        notes = await redbot_notes(base + path)
        bad = [f"{n['level']} {n['note_id']}: {n['summary']}" for n in notes if n["level"] in ("WARN", "BAD")]
        assert not bad, f"{path}: {bad}"
        good = {n["note_id"] for n in notes if n["level"] in ("GOOD", "INFO")}
        assert passes <= good, f"{path}: not reported as passed: {sorted(passes - good)}"
