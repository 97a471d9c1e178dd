"""strip_prefix: the route's decoded prefix taken off the percent-encoded path the member gets."""

from __future__ import annotations

import pytest

from edge.core.routing import strip_prefix


@pytest.mark.parametrize(
    ("raw", "prefix", "forwarded"),
    [
        ("/api/users?id=1", "/api", "/users?id=1"),
        ("/api", "/api", "/"),
        ("/api?x=1", "/api/", "/?x=1"),
        # The router matched the decoded path: the prefix must come off its encoded spelling.
        ("/a%20b/x", "/a b", "/x"),
        ("/a%20b/x", "/a b/", "/x"),
        ("/caf%C3%A9/menu%20du%20jour", "/café", "/menu%20du%20jour"),
        ("/caf%c3%a9/x", "/café/", "/x"),
        ("/%5Bv1%5D/x?q=%2F", "/[v1]", "/x?q=%2F"),
        # An encoded slash is data inside a segment, never the end of the prefix.
        ("/api%2Fx", "/api", "/api%2Fx"),
        ("/a%20b%2Fc/x", "/a b", "/a%20b%2Fc/x"),
        # Not under the prefix: as it came.
        ("/apix", "/api", "/apix"),
        ("/b/x", "/a b", "/b/x"),
        ("/x", "/", "/x"),
    ],
)
def test_the_decoded_prefix_is_taken_off_the_encoded_path(raw: str, prefix: str, forwarded: str) -> None:
    assert strip_prefix(raw, prefix) == forwarded
