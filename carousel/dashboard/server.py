"""The dashboard's HTTP listener: the page, its live stream, and the actions.

    GET  /                  the page (static HTML; it holds no data)
    GET  /static/app.js|css
    GET  /api/state         the document and the chart history (JSON)
    GET  /api/events        Server-Sent Events: "snapshot" once, then "update" on every change
    POST /api/drain|undrain {"node": N, "reason": R}
    POST /api/purge         {"kind": "url"|"prefix"|"tag", "target": T}
    POST /api/unban         {"address": A}
    GET  /healthz

Why an action cannot be forged from another site (OWASP's CSRF cheat sheet):
authentication is the ``Authorization: Bearer`` header, which a browser never
adds by itself (no cookie is read, ever); the body must be
``application/json``, which a cross-site form cannot send and a cross-site
fetch cannot send without a CORS preflight that this server never grants; and
``Origin`` / ``Sec-Fetch-Site``, when the browser sends them, must say
same-origin (or a configured ``allowed_origins`` entry). Every action is logged
with the operator's name (from the token), the client address, what and the
result, and kept in the page's action list.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import structlog
from aiohttp import web

from carousel import ops
from carousel.dashboard.config import Config
from carousel.dashboard.view import ClusterView
from carousel.etcd import Etcd, EtcdError
from carousel.registry import check_name

log = structlog.get_logger("carousel.dashboard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# The page loads only its own files; nothing may frame it (clickjacking onto the buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_TARGET = 2048
SSE_MIN_GAP = 0.2  # seconds between two updates to one client: bursts of watch events coalesce
SSE_HEARTBEAT = 15.0


def _static(name: str) -> bytes:
    return resources.files("carousel.dashboard").joinpath("static", name).read_bytes()


class Hub:
    """Wakes every live stream when the view changes."""

    def __init__(self) -> None:
        self.waiters: set[asyncio.Event] = set()

    def notify(self) -> None:
        for ev in self.waiters:
            ev.set()


class DashboardServer:
    """The aiohttp application around a ClusterView and an etcd client for the actions."""

    def __init__(self, config: Config, view: ClusterView, hub: Hub, etcd: Etcd) -> None:
        self.config = config
        self.view = view
        self.hub = hub
        self.etcd = etcd
        self.operators = config.dashboard.operators()
        self.files = {name: _static(name) for name in STATIC_TYPES}
        self.app = web.Application(middlewares=[self._guard], client_max_size=16 * 1024)
        r = self.app.router
        r.add_get("/", self._page)
        r.add_get("/static/{name}", self._file)
        r.add_get("/healthz", self._healthz)
        r.add_get("/api/state", self._state)
        r.add_get("/api/events", self._events)
        for action in ("drain", "undrain", "purge", "unban"):
            r.add_post(f"/api/{action}", self._action)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._streams: set[web.StreamResponse] = set()

    # --- who is asking -----------------------------------------------------------------

    def operator(self, request: web.Request) -> str | None:
        """The operator's name for the request's bearer token, or None."""
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for known, name in self.operators.items():
            # Compare against every token, so the time taken does not say which one is close.
            if hmac.compare_digest(token.encode(), known.encode()):
                found = name
        return found

    def cross_site(self, request: web.Request) -> str | None:
        """Why a state-changing request is not same-origin, or None if it is."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request (Sec-Fetch-Site: {site})"
        origin = request.headers.get("Origin")
        if origin is not None:
            own = f"{request.scheme}://{request.host}"
            if origin != own and origin not in self.config.dashboard.allowed_origins:
                return f"origin {origin} is not {own}"
        if request.content_type != "application/json":
            return "actions take a JSON body (Content-Type: application/json)"
        return None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if request.method == "POST":
            why = self.cross_site(request)
            if why is not None:
                log.warning("action refused", reason=why, client=request.remote, path=path)
                return web.json_response({"error": why}, status=403)
            if not self.operators:
                return web.json_response({"error": "this dashboard is read-only (no token set)"}, status=403)
            if self.operator(request) is None:
                log.warning("action refused", reason="no valid token", client=request.remote, path=path)
                return _unauthorized()
        elif path.startswith("/api/") and self.config.dashboard.view_requires_token:
            if self.operator(request) is None:
                return _unauthorized()
        return await handler(request)

    # --- pages and data ----------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        return self._send("index.html")

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_TYPES or name == "index.html":
            raise web.HTTPNotFound()
        return self._send(name)

    def _send(self, name: str) -> web.Response:
        headers = {**SECURITY_HEADERS, "Content-Type": STATIC_TYPES[name]}
        return web.Response(body=self.files[name], headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n" if self.view.registry_ok else "registry unreachable\n")

    def _snapshot(self) -> dict[str, Any]:
        doc = self.view.document()
        d = self.config.dashboard
        doc["history"] = list(self.view.history)
        doc["config"] = {
            "interval": d.scrape_interval,
            "history": d.history,
            "window": d.window,
            "actions": bool(self.operators),
        }
        return doc

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self._snapshot(), headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx in front must not buffer the stream
            }
        )
        await resp.prepare(request)
        wake = asyncio.Event()
        self.hub.waiters.add(wake)
        self._streams.add(resp)
        try:
            await resp.write(_event("snapshot", self._snapshot()))
            sent_points = len(self.view.history)
            last_point = self.view.history[-1]["t"] if self.view.history else 0.0
            while True:
                try:
                    await asyncio.wait_for(wake.wait(), SSE_HEARTBEAT)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                wake.clear()
                doc = self.view.document()
                fresh = [p for p in self.view.history if p["t"] > last_point]
                if fresh:
                    last_point = fresh[-1]["t"]
                    sent_points += len(fresh)
                doc["points"] = fresh
                await resp.write(_event("update", doc))
                await asyncio.sleep(SSE_MIN_GAP)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.waiters.discard(wake)
            self._streams.discard(resp)
        return resp

    # --- actions -----------------------------------------------------------------------

    async def _action(self, request: web.Request) -> web.Response:
        action = request.path.rsplit("/", 1)[1]
        who = self.operator(request) or "?"
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            target, detail = _validate(action, body)
        except (ValueError, UnicodeDecodeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        cfg = self.config.etcd
        try:
            if action in ("drain", "undrain"):
                reason = f"{who} via the dashboard" + (f": {detail}" if detail else "")
                changed = await ops.write_drain(self.etcd, cfg, target, action == "drain", reason)
                result = "done" if changed else "was not drained"
            elif action == "purge":
                key = await ops.write_purge(self.etcd, cfg, detail, target)
                result = f"published {key.rsplit('/', 1)[1]}"
            else:
                result = "lifted" if await ops.lift_ban(self.etcd, cfg, target) else "no such ban"
        except EtcdError as exc:
            self._audit(request, who, action, target, detail, f"failed: {exc}")
            return web.json_response({"error": f"etcd: {exc}"}, status=503)
        entry = self._audit(request, who, action, target, detail, result)
        return web.json_response(entry)

    def _audit(
        self, request: web.Request, who: str, action: str, target: str, detail: str, result: str
    ) -> dict[str, Any]:
        entry = {
            "t": round(time.time(), 3),
            "who": who,
            "client": request.remote or "",
            "action": action,
            "target": target,
            "detail": detail,
            "result": result,
        }
        log.warning("operator action", **entry)
        path = self.config.dashboard.audit_log
        if path:
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
            except OSError as exc:
                log.error("cannot append to the audit log", path=path, error=str(exc))
        self.view.add_action(entry)
        self.hub.notify()
        return entry

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        d = self.config.dashboard
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, d.host, d.port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else d.port
        return self.port

    async def stop(self) -> None:
        """Close the listener; live streams are cut (browsers reconnect to the next instance)."""
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "a valid admin token is required (Authorization: Bearer ...)"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="carousel"'},
    )


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _validate(action: str, body: dict[str, Any]) -> tuple[str, str]:
    """(target, detail) of an action's body; ValueError names what is wrong."""

    def text(name: str, required: bool = True) -> str:
        value = body.get(name, "")
        if not isinstance(value, str) or (required and not value.strip()):
            raise ValueError(f"{name!r} must be a non-empty string")
        if len(value) > MAX_TARGET or any(c in value for c in "\r\n\0"):
            raise ValueError(f"{name!r} is too long or holds control characters")
        return value.strip()

    if action in ("drain", "undrain"):
        node = text("node")
        check_name("node", node)
        return node, text("reason", required=False)[:200]
    if action == "purge":
        kind = text("kind")
        if kind not in ("url", "prefix", "tag"):
            raise ValueError("'kind' must be url, prefix or tag")
        return text("target"), kind
    address = text("address")
    ipaddress.ip_network(address, strict=False)
    return address, ""
