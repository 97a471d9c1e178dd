"""DNSSEC keys: generate, read and write them as BIND key files; DNSKEY, key tag and DS.

Files are BIND's pair, so keys move between dnsd and BIND/Knot tooling:
``K<zone>+<alg>+<tag>.key`` holds the DNSKEY record in zone-file syntax and
``.private`` holds "Private-key-format: v1.3" with the private key. Only the
algorithms RFC 8624 recommends for signing are supported: ECDSA P-256 with
SHA-256 (13, the default: small signatures, fast to sign) and Ed25519 (15).

The crypto is the ``cryptography`` package's; this module only does the DNS
encodings (RFC 4034 §2 DNSKEY RDATA, Appendix B key tag, §5 DS; RFC 6605
and RFC 8080 for the public key and signature layouts).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dnsd import wire

ECDSAP256SHA256, ED25519 = 13, 15
ALGORITHMS = {ECDSAP256SHA256: "ECDSAP256SHA256", ED25519: "ED25519"}
ALGORITHM_CODES = {"ecdsap256sha256": ECDSAP256SHA256, "ed25519": ED25519, "13": 13, "15": 15}
ZONE_KEY, SEP = 0x0100, 0x0001  # DNSKEY flags (RFC 4034 §2.1.1)
DNSKEY, DS, RRSIG, NSEC = 48, 43, 46, 47
Role = Literal["csk", "ksk", "zsk"]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class KeyFileError(ValueError):
    """A key file that cannot be used (unreadable, wrong format, unsupported algorithm)."""


def flags_for(role: Role) -> int:
    """DNSKEY flags: a KSK or CSK carries the SEP bit (257), a ZSK not (256)."""
    return ZONE_KEY | (SEP if role in ("ksk", "csk") else 0)


def key_tag(rdata: bytes) -> int:
    """RFC 4034 Appendix B: the key tag of a DNSKEY RDATA."""
    total = 0
    for i, byte in enumerate(rdata):
        total += byte << 8 if i % 2 == 0 else byte
    total += (total >> 16) & 0xFFFF
    return total & 0xFFFF


@dataclass(frozen=True)
class SigningKey:
    """One DNSSEC key: its private half, DNSKEY RDATA and key tag."""

    algorithm: int
    flags: int
    private: PrivateKey

    @property
    def public(self) -> bytes:
        """The public key as DNSKEY carries it (RFC 6605 §4: x | y; RFC 8080 §3: raw 32 bytes)."""
        pub = self.private.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            nums = pub.public_numbers()
            return nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        return pub.public_bytes_raw()

    @property
    def dnskey(self) -> bytes:
        """DNSKEY RDATA: flags, protocol 3, algorithm, public key."""
        return struct.pack("!HBB", self.flags, 3, self.algorithm) + self.public

    @property
    def tag(self) -> int:
        return key_tag(self.dnskey)

    @property
    def sep(self) -> bool:
        return bool(self.flags & SEP)

    def sign(self, data: bytes) -> bytes:
        """The signature field of an RRSIG over ``data`` (RFC 6605 §4: r | s, 32 bytes each)."""
        if isinstance(self.private, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return self.private.sign(data)

    def ds(self, zone: bytes, digest_type: int = 2) -> bytes:
        """DS RDATA for the parent (RFC 4034 §5.1.4): SHA-256 (2) or SHA-384 (4) of owner | DNSKEY."""
        algo = {2: hashlib.sha256, 4: hashlib.sha384}[digest_type]
        digest = algo(zone.lower() + self.dnskey).digest()
        return struct.pack("!HBB", self.tag, self.algorithm, digest_type) + digest


def generate(algorithm: int = ECDSAP256SHA256, role: Role = "csk") -> SigningKey:
    """A new key of ``algorithm`` (13 or 15)."""
    private: PrivateKey
    if algorithm == ECDSAP256SHA256:
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == ED25519:
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise KeyFileError(f"algorithm {algorithm} is not supported (use 13 or 15)")
    return SigningKey(algorithm, flags_for(role), private)


def _private_bytes(key: SigningKey) -> bytes:
    if isinstance(key.private, ec.EllipticCurvePrivateKey):
        return key.private.private_numbers().private_value.to_bytes(32, "big")
    return key.private.private_bytes_raw()


def file_stem(zone: bytes, key: SigningKey) -> str:
    """BIND's file name: K<zone>.+<alg>+<tag> (the zone with its trailing dot)."""
    return f"K{wire.to_text(zone)}+{key.algorithm:03d}+{key.tag:05d}"


def dnskey_text(zone: bytes, key: SigningKey, ttl: int | None = None) -> str:
    """The DNSKEY record in zone-file syntax."""
    ttl_part = f"{ttl} " if ttl is not None else ""
    b64 = base64.b64encode(key.public).decode()
    return f"{wire.to_text(zone)} {ttl_part}IN DNSKEY {key.flags} 3 {key.algorithm} {b64}"


def trust_anchor(zone: bytes, key: SigningKey) -> str:
    """A BIND/delv ``trust-anchors`` clause pinning ``key`` for ``zone`` (for tests and the demo)."""
    b64 = base64.b64encode(key.public).decode()
    return f'trust-anchors {{ {wire.to_text(zone)} static-key {key.flags} 3 {key.algorithm} "{b64}"; }};\n'


def ds_text(zone: bytes, key: SigningKey, digest_type: int = 2) -> str:
    """The DS record to give the parent zone, in zone-file syntax."""
    rdata = key.ds(zone, digest_type)
    return f"{wire.to_text(zone)} IN DS {key.tag} {key.algorithm} {digest_type} {rdata[4:].hex().upper()}"


def write(directory: str | Path, zone: bytes, key: SigningKey) -> Path:
    """Write the .key and .private files (the private one mode 0600); returns the .private path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = str(directory / file_stem(zone, key))
    role = "key-signing" if key.sep else "zone-signing"
    Path(stem + ".key").write_text(
        f"; This is a {role} key, keyid {key.tag}, for {wire.to_text(zone)}\n{dnskey_text(zone, key)}\n"
    )
    created = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    text = (
        "Private-key-format: v1.3\n"
        f"Algorithm: {key.algorithm} ({ALGORITHMS[key.algorithm]})\n"
        f"PrivateKey: {base64.b64encode(_private_bytes(key)).decode()}\n"
        f"Created: {created}\n"
    )
    private = Path(stem + ".private")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return private


def role_of(path: str | Path) -> Role:
    """The role the .key file next to a .private file says (zsk for flags 256, else csk)."""
    try:
        text = Path(str(path).removesuffix(".private") + ".key").read_text()
    except OSError:
        return "csk"
    return "zsk" if " DNSKEY 256 " in text else "csk"


def load(path: str | Path, role: Role) -> SigningKey:
    """Read a BIND .private file (v1.2/v1.3, algorithm 13 or 15); KeyFileError says what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    if not fields.get("private-key-format", "").startswith("v1."):
        raise KeyFileError(f"{path}: not a BIND private key file (no 'Private-key-format: v1.x' line)")
    try:
        algorithm = int(fields.get("algorithm", "").split()[0])
    except (ValueError, IndexError):
        raise KeyFileError(f"{path}: no readable 'Algorithm:' line") from None
    if algorithm not in ALGORITHMS:
        raise KeyFileError(f"{path}: algorithm {algorithm} is not supported (use 13 or 15)")
    try:
        raw = base64.b64decode(fields.get("privatekey", ""), validate=True)
    except ValueError:
        raise KeyFileError(f"{path}: 'PrivateKey:' is not base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: expected a 32-byte private key, found {len(raw)} bytes")
    private: PrivateKey
    if algorithm == ECDSAP256SHA256:
        private = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    return SigningKey(algorithm, flags_for(role), private)
