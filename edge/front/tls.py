"""TLS termination: certificates chosen by SNI, modern settings, reload without dropping connections.

Theory of operation
-------------------
Each configured certificate gets its own ``ssl.SSLContext``, all with the
same settings: TLS 1.2 or newer, forward-secret AEAD ciphers for TLS 1.2 (what
RFC 9113 9.2 asks of HTTP/2 too), ALPN ``h2`` then ``http/1.1`` (``http/1.1`` only
with ``[http2] enabled = false``), no compression, no renegotiation. The listener's context carries
an ``sni_callback`` that looks the client's server name up in a table built
once (exact names, then ``*.example.test`` wildcards one label deep, then the
default: the first certificate) and switches the connection to that context
before the handshake goes on.

Reload, on SIGHUP or when a poll every ``reload_interval`` sees a file change
(mtime, size or inode: certbot's symlink swaps included): every context is
rebuilt from the files. If any fails to load, the current table stays and one
error is logged (a renewal that wrote the certificate but not yet the key is
retried at the next poll). A good table is swapped in with one assignment:
handshakes after it use the new certificates, and live connections keep the
SSL objects they negotiated, so nothing is dropped.

The HTTPS listener feeds the same ClientConnection protocol as plain HTTP
(``scheme = "https"``, so members get ``X-Forwarded-Proto: https``); the
``tls`` pipeline feature (edge/features/https.py) adds HSTS and redirects
plain HTTP to HTTPS.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog

from edge.front.connection import ClientConnection, ConnectionHost
from edge.front.h2accept import start_h2

if TYPE_CHECKING:
    from edge.core.config import TlsConfig

log = structlog.get_logger("carousel.edge.tls")


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the key is encrypted; give an unencrypted key")


def _read_error(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    return None


def certificate_names(cert_file: str) -> list[str]:
    """The DNS names a certificate is for (subjectAltName, else the subject's CN), lower-case."""
    decoded = ssl._ssl._test_decode_cert(cert_file)  # type: ignore[attr-defined]
    names = [v.lower() for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            names += [v.lower() for k, v in rdn if k == "commonName"]
    return names


def check_certificate(cert_file: str, key_file: str) -> str | None:
    """Why this certificate/key pair cannot be served ("subkey: message"), or None."""
    problem = _read_error(cert_file)
    if problem:
        return f"cert_file: {problem}"
    try:
        certificate_names(cert_file)
    except (ssl.SSLError, ValueError, OSError):
        return f"cert_file: {cert_file} holds no PEM certificate"
    problem = _read_error(key_file)
    if problem:
        return f"key_file: {problem}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except ValueError as exc:
        return f"key_file: {exc}"
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "MISMATCH" in reason:
            return f"key_file: {key_file} does not match the certificate in {cert_file}"
        if "KEY" in reason or "PEM" in reason or "DECODE" in reason or "ASN1" in reason:
            return f"key_file: {key_file} holds no usable PEM private key"
        return f"cert_file: cannot load {cert_file} with {key_file}: {exc.reason or exc}"
    return None


@dataclass(frozen=True)
class SniTable:
    """Server name -> context, built once per (re)load."""

    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # "example.test" for "*.example.test"
    default: ssl.SSLContext

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a client's SNI (the default without SNI or for unknown names)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            ctx = self.wildcard.get(name.partition(".")[2])
            if ctx is not None:
                return ctx
        return self.default


class CertificateStore:
    """The HTTPS listener's certificates, switchable by SNI and reloadable in place."""

    def __init__(self, config: TlsConfig, *, h2: bool = False) -> None:
        self.config = config
        self.alpn = ["h2", "http/1.1"] if h2 else ["http/1.1"]
        self.table = self._build()  # raises ValueError: the edge refuses to start
        self.context = self._new_context()
        first = config.certificate[0]
        self.context.load_cert_chain(first.cert_file, first.key_file, password=_no_password)
        self.context.sni_callback = self._on_sni
        self.reloads = 0
        self.reload_failures = 0
        self._stamps = self._file_stamps()
        self._failed_stamps: dict[str, tuple[int, int, int]] | None = None

    def _new_context(self) -> ssl.SSLContext:
        c = self.config
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if c.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(c.ciphers)
        ctx.set_alpn_protocols(self.alpn)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        return ctx

    def _build(self) -> SniTable:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        contexts = []
        for i, cert in enumerate(self.config.certificate):
            ctx = self._new_context()
            try:
                ctx.load_cert_chain(cert.cert_file, cert.key_file, password=_no_password)
                names = [n.lower() for n in cert.names] or certificate_names(cert.cert_file)
            except (OSError, ssl.SSLError, ValueError):
                problem = check_certificate(cert.cert_file, cert.key_file) or "cannot load"
                raise ValueError(f"tls.certificate[{i}].{problem}") from None
            contexts.append(ctx)
            for name in names:
                name = name.rstrip(".")
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)  # the first certificate listing a name wins
        return SniTable(exact, wildcard, contexts[0])

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sslobj.context = self.table.pick(server_name)

    def _file_stamps(self) -> dict[str, tuple[int, int, int]]:
        stamps = {}
        for cert in self.config.certificate:
            for path in (cert.cert_file, cert.key_file):
                try:
                    st = os.stat(path)
                    stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
                except OSError:
                    stamps[path] = (0, 0, 0)
        return stamps

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Rebuild every context from the files; keep the current ones if any fails."""
        stamps = self._file_stamps()
        try:
            table = self._build()
        except ValueError as exc:
            self.reload_failures += 1
            if stamps != self._failed_stamps:
                log.error("certificate reload failed; serving the previous certificates", error=str(exc))
            self._failed_stamps = stamps
            return False
        self.table = table
        self._stamps = stamps
        self._failed_stamps = None
        self.reloads += 1
        log.info("certificates reloaded", reason=reason, certificates=len(self.config.certificate))
        return True

    def changed(self) -> bool:
        """Has any certificate or key file changed since the last good load?"""
        stamps = self._file_stamps()
        return stamps != self._stamps and stamps != self._failed_stamps

    async def watch(self) -> None:
        """Reload when the files change (poll every reload_interval); run as a task."""
        interval = self.config.reload_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload("files changed")

    def status(self) -> dict[str, Any]:
        """What /status shows about TLS."""
        return {
            "names": sorted(self.table.exact) + sorted(f"*.{w}" for w in self.table.wildcard),
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
        }


class TlsClientConnection(ClientConnection):
    """A client connection that came in over TLS."""

    __slots__ = ()
    scheme = "https"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            start_h2(self.edge, transport, "https")  # the handshake chose HTTP/2
            return
        super().connection_made(transport)


async def start_https(edge: ConnectionHost, store: CertificateStore) -> asyncio.Server:
    """Open the HTTPS listener (the handshake deadline is the header deadline)."""
    c = edge.config.edge
    t = edge.config.tls
    factory = cast(Callable[[], asyncio.Protocol], lambda: TlsClientConnection(edge))
    return await asyncio.get_running_loop().create_server(
        factory,
        t.host or c.host,
        t.port,
        ssl=store.context,
        ssl_handshake_timeout=c.header_timeout,
        reuse_address=True,
        reuse_port=c.workers > 1,
        backlog=4096,
    )
