"""The admission webhook's TLS material when no cert-manager provides it: a CA and a serving certificate that the
operator makes itself, writes for Kopf's HTTPS server, and renews before they expire.

``handlers.configure`` creates a ``SelfSignedTLS`` at start-up and calls ``check`` then and every few minutes
from a thread of its own. The CA certificate reaches the API server through ``publish`` (the ``caBundle`` of the
ValidatingWebhookConfiguration, ``k8s.Kube.set_webhook_ca_bundle``), so that it trusts this server and no other.

No key leaves the pod: both live in memory and in a 0600 file on the pod's emptyDir, never in a Secret, and a
restarted pod makes new ones. The CA's key signs one certificate and is then dropped, so nothing else can ever be
issued under the CA that the API server trusts.

Renewal: certificates are valid for ``VALID_FOR`` and renewed once ``RENEW_AFTER`` of it has passed. The new CA is
published beside the current one first, so that the API server trusts both while Kopf's server moves to the new
certificate (it re-reads its files every minute); only then are the files replaced. A failed publish leaves the
current certificate in place (valid for another month) and is tried again at the next ``check``.

The certificate and its key share one file, replaced atomically: Kopf reads them one after the other, and two
files could be caught half-renewed.

Several replicas (leader election) each make their own CA and all serve the webhook: ``merge_bundle`` keeps the other
replicas' CAs in the ``caBundle`` beside this one's (expired ones and the oldest beyond ``BUNDLE_KEEP`` dropped).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR: Final = timedelta(days=90)
RENEW_AFTER: Final = VALID_FOR * 2 / 3
BUNDLE_KEEP: Final = 8
"""CAs at most in the ``caBundle``: a few replicas, each with its current and previous CA, and some restarts."""
BACKDATE: Final = timedelta(minutes=5)
"""``notBefore`` lies this far in the past: the API server's clock may be a little behind the operator's."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Issued:
    """A serving certificate and the CA that signed it, PEM-encoded."""

    ca: bytes
    """The CA certificate: what the API server must trust (``caBundle``)."""
    chain: bytes
    """The serving certificate followed by its private key: what the HTTPS server loads."""
    issued_at: datetime

    def renewal_due(self, now: datetime) -> bool:
        return now - self.issued_at >= RENEW_AFTER


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(host: str, now: datetime) -> Issued:
    """A new CA and a certificate for ``host`` (a DNS name or an IP address) signed by it, valid for ``VALID_FOR``."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    # Names go into subjectAltName only: a common name is limited to 64 characters, a Service's DNS name is not.
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"finetune-operator webhook CA {now:%Y%m%dT%H%M%S}")])
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "finetune-operator")])

    def builder(name: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    serving = (
        builder(subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_subject_alt_name(host)]), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Issued(ca=ca.public_bytes(pem), chain=serving.public_bytes(pem) + private, issued_at=now)


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:  # nothing or garbage: no CA to keep
        return []


def bundle_contains(bundle: bytes, ours: bytes) -> bool:
    """Whether every CA of ``ours`` is in ``bundle`` already (in any order)."""
    own = _certificates(ours)
    if not own:
        return ours in bundle
    there = {cert.fingerprint(hashes.SHA256()) for cert in _certificates(bundle)}
    return all(cert.fingerprint(hashes.SHA256()) in there for cert in own)


def merge_bundle(ours: bytes, existing: bytes, now: datetime, keep: int = BUNDLE_KEEP) -> bytes:
    """``ours`` first, then the other replicas' CAs from ``existing`` that are still valid, newest first, ``keep`` in all."""
    seen = {cert.fingerprint(hashes.SHA256()) for cert in _certificates(ours)}
    others = []
    for cert in sorted(_certificates(existing), key=lambda c: c.not_valid_before_utc, reverse=True):
        fingerprint = cert.fingerprint(hashes.SHA256())
        if fingerprint not in seen and cert.not_valid_after_utc > now:
            seen.add(fingerprint)
            others.append(cert.public_bytes(serialization.Encoding.PEM))
    room = max(0, keep - max(1, len(_certificates(ours))))
    return ours + b"".join(others[:room])


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a file only its owner can read."""
    temporary = path.with_name(f".{path.name}.new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


class SelfSignedTLS:
    """Issues, publishes and renews the webhook's certificate (see the module docstring).

    ``certfile`` (certificate and key) and ``cafile`` are what Kopf's ``WebhookServer`` loads; ``publish`` receives the
    CA bundle the API server must trust (PEM, newest first) and raises when it cannot deliver it.
    """

    def __init__(
        self,
        host: str,
        directory: Path,
        publish: Callable[[bytes], None],
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.host, self.publish, self.clock = host, publish, clock
        self.certfile, self.cafile = directory / "tls.pem", directory / "ca.crt"
        self.current = issue(host, clock())
        self._write(self.current)
        self._previous_ca = b""
        self._published: bytes | None = None

    def _write(self, issued: Issued) -> None:
        _write(self.cafile, issued.ca)
        _write(self.certfile, issued.chain)

    @property
    def bundle(self) -> bytes:
        """The CAs the API server must trust now: the current one, and the one before it while clients switch."""
        return self.current.ca + self._previous_ca

    def check(self) -> None:
        """Publish the bundle if it is not yet published, renew the certificate if it is due; raises what ``publish`` raises."""
        if self._published != self.bundle:
            self.publish(self.bundle)
            self._published = self.bundle
            log.info("the webhook's CA is published in its ValidatingWebhookConfiguration")
        if not self.current.renewal_due(self.clock()):
            return
        renewed = issue(self.host, self.clock())
        bundle = renewed.ca + self.current.ca
        self.publish(bundle)  # trusted before it is served
        self._published, self._previous_ca, self.current = bundle, self.current.ca, renewed
        self._write(renewed)
        log.info("the webhook's certificate was renewed; it is valid until %s", renewed.issued_at + VALID_FOR)
