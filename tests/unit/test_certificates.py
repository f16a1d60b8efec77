"""The webhook's own TLS material (``certificates``): what is issued verifies in a real TLS handshake, the files Kopf
reads hold a matching certificate and key at every moment, and a renewal is trusted before it is served.

Handshakes run over memory BIOs (no socket); time is a fake clock."""

from __future__ import annotations

import ssl
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from finetune_operator.certificates import RENEW_AFTER, VALID_FOR, Issued, SelfSignedTLS, bundle_contains, issue, merge_bundle

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
HOST = "ft-finetune-operator-webhook.a-rather-long-namespace-name-for-a-team.svc"  # longer than a common name may be


def handshake(chain: bytes, ca: bytes, host: str, tmp_path: Path) -> None:
    """A TLS handshake between a server loading ``chain`` and a client trusting ``ca`` for ``host``; raises on failure."""
    (tmp_path / "chain.pem").write_bytes(chain)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "chain.pem")
    client = ssl.create_default_context(cadata=ca.decode())
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(to_server, to_client, server_side=True)
    c = client.wrap_bio(to_client, to_server, server_hostname=host)
    for _ in range(10):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            # Each side's output is the other's input: the two BIOs are shared, so nothing needs copying.
        if done == 2:
            return
    raise AssertionError("the handshake did not finish")


def _certificates(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


@pytest.mark.parametrize("host", [HOST, "localhost", "127.0.0.1"])
def test_issued_certificate_verifies_for_its_host(host: str, tmp_path: Path) -> None:
    issued = issue(host, datetime.now(timezone.utc))
    handshake(issued.chain, issued.ca, host, tmp_path)


def test_another_host_or_another_ca_is_refused(tmp_path: Path) -> None:
    issued, other = issue(HOST, datetime.now(timezone.utc)), issue(HOST, datetime.now(timezone.utc))
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|doesn't match"):
        handshake(issued.chain, issued.ca, "evil.example.com", tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        handshake(issued.chain, other.ca, HOST, tmp_path)


def test_the_ca_can_sign_nothing_but_certificates_and_the_leaf_serves_only() -> None:
    issued = issue(HOST, NOW)
    (ca,) = _certificates(issued.ca)
    (leaf,) = _certificates(issued.chain)  # the key after it is not a certificate
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(ca=True, path_length=0)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [HOST]
    leaf.verify_directly_issued_by(ca)
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (NOW - timedelta(minutes=5), NOW + VALID_FOR)
    assert b"PRIVATE KEY" in issued.chain and b"PRIVATE KEY" not in issued.ca


class Recorder:
    """``publish``: records each bundle with the certificate Kopf's server would load at that moment; fails on demand."""

    def __init__(self, tls: list[SelfSignedTLS]) -> None:
        self.tls, self.calls, self.fail = tls, list[tuple[bytes, bytes]](), False

    def __call__(self, bundle: bytes) -> None:
        if self.fail:
            raise ConnectionError("API server unreachable")
        self.calls.append((bundle, self.tls[0].certfile.read_bytes()))


@pytest.fixture
def clock() -> list[datetime]:
    return [NOW]


@pytest.fixture
def tls_and_publish(tmp_path: Path, clock: list[datetime]) -> tuple[SelfSignedTLS, Recorder]:
    holder: list[SelfSignedTLS] = []
    publish = Recorder(holder)
    holder.append(SelfSignedTLS(HOST, tmp_path, publish, clock=lambda: clock[0]))
    return holder[0], publish


def test_files_are_written_at_once_and_readable_by_the_owner_only(tls_and_publish: tuple[SelfSignedTLS, Recorder]) -> None:
    tls, publish = tls_and_publish
    assert publish.calls == [], "nothing is published before the first check"
    assert tls.certfile.read_bytes() == tls.current.chain and tls.cafile.read_bytes() == tls.current.ca
    for path in (tls.certfile, tls.cafile):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tls.certfile.parent.iterdir()) == ["ca.crt", "tls.pem"], "no temporary file is left"


def test_the_ca_is_published_once_and_retried_until_it_is(tls_and_publish: tuple[SelfSignedTLS, Recorder]) -> None:
    tls, publish = tls_and_publish
    publish.fail = True
    with pytest.raises(ConnectionError):
        tls.check()
    publish.fail = False
    tls.check()
    tls.check()
    assert [bundle for bundle, _ in publish.calls] == [tls.current.ca]


def test_renewal_is_trusted_before_it_is_served(tls_and_publish: tuple[SelfSignedTLS, Recorder], clock: list[datetime]) -> None:
    tls, publish = tls_and_publish
    tls.check()
    first: Issued = tls.current
    clock[0] = NOW + RENEW_AFTER - timedelta(seconds=1)
    tls.check()
    assert tls.current is first, "not due yet"
    clock[0] = NOW + RENEW_AFTER
    publish.fail = True
    with pytest.raises(ConnectionError):
        tls.check()
    assert tls.current is first and tls.certfile.read_bytes() == first.chain, "a failed publish changes nothing"
    publish.fail = False
    tls.check()
    renewed = tls.current
    bundle, served_meanwhile = publish.calls[-1]
    assert renewed is not first and bundle == renewed.ca + first.ca
    assert served_meanwhile == first.chain, "the new CA was published while the old certificate was still served"
    assert tls.certfile.read_bytes() == renewed.chain and tls.bundle == bundle
    tls.check()
    assert len(publish.calls) == 2, "nothing more to publish until the next renewal"


# ------------------------------------------------------------------ several replicas, one caBundle
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CAS = [issue(HOST, T0 + timedelta(days=day)).ca for day in range(4)]  # oldest first


@pytest.mark.parametrize(
    ("case", "ours", "existing", "now", "keep", "expected"),
    [
        ("empty bundle", CAS[3], b"", T0, 8, [CAS[3]]),
        ("another replica's CA stays", CAS[3], CAS[0], T0, 8, [CAS[3], CAS[0]]),
        ("ours is not repeated", CAS[3], CAS[3] + CAS[0], T0, 8, [CAS[3], CAS[0]]),
        ("newest others first", CAS[3], CAS[0] + CAS[2] + CAS[1], T0, 8, [CAS[3], CAS[2], CAS[1], CAS[0]]),
        ("the oldest go beyond keep", CAS[3], CAS[0] + CAS[1] + CAS[2], T0, 3, [CAS[3], CAS[2], CAS[1]]),
        ("expired ones go", CAS[3], CAS[0] + CAS[2], T0 + VALID_FOR + timedelta(hours=1), 8, [CAS[3], CAS[2]]),
        ("garbage is dropped", CAS[3], b"not a certificate", T0, 8, [CAS[3]]),
        ("our current and previous CA stay together", CAS[3] + CAS[2], CAS[0], T0, 3, [CAS[3], CAS[2], CAS[0]]),
    ],
)
def test_merge_bundle_keeps_other_replicas_cas(
    case: str, ours: bytes, existing: bytes, now: datetime, keep: int, expected: list[bytes]
) -> None:
    assert merge_bundle(ours, existing, now, keep) == b"".join(expected), case


def test_bundle_contains_ignores_order() -> None:
    assert bundle_contains(CAS[1] + CAS[0], CAS[0]) and bundle_contains(CAS[1] + CAS[0], CAS[0] + CAS[1])
    assert not bundle_contains(CAS[1], CAS[0]) and not bundle_contains(b"", CAS[0])
