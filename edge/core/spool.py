"""A body being received: in memory up to a limit, then in an unlinked temp file.

The upstream client fills one with a member's response, the cache with a body
it must store whole, the forward proxy with an origin's response; each then
takes the finished ``Body``. Past its size cap ``add`` raises ``SpoolFull``,
which the upstream client turns into a 502 (edge/upstream/client.py).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from edge.core.pipeline import Body, BytesBody, FileBody


class SpoolFull(Exception):
    """More bytes than the spool's cap (``max_response_size``)."""


class SpoolBuffer:
    """Response bytes in memory up to a limit, then in an unlinked temp file."""

    __slots__ = ("_file", "_limit", "_max", "_parts", "_temp_dir", "size")

    def __init__(self, limit: int, temp_dir: str | None, max_size: int = 1 << 62) -> None:
        self._limit = limit
        self._max = max_size
        self._temp_dir = temp_dir
        self._parts: list[bytes] = []
        self._file: Any = None
        self.size = 0

    def add(self, chunk: bytes) -> None:
        """Keep a chunk; SpoolFull past the size cap (the disk is not infinite)."""
        self.size += len(chunk)
        if self.size > self._max:
            raise SpoolFull("response larger than max_response_size")
        if self._file is not None:
            self._file.write(chunk)
            return
        self._parts.append(chunk)
        if self.size > self._limit:
            self._file = tempfile.TemporaryFile(dir=self._temp_dir)
            self._file.write(b"".join(self._parts))
            self._parts = []

    def body(self) -> Body:
        """The finished body (the buffer must not be used afterwards)."""
        if self._file is None:
            parts = self._parts
            return BytesBody(parts[0] if len(parts) == 1 else b"".join(parts))
        self._file.flush()
        fd = os.dup(self._file.fileno())
        self._file.close()  # the unlinked file lives on through the dup'ed descriptor
        self._file = None
        return FileBody(fd, 0, self.size)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._parts = []
