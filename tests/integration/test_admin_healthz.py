"""The admin listener with a token: /healthz open to a health checker, everything else guarded."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from carousel.admin import AdminServer
from carousel.config import AdminConfig

TOKEN = "t0ken-t0ken-t0ken-t0ken"


async def test_healthz_needs_no_token_and_the_rest_still_does() -> None:
    draining = False
    admin = AdminServer(
        AdminConfig(host="127.0.0.1", port=0, token=TOKEN),
        status=lambda: {"secret": "figures"},
        health=lambda: (not draining, "draining" if draining else "ok"),
    )

    async def purge(request: web.Request) -> web.Response:
        return web.Response(text="purged")

    admin.add_route("POST", "/cache/purge", purge)
    port = await admin.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            # A Consul/HAProxy-style check without a secret sees the state...
            async with s.get(base + "/healthz") as r:
                assert (r.status, await r.text()) == (200, "ok\n")
            async with s.head(base + "/healthz") as r:
                assert r.status == 200
            draining = True
            async with s.get(base + "/healthz") as r:
                assert (r.status, await r.text()) == (503, "draining\n")
            # ...and nothing else: figures, status and actions need the token.
            for method, path in (("GET", "/metrics"), ("GET", "/status"), ("POST", "/cache/purge"),
                                 ("POST", "/healthz"), ("GET", "/healthz/../status")):  # fmt: skip
                async with s.request(method, base + path) as r:
                    assert r.status == 401, (method, path, r.status)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with s.get(base + "/status", headers=auth) as r:
                assert r.status == 200 and (await r.json()) == {"secret": "figures"}
            async with s.post(base + "/cache/purge", headers=auth) as r:
                assert r.status == 200
    finally:
        await admin.stop()
