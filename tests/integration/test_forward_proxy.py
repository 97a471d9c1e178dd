"""The forward proxy over real sockets: curl -x, allow/deny, 407, the client's address, the cache.

Every origin is a loopback server started by the test; names such as
"origin.test" reach it through `[forward] hosts`, never DNS.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from carousel.etcdserver import free_port
from edge.front.forward.auth import hash_password
from edge.front.server import Edge
from edge.testing import raw_request, running_edge
from sampleapp.main import start_app
from tests.procs import ProcessGroup, wait_for

pytestmark = pytest.mark.timeout(60)

NAMES = {"origin.test": "127.0.0.1", "www.blocked.test": "127.0.0.1", "ads7.other.test": "127.0.0.1"}


@pytest.fixture
async def origin() -> AsyncIterator[int]:
    runner, port = await start_app("127.0.0.1", 0, "origin")
    yield port
    await runner.cleanup()


def forward(**options: Any) -> dict[str, Any]:
    """An edge config with the forward proxy on a free port; loopback origins on free ports allowed."""
    return {
        "forward": {
            "enabled": True,
            "port": 0,
            "deny_networks": [],
            "http_ports": [80, "1024-65535"],
            "hosts": NAMES,
            **options,
        }
    }


@dataclass
class CurlResult:
    exit: int
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str


async def curl(proxy: int, url: str, *args: str) -> CurlResult:
    """curl -x through the proxy; the status and headers are those of the last response."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-i", "--max-time", "10", "-x", f"http://127.0.0.1:{proxy}", *args, url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    status, headers, body = 0, {}, out
    while body.startswith(b"HTTP/"):
        head, _, body = body.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert proc.returncode is not None
    return CurlResult(proc.returncode, status, headers, body, err.decode())


async def fetch_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return dict(await r.json())


async def stats(port: int) -> dict[str, Any]:
    """The origin's own request counters."""
    return await fetch_json(f"http://127.0.0.1:{port}/stats")


async def test_curl_fetches_from_an_origin_through_the_proxy(origin: int) -> None:
    async with running_edge(forward()) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"http://origin.test:{origin}/echo?x=1")
        assert (r.exit, r.status) == (0, 200), r.stderr
        seen = json.loads(r.body)
        assert (seen["ap"], seen["path"], seen["query"]) == ("origin", "/echo", "x=1")
        assert dict(seen["headers"])["Host"] == f"origin.test:{origin}"
        assert r.headers["via"] == "1.1 carousel"
        assert r.headers["server"] == "SampleAP/1.0"  # the origin's own answer, not rewritten
        # A request body goes through whole, and a POST is not cached nor replayed.
        r = await curl(edge.forward.port, f"http://127.0.0.1:{origin}/echo", "--data-binary", "x" * 5000)
        assert r.status == 200 and json.loads(r.body)["body_length"] == 5000
    assert (await stats(origin))["by_path"]["/echo"] == 2


async def test_keep_alive_and_pipelining_work_on_the_proxy_side(origin: int) -> None:
    async with running_edge(forward()) as edge:
        assert edge.forward is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.forward.port)
        try:
            one = f"GET http://origin.test:{origin}/echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            two = f"GET http://127.0.0.1:{origin}/echo?n=2 HTTP/1.1\r\nHost: y\r\n\r\n"
            writer.write((one + two).encode())
            from edge.testing import read_response

            first = await asyncio.wait_for(read_response(reader), 5)
            second = await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()
    assert json.loads(first.body)["query"] == "n=1" and json.loads(second.body)["query"] == "n=2"
    # The absolute-form authority is the Host the origin gets, whatever Host the client sent.
    assert dict(json.loads(second.body)["headers"])["Host"] == f"127.0.0.1:{origin}"


@pytest.mark.parametrize(
    ("rules", "host", "reason"),
    [
        ({"deny": {"exact": ["www.blocked.test"]}}, "www.blocked.test", "blocked by this proxy"),
        ({"deny": {"suffix": ["blocked.test"]}}, "www.blocked.test", "blocked by this proxy"),
        ({"deny": {"regex": [r"^ads?\d+\."]}}, "ads7.other.test", "blocked by this proxy"),
        ({"allow": {"suffix": ["origin.test"]}}, "www.blocked.test", "not on this proxy's list"),
    ],
)
async def test_a_denied_domain_gets_a_clear_403(
    origin: int, rules: dict[str, Any], host: str, reason: str
) -> None:
    async with running_edge(forward(**rules)) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"http://{host}:{origin}/echo")
        assert r.status == 403
        page = r.body.decode()
        assert "403 Forbidden" in page and reason in page.replace("&#x27;", "'") and host in page
        assert r.headers["content-type"].startswith("text/html") and "via" not in r.headers
        ok = await curl(edge.forward.port, f"http://origin.test:{origin}/echo")
        assert ok.status == 200  # the rule refuses only what it names
        text = await metrics(edge)
        assert 'carousel_edge_forward_refused_total{reason="' in text
    assert (await stats(origin))["by_path"] == {"/echo": 1}  # the refused request never reached it


async def metrics(edge: Edge) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{edge.admin_port}/metrics") as r:
        return await r.text()


async def test_loopback_and_link_local_are_refused_by_default_even_through_a_name(origin: int) -> None:
    cfg = forward(hosts={"sneaky.test": "127.0.0.1", "metadata.test": "169.254.169.254"})
    del cfg["forward"]["deny_networks"]  # the default list
    async with running_edge(cfg) as edge:
        assert edge.forward is not None
        for url in (
            f"http://127.0.0.1:{origin}/echo",  # a literal: refused before any connect
            f"http://sneaky.test:{origin}/echo",  # a name: refused once resolved
            "http://metadata.test/latest/meta-data/",
            f"http://[::ffff:127.0.0.1]:{origin}/echo",
        ):
            r = await curl(edge.forward.port, url)
            assert r.status == 403 and b"address is not allowed" in r.body, url
        # Nor can a client reach the edge's own admin listener through it.
        r = await curl(edge.forward.port, f"http://127.0.0.1:{edge.admin_port}/status")
        assert r.status == 403
    assert (await stats(origin))["by_path"] == {}


async def test_requests_that_are_not_proxy_requests_get_400(origin: int) -> None:
    async with running_edge(forward()) as edge:
        assert edge.forward is not None
        port = edge.forward.port
        r = await raw_request(port, b"GET /echo HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert r is not None and r.status == 400 and b"forward proxy" in r.body
        r = await raw_request(port, b"GET https://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert r is not None and r.status == 400 and b"CONNECT" in r.body
        r = await raw_request(port, b"GET http://user@origin.test/ HTTP/1.1\r\n\r\n")
        assert r is not None and r.status == 400
        r = await raw_request(port, b"GET http://origin.test:99999/ HTTP/1.1\r\n\r\n")
        assert r is not None and r.status == 400
        # Ambiguous framing is refused as on the reverse side.
        smuggle = f"POST http://origin.test:{origin}/echo HTTP/1.1\r\nContent-Length: 3\r\n"
        r = await raw_request(port, (smuggle + "Transfer-Encoding: chunked\r\n\r\n").encode())
        assert r is not None and r.status == 400
        r = await curl(port, "http://unresolvable.invalid/")
        assert r.status == 502 and b"does not resolve" in r.body
        closed = free_port()
        r = await curl(port, f"http://origin.test:{closed}/")
        assert r.status == 502 and b"refused the connection" in r.body
    assert (await stats(origin))["by_path"] == {}


async def test_a_missing_or_wrong_credential_gets_407(origin: int) -> None:
    users = {"alice": hash_password("wonderland", iterations=1000), "bob": "builder"}
    async with running_edge(forward(users=users, realm="lab proxy")) as edge:
        assert edge.forward is not None
        port = edge.forward.port
        url = f"http://origin.test:{origin}/echo"
        for args in ([], ["-U", "alice:wrong"], ["-U", "mallory:wonderland"], ["-U", "alice"]):
            r = await curl(port, url, *args)
            assert r.status == 407, args
            assert r.headers["proxy-authenticate"] == 'Basic realm="lab proxy", charset="UTF-8"'
        raw = await raw_request(
            port, f"GET {url} HTTP/1.1\r\nProxy-Authorization: Bearer abc\r\n\r\n".encode()
        )
        assert raw is not None and raw.status == 407
        for user in ("alice:wonderland", "bob:builder"):
            r = await curl(port, url, "-U", user)
            assert r.status == 200
            sent = {k.lower() for k, _ in json.loads(r.body)["headers"]}
            assert "proxy-authorization" not in sent and "proxy-connection" not in sent
    # The destination policy is not revealed before authentication.
    async with running_edge(forward(users=users, deny={"exact": ["www.blocked.test"]})) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"http://www.blocked.test:{origin}/")
        assert r.status == 407
        r = await curl(edge.forward.port, f"http://www.blocked.test:{origin}/", "-U", "bob:builder")
        assert r.status == 403
    assert (await stats(origin))["by_path"] == {"/echo": 2}


async def test_the_origin_never_sees_the_client_address(origin: int) -> None:
    client = "127.0.0.5"  # a source address of its own, so any trace of it is unmistakable
    spoof = ["-H", f"X-Forwarded-For: {client}", "-H", f"Forwarded: for={client}", "-H", "Via: 1.1 laptop"]
    async with running_edge(forward()) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"http://origin.test:{origin}/echo", "--interface", client, *spoof)
        assert r.status == 200, r.stderr
        seen = json.loads(r.body)
        assert seen["client"] == "127.0.0.1"  # the TCP peer is the proxy
        assert client not in json.dumps(seen["headers"])
        names = {k.lower() for k, _ in seen["headers"]}
        assert not names & {"x-forwarded-for", "forwarded", "x-real-ip"}
        assert dict(seen["headers"])["Via"] == "1.1 carousel"  # a pseudonym, not an address
    async with running_edge(forward(reveal_client=True)) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"http://origin.test:{origin}/echo", "--interface", client)
        headers = dict(json.loads(r.body)["headers"])
        assert headers["X-Forwarded-For"] == client and headers["Forwarded"] == f"for={client}"


@pytest.mark.skipif(
    importlib.util.find_spec("edge.features.cache") is None,
    reason="the RFC 9111 cache (edge/cache/, issue 5) is not in this tree; "
    "the forward chain adds it once it is",
)
async def test_a_second_fetch_of_a_cacheable_response_is_a_cache_hit(origin: int) -> None:
    cfg = {**forward(), "cache": {"enabled": True}}
    async with running_edge(cfg) as edge:
        assert edge.forward is not None
        port = edge.forward.port
        url = f"http://origin.test:{origin}/cacheable?max_age=60"
        first = await curl(port, url)
        second = await curl(port, url)
        assert first.status == second.status == 200 and first.body == second.body
        assert "hit" not in first.headers["cache-status"] and "hit" in second.headers["cache-status"]
        assert second.headers["via"] == "1.1 carousel" and "age" in second.headers
        # Another origin port is another origin: never answered from this entry.
        other_runner, other = await start_app("127.0.0.1", 0, "other")
        try:
            third = await curl(port, f"http://origin.test:{other}/cacheable?max_age=60")
            assert b"from other" in third.body and "hit" not in third.headers["cache-status"]
        finally:
            await other_runner.cleanup()
        assert "carousel_edge_forward_cache_outcomes_total" in await metrics(edge)
        # The reverse side's cache is another store: the forward entry is not in it.
        reverse = next((f for f in edge.features if hasattr(f, "store")), None)
        assert reverse is None or len(reverse.store) == 0
    assert (await stats(origin))["by_path"]["/cacheable"] == 1


async def test_limits_apply_as_on_the_reverse_side(origin: int) -> None:
    async with running_edge(forward(max_body_size=100, max_requests_per_connection=2)) as edge:
        assert edge.forward is not None
        port = edge.forward.port
        r = await curl(port, f"http://origin.test:{origin}/echo", "--data-binary", "x" * 101)
        assert r.status == 413
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            from edge.testing import read_response

            request = f"GET http://origin.test:{origin}/echo HTTP/1.1\r\n\r\n".encode()
            writer.write(request * 2)
            await asyncio.wait_for(read_response(reader), 5)
            last = await asyncio.wait_for(read_response(reader), 5)
            assert last.header("connection") == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
    async with running_edge(forward(read_timeout=0.3)) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"http://origin.test:{origin}/slow?ms=2000")
        assert r.status == 504 and b"did not answer in time" in r.body


async def test_the_edge_process_runs_the_forward_listener_and_stops_cleanly(
    origin: int, procs: ProcessGroup
) -> None:
    port, fport, admin = free_port(), free_port(), free_port()
    toml = f"""
[edge]
port = {port}
[admin]
port = {admin}
[forward]
enabled = true
port = {fport}
deny_networks = []
http_ports = [80, "1024-65535"]
hosts = {{ "origin.test" = "127.0.0.1" }}
"""
    d = procs.daemon("edge", "edge-forward", toml)
    await asyncio.to_thread(wait_for, lambda: "forward proxy listening" in d.output(), 15, what="edge up")
    r = await curl(fport, f"http://origin.test:{origin}/echo")
    assert r.status == 200
    # The access line names the destination and the origin address it reached.
    line = f"origin.test:{origin}"
    await asyncio.to_thread(wait_for, lambda: line in d.output(), 5, what="access log line")
    access = next(x for x in d.output().splitlines() if line in x)
    assert "forward" in access and "/echo" in access and "200" in access and "127.0.0.1" in access
    status = await fetch_json(f"http://127.0.0.1:{admin}/status")
    assert status["forward"]["port"] == fport
    d.signal(signal.SIGTERM)
    assert await asyncio.to_thread(d.wait, 15) == 0


async def test_max_forwards_on_trace_and_options(origin: int) -> None:
    async with running_edge(forward(users={"alice": "pw"})) as edge:
        assert edge.forward is not None
        port = edge.forward.port
        url = f"http://origin.test:{origin}/echo"
        auth = "Proxy-Authorization: Basic YWxpY2U6cHc=\r\n"  # alice:pw
        r = await raw_request(
            port, f"TRACE {url} HTTP/1.1\r\n{auth}Max-Forwards: 0\r\nX-Probe: 1\r\n\r\n".encode()
        )
        assert r is not None and r.status == 200 and r.header("content-type") == "message/http"
        assert r.body.startswith(b"TRACE /echo HTTP/1.1\r\n") and b"X-Probe: 1" in r.body
        assert b"Proxy-Authorization" not in r.body  # never echoed
        r = await raw_request(port, f"OPTIONS {url} HTTP/1.1\r\n{auth}Max-Forwards: 0\r\n\r\n".encode())
        assert r is not None and r.status == 200 and "CONNECT" in (r.header("allow") or "")
        assert (await stats(origin))["by_path"] == {}  # both answered by the proxy
        r = await raw_request(port, f"OPTIONS {url} HTTP/1.1\r\n{auth}Max-Forwards: 3\r\n\r\n".encode())
        assert r is not None and r.status == 200
        assert dict(json.loads(r.body)["headers"])["Max-Forwards"] == "2"
