"""The `compression` feature: gzip and brotli for compressible responses.

It sits inside the cache (edge/core/pipeline.py FEATURE_ORDER), so the cache stores
what it produces: each compressed variant is compressed once, then served from
memory, and ``Vary: Accept-Encoding`` (added here) keeps the variants apart.

Rules:

* Only GET/HEAD answers with status 200/203/404/410, a media type in ``types``
  and no Content-Encoding, Content-Range or ``Cache-Control: no-transform``
  are candidates. For those, ``Vary: Accept-Encoding`` is added whether or not
  this client gets a compressed body (a cache downstream must know).
* Never for Range requests (a range of a compressed body is not what the
  client asked for) and never below ``min_size`` bytes.
* The coding is the first of ``encodings`` (server preference) that the
  client's Accept-Encoding names with q > 0. Only that set counts, never the
  q-value order: the cache keys variants by the same set
  (edge/features/cache/key.py ``accepted_codings``), so what it stores for a set is what
  this feature would produce for every request with that set.
* A compressed body gets a weak ETag (RFC 9110 8.8.1: same meaning, other
  bytes); the origin's strong one goes to ``ex.notes["origin_etag"]`` so the
  cache revalidates with what the origin knows.
* A body in memory is compressed in one go (large ones in a thread); a file or
  a stream is compressed chunk by chunk as it is sent, never held whole.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

from edge.core.config import Config
from edge.core.fields import accepted_codings
from edge.core.pipeline import Body, BytesBody, EdgeContext, Exchange, Handler, NowHandler, Reply

try:
    import brotli
except ImportError:  # pragma: no cover - brotli is a dependency; stay useful without it
    brotli = None

COMPRESSIBLE_STATUS = frozenset({200, 203, 404, 410})
# Bodies above this are compressed in a thread, so the loop keeps serving others.
THREAD_THRESHOLD = 128 * 1024


def _gzip_compressor(level: int) -> Any:
    return zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container, mtime 0


class _BrotliStream:
    """brotli.Compressor with zlib's compress/flush names."""

    def __init__(self, quality: int, text: bool) -> None:
        mode = brotli.MODE_TEXT if text else brotli.MODE_GENERIC
        self._c = brotli.Compressor(quality=quality, mode=mode)

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.process(data))

    def flush(self) -> bytes:
        return bytes(self._c.finish())


class CompressedStream(Body):
    """Another body, compressed chunk by chunk while it is sent (length unknown: chunked)."""

    def __init__(self, inner: Body, compressor: Any) -> None:
        self.inner = inner
        self.compressor = compressor
        self.length = None

    async def chunks(self) -> AsyncIterator[bytes]:
        c = self.compressor
        async for chunk in self.inner.chunks():
            if len(chunk) > THREAD_THRESHOLD:
                out = await asyncio.to_thread(c.compress, chunk)
            else:
                out = c.compress(chunk)
            if out:
                yield out
        tail = c.flush()
        if tail:
            yield tail

    def close(self) -> None:
        self.inner.close()


class Compression:
    """The `compression` feature."""

    def __init__(self, config: Config) -> None:
        c = config.compression
        self.encodings = tuple(e for e in c.encodings if e != "br" or brotli is not None)
        self.min_size = c.min_size
        self.exact_types = frozenset(t.lower() for t in c.types if not t.endswith("/*"))
        self.type_prefixes = tuple(t.lower()[:-1] for t in c.types if t.endswith("/*"))
        self.gzip_level = c.gzip_level
        self.brotli_quality = c.brotli_quality
        self._types: dict[str, bool] = {}

    def _compressible_type(self, content_type: str) -> bool:
        known = self._types.get(content_type)
        if known is None:
            media = content_type.partition(";")[0].strip().lower()
            known = media in self.exact_types or media.startswith(self.type_prefixes)
            if len(self._types) < 4096:  # bounded: values come from members
                self._types[content_type] = known
        return known

    def choose(self, accept_encoding: str | None) -> str | None:
        """The coding for a request's Accept-Encoding (server preference), or None."""
        if not accept_encoding:
            return None
        accepted = accepted_codings(accept_encoding).split(",")
        for coding in self.encodings:
            if coding in accepted:
                return coding
        return None

    def candidate(self, reply: Reply) -> bool:
        """May this reply be compressed at all (for some client)?"""
        if reply.status not in COMPRESSIBLE_STATUS or reply.tunnel is not None:
            return False
        return self._eligible(reply.headers, reply.body.length)

    def _eligible(self, headers: Any, length: int | None, part: bool = False) -> bool:
        """Would a representation with these fields and this length be compressed for some client?
        (``part``: the fields are a 206's, whose Content-Range describes the part sent.)"""
        if headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            return False
        if not part and "Content-Range" in headers:
            return False
        if not self._compressible_type(headers.get("Content-Type", "")):
            return False
        if length is not None and length < self.min_size:
            return False
        return "no-transform" not in ",".join(headers.getall("Cache-Control", ())).lower()

    def _coding(self, ex: Exchange, reply: Reply) -> str | None:
        """The coding to apply to this reply for this request (None: send it as it is).
        Adds Vary: Accept-Encoding to every reply that could be compressed for someone."""
        if not self.candidate(reply):
            if reply.status == 304 or reply.status == 206:
                self._stands_for_200(ex, reply)
            return None
        _add_vary(reply.headers)
        request = ex.request
        if request.method == "HEAD" or "Range" in request.headers:
            return None
        return self.choose(request.headers.get("Accept-Encoding"))

    def _stands_for_200(self, ex: Exchange, reply: Reply) -> None:
        """A 304 or a 206 carries the Vary and ETag of the 200 that this request would get
        (RFC 9110 15.4.5, 15.3.7): Vary: Accept-Encoding where that 200 could be compressed,
        and, on a 304, the weak ETag of the compressed variant when this client would get one
        (a Range request never gets one, so a 206's ETag stays). The representation's length
        comes from a 206's Content-Range, or for a 304 from the terminal (the static files'
        ``representation_length``). A member's own 304 (a conditional passed through; the cache
        answers those it can from its stored variants) says nothing of the length, and rarely
        of the type (RFC 9110 15.4.5 advises against it; nginx sends none): see
        ``_member_304_compressible``."""
        headers = reply.headers
        if reply.status == 206:
            total = _complete_length(headers.get("Content-Range", ""))
            if total is not None and self._eligible(headers, total, part=True):
                _add_vary(headers)
            return
        length = ex.notes.get("representation_length")
        if length is None:
            if not self._member_304_compressible(ex, headers):
                return
        elif not self._eligible(headers, length):
            return
        _add_vary(headers)
        request = ex.request
        if request.method == "HEAD" or "Range" in request.headers:
            return
        if self.choose(request.headers.get("Accept-Encoding")) is not None:
            etag = headers.get("ETag")
            if etag is not None and not etag.startswith("W/"):
                headers["ETag"] = "W/" + etag

    def _member_304_compressible(self, ex: Exchange, headers: Any) -> bool:
        """Could the 200 a member's 304 stands for be compressed (so it says Vary)? By the 304's
        Content-Type when it names one (its length unknown); else only when the client's own
        If-None-Match holds the weak form of the member's strong ETag, which this feature gave
        to a compressed variant of it. Without either, the 304 goes as the member sent it."""
        if "Content-Type" in headers:
            return self._eligible(headers, None)
        etag = headers.get("ETag")
        if etag is None or etag.startswith("W/") or "Content-Encoding" in headers:
            return False
        weak = "W/" + etag
        return any(
            tag.strip() == weak for tag in ",".join(ex.request.headers.getall("If-None-Match", ())).split(",")
        )

    def _encoded(self, ex: Exchange, reply: Reply, coding: str, body: Body) -> Reply:
        """The reply with its new body and the fields that go with it."""
        headers = reply.headers
        reply.body = body
        headers["Content-Encoding"] = coding
        headers.popall("Content-Length", None)
        headers.popall("Accept-Ranges", None)
        etag = headers.get("ETag")
        if etag is not None:
            ex.notes["origin_etag"] = etag
            if not etag.startswith("W/"):
                headers["ETag"] = "W/" + etag
        ex.notes["compressed"] = coding
        return reply

    def now(self, ex: Exchange, call_next: NowHandler) -> Reply | None:
        # Innermost feature: what call_next runs is a terminal's pure (or idempotent) `now`,
        # so giving up (None) after it answered leaves nothing done twice.
        method = ex.request.method
        if (method != "GET" and method != "HEAD") or not ex.route.config.compress:
            return call_next(ex)
        reply = call_next(ex)
        if reply is None:
            return None
        coding = self._coding(ex, reply)
        if coding is None:
            return reply
        body = reply.body
        if type(body) is not BytesBody or len(body.data) > THREAD_THRESHOLD:
            return None  # compressed off the loop, or as a stream: the async path
        packed = self.compress(body.data, coding, reply.headers.get("Content-Type", "").startswith("text/"))
        if len(packed) >= len(body.data):
            return reply  # incompressible after all: identity is the better answer
        return self._encoded(ex, reply, coding, BytesBody(packed))

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        method = ex.request.method
        if (method != "GET" and method != "HEAD") or not ex.route.config.compress:
            return await call_next(ex)
        reply = await call_next(ex)
        coding = self._coding(ex, reply)
        if coding is None:
            return reply
        text = reply.headers.get("Content-Type", "").startswith("text/")
        body = reply.body
        if type(body) is BytesBody:
            data = body.data
            if len(data) > THREAD_THRESHOLD:
                packed = await asyncio.to_thread(self.compress, data, coding, text)
            else:
                packed = self.compress(data, coding, text)
            if len(packed) >= len(data):
                return reply  # incompressible after all: identity is the better answer
            return self._encoded(ex, reply, coding, BytesBody(packed))
        return self._encoded(ex, reply, coding, CompressedStream(body, self.compressor(coding, text)))

    def compressor(self, coding: str, text: bool) -> Any:
        """A streaming compressor with compress(data) and flush()."""
        if coding == "br":
            return _BrotliStream(self.brotli_quality, text)
        return _gzip_compressor(self.gzip_level)

    def compress(self, data: bytes, coding: str, text: bool) -> bytes:
        """Compress a whole body."""
        if coding == "br":
            mode = brotli.MODE_TEXT if text else brotli.MODE_GENERIC
            return bytes(brotli.compress(data, quality=self.brotli_quality, mode=mode))
        c = _gzip_compressor(self.gzip_level)
        return bytes(c.compress(data) + c.flush())


def _complete_length(content_range: str) -> int | None:
    """N of "bytes first-last/N", or None ("*", several ranges, or not a byte range)."""
    unit, _, rest = content_range.strip().partition(" ")
    total = rest.rpartition("/")[2]
    # isascii: a member's field is latin-1, where "\xb2" (superscript two) counts as a digit.
    return int(total) if unit.lower() == "bytes" and total.isascii() and total.isdigit() else None


def _add_vary(headers: Any) -> None:
    """Add Accept-Encoding to Vary unless it (or *) is there already."""
    names = {n.strip().lower() for v in headers.getall("Vary", ()) for n in v.split(",")}
    if "accept-encoding" in names or "*" in names:
        return
    if "Vary" in headers:
        headers["Vary"] = ", ".join([*headers.getall("Vary"), "Accept-Encoding"])
    else:
        headers["Vary"] = "Accept-Encoding"


def feature(config: Config, ctx: EdgeContext) -> Compression | None:
    """Factory for the pipeline: None unless [compression] enabled."""
    if not config.compression.enabled or not config.compression.encodings:
        return None
    return Compression(config)
