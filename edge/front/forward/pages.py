"""The forward proxy's own answers: small HTML pages that say what happened and nothing internal.

Unlike the reverse side's pages (edge/errors.py), these name the destination the
client asked for and why it was refused: the client chose it, and a clear 403
("this proxy does not allow example.test") saves a support call. Anything the
client sent is HTML-escaped before it lands on a page.
"""

from __future__ import annotations

import math
from html import escape
from http import HTTPStatus

from multidict import CIMultiDict

from edge.core.pipeline import BytesBody, Reply

DENIED_REASONS = {
    "port": "Connections to this port are not allowed through this proxy",
    "denied": "This destination is blocked by this proxy's policy",
    "not-allowed": "This destination is not on this proxy's list of allowed destinations",
    "network": "The destination address is not allowed",
}


def page(status: int, message: str, destination: str = "") -> Reply:
    """An HTML page for ``status`` with a one-line explanation."""
    phrase = HTTPStatus(status).phrase
    where = f"<p>Destination: <code>{escape(destination)}</code></p>\n" if destination else ""
    html = (
        f"<!DOCTYPE html>\n<html><head><title>{status} {phrase}</title></head><body>\n"
        f"<h1>{status} {phrase}</h1>\n<p>{escape(message)}.</p>\n{where}</body></html>\n"
    )
    headers: CIMultiDict[str] = CIMultiDict(
        {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}
    )
    return Reply(status, headers, BytesBody(html.encode()))


def denied(reason: str, destination: str) -> Reply:
    """403 for a destination the policy refuses."""
    return page(403, DENIED_REASONS.get(reason, "This destination is not allowed"), destination)


def auth_required(challenge: str) -> Reply:
    """407 with the Basic challenge."""
    reply = page(407, "This proxy needs a user name and password (Proxy-Authorization)")
    reply.headers["Proxy-Authenticate"] = challenge
    return reply


def bad_target(detail: str) -> Reply:
    """400 for a request that is not a proxy request, or names no usable destination."""
    return page(400, detail)


def too_many_failures(retry_after: float) -> Reply:
    """429 for a client past its failed-login budget (no password is checked)."""
    reply = page(429, "Too many failed logins from this address; try again later")
    reply.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return reply
