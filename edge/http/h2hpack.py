"""HPACK for the edge's responses: the static table and literals, never the dynamic table.

Why not the ``hpack`` package's Encoder: it indexes every field into the dynamic
table, so the bytes of a field depend on what was sent before on the connection,
and it costs about 60 us a response in pure Python (a profile of the HTTP/2 cache
hit: a fifth of the request). Without the dynamic table (what nginx does for its
responses) a field always encodes to the same bytes, so each one is encoded once
and then taken from a bounded dict: a response's block is a join of cached pieces.
The price is bytes on the wire (a repeated ``content-type`` costs its literal, not
one index byte); the win is CPU, the edge's scarcer resource.

RFC 7541 rules kept: a field equal to a static table entry is an indexed field
(6.1), a name in the static table is referenced by index (6.2.2, literal without
indexing), strings are Huffman-coded when that is shorter (5.2), and the first
block, and the first block after every change of SETTINGS_HEADER_TABLE_SIZE,
starts with a dynamic table size update to 0 (4.2, 6.3): the client's decoder
then knows no entry is ever added, whatever size it advertised.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, _field in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_FIELD.setdefault(_field, _index)
    _STATIC_NAME.setdefault(_field[0], _index)

TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update, new size 0 (RFC 7541 6.3)
CACHE_FIELDS = (
    4096  # distinct fields kept encoded; Date adds one a second, so the dict is refilled now and then
)
# Values unique to one response (and sensitive): kept out of the cache.
_UNCACHED = frozenset({b"set-cookie"})


def integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``flags`` in the bits above its prefix."""
    out = encode_integer(value, prefix_bits)
    out[0] |= flags
    return bytes(out)


def string(data: bytes) -> bytes:
    """An HPACK string literal (RFC 7541 5.2): Huffman-coded when that is shorter."""
    coded = _HUFFMAN.encode(data)
    if len(coded) < len(data):
        return integer(len(coded), 7, 0x80) + coded
    return integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field with no dynamic table: indexed if the static table has it, else a literal
    without indexing (RFC 7541 6.1, 6.2.2); ``set-cookie`` is never indexed (7.1.3)."""
    index = _STATIC_FIELD.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))
    flags = 0x10 if name == b"set-cookie" else 0x00
    index = _STATIC_NAME.get(name)
    if index is not None:
        return integer(index, 4, flags) + string(value)
    return bytes((flags,)) + string(name) + string(value)


class ResponseEncoder:
    """Stands in for h2's HPACK Encoder (``H2Connection.encoder``): the same ``encode`` and
    ``header_table_size``, encoding without the dynamic table from a per-process cache."""

    __slots__ = ("_size", "_update")

    # Shared by every connection: the encoding of a field depends on nothing else.
    _cache: dict[tuple[bytes, bytes], bytes] = {}

    def __init__(self) -> None:
        self._size = 4096
        self._update = True  # the first block announces size 0

    @property
    def header_table_size(self) -> int:
        """The client's SETTINGS_HEADER_TABLE_SIZE (the most this encoder could use)."""
        return self._size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._size = value
        self._update = True  # RFC 7541 4.2: signalled at the start of the next block

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The header block for ``headers`` (names already lower-case)."""
        cache = self._cache
        parts = [TABLE_SIZE_ZERO] if self._update else []
        self._update = False
        for field in headers:
            piece = cache.get(field)
            if piece is None:
                name, value = field
                piece = encode_field(name, value)
                if name not in _UNCACHED:
                    if len(cache) >= CACHE_FIELDS:
                        cache.clear()
                    cache[field] = piece
            parts.append(piece)
        return b"".join(parts)
