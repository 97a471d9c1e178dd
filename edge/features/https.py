"""The `tls` feature: HSTS on HTTPS answers, and plain HTTP redirected to HTTPS.

TLS itself (certificates, SNI, the HTTPS listener) is the front layer's
(edge/front/tls.py); this feature only sees ``ex.scheme``. The redirect
leaves ACME http-01 challenges alone, so certificates can still be renewed
over plain HTTP (RFC 8555 8.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDict

from edge.core.pipeline import EdgeContext, Exchange, Reply, SyncFeature

if TYPE_CHECKING:
    from edge.core.config import Config, TlsConfig

ACME_CHALLENGE = "/.well-known/acme-challenge/"


class HttpsPolicy(SyncFeature):
    """The `tls` feature: HSTS on HTTPS answers, and plain HTTP redirected to HTTPS."""

    def __init__(self, config: TlsConfig) -> None:
        hsts = f"max-age={config.hsts_max_age}" if config.hsts_max_age else ""
        if hsts and config.hsts_include_subdomains:
            hsts += "; includeSubDomains"
        if hsts and config.hsts_preload:
            hsts += "; preload"
        self.hsts = hsts
        self.redirect = config.redirect_http
        self.port_suffix = "" if config.redirect_port == 443 else f":{config.redirect_port}"

    def before(self, ex: Exchange) -> Reply | None:
        request = ex.request
        if ex.scheme != "https" and self.redirect and ex.host and not request.path.startswith(ACME_CHALLENGE):
            # 301 for GET/HEAD (understood by every client); 308 keeps other methods and bodies.
            status = 301 if request.method in ("GET", "HEAD") else 308
            location = f"https://{ex.host}{self.port_suffix}{request.raw_path}"
            return Reply(status, CIMultiDict({"Location": location}))
        return None

    def after(self, ex: Exchange, reply: Reply) -> Reply:
        if ex.scheme == "https" and self.hsts and "Strict-Transport-Security" not in reply.headers:
            reply.headers["Strict-Transport-Security"] = self.hsts
        return reply


def feature(config: Config, ctx: EdgeContext) -> HttpsPolicy | None:
    """Factory for the pipeline (None when neither HSTS nor the redirect is asked for)."""
    t = config.tls
    if not t.certificate or not (t.redirect_http or t.hsts_max_age):
        return None
    return HttpsPolicy(t)
