"""The edge's HTTPS listener graded by sslyze against Mozilla's server-side TLS configurations.

sslyze (nabla-c0d3/sslyze, its own OpenSSL build in nassl) tries every protocol version and
cipher suite, the key-exchange groups, the certificate, and the known TLS attacks (Heartbleed,
CCS injection, ROBOT, insecure renegotiation, compression, downgrade without
TLS_FALLBACK_SCSV), then checks the result against the profile that ssl-config.mozilla.org
generates nginx and HAProxy settings from. The edge's defaults (TLS 1.2 and 1.3, ECDHE with
AES-GCM or ChaCha20) must meet "intermediate"; `min_version = "1.3"` must meet "modern".

One finding is expected, and only that one: the profiles list the groups X25519, P-256 and
P-384, and the edge also accepts X448 and P-521 (OpenSSL's default list). Python 3.11's
`SSLContext.set_ecdh_curve` sets exactly one group, so the list cannot be narrowed without
losing X25519 or P-256; neither extra group weakens the key exchange.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sslyze import (
    CertificateInfoExtraArgument,
    ScanCommand,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

from edge.testing import running_edge
from sampleapp.main import start_app

pytestmark = pytest.mark.timeout(120)

HOST = "www.example.test"
# What the profiles list and Python 3.11's ssl cannot narrow (see the module docstring).
EXTRA_GROUPS = {"X448", "secp521r1"}


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=89 if not ca else 3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def cert_files(tmp_path: Path) -> dict[str, str]:
    """A CA and a 90-day ECDSA P-256 leaf for HOST, as a public CA would issue them.

    Not trustme's: its leaves mark subjectAltName critical beside a non-empty subject, which
    RFC 5280 4.2.1.6 forbids and the path validation sslyze runs (cryptography's) refuses.
    """
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "carousel test CA")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    ca_cert = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    leaf_cert = _certificate(leaf_name, leaf_key, ca_name, ca_key, ca=False)
    files = {
        "cert": str(tmp_path / "leaf.pem"),
        "key": str(tmp_path / "leaf.key"),
        "ca": str(tmp_path / "ca.pem"),
    }
    Path(files["cert"]).write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    Path(files["ca"]).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    Path(files["key"]).write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


@pytest.fixture
async def ap_port() -> AsyncIterator[int]:
    runner, port = await start_app("127.0.0.1", 0, "ap1")
    yield port
    await runner.cleanup()


def scan(port: int, ca_file: str) -> Any:
    """sslyze's whole scan of 127.0.0.1:port as HOST (blocking: sslyze runs its own threads)."""
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=HOST, port=port, ip_address="127.0.0.1"),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER | {ScanCommand.HTTP_HEADERS},
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(ca_file))
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


def findings(result: Any, profile: TlsConfigurationEnum) -> dict[str, str]:
    """The profile's findings for a scan, by check name ({} when compliant)."""
    try:
        check_server_against_tls_configuration(result, MozillaTlsConfiguration.get(profile))
    except ServerNotCompliantWithTlsConfiguration as e:
        return dict(e.issues)
    return {}


def only_the_extra_groups(issues: dict[str, str]) -> bool:
    """True when the only finding is the groups one, naming exactly EXTRA_GROUPS."""
    if set(issues) != {"tls_curves"}:
        return False
    return (
        all(g in issues["tls_curves"] for g in EXTRA_GROUPS) and "should be rejected" in issues["tls_curves"]
    )


@pytest.mark.parametrize(
    ("tls", "profile", "versions"),
    [
        ({}, TlsConfigurationEnum.MOZILLA_INTERMEDIATE, {"TLS_1_2", "TLS_1_3"}),
        ({"min_version": "1.3"}, TlsConfigurationEnum.MOZILLA_MODERN, {"TLS_1_3"}),
    ],
    ids=["defaults-intermediate", "tls13-modern"],
)
async def test_the_https_listener_meets_mozillas_profile(
    cert_files: dict[str, str],
    ap_port: int,
    tls: dict[str, Any],
    profile: TlsConfigurationEnum,
    versions: set[str],
) -> None:
    cfg = {
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{ap_port}"}]}},
        "route": [{"path": "/", "pool": "app"}],
        "tls": {
            "port": 0,
            "hsts_max_age": 63072000,
            "certificate": [{"cert_file": cert_files["cert"], "key_file": cert_files["key"]}],
            **tls,
        },
    }
    async with running_edge(cfg) as edge:
        result = await asyncio.to_thread(scan, edge.tls_port, cert_files["ca"])
    issues = findings(result, profile)
    assert only_the_extra_groups(issues), issues

    # What the profile's verdict rests on, read back from the scan itself.
    accepted = {
        name
        for name in ("SSL_2_0", "SSL_3_0", "TLS_1_0", "TLS_1_1", "TLS_1_2", "TLS_1_3")
        if getattr(result.scan_result, f"{name.lower()}_cipher_suites").result.accepted_cipher_suites
    }
    assert accepted == versions
    for name in versions:
        for suite in getattr(
            result.scan_result, f"{name.lower()}_cipher_suites"
        ).result.accepted_cipher_suites:
            # Forward secret AEAD only: ECDHE key exchange (TLS 1.3's suites all are), GCM or ChaCha20.
            assert "GCM" in suite.cipher_suite.name or "CHACHA20" in suite.cipher_suite.name, (
                suite.cipher_suite.name
            )
    scan_result = result.scan_result
    assert scan_result.certificate_info.result.certificate_deployments[0].verified_certificate_chain
    assert not scan_result.heartbleed.result.is_vulnerable_to_heartbleed
    assert not scan_result.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection
    assert scan_result.tls_fallback_scsv.result.supports_fallback_scsv
    assert not scan_result.tls_compression.result.supports_compression
    assert scan_result.session_renegotiation.result.supports_secure_renegotiation
    assert not scan_result.session_renegotiation.result.is_vulnerable_to_client_renegotiation_dos
    assert scan_result.tls_extended_master_secret.result.supports_ems_extension
    hsts = scan_result.http_headers.result.strict_transport_security_header
    assert hsts is not None and hsts.max_age == 63072000


def test_the_expected_finding_is_recognised_and_nothing_else() -> None:
    """The allowance above is for the groups finding alone: any other check's finding fails."""
    groups = {"tls_curves": "TLS curves {'X448', 'secp521r1'} are supported, but should be rejected."}
    assert only_the_extra_groups(groups)
    assert not only_the_extra_groups({})
    assert not only_the_extra_groups({**groups, "tls_versions": "TLS versions {'TLSv1'} are supported"})
    assert not only_the_extra_groups(
        {"tls_curves": "TLS curves {'X448'} are supported, but should be rejected."}
    )
