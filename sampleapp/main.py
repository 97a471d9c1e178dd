"""`carousel app`: a sample AP server for the demo, the tests and the lab.

It plays the notes' heavy application server: one dynamic page that names
the AP that rendered it and references ~30 static files, plus endpoints the
tests lean on (slow, large, cacheable, echo). It counts its own concurrent
requests and keeps the peak, which the AP-protection tests read from /stats.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import html
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from carousel.admin import bound_port as _bound_port
from carousel.config import ConfigError
from carousel.logs import setup_logging
from sampleapp.config import Config, load

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = sorted(str(p.relative_to(STATIC_DIR)) for p in STATIC_DIR.rglob("*") if p.is_file())
BIG_CHUNK = b"carousel sample body: 0123456789abcdefghijklmnopqrstuvwxyz\n" * 64  # ~4 KiB

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stats:
    """Request counters, including the peak of concurrent requests."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.by_path: Counter[str] = Counter()
        self.started = time.time()


class SampleApp:
    """The aiohttp application and its state."""

    def __init__(self, name: str, admin_token: str = "") -> None:
        self.name = name
        self.stats = Stats()
        self.healthy = True
        # POST /admin/health needs "Authorization: Bearer <token>"; without a token, nobody
        # may flip the health the agents and edges act on.
        self._admin = f"Bearer {admin_token}".encode() if admin_token else b""
        self.app = web.Application(middlewares=[self._count], client_max_size=64 * 1024 * 1024)
        r = self.app.router
        r.add_get("/", self.page)
        r.add_get("/index.html", self.page)
        r.add_get("/healthz", self.healthz)
        r.add_get("/slow", self.slow)
        r.add_get("/big", self.big)
        r.add_get("/cacheable", self.cacheable)
        r.add_route("*", "/echo", self.echo)
        r.add_route("*", "/echo/{tail:.*}", self.echo)
        r.add_get("/stats", self.stats_json)
        r.add_post("/stats/reset", self.stats_reset)
        r.add_post("/admin/health", self.set_health)
        r.add_static("/static", STATIC_DIR, show_index=False, follow_symlinks=False)

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/stats", "/stats/reset", "/healthz", "/admin/health"):
            return await handler(request)
        s = self.stats
        s.requests += 1
        s.by_path[request.path] += 1
        s.in_flight += 1
        s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
        try:
            return await handler(request)
        finally:
            s.in_flight -= 1

    async def page(self, request: web.Request) -> web.Response:
        """The notes' page: 1 dynamic request that pulls in ~30 static ones."""
        name = html.escape(self.name)
        imgs = "".join(
            f'<img src="/static/{f}" width="64" height="64" alt="">'
            for f in STATIC_FILES
            if f.startswith("img/")
        )
        scripts = "".join(f'<script src="/static/{f}"></script>' for f in STATIC_FILES if f.startswith("js/"))
        css = "".join(
            f'<link rel="stylesheet" href="/static/{f}">' for f in STATIC_FILES if f.endswith(".css")
        )
        client = html.escape(request.remote or "?")
        body = (
            "<!doctype html><html><head><meta charset=utf-8>"
            f"<title>Carousel on {name}</title>{css}</head>"
            f"<body><h1>Served by AP {name}</h1>"
            f"<p>Rendered at {time.strftime('%H:%M:%S')} for {client}.</p>"
            f'<div class="tiles">{imgs}</div>{scripts}</body></html>\n'
        )
        return web.Response(
            text=body,
            content_type="text/html",
            headers={"X-Served-By": self.name, "Cache-Control": "no-store"},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="unhealthy\n")

    async def set_health(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not self._admin or not hmac.compare_digest(given, self._admin):
            return web.Response(status=403, text="admin token required\n")
        self.healthy = request.query.get("ok", "1") not in ("0", "false", "no")
        return web.Response(text=f"healthy={self.healthy}\n")

    async def slow(self, request: web.Request) -> web.Response:
        ms = _int_param(request, "ms", 100, 0, 600_000)
        await asyncio.sleep(ms / 1000)
        return web.Response(text=f"slept {ms} ms on {self.name}\n", headers={"X-Served-By": self.name})

    async def big(self, request: web.Request) -> web.StreamResponse:
        """A large body (default 1 MiB), written as fast as the peer takes it."""
        size = _int_param(request, "kb", 1024, 0, 1024 * 1024) * 1024
        resp = web.StreamResponse(headers={"Content-Type": "text/plain", "X-Served-By": self.name})
        resp.content_length = size
        await resp.prepare(request)
        left = size
        while left > 0:
            chunk = BIG_CHUNK[: min(left, len(BIG_CHUNK))]
            await resp.write(chunk)
            left -= len(chunk)
        await resp.write_eof()
        return resp

    async def cacheable(self, request: web.Request) -> web.Response:
        """A cacheable response with a validator; 304 on a matching If-None-Match."""
        max_age = _int_param(request, "max_age", 60, 0, 86400 * 365)
        key = request.query.get("v", "1")
        etag = '"' + hashlib.sha1(f"{request.path_qs}|{key}".encode()).hexdigest()[:16] + '"'
        headers = {
            "Cache-Control": f"public, max-age={max_age}",
            "ETag": etag,
            "X-Served-By": self.name,
        }
        inm = request.headers.get("If-None-Match", "")
        if etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*":
            return web.Response(status=304, headers=headers)
        return web.Response(text=f"cacheable v{key} from {self.name}\n", headers=headers)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "ap": self.name,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_length": len(body),
                "client": request.remote,
            },
            headers={
                "X-Served-By": self.name,
                "Server": "SampleAP/1.0",
                "X-Powered-By": "carousel-sample",
            },
        )

    async def stats_json(self, request: web.Request) -> web.Response:
        s = self.stats
        return web.json_response(
            {
                "name": self.name,
                "requests": s.requests,
                "by_path": dict(s.by_path),
                "in_flight": s.in_flight,
                "peak_in_flight": s.peak_in_flight,
                "uptime": time.time() - s.started,
            }
        )

    async def stats_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.Response(text="reset\n")


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer\n") from None
    if not lo <= value <= hi:
        raise web.HTTPBadRequest(text=f"{name} must be within {lo}..{hi}\n")
    return value


async def start_app(
    host: str, port: int, name: str | None = None, admin_token: str = ""
) -> tuple[web.AppRunner, int]:
    """Start the app in this loop; returns (runner, bound port). Stop: runner.cleanup()."""
    sample = SampleApp(name or f"{host}:{port}", admin_token)
    runner = web.AppRunner(sample.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = _bound_port(site)
    if name is None:
        sample.name = f"{host}:{bound}"
    runner.app["sample"] = sample
    return runner, bound


async def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, port = await start_app(
            config.app.host, config.app.port, config.app.name or None, config.app.admin_token
        )
    except OSError as exc:
        print(
            f"carousel app: cannot listen on {config.app.host}:{config.app.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    import structlog

    structlog.get_logger("sampleapp").info("sample AP listening", host=config.app.host, port=port)
    await stop.wait()
    await runner.cleanup()
    return 0


def load_config(path: str) -> Config:
    """Read and check a sample app config file (a ConfigError names the file and key)."""
    return load(path)


def run(config: Config, config_path: str | None = None) -> int:
    """Entry point for `carousel app --config FILE`."""
    setup_logging(config.log, daemon="app")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(serve(config))


def cli(args: argparse.Namespace) -> int:
    """`carousel app [--config FILE] [--host H] [--port P] [--name N] [--admin-token T]`: flags override
    the file."""
    from sampleapp import config as cfgmod

    try:
        config = cfgmod.load(args.config) if args.config else cfgmod.Config()
        config = cfgmod.override(
            config, host=args.host, port=args.port, name=args.name, admin_token=args.admin_token
        )
    except ConfigError as exc:
        print(f"carousel: config error: {exc}", file=sys.stderr)
        return 2
    return run(config, args.config)


if __name__ == "__main__":
    os.environ.setdefault("CAROUSEL_LOG_FORMAT", "console")
    sys.exit(run(Config()))
