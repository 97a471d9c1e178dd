"""Cache keys: the primary key of a request, its route's extra key parts, and Vary matching.

The primary key is ``scheme://host/path?query``: the Host is always part of it,
normalised like routing does (lower case, no port, no trailing dot) and sent to
the member as it is in the key; the path is the parser's normalised one (the
path the member gets, edge/http1.py) and the query is as the client sent it.
Only GET and HEAD are looked up or stored, and they share entries, so the
method class needs no room in the key.

A route may sort or drop query parameters (``cache_sort_query``,
``cache_ignore_query``) and add request headers or cookies to the key
(``cache_key_headers``, ``cache_key_cookies``). Those additions form the
"extra" part, matched like a Vary header so a URL purge still finds every
entry of the URL. Everything is compiled once per route.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from edge.core.fields import accepted_codings
from edge.core.routing import normalize_host

if TYPE_CHECKING:
    from edge.core.config import RouteConfig
    from edge.core.pipeline import Exchange
    from edge.core.routing import Route
    from edge.features.cache.fields import Headers


class KeyRule:
    """How one route turns a request into a cache key."""

    __slots__ = ("cookies", "headers", "ignore_all", "ignore_exact", "ignore_globs", "sort")

    def __init__(self, route: RouteConfig | None = None) -> None:
        ignore = route.cache_ignore_query if route is not None else []
        self.ignore_all = "*" in ignore
        self.ignore_exact = frozenset(p for p in ignore if not any(c in p for c in "*?["))
        self.ignore_globs = tuple(p for p in ignore if p != "*" and any(c in p for c in "*?["))
        self.sort = route.cache_sort_query if route is not None else False
        self.headers = tuple(route.cache_key_headers) if route is not None else ()
        self.cookies = tuple(route.cache_key_cookies) if route is not None else ()

    @property
    def has_extra(self) -> bool:
        return bool(self.headers or self.cookies)

    @property
    def plain(self) -> bool:
        """True when the key is the URL as sent (the fast path)."""
        return not (self.ignore_all or self.ignore_exact or self.ignore_globs or self.sort)

    def target(self, raw_path: str) -> str:
        """The path and query as they count in the key."""
        if self.plain:
            return raw_path
        path, sep, query = raw_path.partition("?")
        if not sep:
            return raw_path
        if self.ignore_all:
            return path
        params = [p for p in query.split("&") if p and not self._ignored(p.partition("=")[0])]
        if self.sort:
            params.sort()
        return f"{path}?{'&'.join(params)}" if params else path

    def _ignored(self, name: str) -> bool:
        if name in self.ignore_exact:
            return True
        return any(fnmatch.fnmatchcase(name, g) for g in self.ignore_globs)

    def primary(self, ex: Exchange) -> str:
        """The primary key of a request."""
        return f"{ex.scheme}://{ex.host}{self.target(ex.request.raw_path)}"

    def extra(self, ex: Exchange) -> str:
        """The route's extra key parts for this request ("" when the route adds none)."""
        if not self.has_extra:
            return ""
        h = ex.request.headers
        parts = [f"{name}:{','.join(h.getall(name, ()))}" for name in self.headers]
        if self.cookies:
            cookies = ex.request.cookies
            parts += [f"cookie:{name}={cookies.get(name, '')}" for name in self.cookies]
        return "\n".join(parts)


class RouteRules:
    """A route's cache options, compiled once."""

    __slots__ = ("key", "plain", "set_cookie")

    def __init__(self, route: Route) -> None:
        self.key = KeyRule(route.config)
        # WebSocket routes take the slower path, which lets Upgrade requests through.
        self.plain = self.key.plain and not self.key.has_extra and not route.config.websocket
        self.set_cookie = route.config.cache_set_cookie


def url_key(url: str, rule: KeyRule | None = None) -> tuple[str, str] | None:
    """(host, key path) of an absolute URL, or None if it is not one: for purges."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    slash = rest.find("/")
    authority, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    authority = authority.rpartition("@")[2]
    if not authority:
        return None
    target = target.partition("#")[0]
    return normalize_host(authority), (rule or DEFAULT_RULE).target(target)


DEFAULT_RULE = KeyRule()


# --- Vary ----------------------------------------------------------------------------------


def vary_value(name: str, headers: Headers) -> str:
    """One request field normalised for Vary matching (RFC 9111 4.1 allows consistent normalising)."""
    values = headers.getall(name, ())
    if not values:
        return "\x00"  # absent differs from empty
    joined = ",".join(values)
    if name == "accept-encoding":
        return accepted_codings(joined)
    return ",".join(p.strip() for p in joined.split(","))


def vary_values(names: tuple[str, ...], headers: Headers) -> tuple[str, ...]:
    """The normalised request values of the fields a response varies on."""
    return tuple(vary_value(n, headers) for n in names)
