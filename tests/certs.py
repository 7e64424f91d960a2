"""Throw-away PKI for the TLS tests, made with ``cryptography`` (EC P-256, fast).

``make_pki(directory)`` writes, as PEM files:

- a root CA (``ca.pem``) and an intermediate CA that signs the server certificate;
- the server certificate for ``localhost`` and ``127.0.0.1`` (``server.pem`` holds the
  leaf followed by the intermediate, ``server.key`` its key);
- a client certificate from the root CA, one from another, unrelated CA
  (``other-ca.pem``), and an expired client certificate from the root CA.

``issue_server`` makes more server certificates (for the reload tests).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and on disk."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: str
    key_path: str

    @property
    def der(self) -> bytes:
        """The certificate in DER, as ``SSLSocket.getpeercert(True)`` returns it."""
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def subject(self) -> str:
        """The subject in RFC 4514 form (``CN=...,O=...``)."""
        return self.cert.subject.rfc4514_string()


@dataclass(frozen=True)
class PKI:
    """Everything ``make_pki`` wrote."""

    directory: str
    ca: Issued
    intermediate: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued
    expired_client: Issued


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztick-tw tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM block."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    """The certificates as concatenated PEM blocks."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _write(path: str, data: bytes, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        not_before, not_after = now - 30 * ONE_DAY, now - ONE_DAY
    else:
        not_before, not_after = now - ONE_DAY, now + 30 * ONE_DAY
    issuer_name = issuer[0].subject if issuer is not None else _name(subject)
    signing_key = issuer[1] if issuer is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _issue(
    directory: str,
    stem: str,
    subject: str,
    issuer: Issued | None,
    *,
    chain: tuple[x509.Certificate, ...] = (),
    **kinds: bool,
) -> Issued:
    key = _key()
    signer = (issuer.cert, issuer.key) if issuer is not None else None
    cert = _sign(subject, key, signer, **kinds)
    cert_path = _write(os.path.join(directory, f"{stem}.pem"), cert_pem(cert, *chain), 0o644)
    key_path = _write(os.path.join(directory, f"{stem}.key"), key_pem(key))
    return Issued(cert, key, cert_path, key_path)


def make_pki(directory: str) -> PKI:
    """Write a fresh set of CAs and certificates into ``directory`` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    ca = _issue(directory, "ca", "ztick-tw test root CA", None, ca=True)
    intermediate = _issue(directory, "intermediate", "ztick-tw test intermediate CA", ca, ca=True)
    server = issue_server(directory, "server", intermediate)
    client = _issue(directory, "client", "client-one", ca, client=True)
    other_ca = _issue(directory, "other-ca", "unrelated CA", None, ca=True)
    other_client = _issue(directory, "other-client", "client-of-other-ca", other_ca, client=True)
    expired_client = _issue(
        directory, "expired-client", "client-expired", ca, client=True, expired=True
    )
    return PKI(directory, ca, intermediate, server, client, other_ca, other_client, expired_client)


def issue_server(
    directory: str, stem: str, intermediate: Issued, subject: str = "localhost"
) -> Issued:
    """A server certificate for localhost/127.0.0.1 from ``intermediate``.

    ``<stem>.pem`` holds the leaf, then the intermediate (the chain a server sends).
    """
    return _issue(directory, stem, subject, intermediate, chain=(intermediate.cert,), server=True)
