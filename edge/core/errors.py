"""The edge's own error pages: small, fixed, and free of anything internal."""

from __future__ import annotations

from http import HTTPStatus

from multidict import CIMultiDict

from edge.core.pipeline import BytesBody, Reply


def _page(status: int) -> bytes:
    phrase = HTTPStatus(status).phrase
    return f"<html><body><h1>{status} {phrase}</h1></body></html>\n".encode()


_PAGES = {s: _page(s) for s in (400, 404, 405, 408, 413, 429, 500, 502, 503, 504)}


def error_reply(status: int, retry_after: int | None = None) -> Reply:
    """A small HTML error page; never names a member, an address or an exception."""
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/html; charset=utf-8"})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = _PAGES.get(status) or _page(status)
    return Reply(status, headers, BytesBody(body))
