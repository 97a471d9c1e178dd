"""The "mmsg" UDP engine: recvmmsg/sendmmsg batches through ctypes (Linux).

Python has no recvmmsg, and on a busy server system calls are most of the
cost of a UDP answer (profiled: ~55 % of the receive thread in recvfrom and
sendto). One recvmmsg returns every datagram already queued (up to BATCH,
without waiting for more: MSG_WAITFORONE), and one sendmmsg sends all the
answers; measured, this answers ~14 % more queries per CPU-second than a
recvfrom/sendto loop.

The message headers, I/O vectors, address and data buffers are allocated
once. Per batch the loop reads each datagram's length from the headers
(through memoryview casts: no ctypes objects per message), answers it,
copies the answer into the send buffer, and points the send header at the
client's address as received. ctypes releases the GIL around both calls, so
the event loop runs while we wait.

Where setup.py could compile it, the same loop runs in C (dnsd/_udploop.c):
plain cached answers are made there and everything else comes back to
``_answer_one``, the Python path below. CAROUSEL_PURE_PYTHON=1 at run time
(or a C source newer than its build) keeps the loop in Python.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.machinery
import importlib.util
import os
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dnsd import rrl as rrl_mod
from dnsd.respond import NEEDS_PEER, Answerer

if TYPE_CHECKING:
    from dnsd.config import DnsConfig
    from dnsd.table import AnswerTable


class AnsweringServer(Protocol):
    """What a receive thread reads from the server that owns it (server.py's DnsServer)."""

    @property
    def config(self) -> DnsConfig: ...

    @property
    def table(self) -> AnswerTable: ...

    def new_rate_limiter(self) -> rrl_mod.RateLimiter | None: ...


log = structlog.get_logger("dnsd.mmsg")

BATCH = 64
RECV_SIZE = 4096  # larger datagrams are cut, then answered FORMERR
NAME_SIZE = 128  # sizeof(struct sockaddr_storage)
SOCKADDR_IN, SOCKADDR_IN6 = 16, 28  # sizeof(struct sockaddr_in), sizeof(struct sockaddr_in6)
MSG_WAITFORONE = 0x10000
HOSTS_MAX = 4096  # senders' text addresses remembered by a compiled loop's rate limiting


def _host(names: memoryview | bytes, off: int) -> str:
    """The text address in the sockaddr at ``names[off:]``."""
    family = int.from_bytes(names[off : off + 2], sys.byteorder)
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, names[off + 8 : off + 24])
    return socket.inet_ntop(socket.AF_INET, names[off + 4 : off + 8])


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc_calls() -> tuple[Any, Any] | None:
    """(recvmmsg, sendmmsg) from the C library, or None where they do not exist."""
    # The C library is loaded in every CPython on Linux, so the process's own symbols
    # have them; ctypes.util.find_library("c") runs ldconfig in a child process
    # (measured 12-14 ms of dnsd's start-up) and is only the fallback.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        from ctypes.util import find_library

        try:
            libc = ctypes.CDLL(find_library("c") or None, use_errno=True)
            recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
        except (OSError, AttributeError):
            return None
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_CALLS = _libc_calls()


def _compiled_loop() -> Any:
    """dnsd._udploop when it is built, fresh and wanted; else None (the loop stays in Python)."""
    if os.environ.get("CAROUSEL_PURE_PYTHON"):
        return None
    spec = importlib.util.find_spec("dnsd._udploop")
    if spec is None or spec.origin is None:
        return None  # not built: no C compiler at install, or CAROUSEL_PURE_PYTHON=1 then
    source = os.path.join(os.path.dirname(__file__), "_udploop.c")
    if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(spec.origin):
        log.warning("dnsd/_udploop.c is newer than its build: the UDP loop runs in Python "
                    "(rebuild with `pip install -e .`)")  # fmt: skip
        return None
    try:
        module = importlib.util.module_from_spec(spec)
        assert isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)
        spec.loader.exec_module(module)
    except (ImportError, AssertionError) as exc:
        log.warning("the compiled UDP loop did not load; it runs in Python", error=str(exc))
        return None
    return module


_LOOP = _compiled_loop() if _CALLS is not None else None


def compiled() -> bool:
    """True when the receive loop runs in C (dnsd/_udploop.c)."""
    return _LOOP is not None


def available() -> bool:
    """True where recvmmsg and sendmmsg can be called (Linux with glibc or musl)."""
    return _CALLS is not None


class _Batch:
    """The buffers of one direction: headers, I/O vectors and data, preallocated."""

    def __init__(self, names_addr: int, data_size: int, namelen: int) -> None:
        hdr = ctypes.sizeof(_MMsgHdr)
        self.headers = (ctypes.c_char * (hdr * BATCH))()
        self.iovecs = (_IOVec * BATCH)()
        self.data = (ctypes.c_char * (data_size * BATCH))()
        self.data_size = data_size
        self.address = ctypes.addressof(self.headers)
        for i in range(BATCH):
            self.iovecs[i].iov_base = ctypes.addressof(self.data) + data_size * i
            self.iovecs[i].iov_len = data_size
            h = _MMsgHdr.from_buffer(self.headers, hdr * i)
            h.msg_hdr.msg_name = names_addr + NAME_SIZE * i
            h.msg_hdr.msg_namelen = namelen
            h.msg_hdr.msg_iov = ctypes.addressof(self.iovecs[i])
            h.msg_hdr.msg_iovlen = 1
        # Word views over the headers: header i's fields sit at fixed word indexes.
        self.u32 = memoryview(self.headers).cast("B").cast("I")
        self.u64 = memoryview(self.headers).cast("B").cast("Q")
        self.iov64 = memoryview(self.iovecs).cast("B").cast("Q")
        self.bytes = memoryview(self.data).cast("B")


class MmsgThread:
    """A receive/answer/send loop over one UDP socket, a batch of datagrams at a time."""

    def __init__(self, server: AnsweringServer, sock: socket.socket, name: str) -> None:
        assert _CALLS is not None, "recvmmsg/sendmmsg are not available here"
        self.server = server
        self.sock = sock
        self.answerer = Answerer()
        self.rrl = server.new_rate_limiter()
        self.send_errors = 0
        self._stopping = False
        self._failures = 0
        self._hosts: dict[bytes, str] = {}  # sender's sockaddr -> text address, for RRL
        self._names = (ctypes.c_char * (NAME_SIZE * BATCH))()
        self._names_view = memoryview(self._names).cast("B")
        names_addr = ctypes.addressof(self._names)
        # Every sender of a socket has an address of the socket's family (IPv4-mapped
        # ones too, on an IPv6 socket), so one name length serves every message: the
        # kernel writes back what it read, and send header k keeps naming sender k.
        # Setting both per message, and restoring the receive lengths after every
        # batch, was three Python statements per answer.
        namelen = SOCKADDR_IN6 if sock.family == socket.AF_INET6 else SOCKADDR_IN
        self._recv = _Batch(names_addr, RECV_SIZE, namelen)
        # Answers never exceed the UDP size we allow (larger ones are sent truncated).
        self._send = _Batch(names_addr, max(512, server.config.udp_payload_size), namelen)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Wake the blocked recvmmsg (shutdown makes it return) and wait for the thread."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # ENOTCONN on UDP, but it still wakes the reader
        self._thread.join(5)

    def _client(self, i: int) -> str:
        """The text address of datagram i's sender (for RRL, cookies and sites)."""
        return _host(self._names_view, NAME_SIZE * i)

    # --- what the compiled loop calls back (dnsd/_udploop.c) ------------------------------

    def _answer_one(self, data: bytes, name: bytes) -> bytes | None:
        """The answer to a datagram the compiled loop did not answer itself (None: silence)."""
        try:
            table = self.server.table
            response, key = self.answerer.respond(data, table, True)
            if response is None:
                if key is not NEEDS_PEER:
                    return None
                response, key = self.answerer.respond_peer(data, table, True, _host(name, 0))
                if response is None:
                    return None
            if self.rrl is not None:
                verdict = self.rrl.check(_host(name, 0), key)
                if verdict:
                    return None if verdict == rrl_mod.DROP else self.answerer.truncate(data, table)
        except Exception as exc:  # a bug must cost one answer, not the listener
            self._failed(exc)
            return None
        return response

    def _limit(self, data: bytes, name: bytes, key: bytes) -> int | bytes | None:
        """RRL for an answer the compiled loop made: 0 send it, 1 drop it, else the slip to send."""
        assert self.rrl is not None
        host = self._hosts.get(name)
        if host is None:  # a resolver asks again and again: its text address is made once
            if len(self._hosts) >= HOSTS_MAX:
                self._hosts.clear()
            host = self._hosts[name] = _host(name, 0)
        verdict = self.rrl.check(host, key)
        if not verdict:
            return 0
        if verdict == rrl_mod.DROP:
            return 1
        return self.answerer.truncate(data, self.server.table) or 1

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures == 1 or self._failures % 10000 == 0:
            log.error("answering a UDP query failed", failures=self._failures, exc_info=exc)

    def _recv_failed(self, err: int) -> None:
        log.warning("udp receive failed", error=errno.errorcode.get(err, str(err)))

    def _count_send_errors(self, count: int) -> None:
        self.send_errors += count

    def _run(self) -> None:
        assert _CALLS is not None
        if _LOOP is not None:
            _LOOP.serve(self.sock.fileno(), self, BATCH, RECV_SIZE, self._send.data_size)
            return
        recvmmsg, sendmmsg = _CALLS
        fd = self.sock.fileno()
        server = self.server
        respond = self.answerer.respond
        rrl = self.rrl
        recv, send = self._recv, self._send
        hdr = ctypes.sizeof(_MMsgHdr)
        # Word indexes of the fields we touch per message.
        len_word = _MMsgHdr.msg_len.offset // 4
        name_qword = _MsgHdr.msg_name.offset // 8
        hdr32, hdr64 = hdr // 4, hdr // 8
        rsize, ssize = recv.data_size, send.data_size
        names_addr = ctypes.addressof(self._names)
        rdata, sdata = recv.bytes, send.bytes
        r32, s64, siov = recv.u32, send.u64, send.iov64
        while True:
            n = recvmmsg(fd, recv.address, BATCH, MSG_WAITFORONE, None)
            if self._stopping:
                return
            if n <= 0:
                err = ctypes.get_errno()
                if n < 0 and err not in (errno.EINTR, errno.EAGAIN):
                    log.warning("udp receive failed", error=errno.errorcode.get(err, str(err)))
                continue
            table = server.table
            out = 0
            for i in range(n):
                size = r32[hdr32 * i + len_word]
                if not size:
                    continue
                try:
                    data = bytes(rdata[rsize * i : rsize * i + size])
                    response, key = respond(data, table, True)
                    if response is None:
                        if key is not NEEDS_PEER:
                            continue
                        response, key = self.answerer.respond_peer(data, table, True, self._client(i))
                        if response is None:
                            continue
                    if rrl is not None:
                        verdict = rrl.check(self._client(i), key)
                        if verdict:
                            if verdict == rrl_mod.DROP:
                                continue
                            response = self.answerer.truncate(data, table)
                            if response is None:
                                continue
                except Exception as exc:  # a bug must cost one answer, not the listener
                    self._failed(exc)
                    continue
                length = len(response)
                if length > ssize:  # cannot happen: answers are truncated to our UDP size
                    continue
                sdata[ssize * out : ssize * out + length] = response
                siov[2 * out + 1] = length
                if out != i:  # a datagram before it got no answer: name its sender
                    s64[hdr64 * out + name_qword] = names_addr + NAME_SIZE * i
                out += 1
            done = 0
            while done < out:
                sent = sendmmsg(fd, send.address + hdr * done, out - done, 0)
                if sent <= 0:
                    self.send_errors += 1  # this destination refused: skip it
                    done += 1
                else:
                    done += sent
            if out != n:  # send headers were pointed at later senders: back to their own
                for k in range(out):
                    s64[hdr64 * k + name_qword] = names_addr + NAME_SIZE * k
