"""The answer function: query bytes + AnswerTable -> response bytes. No I/O, no clock.

Theory of operation
-------------------
``Answerer.respond(query, table, udp)`` returns ``(response, rrl_key)``;
``response`` is None when the right answer is silence (the header cannot be
read, or the message is itself a response).

Fast path: an ordinary query (one question, class IN, nothing else but an
optional well-formed EDNS0 OPT record) for a name we hold. The question name
ends at the first zero byte after the header; the lowercase wire name up to
there is looked up directly. A hit proves the name was well formed: table
keys are valid wire names, and a byte string equal to one parses the same
way. The response is the query's ID, a prepared header, the question copied
byte for byte (so 0x20 case randomisation survives), a prepared body and,
when the query had EDNS, our OPT record.

Slow path: everything else is parsed field by field with bounds checks
(``parse_query``, in query.py) and answered per the RFCs: FORMERR for malformed
messages, NOTIMP for opcodes other than QUERY, BADVERS for EDNS versions
above 0, REFUSED for other classes and for names outside our zones,
NXDOMAIN with the zone's SOA for names inside them. No input raises.

Answers that depend on the client's address (a DNS Cookie to check or make,
a site chosen by EDNS Client Subnet or the source address) come back from
``respond`` as ``(None, NEEDS_PEER)``; the transport then calls
``respond_peer`` with the address. Queries without options, for names that
are not site-aware, never take that path.

DNSSEC: a query with the DO bit gets the entry's signed variant (RRSIGs,
compact-denial NSEC), prepared with the rest; only the NSEC of a name that
does not exist is signed when asked (dnssec/sign.py).

Truncation: over UDP an answer is limited to 512 bytes without EDNS, and to
the client's advertised size (at least 512, at most ours) with it. A larger
answer is replaced by its header with TC=1 and the question, so the client
retries over TCP and a spoofed query gains no amplification.
"""

from __future__ import annotations

import struct

import dnslib

from dnsd import wire
from dnsd.cookies import cookie_option, find_cookie, find_option, packed_address, well_formed
from dnsd.query import Query, options_ok, parse_query  # parse_query: re-exported for callers
from dnsd.sites import ECS, EcsError, address_of, cap, parse_ecs
from dnsd.table import AnswerTable, Entry

_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_ONE_QUESTION_ONE_EXTRA = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_CLASS_IN = b"\x00\x01"
_TYPE_OPT = b"\x00\x29"
ERROR_KEY = b"error"  # RRL account of every error response of a client prefix
# Returned as the key (with no response) when the answer depends on the client's address
# (DNS Cookies, sites): the transport then calls respond_peer with it.
NEEDS_PEER = b"\x00peer"
_OPTS_MAX = 64
VALIDATED = b""  # RRL key of an answer to a client with a valid server cookie: never limited
_NSEC, _RRSIG = 47, 46
_ANY = b"\x00\xff"


class Answerer:
    """Answers queries from an AnswerTable; keeps counts of the answers it builds itself."""

    def __init__(self) -> None:
        # (qtype, rcode) -> count, for answers not taken from a table entry.
        self.counts: dict[tuple[int, int], int] = {}
        self.ignored = 0  # messages answered with silence
        # (query, BADCOOKIE answer) for the last query answered with a new server cookie,
        # handed out by truncate() when RRL limits that answer.
        self._badcookie: tuple[bytes, bytes] | None = None
        # OPT records (11 bytes, no options) already checked -> (1: no DO, 2: DO; payload size).
        self._opts: dict[bytes, tuple[int, int]] = {}

    # --- fast path --------------------------------------------------------------------

    def respond(self, query: bytes, table: AnswerTable, udp: bool = True) -> tuple[bytes | None, bytes]:
        """The response to ``query`` (None: stay silent) and its RRL account key."""
        # The question ends 4 bytes after the first zero byte (the root label); when
        # the lowercased bytes are a key of ours, that is exactly where it ends.
        end = query.find(0, 12)
        qend = end + 5
        raw = query[12:qend]
        low = raw.lower()
        entry = table.questions.get(low)
        if entry is None or query[2] & 0xF8:  # not ours, or QR / opcode bits set
            return self._by_name(query, table, udp, end, qend)
        if query[4:12] != _ONE_QUESTION or len(query) != qend:
            # An OPT record without options, seen before (resolvers send the same few):
            # straight to the pre-assembled answer. Anything else is checked by _with_extra.
            known = self._opts.get(query[qend:]) if query[4:12] == _ONE_QUESTION_ONE_EXTRA else None
            full = entry.full
            if known is None or full is None or raw != low:
                return self._with_extra(query, table, udp, entry, raw == low, qend)
            edns, payload = known
            if udp and qend + 11 + (entry.do_body_len if edns == 2 else entry.body_len) > 512:
                if qend + 11 + (entry.do_body_len if edns == 2 else entry.body_len) > min(
                    payload, table.payload_size
                ):
                    return self._with_extra(query, table, udp, entry, True, qend)  # it truncates
            n = entry.served
            entry.served = n + 1
            if entry.shared is not None:  # workers = N: the node's next step (dnsd/shared.py)
                n = entry.node_step()
            return query[:2] + full[edns * 18 + (query[2] & 1) + (query[3] & 0x10)][
                n % entry.period
            ], entry.rrl_key
        n = entry.served
        entry.served = n + 1
        if entry.shared is not None:  # workers = N: the node's next step (dnsd/shared.py)
            n = entry.node_step()
        if udp and qend > entry.fit_plain:
            return self._truncated(query, qend, entry, None), entry.rrl_key
        full = entry.full
        if full is not None and raw == low:
            return query[:2] + full[(query[2] & 1) | (query[3] & 0x10)][n % entry.period], entry.rrl_key
        return (
            query[:2]
            + entry.heads[(query[2] & 1) | (query[3] & 0x10)]
            + raw
            + entry.schedule[n % entry.period],
            entry.rrl_key,
        )

    def _by_name(
        self, query: bytes, table: AnswerTable, udp: bool, end: int, qend: int
    ) -> tuple[bytes | None, bytes]:
        """Types respond() misses for names we hold: rare ones, and HTTPS (the compiled loop finds it)."""
        if table.site_questions and query[12:qend].lower() in table.site_questions:
            return None, NEEDS_PEER  # the answer depends on the client's site
        if end < 0 or query[2] & 0xF8 or query[end + 3 : qend] != _CLASS_IN:
            return self._slow(query, table, udp)
        node = table.names.get(query[12 : end + 1].lower())
        if node is None:
            return self._slow(query, table, udp)
        entry = node.get(query[end + 1 : end + 3])
        if entry is None:
            qtype = (query[end + 1] << 8) | query[end + 2]
            if qtype in (_NSEC, _RRSIG) and table.denial:
                return self._slow(query, table, udp)  # see _signed_meta
            entry = node[b""]  # shared by every type without an entry: count by the asked type
            self._count(qtype, entry.rcode)
        return self._with_extra(query, table, udp, entry, False, qend)

    def _with_extra(
        self, query: bytes, table: AnswerTable, udp: bool, entry: Entry, exact: bool, qend: int
    ) -> tuple[bytes | None, bytes]:
        """One question plus at most a well-formed OPT record; anything else goes slow."""
        counts = query[4:12]
        if counts == _ONE_QUESTION and len(query) == qend:
            edns = 0
        elif (
            counts != _ONE_QUESTION_ONE_EXTRA
            or len(query) < qend + 11
            or query[qend] != 0
            or query[qend + 1 : qend + 3] != _TYPE_OPT
            or query[qend + 6]  # EDNS version above 0: BADVERS, built by the slow path
        ):
            return self._slow(query, table, udp)
        else:
            opt_end = qend + 11 + ((query[qend + 9] << 8) | query[qend + 10])
            if len(query) != opt_end or (opt_end > qend + 11 and not options_ok(query, qend + 11, opt_end)):
                return self._slow(query, table, udp)
            if opt_end > qend + 11 and (table.cookies is not None or table.site_map is not None):
                return None, NEEDS_PEER  # options may hold a cookie or ECS: the answer needs the client
            edns = 1 + (query[qend + 7] >> 7)  # 1: OPT, 2: OPT with DO
            if opt_end == qend + 11:  # remember this exact OPT record for respond()
                if len(self._opts) >= _OPTS_MAX:
                    self._opts.clear()
                self._opts[query[qend:]] = (edns, max(512, (query[qend + 3] << 8) | query[qend + 4]))
        n = entry.served
        entry.served = n + 1
        if entry.shared is not None:  # workers = N: the node's next step (dnsd/shared.py)
            n = entry.node_step()
        rdcd = (query[2] & 1) | (query[3] & 0x10)
        if not edns:
            if udp and qend > entry.fit_plain:
                return self._truncated(query, qend, entry, None), entry.rrl_key
            body = entry.schedule[n % entry.period]
            return query[:2] + entry.heads[rdcd] + query[12:qend] + body, entry.rrl_key
        opt = table.opt[edns - 1]
        # DO set: the signed variant (the same as the plain one in an unsigned zone).
        body_len = entry.do_body_len if edns == 2 else entry.body_len
        if udp and qend + body_len + len(opt) > 512:
            payload = (query[qend + 3] << 8) | query[qend + 4]
            if qend + body_len + len(opt) > min(max(payload, 512), table.payload_size):
                return self._truncated(query, qend, entry, opt), entry.rrl_key
        full = entry.full
        if exact and full is not None:
            return query[:2] + full[edns * 18 + rdcd][n % entry.period], entry.rrl_key
        if edns == 2:
            body = entry.do_schedule[n % entry.period]
            return query[:2] + entry.do_heads[rdcd] + query[12:qend] + body + opt, entry.rrl_key
        body = entry.schedule[n % entry.period]
        return query[:2] + entry.heads_edns[rdcd] + query[12:qend] + body + opt, entry.rrl_key

    def _truncated(self, query: bytes, qend: int, entry: Entry, opt: bytes | None) -> bytes:
        """Header with TC=1 and the question: "ask me again over TCP"."""
        hi = wire.QR | wire.TC | (wire.AA if entry.aa else 0) | (query[2] & wire.RD)
        lo = (query[3] & wire.CD) | (entry.rcode & 0x0F)
        head = struct.pack("!BBHHHH", hi, lo, 1, 0, 0, 1 if opt else 0)
        return query[:2] + head + query[12:qend] + (opt or b"")

    def truncate(self, query: bytes, table: AnswerTable) -> bytes | None:
        """An empty TC=1 answer to ``query`` (the RRL "slip"); None if it cannot be parsed.

        A client that sent a cookie gets BADCOOKIE with a fresh server cookie
        instead (RFC 7873 §5.2.3): as small, and it tells a real client how to
        be exempt from rate limiting next time.
        """
        pending = self._badcookie
        if pending is not None and pending[0] is query:
            self._badcookie = None
            return pending[1]
        q = parse_query(query)
        if q is None or q.error or not q.question:
            return None
        hi = wire.QR | wire.TC | (q.flags1 & wire.RD)
        lo = q.flags2 & wire.CD
        opt = b"" if q.edns is None else table.opt[q.edns.do]
        head = struct.pack("!BBHHHH", hi, lo, 1, 0, 0, 1 if opt else 0)
        return q.id + head + q.question + opt

    # --- slow path --------------------------------------------------------------------

    def _count(self, qtype: int, rcode: int) -> None:
        key = (qtype, rcode)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _error(self, q: Query, rcode: int, table: AnswerTable) -> tuple[bytes, bytes]:
        """An answer without records: FORMERR, BADVERS, REFUSED."""
        opt = b""
        if q.edns is not None and rcode != wire.FORMERR:
            opt = wire.opt_record(table.payload_size, rcode >> 4, q.edns.do)
        hi = wire.QR | (q.opcode << 3) | (q.flags1 & wire.RD)
        lo = (q.flags2 & wire.CD) | (rcode & 0x0F)
        head = struct.pack("!BBHHHH", hi, lo, 1 if q.question else 0, 0, 0, 1 if opt else 0)
        self._count(q.qtype, rcode)
        return q.id + head + q.question + opt, ERROR_KEY

    def _notimp(self, q: Query) -> tuple[bytes, bytes]:
        """NOTIMP for an opcode we do not serve: the ID, QR, the opcode and the rcode, nothing else.

        The rest of the message is another protocol's (UPDATE's zone and update
        sections, NOTIFY's SOA): echoing any of it, or a flag such as RD or CD
        that means something else there, would be guessing.
        """
        self._count(0, wire.NOTIMP)
        return q.id + struct.pack("!BBHHHH", wire.QR | (q.opcode << 3), wire.NOTIMP, 0, 0, 0, 0), ERROR_KEY

    def _badkey(self, q: Query, table: AnswerTable) -> tuple[bytes, bytes]:
        """NOTAUTH with an unsigned TSIG whose error is BADKEY (RFC 8945 §5.2, §5.3.2).

        dnsd holds no TSIG keys, so every signed message is signed with a key it
        does not know. The TSIG repeats the client's key and algorithm names and
        its Time Signed and Fudge; the MAC is empty, as a BADKEY answer cannot be signed.
        """
        tsig = q.tsig
        assert tsig is not None
        rdata = tsig.algorithm + tsig.time_fudge + b"\x00\x00" + q.id + struct.pack("!HH", wire.BADKEY, 0)
        record = tsig.key + struct.pack("!HHIH", wire.TSIG, wire.CLASS_ANY, 0, len(rdata)) + rdata
        opt = b"" if q.edns is None else table.opt[q.edns.do]
        question = q.question if q.opcode == 0 else b""
        hi = wire.QR | (q.opcode << 3) | ((q.flags1 & wire.RD) if q.opcode == 0 else 0)
        lo = ((q.flags2 & wire.CD) if q.opcode == 0 else 0) | wire.NOTAUTH
        head = struct.pack("!BBHHHH", hi, lo, 1 if question else 0, 0, 0, 2 if opt else 1)
        self._count(q.qtype, wire.NOTAUTH)
        return q.id + head + question + opt + record, ERROR_KEY

    def _slow(self, query: bytes, table: AnswerTable, udp: bool) -> tuple[bytes | None, bytes]:
        q = parse_query(query)
        if q is None or q.flags1 & wire.QR:
            self.ignored += 1  # unreadable, or a response: answering could start a loop
            return None, ERROR_KEY
        if q.options and (
            (table.cookies is not None and find_cookie(q.options) is not None)
            or (table.site_map is not None and find_option(q.options, ECS) is not None)
        ):
            return None, NEEDS_PEER
        return self._answer(q, query, table, udp)

    def _answer(
        self, q: Query, query: bytes, table: AnswerTable, udp: bool, chosen: Entry | None = None
    ) -> tuple[bytes | None, bytes]:
        """The answer to a parsed query (the slow path); ``chosen``: the entry, picked by site."""
        if q.tsig is not None and not q.error:
            return self._badkey(q, table)
        if q.opcode != 0:
            return self._notimp(q)
        if q.error:
            return self._error(q, q.error, table)
        if q.edns is not None and q.edns.version > 0:
            return self._error(q, wire.BADVERS, table)
        if q.qclass != wire.CLASS_IN:
            return self._error(q, wire.REFUSED, table)
        entry = chosen or table.lookup(q.qname, q.qtype) or table.meta.get(struct.pack("!H", q.qtype))
        if entry is not None and not entry.qtype and q.qtype in (_NSEC, _RRSIG) and table.denial:
            meta = self._signed_meta(q, table, entry, query, udp)
            if meta is not None:
                return meta
        if entry is not None:
            n = entry.served
            entry.served = n + 1
            if entry.shared is not None:  # workers = N: the node's next step (dnsd/shared.py)
                n = entry.node_step()
            if not entry.qtype:
                self._count(q.qtype, entry.rcode)  # a name's default entry: see _by_name
        else:
            # NXDOMAIN and REFUSED entries serve any name: count them by the asked type.
            origin = table.zone_of(q.qname)
            entry = table.refused if origin is None else table.nxdomain[origin]
            n = 0
            if origin is not None and q.edns is not None and q.edns.do and origin in table.denial:
                self._count(q.qtype, wire.NXDOMAIN)
                return self._signed_nx(q, table, origin, entry, query, udp)
            self._count(q.qtype, entry.rcode)
        if q.edns is None:
            heads, schedule, opt = entry.heads, entry.schedule, b""
        elif q.edns.do:
            heads, schedule, opt = entry.do_heads, entry.do_schedule, table.opt[1]
        else:
            heads, schedule, opt = entry.heads_edns, entry.schedule, table.opt[0]
        head = heads[(q.flags1 & 1) | (q.flags2 & 0x10)]
        response = q.id + head + q.question + schedule[n % entry.period] + opt
        if udp and len(response) > 512:
            limit = 512 if q.edns is None else min(max(q.edns.payload, 512), table.payload_size)
            if len(response) > limit:
                qend = 12 + len(q.question)
                return self._truncated(query, qend, entry, opt or None), entry.rrl_key
        return response, entry.rrl_key

    def _signed_nx(
        self, q: Query, table: AnswerTable, origin: bytes, entry: Entry, query: bytes, udp: bool
    ) -> tuple[bytes | None, bytes]:
        """A nonexistent name in a signed zone, DO set: compact denial (RFC 9824).

        NOERROR with an NSEC at the name listing only RRSIG, NSEC and NXNAME;
        NXDOMAIN when the client set the CO flag ("compact answers OK", §4).
        """
        denial = table.denial[origin]
        records = denial.signer.nx_records(q.qname, denial.ttl, denial.soa)
        co = q.edns is not None and q.edns.co
        hi = wire.QR | wire.AA | (q.flags1 & wire.RD)
        lo = (q.flags2 & wire.CD) | (wire.NXDOMAIN if co else wire.NOERROR)
        head = struct.pack("!BBHHHH", hi, lo, 1, 0, denial.authority_count, 1)
        opt = table.opt_co if co else table.opt[1]
        response = q.id + head + q.question + records + opt
        if udp and len(response) > 512:
            assert q.edns is not None
            if len(response) > min(max(q.edns.payload, 512), table.payload_size):
                return self._truncated(query, 12 + len(q.question), entry, opt), entry.rrl_key
        return response, entry.rrl_key

    def _signed_meta(
        self, q: Query, table: AnswerTable, entry: Entry, query: bytes, udp: bool
    ) -> tuple[bytes | None, bytes] | None:
        """qtype NSEC or RRSIG at a name we hold, in a signed zone, DO set: the records themselves.

        The name's NODATA carries an NSEC whose bitmap lists NSEC and RRSIG (they exist
        there, RFC 4034 §4.1.2), so a NODATA for either type would deny what its own proof
        asserts (RFC 4035 §3.1.3.1 is for types the name lacks). As BIND and Knot do for
        a name with an NSEC, qtype NSEC gets the name's NSEC and its RRSIG; qtype RRSIG
        gets every RRSIG at the name (the RRsets' as served now, and the NSEC's). Rare
        types: parsed from the prepared answers, off the fast path. None: not this case.
        """
        origin = table.zone_of(q.qname)
        if q.edns is None or not q.edns.do or origin is None or origin not in table.denial:
            return None
        node = table.names.get(q.qname)
        if node is None:
            return None
        records: list[dnslib.RR] = []
        for key, typed in sorted(node.items()):
            if (key and q.qtype == _NSEC) or key == _ANY:
                continue  # the NSEC is in the name's default entry; ANY's HINFO is synthesized
            head = typed.do_heads[0]  # its ARCOUNT counts the OPT that follows the body
            arcount = max(0, struct.unpack("!H", head[8:10])[0] - 1)
            body = head[:8] + struct.pack("!H", arcount) + q.question + typed.do_schedule[0]
            msg = dnslib.DNSRecord.parse(b"\x00\x00" + body)
            owner = msg.q.qname
            for rr in (*msg.rr, *msg.auth):
                if rr.rname != owner or rr in records:
                    continue
                if q.qtype == _NSEC and (
                    rr.rtype == _NSEC or (rr.rtype == _RRSIG and rr.rdata.covered == _NSEC)
                ):
                    records.append(rr)
                elif q.qtype == _RRSIG and rr.rtype == _RRSIG:
                    records.append(rr)
        if not records:
            return None
        self._count(q.qtype, wire.NOERROR)
        header = dnslib.DNSHeader(id=0, qr=1, aa=1, rd=q.flags1 & wire.RD)
        reply = dnslib.DNSRecord(header, q=dnslib.DNSQuestion(records[0].rname, q.qtype))
        for rr in records:
            reply.add_answer(rr)
        packed = reply.pack()
        qend = 12 + len(q.question)
        opt = table.opt[1]
        lo = (q.flags2 & wire.CD) | wire.NOERROR
        response = (
            q.id + bytes((packed[2], lo)) + packed[4:10] + b"\x00\x01" + q.question + packed[qend:] + opt
        )
        if udp and len(response) > min(max(q.edns.payload, 512), table.payload_size):
            return self._truncated(query, qend, entry, opt), entry.rrl_key
        return response, entry.rrl_key

    # --- answers that depend on the client's address ----------------------------------

    def respond_peer(
        self, query: bytes, table: AnswerTable, udp: bool, host: str
    ) -> tuple[bytes | None, bytes]:
        """``respond`` for a query the fast path returned NEEDS_PEER for; ``host`` is the client."""
        q = parse_query(query)
        if q is None or q.flags1 & wire.QR:
            self.ignored += 1
            return None, ERROR_KEY
        extra = b""  # options of our answer
        chosen: Entry | None = None
        if table.site_map is not None:
            try:
                chosen, extra = _site_entry(q, table, host)
            except EcsError:
                return self._error(q, wire.FORMERR, table)  # RFC 7871 §7.1.2
        cookies = table.cookies
        cookie = find_cookie(q.options) if cookies is not None and q.options else None
        if cookies is None or cookie is None:
            response, key = self._answer(q, query, table, udp, chosen)
            return (_with_option(response, extra) if response and extra else response), key
        if not well_formed(cookie):
            return self._error(q, wire.FORMERR, table)  # RFC 7873 §5.2.2
        client = packed_address(host)
        valid, fresh = cookies.check(cookie, client) if len(cookie) > 8 else (False, False)
        option = extra + cookie_option(cookie[:8], cookie[8:] if fresh else cookies.make(cookie[:8], client))
        assert q.edns is not None  # a cookie is an EDNS option
        opt = wire.opt_record(table.payload_size, 0, q.edns.do)
        if q.opcode == 0 and query[4:6] == b"\x00\x00" and not q.tsig:
            # RFC 7873 §5.4: a query with no question, only a cookie, asks for a server cookie.
            head = struct.pack("!BBHHHH", wire.QR, 0, 0, 0, 0, 1)
            return q.id + head + _with_option(opt, option), VALIDATED if valid else ERROR_KEY
        response, key = self._answer(q, query, table, udp, chosen)
        if response is None:
            return None, key
        response = _with_option(response, option)
        if valid:
            return response, VALIDATED
        if q.question:
            hi = wire.QR | (q.flags1 & wire.RD)
            lo = (q.flags2 & wire.CD) | (wire.BADCOOKIE & 0x0F)
            head = struct.pack("!BBHHHH", hi, lo, 1, 0, 0, 1)
            ext = wire.opt_record(table.payload_size, wire.BADCOOKIE >> 4, q.edns.do)
            self._badcookie = (query, q.id + head + q.question + _with_option(ext, option))
        return response, key


def _site_entry(q: Query, table: AnswerTable, host: str) -> tuple[Entry | None, bytes]:
    """(the entry for the client's site or None, our ECS option or b""); EcsError if malformed."""
    site_map = table.site_map
    assert site_map is not None
    data = find_option(q.options, ECS) if q.options else None
    subnet = parse_ecs(data) if data is not None else None
    question = q.qname + q.question[-4:]
    default = table.site_questions.get(question) if q.question else None
    site: str | None = None
    extra = b""
    if subnet is not None:
        scope = 0
        if subnet.source:  # 0: the client asked that its address not be used
            used = min(subnet.source, cap(subnet.family))
            site, scope = site_map.lookup(subnet.family, _prefix(subnet.address, subnet.family, used), used)
        extra = subnet.reply(scope if default is not None else 0)  # other answers: the same for all
    elif default is not None:
        family, address = address_of(host)
        used = cap(family)
        site, _ = site_map.lookup(family, _prefix(address, family, used), used)
    if default is None:
        return None, extra
    return (table.by_site.get(site, {}).get(question) if site else None) or default, extra


def _prefix(address: int, family: int, bits: int) -> int:
    width = 32 if family == 1 else 128
    return address & (((1 << bits) - 1) << (width - bits)) if bits else 0


def _with_option(message: bytes, option: bytes) -> bytes:
    """``message`` with ``option`` added to its OPT record, when that is its last record and empty."""
    if len(message) < 11 or message[-11] != 0 or message[-10:-8] != _TYPE_OPT or message[-2:] != b"\x00\x00":
        return message
    return message[:-2] + struct.pack("!H", len(option)) + option
