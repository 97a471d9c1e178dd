"""HTTP/2 to clients with independent clients (curl, nghttp, h2load) and the h2 package.

The same routes answer over HTTP/1.1 and HTTP/2 with the same bodies and fields:
static files, a cache hit with Cache-Status, a compressed answer, the proxied
echo. ALPN picks h2 and falls back to http/1.1; h2c works by prior knowledge
where it is on. Request bodies cross DATA frames and count against max_body_size;
shutdown sends GOAWAY and lets open streams finish.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame

from edge.front.h2stream import Stats
from edge.testing import raw_request, running_edge
from sampleapp.main import start_app
from tests.integration.test_h2_attacks import RawH2

pytestmark = pytest.mark.timeout(90)

STATIC = str(Path(__file__).resolve().parents[2] / "sampleapp" / "static")
needs_curl_h2 = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_nghttp = pytest.mark.skipif(
    shutil.which("nghttp") is None or shutil.which("h2load") is None,
    reason="nghttp/h2load missing (Debian package nghttp2-client)",
)


@pytest.fixture
async def ap() -> AsyncIterator[int]:
    runner, port = await start_app("127.0.0.1", 0, "ap1")
    yield port
    await runner.cleanup()


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem"), "ca": str(tmp_path / "ca.pem")}
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    shutil.copytree(STATIC, tmp_path / "static")
    # Big enough for the compression feature (min_size 1 KiB).
    (tmp_path / "static" / "big.js").write_text("function f(){return 1}\n" * 400)
    files["static"] = str(tmp_path / "static")
    return files


def config(ap: int, tls: dict[str, str], **http2: Any) -> dict[str, Any]:
    return {
        "http2": {"h2c": True, **http2},
        "tls": {"port": 0, "certificate": [{"cert_file": tls["cert"], "key_file": tls["key"]}]},
        "cache": {"enabled": True, "cluster_purge": False},  # no etcd in these tests
        "compression": {"enabled": True},
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{ap}"}]}},
        "route": [
            {"path": "/static/", "static": tls["static"]},
            {"path": "/", "pool": "app"},
        ],
    }


async def curl(*args: str) -> tuple[str, str]:
    """Run curl; (the response head as -D wrote it, the body)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-D", "-", "--max-time", "20", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    head, _, body = out.decode("latin-1").partition("\r\n\r\n")
    return head, body


def fields(head: str) -> dict[str, str]:
    """Response fields by lower-case name, minus the ones that differ by design (Date, framing)."""
    lines = head.split("\r\n")[1:]
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    for name in ("date", "connection", "keep-alive", "age"):
        out.pop(name, None)
    if "cache-status" in out:  # the remaining ttl may tick between the two fetches
        out["cache-status"] = re.sub(r"; ttl=\d+", "", out["cache-status"])
    return out


@needs_curl_h2
async def test_curl_gets_the_same_answers_over_h2_and_http1(ap: int, tls: dict[str, str]) -> None:
    async with running_edge(config(ap, tls)) as edge:
        base = f"https://localhost:{edge.tls_port}"
        ca = ["--cacert", tls["ca"]]
        # Warm the cache so both protocols see a hit.
        await curl(*ca, "--http1.1", f"{base}/cacheable?v=7")
        for path, extra in (
            ("/static/css/site.css", []),
            ("/cacheable?v=7", []),
            ("/static/big.js", ["-H", "Accept-Encoding: gzip"]),
            ("/echo?x=1", []),
        ):
            h1_head, h1_body = await curl(*ca, "--http1.1", *extra, f"{base}{path}")
            h2_head, h2_body = await curl(*ca, "--http2", *extra, f"{base}{path}")
            assert h1_head.startswith("HTTP/1.1 200"), h1_head
            assert h2_head.startswith("HTTP/2 200"), h2_head
            if path.startswith("/echo"):
                h1_echo, h2_echo = json.loads(h1_body), json.loads(h2_body)
                assert h1_echo["path"] == h2_echo["path"] == "/echo"
                h1_fields = {k.lower(): v for k, v in h1_echo["headers"]}
                h2_fields = {k.lower(): v for k, v in h2_echo["headers"]}
                assert h2_fields["x-forwarded-proto"] == "https"
                assert h1_fields == h2_fields  # the member cannot tell the protocols apart
                # Nor by the order: Host (from :authority) comes first, where curl puts it over HTTP/1.1.
                h1_names = [k.lower() for k, _ in h1_echo["headers"]]
                assert [k.lower() for k, _ in h2_echo["headers"]] == h1_names
                assert h1_names[0] == "host"
            else:
                assert h1_body == h2_body
            assert fields(h1_head) == fields(h2_head), path
            if path.startswith("/cacheable"):
                assert "hit" in fields(h2_head)["cache-status"]
            if extra:
                assert fields(h2_head)["content-encoding"] == "gzip"


@needs_curl_h2
async def test_alpn_falls_back_to_http1_and_can_be_turned_off(ap: int, tls: dict[str, str]) -> None:
    async with running_edge(config(ap, tls, enabled=False)) as edge:
        head, _ = await curl(
            "--cacert", tls["ca"], "--http2", f"https://localhost:{edge.tls_port}/static/css/site.css"
        )
        assert head.startswith("HTTP/1.1 200")
    async with running_edge(config(ap, tls)) as edge:
        head, _ = await curl(
            "--cacert", tls["ca"], "--http1.1", f"https://localhost:{edge.tls_port}/static/css/site.css"
        )
        assert head.startswith("HTTP/1.1 200")


@needs_curl_h2
async def test_h2c_prior_knowledge_only_where_it_is_on(ap: int, tls: dict[str, str]) -> None:
    async with running_edge(config(ap, tls)) as edge:
        head, body = await curl(
            "--http2-prior-knowledge", f"http://127.0.0.1:{edge.port}/static/css/site.css"
        )
        assert head.startswith("HTTP/2 200")
        assert body == (Path(STATIC) / "css" / "site.css").read_text()
        head, _ = await curl("--http1.1", f"http://127.0.0.1:{edge.port}/static/css/site.css")
        assert head.startswith("HTTP/1.1 200")  # the same listener still speaks HTTP/1.1
    async with running_edge(config(ap, tls, h2c=False)) as edge:
        answer = await raw_request(edge.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", wait=3)
        assert answer is None or answer.status >= 400  # not HTTP/2 here


@needs_nghttp
async def test_nghttp_and_h2load_over_tls(ap: int, tls: dict[str, str]) -> None:
    async with running_edge(config(ap, tls)) as edge:
        url = f"https://127.0.0.1:{edge.tls_port}/static/css/site.css"
        proc = await asyncio.create_subprocess_exec(
            "nghttp",
            "-nv",
            url,
            f"https://127.0.0.1:{edge.tls_port}/static/js/app1.js",
            stdout=subprocess.PIPE,
        )
        out = (await proc.communicate())[0].decode()
        assert proc.returncode == 0, out
        assert out.count(":status: 200") == 2
        assert "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100" in out
        proc = await asyncio.create_subprocess_exec(
            "h2load", "-n", "400", "-c", "4", "-m", "10", url, stdout=subprocess.PIPE
        )
        out = (await proc.communicate())[0].decode()
        assert "Application protocol: h2" in out
        assert "400 succeeded, 0 failed" in out, out


async def test_request_body_across_data_frames_and_max_body(ap: int, tls: dict[str, str]) -> None:
    data = config(ap, tls)
    data["edge"] = {"max_body_size": 50_000}
    async with running_edge(data) as edge:
        client = await RawH2.connect(edge.port)
        try:
            head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/echo")]
            client.send(HeadersFrame(1, client.block(head), flags=["END_HEADERS"]))
            for _ in range(4):  # within the 64 KiB windows: this client does no flow control
                client.send(DataFrame(1, b"z" * 10000))
            client.send(DataFrame(1, b"", flags=["END_STREAM"]))
            status, body = await client.response(1)
            assert status == 200 and json.loads(body)["body_length"] == 40000
            # Over max_body_size in DATA frames with no content-length: 413, then RST_STREAM NO_ERROR.
            client.send(HeadersFrame(3, client.block(head), flags=["END_HEADERS"]))
            for _ in range(6):
                client.send(DataFrame(3, b"z" * 10000))
            assert (await client.response(3))[0] == 413
            reset = await client.until(RstStreamFrame, stream=3)
            assert reset is not None and reset.error_code == ErrorCodes.NO_ERROR
            # A content-length over the limit is refused before any byte of the body.
            too_long = [*head, (b"content-length", b"200000")]
            client.send(HeadersFrame(5, client.block(too_long), flags=["END_HEADERS"]))
            assert (await client.response(5))[0] == 413
        finally:
            await client.close()


async def test_a_padded_request_body_with_trailers_reaches_the_member(ap: int, tls: dict[str, str]) -> None:
    """RFC 9113 8.1: trailers end the request (the member gets a Content-Length, not them)."""
    async with running_edge(config(ap, tls)) as edge:
        client = await RawH2.connect(edge.port)
        try:
            head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/echo")]
            client.send(HeadersFrame(1, client.block(head), flags=["END_HEADERS"]))
            client.send(DataFrame(1, b"z" * 1000, flags=["PADDED"], pad_length=20))
            trailers = client.block([(b"x-checksum", b"1")])
            client.send(HeadersFrame(1, trailers, flags=["END_HEADERS", "END_STREAM"]))
            status, body = await client.response(1)
            assert status == 200 and json.loads(body)["body_length"] == 1000
            # Trailers without END_STREAM are malformed: a stream error, the connection goes on.
            client.send(HeadersFrame(3, client.block(head), flags=["END_HEADERS"]))
            client.send(HeadersFrame(3, client.block([(b"x-checksum", b"1")]), flags=["END_HEADERS"]))
            reset = await client.until(RstStreamFrame, stream=3)
            assert reset is not None and reset.error_code == ErrorCodes.PROTOCOL_ERROR
            client.request(5, b"/echo")
            assert (await client.response(5))[0] == 200
        finally:
            await client.close()


async def test_shutdown_sends_goaway_and_finishes_open_streams(ap: int, tls: dict[str, str]) -> None:
    async with running_edge(config(ap, tls)) as edge:
        client = await RawH2.connect(edge.port)
        try:
            client.request(1, b"/slow?ms=800")
            await asyncio.sleep(0.2)
            stopping = asyncio.create_task(edge.stop())
            frame = await client.until(GoAwayFrame, wait=5)
            assert frame is not None and frame.error_code == ErrorCodes.NO_ERROR and frame.last_stream_id == 1
            client.request(3)  # after GOAWAY: refused, safe to retry elsewhere
            status, body = await client.response(1)
            assert status == 200 and body.startswith(b"slept 800 ms")
            reset = await client.until(RstStreamFrame, stream=3, wait=3)
            assert reset is None or reset.error_code == ErrorCodes.REFUSED_STREAM
            await stopping
        finally:
            await client.close()


async def test_metrics_count_h2_requests(ap: int, tls: dict[str, str]) -> None:
    before = Stats.streams
    async with running_edge(config(ap, tls)) as edge:
        client = await RawH2.connect(edge.port)
        try:
            client.request(1, b"/static/css/site.css")
            assert (await client.response(1))[0] == 200
        finally:
            await client.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{edge.admin_port}/metrics") as resp:
                text = await resp.text()
        assert f"carousel_edge_h2_streams_total {before + 1}.0" in text
        # The request counter the HTTP/1.1 side uses counted it too.
        assert re.search(r'carousel_edge_requests_total\{route="[^"]+",status="200"\} 1\.0', text), text
