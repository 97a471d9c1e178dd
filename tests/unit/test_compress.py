"""Compression decisions and streams without sockets."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import brotli
from multidict import CIMultiDict

from edge.core.config import from_dict
from edge.core.pipeline import Body, BytesBody, Reply
from edge.features.compress import CompressedStream, Compression, _add_vary, _complete_length


def compression(**options: object) -> Compression:
    return Compression(from_dict({"compression": {"enabled": True, **options}}))


class Chunks(Body):
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.length = None
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        for p in self.parts:
            yield p

    def close(self) -> None:
        self.closed = True


def test_coding_is_the_servers_preference_among_what_the_client_accepts() -> None:
    c = compression()
    assert c.choose("gzip, deflate, br") == "br"
    assert c.choose("gzip;q=1.0, br;q=0.1") == "br"  # any q > 0 counts: the cache keys on the set
    assert c.choose("br;q=0, gzip") == "gzip"
    assert c.choose("*") is None  # only named codings: "*" would make variants ambiguous
    assert c.choose("identity") is None and c.choose(None) is None and c.choose("") is None
    assert compression(encodings=["gzip", "br"]).choose("br, gzip") == "gzip"


def test_candidates() -> None:
    c = compression(min_size=100)

    def reply(status: int = 200, body: bytes = b"x" * 200, **headers: str) -> Reply:
        h = CIMultiDict({"Content-Type": "text/html; charset=utf-8"})
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        return Reply(status, h, BytesBody(body))

    assert c.candidate(reply())
    assert c.candidate(reply(content_type="application/json"))
    assert c.candidate(reply(content_type="image/svg+xml"))
    assert not c.candidate(reply(content_type="image/png"))
    assert not c.candidate(reply(body=b"tiny"))
    assert not c.candidate(reply(content_encoding="gzip"))
    assert c.candidate(reply(content_encoding="identity"))
    assert not c.candidate(reply(cache_control="public, No-Transform"))
    assert not c.candidate(reply(content_range="bytes 0-1/2"))
    assert not c.candidate(reply(status=206)) and not c.candidate(reply(status=304))
    assert c.candidate(reply(status=404))


def test_vary_gains_accept_encoding_once() -> None:
    h: CIMultiDict[str] = CIMultiDict()
    _add_vary(h)
    assert h.getall("Vary") == ["Accept-Encoding"]
    _add_vary(h)
    assert h.getall("Vary") == ["Accept-Encoding"]
    h = CIMultiDict({"Vary": "Cookie"})
    _add_vary(h)
    assert h["Vary"] == "Cookie, Accept-Encoding"
    h = CIMultiDict({"Vary": "*"})
    _add_vary(h)
    assert h["Vary"] == "*"


async def test_streams_compress_chunk_by_chunk_and_decode_whole() -> None:
    c = compression()
    parts = [bytes([65 + i % 26]) * 70_000 for i in range(5)]  # one above the thread threshold each
    for coding, decode in (("gzip", gzip.decompress), ("br", brotli.decompress)):
        inner = Chunks(parts)
        stream = CompressedStream(inner, c.compressor(coding, text=True))
        out = b"".join([chunk async for chunk in stream.chunks()])
        assert decode(out) == b"".join(parts)
        stream.close()
        assert inner.closed


def test_whole_bodies_round_trip() -> None:
    c = compression(gzip_level=9, brotli_quality=11)
    data = b"<p>hello</p>\n" * 1000
    assert gzip.decompress(c.compress(data, "gzip", True)) == data
    assert brotli.decompress(c.compress(data, "br", True)) == data


def test_complete_length_of_a_content_range() -> None:
    assert _complete_length("bytes 0-9/3800") == 3800
    assert _complete_length("BYTES 5-5/6") == 6
    # Unknown length, another unit, garbage, and a latin-1 character that str.isdigit accepts.
    for value in ("bytes 0-9/*", "items 1-2/5", "", "bytes", "bytes 0-9/\xb2", "bytes 0-9/-1"):
        assert _complete_length(value) is None, value
