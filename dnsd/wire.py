"""DNS wire format: constants, names, and a record writer with name compression.

Used when the answer table is built (on registry changes), never per query.
Names are handled as lowercase wire bytes (``b"\\x03www\\x07example\\x04test\\x00"``):
lowering the whole wire name is safe because length bytes are below 64 and
never in the ASCII A-Z range.

RDATA is encoded by dnslib's record classes (``rdata``); names inside it are
handed to ``MessageWriter``, which compresses them against offsets in the
final response, something dnslib's own buffer cannot know.
"""

from __future__ import annotations

import ipaddress
import struct

import dnslib

# Record types. Plain ints, as the query path compares them; their names come from dnslib.
A, NS, CNAME, SOA, HINFO, MX, TXT, AAAA, OPT = 1, 2, 5, 6, 13, 15, 16, 28, 41
HTTPS = 65
IXFR, AXFR, MAILB, MAILA, ANY = 251, 252, 253, 254, 255
TSIG = 250
# dnslib has no names for MAILB/MAILA (obsolete, but we answer them NOTIMP and count them).
TYPE_NAMES: dict[int, str] = {MAILB: "MAILB", MAILA: "MAILA", **dnslib.QTYPE.forward}
TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}
CLASS_IN = 1
CLASS_ANY = 255

# Response codes (BADVERS needs the extended bits carried in OPT; dnslib has no name for it).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
NOTAUTH = 9
BADCOOKIE = 23  # extended: needs OPT, as BADVERS
BADKEY = 17  # a TSIG error code (RFC 8945 §4.3), carried in the TSIG record, not the header
RCODE_NAMES: dict[int, str] = {BADVERS: "BADVERS", BADCOOKIE: "BADCOOKIE", **dnslib.RCODE.forward}

# Header flag bits, first and second flag byte.
QR, AA, TC, RD = 0x80, 0x04, 0x02, 0x01
CD = 0x10
DO = 0x80  # in the first byte of the OPT flags
CO = 0x40  # RFC 9824 §4, Compact Answers OK: next to DO

ROOT = b"\x00"
MAX_NAME = 255
MAX_LABEL = 63
PLAIN_UDP_LIMIT = 512
TCP_LIMIT = 65535
LABEL_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")


class BadName(ValueError):
    """A name that cannot be written in DNS wire format."""


def to_wire(name: str) -> bytes:
    """'www.example.test' (absolute, trailing dot optional) -> lowercase wire bytes."""
    text = name.rstrip(".").lower() if name != "." else ""
    if not text:
        return ROOT
    out = bytearray()
    for label in text.split("."):
        raw = label.encode("ascii", "strict") if label.isascii() else b""
        if not raw:
            raise BadName(f"empty or non-ASCII label in {name!r}")
        if len(raw) > MAX_LABEL:
            raise BadName(f"label longer than 63 bytes in {name!r}")
        if not set(raw) <= LABEL_CHARS:
            raise BadName(f"use letters, digits, '-' and '_' in names, found {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise BadName(f"name longer than 255 bytes: {name!r}")
    return bytes(out)


def to_text(wire: bytes) -> str:
    """Wire name -> dotted text with a trailing dot (printable bytes only, others escaped)."""
    labels = []
    i = 0
    while i < len(wire) and wire[i]:
        n = wire[i]
        raw = wire[i + 1 : i + 1 + n]
        labels.append("".join(chr(c) if 33 <= c < 127 and c != 46 else f"\\{c:03d}" for c in raw))
        i += 1 + n
    return ".".join(labels) + "."


def labels(wire: bytes) -> list[bytes]:
    """The labels of a wire name, without the root."""
    out = []
    i = 0
    while wire[i]:
        n = wire[i]
        out.append(wire[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def suffixes(wire: bytes) -> list[tuple[int, bytes]]:
    """(offset, suffix) for every label boundary of a wire name, longest first, root excluded."""
    out = []
    i = 0
    while wire[i]:
        out.append((i, wire[i:]))
        i += 1 + wire[i]
    return out


def parent(wire: bytes) -> bytes:
    """The wire name one label up ('a.b.' -> 'b.'); the root is its own parent."""
    return wire[1 + wire[0] :] if wire != ROOT else ROOT


def is_subdomain(wire: bytes, origin: bytes) -> bool:
    """True when ``wire`` equals ``origin`` or lies below it (label-aligned)."""
    if origin == ROOT:
        return True
    return any(s == origin for _, s in suffixes(wire))


def ipv4_bytes(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def ipv6_bytes(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


class Name(bytes):
    """A wire name inside RDATA that may be compressed (NS, CNAME, MX, SOA)."""

    __slots__ = ()


class Serial(bytes):
    """SOA RDATA times (serial, refresh, retry, expire, minimum) whose serial is filled in later.

    A zone's SOA is the same in every build but for its serial (the registry
    revision), so answers that carry it are rendered once with this piece and
    copied with the serial written at the offsets MessageWriter records
    (``MessageWriter.serials``, ``Entry.with_serial``).
    """

    __slots__ = ()


RData = list[bytes]  # raw pieces and Name pieces, concatenated in order


class MessageWriter:
    """Writes resource records after a known header + question, compressing names.

    ``base`` is the absolute offset where the written bytes will start in the
    final message, so compression pointers stay valid once the header and the
    (client's) question are put in front. The question name is known only by
    its lowercase form: pointers into it are valid for any 0x20 spelling,
    because case changes no length.
    """

    def __init__(self, question_name: bytes | None, base: int) -> None:
        self.buf = bytearray()
        self.base = base
        self.serials: list[int] = []  # offsets of Serial pieces written (see Serial)
        self._names: dict[bytes, int] = {}
        if question_name is not None:
            for off, suffix in suffixes(question_name):
                self._names.setdefault(suffix, 12 + off)

    def name(self, wire: bytes, *, compress: bool = True) -> None:
        """Append a name, pointing at an earlier copy of its longest known suffix."""
        if not compress:
            self.buf += wire
            return
        for off, suffix in suffixes(wire):
            known = self._names.get(suffix)
            if known is not None:
                self.buf += wire[:off]
                self.buf += struct.pack("!H", 0xC000 | known)
                return
            here = self.base + len(self.buf) + off
            if here < 0x3FFF:
                self._names[suffix] = here
        self.buf += wire

    def rr(self, owner: bytes, rtype: int, ttl: int, rdata: RData, *, compress: bool = True) -> None:
        """Append one resource record of class IN."""
        self.name(owner, compress=compress)
        self.buf += struct.pack("!HHI", rtype, CLASS_IN, ttl)
        at = len(self.buf)
        self.buf += b"\x00\x00"
        for piece in rdata:
            if isinstance(piece, Name):
                self.name(bytes(piece), compress=compress)
            else:
                if isinstance(piece, Serial):
                    self.serials.append(len(self.buf))
                self.buf += piece
        struct.pack_into("!H", self.buf, at, len(self.buf) - at - 2)

    def getvalue(self) -> bytes:
        """The records written so far."""
        return bytes(self.buf)


def to_label(wire: bytes) -> dnslib.DNSLabel:
    """A wire name as a dnslib label, to build dnslib records with."""
    return dnslib.DNSLabel(labels(wire))


def _wire_of(name: dnslib.DNSLabel | str) -> bytes:
    if not isinstance(name, dnslib.DNSLabel):
        name = dnslib.DNSLabel(name)
    return b"".join(bytes((len(part),)) + part for part in name.label).lower() + ROOT


class _PieceBuffer(dnslib.DNSBuffer):
    """A dnslib buffer that leaves compressible names as Name pieces instead of writing them.

    dnslib compresses against offsets in its own buffer, which mean nothing in
    a body that will sit after a client's question; MessageWriter knows the
    real offsets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pieces: RData = []
        self._cut = 0

    def _flush(self) -> None:
        if len(self.data) > self._cut:
            self.pieces.append(bytes(self.data[self._cut :]))
        self._cut = len(self.data)

    def encode_name(self, name: dnslib.DNSLabel | str) -> None:
        self._flush()
        self.pieces.append(Name(_wire_of(name)))

    def encode_name_nocompress(self, name: dnslib.DNSLabel | str) -> None:
        self.append(_wire_of(name))


def rdata(rd: dnslib.RD) -> RData:
    """The RDATA of a dnslib record, as pieces for MessageWriter.rr."""
    buf = _PieceBuffer()
    rd.pack(buf)
    buf._flush()
    return buf.pieces


def opt_record(payload_size: int, ext_rcode: int = 0, do: bool = False, co: bool = False) -> bytes:
    """An OPT pseudo-record with no options (we never echo a client's options)."""
    flags = (DO << 8 if do else 0) | (CO << 8 if co else 0)
    return struct.pack("!BHHBBHH", 0, OPT, payload_size, ext_rcode, 0, flags, 0)
