"""TLS for hop links: a provider's own key and self-signed certificate, and contexts that pin a peer by the
sha256 of its certificate rather than by any authority.

A provider makes its key and certificate once (:meth:`TlsIdentity.load_or_create`) and keeps the key secret;
the certificate's fingerprint goes into every ask it signs, so whoever connects to it (the gateway, the
provider before it on a route, a validator) pins exactly that certificate. The certificate names nobody: who
the provider is comes from the staked key that signed the ask, and the fingerprint ties the TLS channel to it.

Clients present no certificate: a client proves who it is with its staked key over the pinned channel
(:class:`worker.messages.Auth`), which the standard library's ssl can check where it cannot check a
self-signed client certificate against a fingerprint.

Plain TCP (``TlsIdentity`` absent, fingerprints zero) is a development switch: it authenticates clients the
same way but leaves servers unauthenticated and everything readable on the wire.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worker.errors import CertificateMismatch

NO_FINGERPRINT = bytes(32)  # what a plaintext link pins: nothing
KEY_FILE = "tls-key.pem"
CERT_FILE = "tls-cert.pem"
CERT_LIFETIME = datetime.timedelta(days=3650)  # pinned by fingerprint: expiry adds nothing but outages


def fingerprint_of(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


@dataclass(frozen=True)
class TlsIdentity:
    """A provider's TLS key and certificate, on disk as PEM files."""

    key_path: Path
    cert_path: Path
    fingerprint: bytes  # sha256 of the certificate's DER encoding

    @classmethod
    def load_or_create(cls, directory: Path) -> TlsIdentity:
        """The identity kept in ``directory``, made there (key readable by its owner only) on first use."""
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        if not (key_path.exists() and cert_path.exists()):
            directory.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "strata provider")])
            now = datetime.datetime.now(datetime.UTC)
            certificate = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + CERT_LIFETIME)
                .sign(key, hashes.SHA256())
            )
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # Written owner-only before it holds anything, then moved into place whole.
            partial = key_path.with_suffix(".partial")
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(pem)
            os.replace(partial, key_path)
            cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
        return cls(key_path, cert_path, fingerprint_of(der))

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def client_context() -> ssl.SSLContext:
    """A client context that checks nothing by authority: the caller pins the certificate it gets
    (:func:`check_pinned`) before it sends a byte of its own."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_pinned(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected: bytes, endpoint: str) -> bytes:
    """The fingerprint of the certificate the server presented, which must be ``expected``."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:
        raise CertificateMismatch(f"{endpoint} presented no certificate")
    got = fingerprint_of(der)
    if got != expected:
        raise CertificateMismatch(
            f"{endpoint} presented certificate {got.hex()[:16]}…, not the pinned {expected.hex()[:16]}…"
        )
    return got
