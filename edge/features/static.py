"""Static files served by the edge itself (the notes' 30 images that never reach an AP).

Safety first: the path comes normalised by the parser (edge/http1.py), is
decoded exactly once, and anything that could climb out of the root is refused
with 404 before touching the disk: ``..`` or ``.`` segments (plain or
percent-encoded), a ``%`` left after decoding (double encoding), backslashes,
NUL bytes, and symlinks whose real path leaves the root. Segments starting with
``.`` (``/.env``, ``/.git/config``) are 404 unless the route sets ``dotfiles``,
``/.well-known/`` excepted (RFC 8615). A file asked for as a directory
(``/site.css/``) is 404, as on a file system. No directory is ever listed.

Speed: files up to ``SMALL_FILE`` bytes are kept in memory, keyed by path and
re-validated with one stat() per request (device, inode, size and mtime must match),
like nginx's open_file_cache but never serving a changed file. Such a file is
answered inside the connection's data_received (``now``, edge/core/pipeline.py),
with no task: its validators and type are serialised once per file
(``FileInfo.wire``, sent as they are, as a cache hit's stored fields are) and its
body object is shared by every answer. Larger files are sent from a descriptor
opened when the body is written: the edge writes the head and sendfile(2)s what the
socket takes at once from data_received too (edge/front/server.py ``_send``), and takes a
task only for a rest that has to wait for the client.
"""

from __future__ import annotations

import dataclasses
import mimetypes
import os
import stat
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import unquote

from multidict import CIMultiDict, istr

from edge.core.fields import parse_range
from edge.core.pipeline import BytesBody, Exchange, FileBody, Reply, Wire
from edge.core.routing import Route
from edge.http.http1 import SEEN_IF_MODIFIED_SINCE, SEEN_IF_NONE_MATCH, SEEN_RANGE, field_lines

SMALL_FILE = 64 * 1024
CACHE_ENTRIES = 4096
CACHE_BYTES = 64 * 1024 * 1024  # file contents kept in memory, at most
_NO_WIRE = Wire(b"", False, False)  # a directory's FileInfo: never sent
TEXT_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml")
# Looked up on every answer, absent from most requests: istr, folded once (edge/http/http1.py).
_IF_NONE_MATCH = istr("If-None-Match")
_IF_MODIFIED_SINCE = istr("If-Modified-Since")
_RANGE = istr("Range")
_CONDITIONS = SEEN_IF_NONE_MATCH | SEEN_IF_MODIFIED_SINCE | SEEN_RANGE


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What is known about one file: identity, validators, type, maybe its bytes."""

    path: str
    ident: tuple[int, int, int, int]  # (dev, ino, size, mtime_ns)
    size: int
    etag: str
    last_modified: str
    mtime: int
    content_type: str
    content: bytes | None
    base_headers: tuple[tuple[str, str], ...] = ()
    # The base headers serialised, and the body every in-memory answer shares (read-only).
    wire: Wire = _NO_WIRE
    body: BytesBody | None = None

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """The base headers (pipeline.StoredFields: what a reader of the reply's headers sees)."""
        return self.base_headers


def content_type_of(path: str) -> str:
    """Content-Type from the file name, with a charset for text."""
    ctype, encoding = mimetypes.guess_type(path)
    if encoding is not None or ctype is None:
        return "application/octet-stream"
    if ctype.startswith(TEXT_TYPES):
        return ctype + "; charset=utf-8"
    return ctype


def safe_relative_path(raw_path: str, prefix: str, dotfiles: bool = False) -> str | None:
    """The path below the route prefix, or None if the request path is unsafe (or names a
    dotfile, unless ``dotfiles``)."""
    raw = raw_path.split("?", 1)[0]
    if "\\" in raw or "\x00" in raw:
        return None
    try:
        decoded = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None
    if "%" in decoded or "\\" in decoded or "\x00" in decoded:
        return None  # double encoding, or an encoded backslash / NUL
    if not decoded.startswith(prefix.rstrip("/")):
        return None
    rest = decoded[len(prefix.rstrip("/")) :]
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    if not dotfiles and any(p[0] == "." and p != ".well-known" for p in parts):
        return None
    return "/".join(parts) + ("/" if rest.endswith("/") and parts else "")


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match (weak comparison)."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in header.split(","))


class StaticFiles:
    """Terminal handler for routes with `static = DIR`."""

    def __init__(self) -> None:
        self._cache: dict[str, FileInfo] = {}
        self._cached_bytes = 0
        self._roots: dict[str, str] = {}
        # (root, route prefix, dotfiles, raw path) -> (checked relative path, its path in the
        # root, the root, the relative path without its final slash): the safety checks, the
        # join and the root's realpath run once per URL.
        self._paths: dict[tuple[str, str, bool, str], tuple[str | None, str, str, str]] = {}

    def _root(self, directory: str) -> str:
        root = self._roots.get(directory)
        if root is None:
            root = self._roots[directory] = os.path.realpath(directory)
        return root

    def _info(self, root: str, rel: str, full: str = "") -> FileInfo | None:
        if not full:
            full = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(full)
        except (OSError, ValueError):
            return None
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._cache.get(full)
        if cached is not None and cached.ident == ident:
            return cached
        real = os.path.realpath(full)
        if real != root and not real.startswith(root + os.sep):
            return None  # a symlink leaving the root
        if stat.S_ISDIR(st.st_mode):
            return FileInfo(full, ident, 0, "", "", 0, "dir", None)
        if not stat.S_ISREG(st.st_mode):
            return None
        content = None
        if st.st_size <= SMALL_FILE:
            try:
                with open(real, "rb") as f:
                    content = f.read()
            except OSError:
                return None
            if len(content) != st.st_size:
                return None  # changed under us; the next request tries again
        mtime = int(st.st_mtime)
        info = FileInfo(
            path=real,
            ident=ident,
            size=st.st_size,
            etag=f'"{st.st_mtime_ns // 1000:x}-{st.st_size:x}"',
            last_modified=formatdate(mtime, usegmt=True),
            mtime=mtime,
            content_type=content_type_of(real),
            content=content,
        )
        base = (
            ("Content-Type", info.content_type),
            ("ETag", info.etag),
            ("Last-Modified", info.last_modified),
            ("Accept-Ranges", "bytes"),
        )
        info = dataclasses.replace(
            info,
            base_headers=base,
            wire=Wire(field_lines(base).encode("latin-1"), False, False),
            body=BytesBody(content) if content is not None else None,
        )
        size = len(content) if content is not None else 0
        old = self._cache.pop(full, None)
        if old is not None and old.content is not None:
            self._cached_bytes -= len(old.content)
        while self._cache and (len(self._cache) >= CACHE_ENTRIES or self._cached_bytes + size > CACHE_BYTES):
            evicted = self._cache.pop(next(iter(self._cache)))  # oldest first
            if evicted.content is not None:
                self._cached_bytes -= len(evicted.content)
        self._cache[full] = info
        self._cached_bytes += size
        return info

    async def __call__(self, ex: Exchange) -> Reply:
        return self.answer(ex, True)

    def now(self, ex: Exchange) -> Reply:
        """The answer on the synchronous chain: a file sent from disk is opened only when written.

        Doing this twice (a feature further out gives up on the synchronous chain) costs a
        stat and a dict lookup, and leaves nothing open."""
        return self.answer(ex, False)

    def answer(self, ex: Exchange, open_files: bool) -> Reply:
        """The reply for a static route; ``open_files`` off: a large file is opened when written."""
        route: Route = ex.route
        request = ex.request
        if request.method not in ("GET", "HEAD"):
            return Reply(405, CIMultiDict({"Allow": "GET, HEAD"}), BytesBody(b""))
        dotfiles = route.config.dotfiles
        directory = route.config.static
        assert directory is not None
        key = (directory, route.prefix, dotfiles, request.raw_path)
        known = self._paths.get(key)
        if known is None:
            rel = safe_relative_path(request.raw_path, route.prefix, dotfiles)
            # The file's path in the root, joined once per URL as the checks are.
            root = self._root(directory)
            name = "" if rel is None else rel.rstrip("/")
            full = os.path.join(root, name) if name else root
            if len(self._paths) >= CACHE_ENTRIES:
                self._paths.pop(next(iter(self._paths)))
            self._paths[key] = (rel, full, root, name)
        else:
            rel, full, root, name = known
        if rel is None:
            return not_found()
        info = self._info(root, name, full)
        if info is not None and info.content_type == "dir":
            if not rel.endswith("/") and rel:
                location = request.raw_path.partition("?")[0] + "/"  # normalised, still encoded
                return Reply(301, CIMultiDict({"Location": location}), BytesBody(b""))
            for name in route.config.index:
                info = self._info(root, os.path.join(rel, name))
                if info is not None and info.content_type != "dir":
                    break
            else:
                return not_found()  # never a listing
        elif info is not None and rel.endswith("/"):
            return not_found()  # a file asked for as a directory ("/site.css/")
        if info is None:
            return not_found()
        return self.respond(ex, info, open_files)

    def respond(self, ex: Exchange, info: FileInfo, open_files: bool = True) -> Reply:
        """200, 206, 304 or 416 for one file (``open_files`` off: opened when written)."""
        head = ex.request.head
        h = head.headers
        # The parser's note of which fields may be there (http1.SEEN_*): most requests, none.
        plain = not head.seen & _CONDITIONS or (
            _IF_NONE_MATCH not in h and _IF_MODIFIED_SINCE not in h and _RANGE not in h
        )
        if info.body is not None and plain:
            # The usual answer: the stored fields as serialised, nothing built per request.
            return Reply(200, None, info.body, stored=info)
        headers: CIMultiDict[str] = CIMultiDict(info.base_headers)
        inm = h.get("If-None-Match")
        if inm is not None:
            if _etag_matches(inm, info.etag):
                return _not_modified(ex, headers, info)
        else:
            ims = h.get("If-Modified-Since")
            if ims is not None and _not_modified_since(ims, info.mtime):
                return _not_modified(ex, headers, info)
        start, end = 0, info.size - 1
        status = 200
        range_header = h.get("Range")
        if range_header is not None and _if_range_ok(h.get("If-Range"), info):
            parsed = parse_range(range_header, info.size)
            if parsed is False:
                headers["Content-Range"] = f"bytes */{info.size}"
                return Reply(416, headers)
            if isinstance(parsed, tuple):
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        length = max(0, end - start + 1)
        if info.content is not None:
            data = info.content if status == 200 else info.content[start : end + 1]
            return Reply(status, headers, BytesBody(data))
        if not open_files:
            # Opened when written; a file gone by then aborts the answer (its head is out).
            return Reply(status, headers, FileBody.of_path(info.path, start, length))
        try:
            fd = os.open(info.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return not_found()
        return Reply(status, headers, FileBody(fd, start, length))


def _not_modified(ex: Exchange, headers: CIMultiDict[str], info: FileInfo) -> Reply:
    """A 304 with the file's fields. The 200 it stands for may be compressed: the compression
    feature reads the file's size here to add what it would add to that 200 (Vary, the weak
    ETag of the variant this client gets: RFC 9110 15.4.5)."""
    ex.notes["representation_length"] = info.size
    return Reply(304, headers)


def _not_modified_since(header: str, mtime: int) -> bool:
    try:
        since = parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return mtime <= since


def _if_range_ok(header: str | None, info: FileInfo) -> bool:
    """True when a Range header should be honoured (no If-Range, or it still matches)."""
    if header is None:
        return True
    header = header.strip()
    if header.startswith('"') or header.startswith("W/"):
        return header == info.etag
    return header == info.last_modified


_NOT_FOUND = b"<html><body><h1>404 Not Found</h1></body></html>\n"


def not_found() -> Reply:
    """A 404 page that says nothing about the file system."""
    return Reply(404, CIMultiDict({"Content-Type": "text/html; charset=utf-8"}), BytesBody(_NOT_FOUND))
