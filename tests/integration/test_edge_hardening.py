"""What a hostile client gets from the edge, with real sockets on loopback.

The member is a recorder: it keeps every request head it receives and answers
with the Host it saw, so a test can say exactly what reached the AP tier.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge.testing import raw_request, running_edge

pytestmark = pytest.mark.timeout(60)

HOST = "www.example.test"


@dataclass
class Recorder:
    """A member that records request heads: (method, target, headers with lower-case names)."""

    port: int = 0
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    cache_control: str = "no-store"
    vary: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                self.seen.append((method, target, headers))
                body = f"{headers.get('host', '-')}|{headers.get('accept-language', '-')}".encode()
                extra = f"Vary: {self.vary}\r\n" if self.vary else ""
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nCache-Control: %s\r\n%s\r\n"
                    % (len(body), self.cache_control.encode(), extra.encode())
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def paths(self) -> list[str]:
        return [target for _, target, _ in self.seen]


@pytest.fixture
async def member() -> AsyncIterator[Recorder]:
    rec = Recorder()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        server.close()
        await server.wait_closed()


async def get(
    port: int, target: str, host: str = HOST, method: str = "GET", extra: str = ""
) -> tuple[int, bytes]:
    """One request on its own connection: (status, body); status 0 when the edge just closed."""
    data = (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    resp = await raw_request(port, data.encode("latin-1"))
    return (0, b"") if resp is None else (resp.status, resp.body)


# --- paths: the router sees what the member sees ---------------------------------------------


def _routing_config(member: Recorder, static_root: str) -> dict[str, Any]:
    return {
        "pool": {"ap": {"members": [{"address": f"127.0.0.1:{member.port}"}]}},
        "route": [
            {"name": "deny-admin", "path": "/admin/", "respond": 403, "body": "no"},
            {"name": "read-only", "path": "/ro/", "methods": ["GET", "HEAD"], "pool": "ap"},
            {"name": "read-only-other", "path": "/ro/", "respond": 405, "body": "read only"},
            {"name": "private", "path": "/static/private/", "respond": 403, "body": "no"},
            {"name": "static", "path": "/static/", "static": static_root},
            {"name": "app", "path": "/", "pool": "ap"},
        ],
    }


# Every way to write /admin/x that an RFC 3986 resolver or a member's router reads as /admin/x.
ADMIN_FORMS = [
    "/admin/x",
    "/x/../admin/x",
    "//admin/x",
    "///admin//x",
    "/./admin/x",
    "/x/./../admin/x",
    "/%2e/admin/x",
    "/x/%2e%2e/admin/x",
    "/x/%2E%2E/admin/x",
    "/x/.%2e/admin/x",
    "/x/%2e./admin/x",
    "/%61dmin/x",
    "/%61%64%6d%69%6e/x",
    "/x//..//admin/x",
    "/x/y/../../admin/x",
    "/admin/./x",
    "/admin/y/../x",
    "/x/..//admin/x",
    "/x/../admin/x?q=/../",
]
# Forms no normalisation both sides agree on: refused outright.
REFUSED_FORMS = [
    "/x/..%2fadmin/x",
    "/x/..%2Fadmin/x",
    "/%2fadmin/x",
    "/admin%2fx",
    "/x%5c..%5cadmin/x",
    "/x\\..\\admin/x",
    "/../admin/x",
    "/%2e%2e/admin/x",
    "/x/../../admin/x",
    "/admin%00/x",
    "/adm%zzin/x",
    "/admin/x%",
    "/admin/x%4",
    "/x#/../admin/x",
]


async def test_deny_routes_hold_for_every_spelling_of_the_path(member: Recorder, tmp_path: Path) -> None:
    async with running_edge(_routing_config(member, str(tmp_path))) as edge:
        for target in ADMIN_FORMS:
            assert await get(edge.port, target) == (403, b"no"), target
        for target in REFUSED_FORMS:
            status, _ = await get(edge.port, target)
            assert status == 400, (target, status)
        assert member.seen == [], member.paths()


async def test_the_member_gets_the_normalised_path_the_router_saw(member: Recorder, tmp_path: Path) -> None:
    async with running_edge(_routing_config(member, str(tmp_path))) as edge:
        cases = {
            "/a/./b//c/../d": "/a/b/d",
            "/%7euser/%41%2e%62": "/~user/A.b",
            "/a/%3f%2a/b/..?x=/../%2e": "/a/%3F%2A/?x=/../%2e",  # the query is left alone
            "/a/%252e%252e/admin/x": "/a/%252e%252e/admin/x",  # decoded once: not a dot segment
            "/a/...": "/a/...",
        }
        for target, forwarded in cases.items():
            assert (await get(edge.port, target))[0] == 200, target
            assert member.paths()[-1] == forwarded, target


async def test_method_restricted_routes_hold_for_every_spelling(member: Recorder, tmp_path: Path) -> None:
    async with running_edge(_routing_config(member, str(tmp_path))) as edge:
        for target in ["/ro/x", "/a/../ro/x", "//ro/x", "/%72o/x", "/./ro/./x", "/a/%2e%2e/ro/x"]:
            assert await get(edge.port, target, method="POST") == (405, b"read only"), target
            assert member.seen == [], (target, member.paths())
        assert (await get(edge.port, "/a/../ro/x"))[0] == 200
        assert member.paths() == ["/ro/x"]


async def test_static_roots_hold_for_every_spelling(member: Recorder, tmp_path: Path) -> None:
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key").write_text("SECRET")
    (tmp_path / "site.css").write_text("body{}")
    async with running_edge(_routing_config(member, str(tmp_path))) as edge:
        assert await get(edge.port, "/static/x/../site.css") == (200, b"body{}")
        for target in [
            "/static/private/key",
            "/static//private/key",
            "/static/./private/key",
            "/static/x/../private/key",
            "/static/%70rivate/key",
            "/static/%2e/private/key",
            "/static/x/%2E%2E/private/key",
            "/x/../static/private/key",
            "//static//private//key",
        ]:
            assert await get(edge.port, target) == (403, b"no"), target
        for target in ["/static/private%2fkey", "/static/x/..%2fprivate/key", "/static\\private\\key"]:
            status, body = await get(edge.port, target)
            assert status == 400 and b"SECRET" not in body, target
        assert member.seen == []


# --- Host: what the key uses is what the member gets ----------------------------------------


def _cache_config(member: Recorder, **route: Any) -> dict[str, Any]:
    return {
        "pool": {"ap": {"members": [{"address": f"127.0.0.1:{member.port}"}]}},
        "route": [{"name": "app", "path": "/", "pool": "ap", **route}],
        "cache": {"enabled": True, "cluster_purge": False},
    }


async def test_a_host_variant_never_poisons_the_cache(member: Recorder) -> None:
    member.cache_control = "max-age=60"
    async with running_edge(_cache_config(member)) as edge:
        for i, host in enumerate(["www.example.test:1337", "WWW.Example.Test.", "www.EXAMPLE.test.:8080"]):
            status, body = await get(edge.port, f"/page{i}", host=host)
            assert (status, body) == (200, b"www.example.test|-"), host
            assert member.seen[-1][2]["host"] == "www.example.test"
            assert member.seen[-1][2]["x-forwarded-host"] == "www.example.test"
            # Another client asking the plain name gets the same entry, built from the same Host.
            assert await get(edge.port, f"/page{i}") == (200, b"www.example.test|-")
        assert len(member.seen) == 3


BAD_HOSTS = [
    'a";for=6.6.6.6',
    "a;for=6.6.6.6",  # ';' is a sub-delim: valid, and quoted in Forwarded (checked below)
    "evil.test/x",
    "a@b.test",
    "a b",
    "[::1",
    "[::1]x",
    "[v1.fe]",
    "[fe80::1%25eth0]",
    "[1.2.3.4]",
    "x:99999",
    "x:8o",
    "x:-1",
    ":80",
    "x:1:2",
    "a%zz.test",
    "a\\b",
    "a<b>",
    "...",
]


async def test_hosts_outside_rfc_3986_get_400(member: Recorder) -> None:
    async with running_edge(_cache_config(member, cache=False)) as edge:
        for host in BAD_HOSTS:
            status, _ = await get(edge.port, "/", host=host)
            if host.startswith("a;"):
                assert status == 200
                fwd = member.seen[-1][2]["forwarded"]
                assert fwd == 'for=127.0.0.1;proto=http;host="a;for=6.6.6.6"', fwd
                continue
            assert status == 400, (host, status)
        for host in ["[::1]:80", "[2001:DB8::1]", "127.0.0.1:8080", "x:", "a-b_c~d.test", ""]:
            assert (await get(edge.port, "/", host=host))[0] == 200, host
        hosts = [h["host"] for _, _, h in member.seen[1:]]
        assert hosts[:5] == ["[::1]", "[2001:db8::1]", "127.0.0.1", "x", "a-b_c~d.test"]
        assert hosts[5] == f"127.0.0.1:{member.port}"  # no Host at all: the member's address


async def test_forwarded_carries_one_element_built_from_validated_values(member: Recorder) -> None:
    async with running_edge(_cache_config(member, cache=False)) as edge:
        assert (await get(edge.port, "/", host="Www.Example.Test:8080"))[0] == 200
        fwd = member.seen[-1][2]["forwarded"]
        assert fwd == 'for=127.0.0.1;proto=http;host="www.example.test"'
        status, _ = await get(edge.port, "/", host='x", for=1.2.3.4;host="y')
        assert status == 400
        assert len(member.seen) == 1


# --- Connection: never removes what the edge or the key relies on ------------------------------


async def test_connection_options_never_remove_host_or_end_to_end_fields(member: Recorder) -> None:
    cfg = _cache_config(member, cache=False, cache_key_headers=["X-Tenant"])
    cfg["pool"]["ap"]["hash_key"] = "header:X-Shard"
    async with running_edge(cfg) as edge:
        extra = (
            "Connection: keep-alive, Host, X-Forwarded-For, Forwarded, Accept-Language, Cookie, "
            "Authorization, X-Tenant, X-Shard, X-Hop\r\n"
            "Accept-Language: fr\r\nCookie: a=1\r\nAuthorization: Bearer t\r\n"
            "X-Tenant: t1\r\nX-Shard: s1\r\nX-Hop: 1\r\n"
        )
        assert (await get(edge.port, "/", extra=extra))[0] == 200
        seen = member.seen[-1][2]
        assert seen["host"] == HOST
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["forwarded"].startswith("for=127.0.0.1;")
        for name, value in [("accept-language", "fr"), ("cookie", "a=1"), ("authorization", "Bearer t"),
                            ("x-tenant", "t1"), ("x-shard", "s1")]:  # fmt: skip
            assert seen.get(name) == value, name
        # A field that is hop-by-hop by the client's word is still removed (RFC 9110 7.6.1).
        assert "x-hop" not in seen


async def test_connection_options_never_change_a_cached_variant(member: Recorder) -> None:
    member.cache_control = "max-age=60"
    member.vary = "Accept-Language, X-Device"
    async with running_edge(_cache_config(member)) as edge:
        extra = "Connection: Accept-Language, X-Device\r\nAccept-Language: fr\r\nX-Device: mobile\r\n"
        assert await get(edge.port, "/v", extra=extra) == (200, b"www.example.test|fr")
        assert member.seen[-1][2].get("x-device") == "mobile"
        # The French mobile variant is the one the member built for French mobile clients.
        assert await get(edge.port, "/v", extra="Accept-Language: fr\r\nX-Device: mobile\r\n") == (
            200,
            b"www.example.test|fr",
        )
        assert len(member.seen) == 1


# --- forward proxy: loopback targets only ------------------------------------------------------


async def _via_proxy(proxy: int, url: str) -> int:
    host = url.split("/")[2]
    resp = await raw_request(
        proxy, f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    )
    return 0 if resp is None else resp.status


async def test_the_forward_proxy_keeps_plain_http_off_high_ports_by_default(member: Recorder) -> None:
    # Loopback allowed here so that only the port rule is tested; the member stands for an
    # internal service on a high port (an admin listener, a database's HTTP API).
    cfg = {
        "forward": {"enabled": True, "port": 0, "deny_networks": [], "hosts": {"internal.test": "127.0.0.1"}}
    }
    async with running_edge(cfg) as edge:
        assert edge.forward is not None
        assert await _via_proxy(edge.forward.port, f"http://internal.test:{member.port}/") == 403
        assert await _via_proxy(edge.forward.port, f"http://127.0.0.1:{member.port}/") == 403
    assert member.seen == []
    # An operator opens a port and a range explicitly.
    cfg["forward"] |= {
        "http_ports": [member.port],
        "deny_networks": ["127.0.0.0/8"],
        "allow_networks": ["127.0.0.1/32"],
    }
    async with running_edge(cfg) as edge:
        assert edge.forward is not None
        assert await _via_proxy(edge.forward.port, f"http://internal.test:{member.port}/") == 200
        assert await _via_proxy(edge.forward.port, f"http://127.0.0.2:{member.port}/") == 403
    assert len(member.seen) == 1


# --- the sample AP's admin endpoint ------------------------------------------------------------


async def test_no_client_can_flip_the_sample_aps_health_through_the_edge() -> None:
    from sampleapp.main import start_app

    token = "sample-admin-token-0123"
    runner, port = await start_app("127.0.0.1", 0, "ap", admin_token=token)
    try:
        cfg = {
            "pool": {"ap": {"members": [{"address": f"127.0.0.1:{port}"}]}},
            "route": [{"path": "/", "pool": "ap"}],
        }
        async with running_edge(cfg) as edge:
            for extra in [
                "",
                "Authorization: Bearer \r\n",
                "Authorization: Bearer sample-admin-token-012\r\n",
            ]:
                status, _ = await get(edge.port, "/admin/health?ok=0", method="POST", extra=extra)
                assert status == 403, extra
                assert (await get(edge.port, "/healthz"))[0] == 200
            # The operator, with the token, still can.
            status, _ = await get(
                port, "/admin/health?ok=0", method="POST", extra=f"Authorization: Bearer {token}\r\n"
            )
            assert status == 200 and (await get(port, "/healthz"))[0] == 503
    finally:
        await runner.cleanup()
    # Without a token nobody may use it, the operator included.
    runner, port = await start_app("127.0.0.1", 0, "ap")
    try:
        assert (await get(port, "/admin/health?ok=0", method="POST"))[0] == 403
        assert (await get(port, "/healthz"))[0] == 200
    finally:
        await runner.cleanup()


# --- forward proxy Basic auth: failures limited per client -------------------------------------


async def test_a_client_guessing_proxy_passwords_is_stopped(member: Recorder) -> None:
    import base64

    from edge.front.forward.auth import MAX_FAILURES, hash_password

    cfg = {
        "forward": {
            "enabled": True,
            "port": 0,
            "deny_networks": [],
            "http_ports": [member.port],
            "users": {"alice": hash_password("s3cret", 1000)},
        }
    }

    async def ask(source: str, user: str, password: str) -> tuple[int, str | None]:
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.forward.port, local_addr=(source, 0))
        writer.write(
            f"GET http://127.0.0.1:{member.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{member.port}\r\n"
            f"Proxy-Authorization: Basic {credentials}\r\nConnection: close\r\n\r\n".encode()
        )
        from edge.testing import read_response

        resp = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        return resp.status, resp.header("retry-after")

    async with running_edge(cfg) as edge:
        assert edge.forward is not None
        for i in range(MAX_FAILURES):
            assert (await ask("127.0.0.2", f"user{i % 3}", f"guess{i}"))[0] == 407
        status, retry = await ask("127.0.0.2", "alice", "guess-again")
        assert status == 429 and retry is not None and 1 <= int(retry) <= 60
        assert (await ask("127.0.0.2", "alice", "s3cret"))[0] == 429  # even the right one, for now
        assert (await ask("127.0.0.3", "alice", "s3cret"))[0] == 200  # others are not affected
    assert len(member.seen) == 1


# --- static files: dotfiles and files asked for as directories ---------------------------------


async def test_static_dotfiles_and_files_as_directories_are_404(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[remote]")
    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / "css").mkdir()
    (tmp_path / "css" / ".htpasswd").write_text("admin:x")
    (tmp_path / "css" / "site.css").write_text("body{}")
    (tmp_path / ".well-known").mkdir()
    (tmp_path / ".well-known" / "security.txt").write_text("Contact: x")
    cfg = {
        "route": [
            {"path": "/open/", "static": str(tmp_path), "dotfiles": True},
            {"path": "/", "static": str(tmp_path)},
        ]
    }
    async with running_edge(cfg) as edge:
        for target in ["/.env", "/.git/config", "/.git/", "/css/.htpasswd", "/%2egit/config", "/%2Eenv",
                       "/css/../.env", "/x/..//.env", "/.git/./config"]:  # fmt: skip
            status, body = await get(edge.port, target)
            assert status == 404 and b"SECRET" not in body and b"remote" not in body, (target, status)
        for target in ["/css/site.css/", "/css/site.css/.", "/css/site.css//", "/css/site.css/x/.."]:
            assert (await get(edge.port, target))[0] == 404, target
        assert await get(edge.port, "/css/site.css") == (200, b"body{}")
        assert await get(edge.port, "/.well-known/security.txt") == (200, b"Contact: x")
        # A route that asks for them serves dotfiles.
        assert await get(edge.port, "/open/.env") == (200, b"SECRET=1")
        resp = await raw_request(edge.port, f"GET /c%73s HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert resp is not None and (resp.status, resp.header("location")) == (301, "/css/")


# --- the admin listener's purge API: mounted, as documented, behind the token -------------------


async def test_the_admin_listener_serves_the_purge_api_as_documented(member: Recorder) -> None:
    import aiohttp

    token = "purge-admin-token-0123"
    cfg = _cache_config(member)
    cfg["admin"] = {"port": 0, "token": token}
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as session:
        api = f"http://127.0.0.1:{edge.admin_port}/cache/purge"
        async with session.post(api, params={"prefix": "/"}) as r:
            assert r.status == 401
        async with session.post(api, params={"prefix": "/"}, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with session.post(
            api, params={"prefix": "/"}, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200 and (await r.json())["purged"] == 0
    readme = (Path(__file__).parents[2] / "edge" / "README.md").read_text()
    assert "does not\nmount" not in readme and "does not mount" not in readme
    assert "is mounted on the edge's admin listener" in readme


# --- the disk cache's files are the edge user's alone --------------------------------------------


async def test_disk_cache_files_are_0600_and_directories_0700(member: Recorder, tmp_path: Path) -> None:
    import os
    import stat

    from edge.features.cache.feature import CacheFeature

    member.cache_control = "max-age=60"
    root = tmp_path / "cache"
    cfg = _cache_config(member)
    cfg["cache"] |= {"disk_dir": str(root)}
    old_umask = os.umask(0o022)  # the usual umask, which gave 0644 files and 0755 directories
    try:
        async with running_edge(cfg) as edge:
            for i in range(5):
                assert (await get(edge.port, f"/doc{i}"))[0] == 200
            cache = next(f for f in edge.features if isinstance(f, CacheFeature))
            assert cache.disk is not None
            await cache.disk.flush()
            assert cache.disk.sweep() >= 0  # creates the sweep lock file too
    finally:
        os.umask(old_umask)
    files = dirs = 0
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            dirs += 1
            assert mode == 0o700, (path, oct(mode))
        else:
            files += 1
            assert mode == 0o600, (path, oct(mode))
    assert files >= 11 and dirs >= 6  # 5 bodies + 5 metas + the lock; root + levels
