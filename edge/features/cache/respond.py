"""Responses built from stored entries: hits, 304s, byte ranges, and the Cache-Status field.

Every function here builds fresh objects (a new header multidict, a new body
wrapper) around the shared stored data: a stored entry is never mutated by the
response path, and its body bytes are never copied.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from email.utils import formatdate, parsedate_to_datetime

from multidict import CIMultiDict

from edge.core.pipeline import EMPTY, Body, BodyWriter, BytesBody, FileBody, Reply
from edge.features.cache.fields import Headers
from edge.features.cache.policy import NOT_MODIFIED_FIELDS, not_modified
from edge.features.cache.store import Entry


class HeadOnly(Body):
    """No bytes, but a known length (HEAD answered from a disk entry)."""

    __slots__ = ("length",)

    def __init__(self, length: int | None) -> None:
        self.length = length

    async def write_to(self, out: BodyWriter) -> None:
        return None


def http_date(ts: float) -> str:
    """An IMF-fixdate."""
    return formatdate(ts, usegmt=True)


def entry_body(entry: Entry, head: bool) -> Body | None:
    """The body of a stored entry (memory or disk); None if its disk file is gone."""
    if entry.body is not None:
        return BytesBody(entry.body)
    if head:
        return HeadOnly(entry.length)
    assert entry.disk_path is not None
    try:
        fd = os.open(entry.disk_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    size = os.fstat(fd).st_size
    if size < entry.length:
        os.close(fd)
        return None
    return FileBody(fd, size - entry.length, entry.length)


def from_entry(
    entry: Entry,
    request: Headers,
    method: str,
    age: float,
    cache_status: str | None,
) -> Reply | None:
    """The reply for a request answered from a stored entry (200, 304, 206 or 416)."""
    if 200 <= entry.status < 300 and ("If-None-Match" in request or "If-Modified-Since" in request):
        if not_modified(request, entry.etag, entry.last_modified, entry.date, entry.response_time):
            return not_modified_reply(entry, age, cache_status)
    body = entry_body(entry, method == "HEAD")
    if body is None:
        return None
    headers = entry.reply_headers()
    headers.add("Age", str(int(age)))  # never stored, so add() (cheaper than a replace)
    if cache_status is not None:
        headers.add("Cache-Status", cache_status)
    status = entry.status
    # Range handling is defined for GET only; HEAD ignores it (RFC 9110 14.2).
    if status == 200 and method == "GET" and "Range" in request and not entry.transformed:
        return _ranged(entry, request, headers, body)
    return Reply(status, headers, body, entry.reason)


def not_modified_reply(entry: Entry, age: float, cache_status: str | None) -> Reply:
    """A 304 for the stored response, with the fields RFC 9110 15.4.5 asks for."""
    headers: CIMultiDict[str] = CIMultiDict()
    wanted = {n.lower() for n in NOT_MODIFIED_FIELDS}
    for name, value in entry.fields:
        if name.lower() in wanted:
            headers.add(name, value)
    headers["Age"] = str(int(age))
    if cache_status is not None:
        headers.add("Cache-Status", cache_status)
    return Reply(304, headers, EMPTY)


def _ranged(entry: Entry, request: Headers, headers: CIMultiDict[str], body: Body) -> Reply:
    """Byte ranges of a complete stored 200 (RFC 9110 14): 206 single or multipart, 416, or the 200."""
    whole = Reply(200, headers, body, entry.reason)
    if_range = request.get("If-Range")
    if if_range is not None and not _if_range_holds(if_range.strip(), entry):
        return whole
    size = entry.length
    ranges = parse_ranges(request.get("Range", ""), size)
    if ranges is None:
        return whole
    if not ranges:  # none satisfiable (RFC 9110 15.5.17)
        body.close()
        headers["Content-Range"] = f"bytes */{size}"
        return Reply(416, headers, EMPTY)
    if len(ranges) == 1:
        start, end = ranges[0]
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Reply(206, headers, _slice(body, start, end - start + 1))
    return _multipart(entry, headers, body, ranges)


def _slice(body: Body, start: int, length: int) -> Body:
    if isinstance(body, BytesBody):
        return BytesBody(body.data[start : start + length])
    if isinstance(body, FileBody):
        return FileBody(body.fd, body.offset + start, length, owned=body.owned)
    return HeadOnly(length)


def _multipart(entry: Entry, headers: CIMultiDict[str], body: Body, ranges: list[tuple[int, int]]) -> Reply:
    """multipart/byteranges (RFC 9110 14.6): each part with its Content-Type and Content-Range."""
    size = entry.length
    boundary = secrets.token_hex(12)
    content_type = headers.get("Content-Type")
    part_head = f"\r\n--{boundary}\r\n"
    if content_type is not None:
        part_head += f"Content-Type: {content_type}\r\n"
    pieces: list[bytes | tuple[int, int]] = []
    for start, end in ranges:
        pieces.append(f"{part_head}Content-Range: bytes {start}-{end}/{size}\r\n\r\n".encode("latin-1"))
        pieces.append((start, end - start + 1))
    pieces.append(f"\r\n--{boundary}--\r\n".encode("latin-1"))
    headers["Content-Type"] = f"multipart/byteranges; boundary={boundary}"
    return Reply(206, headers, PartsBody(body, pieces))


class PartsBody(Body):
    """A multipart body: literal part heads, and ranges of a stored body (memory or file)."""

    __slots__ = ("length", "pieces", "source")

    def __init__(self, source: Body, pieces: list[bytes | tuple[int, int]]) -> None:
        self.source = source
        self.pieces = pieces
        self.length = sum(len(p) if isinstance(p, bytes) else p[1] for p in pieces)

    async def chunks(self) -> AsyncIterator[bytes]:
        source = self.source
        for piece in self.pieces:
            if isinstance(piece, bytes):
                yield piece
                continue
            start, length = piece
            if isinstance(source, BytesBody):
                yield source.data[start : start + length]
            elif isinstance(source, FileBody):
                async for chunk in FileBody(source.fd, source.offset + start, length, owned=False).chunks():
                    yield chunk

    def close(self) -> None:
        self.source.close()


# A Range with more parts than this is answered with the whole representation, which
# RFC 9110 14.2 allows ("many small ranges"): a part costs far more than its bytes.
MAX_RANGES = 32


def parse_ranges(value: str, size: int) -> list[tuple[int, int]] | None:
    """Satisfiable byte ranges (first, last inclusive), merged when they overlap or touch.

    None means ignore the field (another unit, bad syntax, too many parts: send the 200);
    an empty list means nothing is satisfiable (416). RFC 9110 14.1.1-14.1.2, 14.2.
    """
    unit, eq, spec = value.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",")]
    specs = [s for s in specs if s]  # 1#range-spec allows empty list elements
    if not specs or len(specs) > MAX_RANGES:
        return None
    out: list[tuple[int, int]] = []
    for item in specs:
        first, dash, last = item.partition("-")
        if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
            return None
        if first == "":
            if last == "":
                return None
            n = int(last)
            if n > 0 and size > 0:  # a suffix-length of 0 is unsatisfiable
                out.append((max(0, size - n), size - 1))
            continue
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None  # invalid range-spec: the whole field is ignored
        if start < size:
            out.append((start, min(end, size - 1)))
    if len(out) < 2:
        return out
    # Coalescing overlapping or adjacent ranges is allowed (14.6) and keeps a client
    # from making the edge send the same bytes many times over.
    out.sort()
    merged = [out[0]]
    for start, end in out[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end + 1:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged


def _if_range_holds(value: str, entry: Entry) -> bool:
    """If-Range (RFC 9110 13.1.5): a strong ETag match, or the exact Last-Modified when strong."""
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        etag = entry.etag
        return etag is not None and not etag.startswith("W/") and etag == value
    if entry.last_modified is None:
        return False
    try:
        asked = parsedate_to_datetime(value).timestamp()
        modified = parsedate_to_datetime(entry.last_modified).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    # A Last-Modified is strong only if the response's Date is at least a second later (8.8.2.2).
    return asked == modified and entry.date - modified >= 1


def not_modified_from(reply: Reply) -> Reply:
    """A 304 in place of a fetched 200 whose validators match the client's conditional request."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name in (*NOT_MODIFIED_FIELDS, "Age", "Cache-Status"):
        for value in reply.headers.getall(name, ()):
            headers.add(name, value)
    return Reply(304, headers, EMPTY)
