"""Responses built from stored entries: hits, 304s, byte ranges, and the Cache-Status field.

Every function here builds fresh objects (a new header multidict, a new body
wrapper) around the shared stored data: a stored entry is never mutated by the
response path, and its body bytes are never copied.
"""

from __future__ import annotations

import os
from email.utils import formatdate

from multidict import CIMultiDict

from edge.core.fields import parse_range
from edge.core.pipeline import EMPTY, Body, BodyWriter, BytesBody, FileBody, Reply
from edge.features.cache.fields import Headers
from edge.features.cache.policy import NOT_MODIFIED_FIELDS, not_modified
from edge.features.cache.store import Entry


class HeadOnly(Body):
    """No bytes, but a known length (HEAD answered from a disk entry)."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
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
    if status == 200 and "Range" in request and not entry.transformed:
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
    """One byte range of a complete stored 200 (several ranges: the whole body, as RFC allows)."""
    if_range = request.get("If-Range")
    if if_range is not None:
        if_range = if_range.strip()
        # Strong comparison only: a weak ETag never validates a range.
        validator = entry.etag if if_range.startswith(('"', "W/")) else entry.last_modified
        if if_range.startswith("W/") or validator != if_range:
            return Reply(200, headers, body, entry.reason)
    size = entry.length
    rng = parse_range(request.get("Range", ""), size)
    if rng is None:
        return Reply(200, headers, body, entry.reason)
    if not isinstance(rng, tuple):  # unsatisfiable
        body.close()
        headers["Content-Range"] = f"bytes */{size}"
        return Reply(416, headers, EMPTY)
    start, end = rng
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if isinstance(body, BytesBody):
        part: Body = BytesBody(body.data[start : end + 1])
    elif isinstance(body, FileBody):
        part = FileBody(body.fd, body.offset + start, end - start + 1)
    else:
        part = HeadOnly(end - start + 1)
    return Reply(206, headers, part)


def not_modified_from(reply: Reply) -> Reply:
    """A 304 in place of a fetched 200 whose validators match the client's conditional request."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name in (*NOT_MODIFIED_FIELDS, "Age", "Cache-Status"):
        for value in reply.headers.getall(name, ()):
            headers.add(name, value)
    return Reply(304, headers, EMPTY)
